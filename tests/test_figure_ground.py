"""Figure and ground on real photos, and what the photo composer does with them: a background
edit never touches the main subject, parts of the subject are never named, words go on flat
areas, and a photo without a clear subject gets no background edit."""

from __future__ import annotations

import numpy as np
import pytest

from photo_fixtures import photo_array
from pipeline.compose.photo import FLAT_TEXT, InventoryComposer, _grey_std, role
from pipeline.compose.referring import resolve
from pipeline.compose.regions import dilate
from pipeline.editors.photo import PhotoEditor
from pipeline.grounders.classical import IN_SUBJECT, ClassicalGrounder
from pipeline.grounders.figure_ground import subject_mask
from pipeline.record import EditSample


@pytest.fixture(scope="module")
def subjects() -> dict[str, np.ndarray | None]:
    return {name: subject_mask(photo_array(name))
            for name in ("astronaut", "coffee", "chelsea", "hubble_deep_field")}


def test_a_clear_subject_is_found_and_a_frame_filling_one_is_not(subjects):
    astronaut, coffee = subjects["astronaut"], subjects["coffee"]
    assert astronaut is not None and coffee is not None
    # her face (rows 60-180, columns 180-260 of the 512 x 512 photo) and the cup's rim
    assert astronaut[60:180, 180:260].mean() > 0.95
    assert coffee[100:140, 180:420].mean() > 0.9
    # the top-left corner is the flag / the table: ground
    assert not astronaut[:40, :40].any() and not coffee[:20, :20].any()
    # the cat fills its frame and the deep field is all stars: no subject a person agrees on
    assert subjects["chelsea"] is None and subjects["hubble_deep_field"] is None


def grounded(name: str, seed: int) -> EditSample:
    sample = EditSample(id=f"{name}-{seed}", index=seed, seed=seed, source=photo_array(name),
                        source_key=name)
    ClassicalGrounder()([sample])
    assert not sample.failed, sample.error
    return sample


@pytest.mark.parametrize("name", ["astronaut", "coffee"])
def test_a_background_edit_keeps_exactly_the_subject_untouched(name):
    for seed in range(3):
        sample = grounded(name, seed)
        subject = next(o for o in sample.objects if role(o) == "subject")
        for obj in sample.objects:  # parts of the subject are never nameable
            if role(obj) == "object":
                assert (obj.mask & subject.mask).sum() <= IN_SUBJECT * obj.mask.sum()
        InventoryComposer(1, 2, ("background", "add_text"))([sample])
        assert not sample.failed, sample.error
        background = [s for s in sample.sub_edits if s.type == "background"]
        assert background and sample.sub_edits[0] is background[0]  # first, always
        assert background[0].object_ids == [subject.id]
        PhotoEditor(defect_rate=0.0)([sample])
        assert not sample.failed, sample.error
        assert np.array_equal(sample.target[subject.mask], sample.source[subject.mask])
        changed = (sample.target != sample.source).any(axis=2)
        assert changed[~dilate(subject.mask, 2)].mean() > 0.3  # and the ground did change
        for sub in sample.sub_edits:
            if sub.type == "add_text":
                assert not (sub.mask & subject.mask).any()
                assert _grey_std(sample.source, sub.mask) <= FLAT_TEXT * 1.5


def test_without_a_clear_subject_there_is_no_background_edit_and_phrases_rule_out_everything():
    for seed in range(4):
        sample = grounded("chelsea", seed)
        assert all(role(o) != "subject" for o in sample.objects)
        InventoryComposer(1, 5)([sample])
        if sample.failed:  # too few nameable things on a cat: said, not faked
            assert "could only place" in sample.error
            continue
        assert all(s.type != "background" for s in sample.sub_edits)
        for sub in sample.sub_edits:
            ref = sub.params.get("ref")
            if ref is not None:  # unique among the named objects AND the distractors
                assert resolve(ref, sample.objects) == sub.object_ids[:1]


def test_a_figure_whose_outline_is_no_edge_is_not_a_subject():
    from pipeline.grounders.figure_ground import BOUNDARY_SHARE, boundary_contrast

    cat = photo_array("chelsea")
    h, w = cat.shape[:2]
    half = np.zeros((h, w), bool)
    half[:, : w // 2] = True  # a cut through the fur, where no edge is
    assert boundary_contrast(cat, half) < BOUNDARY_SHARE
    disc = np.zeros((h, w), bool)
    yy, xx = np.mgrid[:h, :w]
    disc[(yy - h / 2) ** 2 + (xx - w / 2) ** 2 < (h / 4) ** 2] = True
    pasted = cat.copy()
    pasted[disc] = (40, 90, 200)  # a real edge all round
    assert boundary_contrast(pasted, disc) > 0.95
