"""The pixel judge on pairs whose truth is known by construction (see judge_pairs.py)."""

from __future__ import annotations

import numpy as np
import pytest

from judge_pairs import build_pair, half_done, spill
from pipeline.judges.base import JudgeError, JudgeStage, make_judge
from pipeline.judges.pixel import PixelJudge
from pipeline.record import EDIT_TYPES

PASS = 0.85  # below the default routing bar (0.92) for "sub-edit carried out"


def single(edit_type: str, seed: int, **kw):
    """A pair whose instruction holds `edit_type` (plus a recolor, so regions overlap sometimes)."""
    for s in range(seed, seed + 40):
        sample, steps = build_pair(s, [edit_type, "recolor"], **kw)
        if sample.sub_edits and sample.sub_edits[0].type == edit_type:
            return sample
    raise RuntimeError(f"no scene could host a {edit_type} edit")


@pytest.fixture(scope="module")
def judge() -> PixelJudge:
    return make_judge("pixel")


def test_registered_under_its_name(judge):
    assert isinstance(judge, PixelJudge)
    assert judge.name == "pixel" and judge.version


@pytest.mark.parametrize("edit_type", EDIT_TYPES)
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_clean_edits_score_high(judge, edit_type, seed):
    sample = single(edit_type, seed * 100)
    scores = judge.score(sample.judge_view())
    assert len(scores["sub_edits"]) == len(scores["sub_edit_reasons"]) == len(sample.sub_edits)
    assert all(0.0 <= s <= 1.0 for s in scores["sub_edits"])
    assert scores["sub_edits"][0] >= 0.9, scores["sub_edit_reasons"]
    assert scores["background"] == 1.0 and scores["background_changed"] == 0.0
    assert scores["overall"] == min(scores["sub_edits"] + [scores["background"], scores["quality"]])
    assert scores["sub_edit_reasons"][0].startswith(f"{edit_type}: ")


@pytest.mark.parametrize("edit_type", EDIT_TYPES)
def test_a_skipped_sub_edit_scores_low(judge, edit_type):
    clean = single(edit_type, 500)
    seed = clean.seed
    types = [e.type for e in clean.sub_edits]
    skipped, _ = build_pair(seed, types, skip=0)
    scores = judge.score(skipped.judge_view())
    assert scores["sub_edits"][0] < 0.5, scores["sub_edit_reasons"][0]
    assert scores["overall"] < 0.5


@pytest.mark.parametrize("edit_type", EDIT_TYPES)
def test_a_half_done_sub_edit_fails(judge, edit_type):
    sample = single(edit_type, 700)
    half_done(sample, 0)
    scores = judge.score(sample.judge_view())
    assert scores["sub_edits"][0] < PASS, scores["sub_edit_reasons"][0]


def test_a_wrong_colour_scores_zero(judge):
    sample = single("recolor", 900)
    edit = sample.sub_edits[0]
    # Ask for a colour the target does not show: the judge must not be satisfied.
    edit.params = dict(edit.params, to_color="cyan" if edit.params["to_color"] != "cyan" else "red")
    edit.params["to_rgb"] = None
    assert judge.score(sample.judge_view())["sub_edits"][0] == 0.0


def test_a_change_outside_the_regions_fails_the_background(judge):
    sample = single("move", 40)
    assert judge.score(sample.judge_view())["background"] == 1.0
    spill(sample, size=10)  # 100 px, 0.15 % of a 256 px frame
    scores = judge.score(sample.judge_view())
    assert scores["background"] < 0.5
    assert scores["background_changed"] > 0 and scores["background_psnr"] is not None
    assert scores["overall"] < 0.5


def test_noise_inside_a_region_lowers_quality(judge):
    sample = single("add", 60)
    rng = np.random.default_rng(0)
    mask = sample.sub_edits[0].mask
    noisy = sample.target.astype(np.int16)
    noisy[mask] += rng.integers(-40, 41, size=(int(mask.sum()), 3))
    sample.target = np.clip(noisy, 0, 255).astype(np.uint8)
    clean_quality = judge.score(single("add", 60).judge_view())["quality"]
    scores = judge.score(sample.judge_view())
    assert clean_quality == 1.0
    assert scores["quality"] < 0.8 and scores["overall"] < PASS


def test_unscorable_views_become_judge_errors_without_stopping_the_batch(judge):
    good = single("remove", 10)
    no_mask = single("remove", 20)
    no_mask.sub_edits[0].mask = None
    wrong_size = single("recolor", 30)
    wrong_size.target = wrong_size.target[:-1]
    results = judge.score_batch([no_mask.judge_view(), good.judge_view(), wrong_size.judge_view()])
    assert isinstance(results[0], JudgeError) and "no region mask" in str(results[0])
    assert isinstance(results[1], dict) and results[1]["overall"] > 0.9
    assert isinstance(results[2], JudgeError)


def test_judge_stage_marks_judge_errors(judge):
    bad = single("remove", 20)
    bad.sub_edits[0].mask = None
    good = single("add", 30)
    JudgeStage(judge)([bad, good])
    assert bad.verdict == "judge_error" and bad.error and bad.scores == {}
    assert good.verdict is None and good.scores["overall"] > 0.9
    assert good.provenance["judge"] == f"pixel@{judge.version}"


def test_options_are_validated():
    with pytest.raises(ValueError, match="tolerance"):
        PixelJudge(color_tolerance=-1)
    with pytest.raises(ValueError, match="budget"):
        PixelJudge(background_budget=0)
    assert make_judge("pixel", background_budget=0.01).background_budget == 0.01


def test_an_object_drowned_in_noise_is_not_removed(judge):
    clean = single("remove", 700)
    assert judge.score(clean.judge_view())["sub_edits"][0] >= 0.9
    noisy = clean.judge_view()
    region = noisy.sub_edits[0].mask
    target = noisy.target.copy()
    target[region] = np.random.default_rng(0).integers(0, 256, (int(region.sum()), 3), dtype=np.uint8)
    noisy.target = target
    scores = judge.score(noisy)
    assert scores["sub_edits"][0] < 0.2, scores["sub_edit_reasons"][0]
