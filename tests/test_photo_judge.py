"""The pixel judge on photo pairs: clean pairs pass, every injected defect is caught, and a
sub-edit pixels cannot verify is scored unknown and goes to a person."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from test_photo_editor import ALL_TYPES, PHOTOS, composed, edited
from pipeline.compose.regions import region_of
from pipeline.editors.defects import DEFECT_TYPES
from pipeline.judges.base import JudgeStage, make_judge
from pipeline.judges.pixel_photo import is_photo
from pipeline.routing import RouteStage, RoutingPolicy

MIX = ("recolor", "add_text", "move", "texture", "background")


def judged(samples, plausibility: bool = False):
    # The sub-edits here are made by hand on random segments (ones the composer may never pick),
    # to test the type checks; whether the result is plausible is tested in test_plausibility.py.
    judge = make_judge("pixel", plausibility=plausibility)
    for stage in (JudgeStage(judge), RouteStage(RoutingPolicy.for_judge(judge))):
        samples = stage(samples)
    return samples


@pytest.mark.parametrize("kind", ALL_TYPES)
def test_clean_photo_pairs_of_each_type_pass(kind):
    samples = [edited(composed(name, (kind,), seed=7), defect_rate=0.0)
               for name in ("astronaut", "coffee", "chelsea")]
    for s in judged(samples):
        assert is_photo(s.judge_view())
        assert s.scores["quality"] is None and s.scores["background"] == 1.0
        assert s.verdict != "reject", (s.source_key, s.scores["sub_edit_reasons"])
    accepted = [s for s in samples if s.verdict == "accept"]
    assert len(accepted) >= 2, [(s.source_key, s.scores["sub_edit_reasons"]) for s in samples]


def test_clean_complex_photo_pairs_are_accepted():
    samples = [edited(composed(PHOTOS[i % len(PHOTOS)], MIX, seed=8, index=i), defect_rate=0.0)
               for i in range(8)]
    verdicts = [s.verdict for s in judged(samples)]
    assert "reject" not in verdicts
    assert verdicts.count("accept") >= 6, [s.scores["sub_edit_reasons"] for s in samples]


@pytest.mark.parametrize("defect_type", DEFECT_TYPES)
def test_each_defect_type_is_caught_on_photos(defect_type):
    spoiled = []
    for index in range(12):
        base = composed(PHOTOS[index % len(PHOTOS)], MIX, seed=5, index=index)
        sample = edited(base, defect_rate=1.0, defect_types=(defect_type,))
        if sample.defects:
            spoiled.append(sample)
        if len(spoiled) == 3:
            break
    assert spoiled, f"no photo sample took a {defect_type} defect"
    for s in judged(spoiled, plausibility=True):  # the gate only ever lowers a score
        assert s.defects[0]["type"] == defect_type
        assert s.verdict in ("reject", "borderline"), (s.defects, s.scores)


def test_a_sub_edit_pixels_cannot_verify_is_unknown_and_goes_to_review():
    # Moving a patch of a flat area: the content looks the same wherever it is.
    sample = edited(composed("coffee", ("move",), seed=7), defect_rate=0.0)
    flat = copy.deepcopy(sample)
    flat.source = np.full_like(sample.source, 120)
    flat.source[::2] = 124  # a stripe texture the same shifted by any even dy
    flat.target = flat.source.copy()
    sub = flat.sub_edits[0]
    sub.params["dy"] = 0
    sub.params["dx"] = 2 * (sub.params["dx"] // 2) or 2
    flat.target[sub.mask] = np.clip(flat.target[sub.mask].astype(int) + 1, 0, 255).astype(np.uint8)
    (s,) = judged([flat])
    assert s.scores["sub_edits"] == [None], s.scores["sub_edit_reasons"]
    assert "unknown" in s.scores["sub_edit_reasons"][0]
    assert s.verdict == "borderline" and s.scores["sub_edit_pass"] == [False]


def _add_on_blurred_background(name: str, seed: int, keep_under_add: bool = False):
    """A clean pair: blur the background (every pixel, or all but an object the add overlaps),
    then add an object on it; and the image after the blur alone (what a skipped add leaves)."""
    base = composed(name, ("background", "add"), seed=seed)
    if [s.type for s in base.sub_edits] != ["background", "add"]:
        return None
    background, add = base.sub_edits
    background.params = {"domain": "photo", "op": "blur", "sigma": 4.0}
    if keep_under_add:
        under = [o for o in base.objects if np.count_nonzero(o.mask & add.mask) >= 80]
        if not under:
            return None
        background.object_ids = [under[0].id]
        background.mask = region_of(background, base.objects, base.source.shape, None, index=0)
    clean = edited(base, defect_rate=0.0)
    blurred_only = copy.deepcopy(base)
    blurred_only.sub_edits = [copy.deepcopy(background)]
    return clean, edited(blurred_only, defect_rate=0.0).target


def _cases(keep_under_add: bool = False):
    cases = [_add_on_blurred_background(name, seed, keep_under_add)
             for name in ("astronaut", "coffee", "chelsea") for seed in (3, 4)]
    cases = [c for c in cases if c is not None]
    assert len(cases) >= 2
    return cases


def test_a_skipped_or_partial_add_after_a_background_blur_is_not_accepted():
    # The blur changed the add's pixels too, so source against target shows a change there
    # whether the object was pasted or not: the judge re-makes the blurred background.
    clean, skipped, partial = [], [], []
    for pair, blurred in _cases():
        add = pair.sub_edits[1].mask
        # (almost) wholly on blurred pixels (a flat patch the blur leaves as it was)
        assert np.count_nonzero(add & pair.sub_edits[0].mask) >= 0.8 * np.count_nonzero(add)
        clean.append(pair)
        s = copy.deepcopy(pair)
        s.target = blurred.copy()
        skipped.append(s)
        ys, xs = np.nonzero(add)  # the object pasted in part: 60% of it left blurred background
        left = xs <= np.quantile(xs, 0.6)
        s = copy.deepcopy(pair)
        s.target[ys[left], xs[left]] = blurred[ys[left], xs[left]]
        partial.append(s)
    for s in judged(clean):
        assert s.verdict == "accept", s.scores["sub_edit_reasons"]
    for s in judged(skipped) + judged(partial):
        assert s.verdict != "accept", s.scores["sub_edit_reasons"]
        assert s.scores["sub_edits"][1] is not None and s.scores["sub_edits"][1] < 0.92


def test_a_partial_add_over_pixels_only_it_changed_is_caught():
    # The add overlaps an object the background keeps: there only the add changed pixels, so
    # a clean target differs from the source on every one of them. Undo 60% of them, as the
    # injector's partial does, and their coverage shows it.
    cases = _cases(keep_under_add=True)
    for pair, _ in cases:
        background, add = pair.sub_edits
        only = add.mask & ~background.mask
        assert np.count_nonzero(only) >= 16
        assert judged([copy.deepcopy(pair)])[0].verdict == "accept"
        ys, xs = np.nonzero(only)
        left = xs <= np.quantile(xs, 0.6)
        s = copy.deepcopy(pair)
        s.target[ys[left], xs[left]] = s.source[ys[left], xs[left]]
        (s,) = judged([s])
        assert s.verdict != "accept", s.scores["sub_edit_reasons"]
        assert "only it changed" in s.scores["sub_edit_reasons"][1]
