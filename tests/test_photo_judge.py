"""The pixel judge on photo pairs: clean pairs pass, every injected defect is caught, and a
sub-edit pixels cannot verify is scored unknown and goes to a person."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from test_photo_editor import ALL_TYPES, PHOTOS, composed, edited
from pipeline.editors.defects import DEFECT_TYPES
from pipeline.judges.base import JudgeStage, make_judge
from pipeline.judges.pixel_photo import is_photo
from pipeline.routing import RouteStage, RoutingPolicy

MIX = ("recolor", "add_text", "move", "texture", "background")


def judged(samples):
    judge = make_judge("pixel")
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
    for s in judged(spoiled):
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
