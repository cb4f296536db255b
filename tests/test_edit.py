"""The procedural editor: exact targets, exact regions, and fault injection that shows where it should."""

import copy
import json

import numpy as np
import pytest

from pipeline import __version__
from pipeline.compose.procedural import Composer
from pipeline.editors.defects import (
    ARTIFACT_MIN_AREA,
    DEFECT_TYPES,
    SUB_EDIT_DEFECTS,
    EditTrace,
    changed_mask,
    inject_defect,
    measurable,
)
from pipeline.editors.procedural import ProceduralEditor, apply_chain, apply_sub_edit
from pipeline.record import EditSample, SubEdit, dumps
from pipeline.sources.scene import Background, Scene, SceneObject, bbox, render
from pipeline.sources.procedural import ProceduralSource

RESOLUTION = 256


def composed(seed: int, index: int, resolution: int = RESOLUTION) -> EditSample:
    sample = ProceduralSource(resolution=resolution).make(seed, index)
    Composer()([sample])
    assert not sample.failed, sample.error
    return sample


def edited(sample: EditSample, **options) -> EditSample:
    sample = copy.deepcopy(sample)
    ProceduralEditor(**options)([sample])
    assert not sample.failed, sample.error
    return sample


@pytest.fixture(scope="module")
def clean_samples():
    return [edited(composed(5, i), defect_rate=0.0) for i in range(40)]


def test_bad_options_are_refused():
    with pytest.raises(ValueError):
        ProceduralEditor(defect_rate=1.5)
    with pytest.raises(ValueError):
        ProceduralEditor(defect_types=("smudge",))
    with pytest.raises(ValueError):
        ProceduralEditor(defect_types=())


def test_clean_target_is_the_exact_render_of_the_edited_scene(clean_samples):
    for sample in clean_samples:
        scene = apply_chain(Scene.from_dict(sample.private["scene"]), sample.sub_edits)
        assert np.array_equal(sample.target, render(scene)[0])
        assert sample.private["target_scene"] == scene.to_dict()
        assert sample.defects == []
        assert sample.provenance["editor"] == f"procedural@{__version__}"


def test_masks_cover_exactly_the_changed_pixels(clean_samples):
    for sample in clean_samples:
        changed = (sample.source != sample.target).any(axis=2)
        union = np.logical_or.reduce([s.mask for s in sample.sub_edits])
        assert not (changed & ~union).any()  # every changed pixel is inside some region
        assert np.array_equal(sample.background_mask, ~union)
        assert np.array_equal(sample.source[sample.background_mask],
                              sample.target[sample.background_mask])  # bit-identical
        state = Scene.from_dict(sample.private["scene"])
        before = render(state)
        for sub in sample.sub_edits:
            state = apply_sub_edit(state, sub)
            after = render(state)
            step = (before[0] != after[0]).any(axis=2)
            assert sub.mask.dtype == bool and sub.mask.shape == changed.shape
            assert sub.box == bbox(sub.mask)
            assert (sub.mask & step).any(), sub.text  # the sub-edit changes something
            assert not (step & ~sub.mask).any()  # and nothing outside its own region
            assert (sub.mask & changed).any(), sub.text  # visible in the final target too
            before = after


def test_regions_follow_the_objects_touched():
    scene = Scene(64, 64, Background("flat", ["cream"]), [
        SceneObject(0, "square", "red", "small", 0.3, 0.3, 0),
        SceneObject(1, "circle", "blue", "small", 0.7, 0.7, 1)])
    sample = EditSample(id="t", index=0, seed=0, private={"scene": scene.to_dict()}, sub_edits=[
        SubEdit("recolor", "make the square green", object_ids=[0],
                params={"kind": "square", "from_color": "red", "to_color": "green"}),
        SubEdit("move", "move the circle to the left", object_ids=[1],
                params={"kind": "circle", "from_cx": 0.7, "from_cy": 0.7, "to_cx": 0.5,
                        "to_cy": 0.7}),
    ])
    ProceduralEditor(defect_rate=0.0)([sample])
    assert not sample.failed, sample.error
    _, ids = render(scene)
    recolor, move = sample.sub_edits
    assert np.array_equal(recolor.mask, ids == 1)
    moved = render(apply_chain(scene, sample.sub_edits))[1]
    assert np.array_equal(move.mask, (ids == 2) | (moved == 2))
    assert not (recolor.mask & move.mask).any()


def test_an_edit_that_changes_nothing_fails_that_sample_alone():
    source = ProceduralSource(resolution=128)
    good = source.make(0, 0)
    Composer()([good])
    scene = Scene(64, 64, Background("flat", ["cream"]),
                  [SceneObject(0, "square", "red", "small", 0.5, 0.5, 0)])
    bad = EditSample(id="b", index=1, seed=0, private={"scene": scene.to_dict()}, sub_edits=[
        SubEdit("resize", "make the square small", object_ids=[0],
                params={"kind": "square", "from_size": "small", "to_size": "small"})])
    missing = EditSample(id="m", index=2, seed=0, private={"scene": scene.to_dict()})
    ProceduralEditor()([bad, missing, good])
    assert bad.failed and "changes no visible pixel" in bad.error
    assert missing.failed and missing.error_stage == "edit"
    assert not good.failed and good.target is not None


def test_editor_is_deterministic_and_defect_rate_zero_is_exact():
    base = composed(9, 4)
    a, b = edited(base, defect_rate=1.0), edited(base, defect_rate=1.0)
    assert np.array_equal(a.target, b.target) and a.defects == b.defects
    clean = edited(base, defect_rate=0.0)
    assert clean.defects == []
    assert np.array_equal(clean.target, render(Scene.from_dict(clean.private["target_scene"]))[0])


def test_defect_rate_is_respected_roughly():
    samples = [edited(composed(4, i, resolution=128), defect_rate=0.25) for i in range(120)]
    spoiled = sum(bool(s.defects) for s in samples)
    assert 12 <= spoiled <= 50, spoiled
    clean = [edited(composed(4, i, resolution=128), defect_rate=0.0) for i in range(10)]
    assert all(not s.defects for s in clean)


def _forced(defect_type: str, wanted: int = 3) -> list[tuple[EditSample, EditSample]]:
    """(clean, spoiled) pairs where `defect_type` was injected."""
    pairs = []
    for index in range(60):
        base = composed(11, index)
        spoiled = edited(base, defect_rate=1.0, defect_types=(defect_type,))
        if spoiled.defects:
            pairs.append((edited(base, defect_rate=0.0), spoiled))
            if len(pairs) == wanted:
                break
    assert pairs, f"no sample took a {defect_type} defect"
    return pairs


@pytest.mark.parametrize("defect_type", DEFECT_TYPES)
def test_every_defect_type_can_be_forced_and_shows_where_it_should(defect_type):
    for clean, spoiled in _forced(defect_type):
        (record,) = spoiled.defects
        assert record["type"] == defect_type and set(record) == {"type", "sub_edit", "detail"}
        json.loads(dumps(spoiled.defects))
        # The record keeps the INTENDED edit: same sub-edits, regions and background mask.
        assert [s.to_json() for s in spoiled.sub_edits] == [s.to_json() for s in clean.sub_edits]
        assert all(np.array_equal(a.mask, b.mask) for a, b in zip(spoiled.sub_edits, clean.sub_edits))
        assert np.array_equal(spoiled.background_mask, clean.background_mask)
        assert "defect" not in dumps(spoiled.metadata()).decode()
        assert spoiled.private["target_scene"] == clean.private["target_scene"]

        diff = changed_mask(clean.target, spoiled.target)
        union = ~clean.background_mask
        if defect_type in SUB_EDIT_DEFECTS:
            i = record["sub_edit"]
            assert isinstance(i, int) and 0 <= i < len(clean.sub_edits)
            assert measurable(clean.target, spoiled.target, clean.sub_edits[i].mask)
            if defect_type in ("skip", "partial", "wrong_color"):
                assert not (diff & ~union).any()  # nothing outside the regions moved
        else:
            assert record["sub_edit"] is None
            assert measurable(clean.target, spoiled.target, clean.background_mask)
            assert np.array_equal(clean.target[union], spoiled.target[union])
        _check_magnitude(record, clean, spoiled)


def _check_magnitude(record, clean, spoiled):
    detail = record["detail"]
    kind = record["type"]
    if kind == "partial":
        assert 0.3 <= detail["applied_fraction"] <= 0.6
        # Part of the region still shows the change, part shows the source.
        i = record["sub_edit"]
        region = clean.sub_edits[i].mask
        still = (spoiled.target != clean.source).any(axis=2) & region
        assert still.any()
    elif kind == "wrong_color":
        assert detail["distance"] >= 100
    elif kind == "wrong_object":
        assert detail["actual_object"] != detail["intended_object"]
    elif kind == "background_shift":
        shift = np.abs(detail["shift"])
        assert shift.max() >= 12 and shift.max() <= 30
        outside = clean.background_mask
        delta = spoiled.target[outside].astype(int) - clean.target[outside].astype(int)
        unclipped = (spoiled.target[outside] > 0) & (spoiled.target[outside] < 255)
        assert np.all((delta == np.array(detail["shift"])) | ~unclipped)
    elif kind == "background_blur":
        assert 1.5 <= detail["radius"] <= 3.0
    elif kind == "background_noise":
        assert 6.0 <= detail["sigma"] <= 15.0
    elif kind == "artifact":
        h, w = clean.background_mask.shape
        assert 1 <= len(detail["marks"]) <= 3
        assert all(m["pixels"] >= ARTIFACT_MIN_AREA * h * w for m in detail["marks"])


def _flat_trace() -> EditTrace:
    """A flat background whose only object is the edited one: outside the region is uniform."""
    scene = Scene(64, 64, Background("flat", ["cream"]),
                  [SceneObject(0, "square", "red", "small", 0.5, 0.5, 0)])
    sub = SubEdit("recolor", "make the square blue", object_ids=[0],
                  params={"kind": "square", "from_color": "red", "to_color": "blue"})
    after = apply_sub_edit(scene, sub)
    (img0, ids0), (img1, ids1) = render(scene), render(after)
    region = (ids0 == 1) | (ids1 == 1)
    return EditTrace(states=[scene, after], images=[img0, img1], sub_edits=[sub],
                     regions=[region], background_mask=~region,
                     replay=lambda subs, start: render(apply_chain(scene, subs))[0])


def test_an_unmeasurable_defect_gives_way_to_another_type():
    trace = _flat_trace()
    rng = np.random.default_rng(0)
    assert inject_defect(rng, trace, ("background_blur",)) is None  # a flat field stays flat
    spoiled, record = inject_defect(rng, trace, ("background_blur", "background_shift"))
    assert record["type"] == "background_shift"
    assert measurable(trace.target, spoiled, trace.background_mask)
    # Nothing else to pick: the wrong object cannot be had either.
    assert inject_defect(rng, trace, ("wrong_object",)) is None


def test_defect_types_are_drawn_across_the_board():
    seen = set()
    for index in range(40):
        sample = edited(composed(13, index, resolution=128), defect_rate=1.0)
        seen.update(d["type"] for d in sample.defects)
    assert len(seen) >= 6, seen
