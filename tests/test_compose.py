"""The instruction composer: unambiguous references, non-conflicting sub-edits, a reversible grammar."""

from collections import Counter

import numpy as np
import pytest

from pipeline.compose.procedural import (
    Composer,
    describe,
    join_instruction,
    refer,
    resolve_reference,
    split_instruction,
)
from pipeline.editors.procedural import apply_sub_edit
from pipeline.record import EDIT_TYPES, EditSample, SubEdit
from pipeline.sources.scene import TEXT_KIND, Background, Scene, SceneObject, fits
from pipeline.sources.procedural import ProceduralSource

SEEDS = range(120)


@pytest.fixture(scope="module")
def composed():
    source = ProceduralSource(resolution=256)
    samples = [source.make(7, i) for i in SEEDS]
    Composer()(samples)
    return samples


def _scene(*objects, width=256, height=256):
    return Scene(width, height, Background("flat", ["cream"]), list(objects))


def _obj(i, kind, color, size, cx, cy):
    return SceneObject(id=i, kind=kind, color=color, size=size, cx=cx, cy=cy, depth=i)


def test_bad_edit_counts_are_refused():
    for low, high in ((0, 3), (3, 2), (2, 9)):
        with pytest.raises(ValueError):
            Composer(min_edits=low, max_edits=high)


def test_every_sample_gets_an_instruction_with_its_sub_edits(composed):
    for sample in composed:
        assert not sample.failed, sample.error
        assert 2 <= len(sample.sub_edits) <= 5
        text = sample.instruction
        assert text[0].isupper() and text.endswith(".")
        for sub in sample.sub_edits:
            assert sub.text and sub.text[1:] in text  # the first one is capitalised
        assert split_instruction(text) == [s.text for s in sample.sub_edits]


def test_split_instruction_round_trips_many_seeds():
    texts = ["remove the red cup", "make the small blue star large",
             "change the background to sand on top and mint at the bottom",
             "swap the cup and the tree", "add the word SALE in black on the sign",
             "move the ring up and to the left", "give the square stripes", "erase the car"]
    for seed in range(300):
        rng = np.random.default_rng(seed)
        chosen = [texts[k] for k in rng.permutation(len(texts))[: 1 + seed % len(texts)]]
        joined = join_instruction(chosen, rng)
        assert split_instruction(joined) == chosen, joined


def test_split_instruction_reads_the_connectives():
    assert split_instruction(
        "First, remove the red cup, then make the blue star large. After that, swap the cup "
        "and the tree, and finally add a small green tree on the left."
    ) == ["remove the red cup", "make the blue star large", "swap the cup and the tree",
          "add a small green tree on the left"]
    assert split_instruction("Erase the car.") == ["erase the car"]


def test_join_refuses_texts_it_could_not_split_back():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError):
        join_instruction(["remove the cup, quickly", "erase the car"], rng)
    with pytest.raises(ValueError):
        join_instruction([], rng)


def test_composer_is_deterministic():
    source = ProceduralSource(resolution=256)
    a, b = source.make(3, 11), source.make(3, 11)
    Composer()([a])
    Composer()([b])
    assert a.instruction == b.instruction
    assert [s.to_json() for s in a.sub_edits] == [s.to_json() for s in b.sub_edits]
    c = source.make(3, 12)
    Composer()([c])
    assert c.instruction != a.instruction


def _refs(sub: SubEdit):
    """(reference, object id it must denote) pairs of a sub-edit."""
    if sub.type == "swap":
        return list(zip(sub.params["refs"], sub.object_ids))
    if sub.type == "add_text":
        return [(sub.params["ref"], sub.object_ids[1])] if sub.params.get("on_object") is not None else []
    if "ref" in sub.params:
        return [(sub.params["ref"], sub.object_ids[0])]
    return []


def test_each_reference_names_exactly_its_object_when_it_applies(composed):
    checked = 0
    for sample in composed:
        state = Scene.from_dict(sample.private["scene"])
        for sub in sample.sub_edits:
            for ref, object_id in _refs(sub):
                assert resolve_reference(ref, state) == [object_id], (sample.instruction, ref)
                assert describe(ref) in sub.text
                checked += 1
            state = apply_sub_edit(state, sub)
    assert checked > 150


def test_sub_edits_never_contradict_and_placements_fit(composed):
    for sample in composed:
        state = Scene.from_dict(sample.private["scene"])
        touched: list[int] = []
        backgrounds = 0
        for sub in sample.sub_edits:
            touched.extend(sub.object_ids)
            backgrounds += sub.type == "background"
            after = apply_sub_edit(state, sub)
            if sub.type in ("add", "move", "resize", "swap", "replace"):
                for object_id in sub.object_ids:
                    assert fits(after, after.get(object_id)), sub.text
            if sub.type == "add_text":
                ignore = tuple(sub.object_ids[1:])
                assert fits(after, after.get(sub.object_ids[0]), ignore=ignore), sub.text
            state = after
        assert len(touched) == len(set(touched)), sample.instruction
        assert backgrounds <= 1


def test_all_edit_types_are_drawn_and_reasonably_balanced():
    source = ProceduralSource(resolution=256)
    samples = [source.make(1, i) for i in range(300)]
    Composer()(samples)
    counts = Counter(s.type for sample in samples for s in sample.sub_edits)
    total = sum(counts.values())
    assert set(counts) == set(EDIT_TYPES)
    for edit_type in EDIT_TYPES:
        assert counts[edit_type] >= 0.05 * total, counts  # uniform would be 0.10


def test_up_to_eight_sub_edits():
    source = ProceduralSource(resolution=256)
    samples = [source.make(2, i) for i in range(40)]
    Composer(min_edits=8, max_edits=8)(samples)
    placed = [s for s in samples if not s.failed]
    assert len(placed) >= 30
    for sample in placed:
        assert len(sample.sub_edits) == 8
        assert split_instruction(sample.instruction) == [s.text for s in sample.sub_edits]
    for sample in samples:
        if sample.failed:
            assert sample.error_stage == "compose" and "could only place" in sample.error


def test_a_sample_without_scene_fails_alone():
    source = ProceduralSource(resolution=128)
    good, bad = source.make(0, 0), EditSample(id="x", index=1, seed=0)
    Composer()([bad, good])
    assert bad.failed and bad.error_stage == "compose"
    assert not good.failed and good.sub_edits


# ---- referring expressions -----------------------------------------------------------------

def test_reference_uses_the_fewest_attributes():
    scene = _scene(_obj(0, "cup", "red", "small", 0.2, 0.5), _obj(1, "star", "blue", "large", 0.8, 0.5))
    rng = np.random.default_rng(0)
    assert refer(scene.get(0), scene, rng) == {"kind": "cup"}
    scene.objects.append(_obj(2, "cup", "green", "small", 0.5, 0.2))
    ref = refer(scene.get(0), scene, rng)
    assert len(ref) == 2 and resolve_reference(ref, scene) == [0]


def test_position_and_relation_references():
    # Two identical cups: only where they are tells them apart.
    scene = _scene(_obj(0, "cup", "red", "small", 0.15, 0.5), _obj(1, "cup", "red", "small", 0.85, 0.5),
                   _obj(2, "ring", "blue", "medium", 0.5, 0.15))
    assert resolve_reference({"kind": "cup", "position": "left"}, scene) == [0]
    assert resolve_reference({"kind": "cup", "position": "right"}, scene) == [1]
    assert resolve_reference({"kind": "cup"}, scene) == [0, 1]
    ref = refer(scene.get(0), scene, np.random.default_rng(0))
    assert ref["position"] in ("left", "bottom left", "top left") or "relation" in ref
    assert resolve_reference(ref, scene) == [0]
    assert describe({"kind": "cup", "color": "red", "size": "small", "position": "left"}) == \
        "the small red cup on the left"
    relational = {"kind": "cup", "relation": {"type": "left of", "landmark": {"kind": "ring"}}}
    assert resolve_reference(relational, scene) == [0]
    assert describe(relational) == "the cup to the left of the ring"
    # Near the middle on both axes: positions would be fragile, the landmark is clear.
    scene = _scene(_obj(0, "cup", "red", "small", 0.42, 0.45), _obj(1, "cup", "red", "small", 0.58, 0.55),
                   _obj(2, "house", "blue", "small", 0.5, 0.5))
    ref = refer(scene.get(0), scene, np.random.default_rng(0))
    assert ref is not None and "relation" in ref
    assert resolve_reference(ref, scene) == [0]


def test_objects_that_cannot_be_told_apart_get_no_reference():
    scene = _scene(_obj(0, "cup", "red", "small", 0.48, 0.5), _obj(1, "cup", "red", "small", 0.52, 0.5))
    assert refer(scene.get(0), scene, np.random.default_rng(0)) is None


def test_references_follow_recolours():
    scene = _scene(_obj(0, "cup", "red", "small", 0.2, 0.5), _obj(1, "cup", "blue", "small", 0.8, 0.5))
    recolor = SubEdit("recolor", "make the red cup blue", object_ids=[0],
                      params={"kind": "cup", "from_color": "red", "to_color": "blue"})
    after = apply_sub_edit(scene, recolor)
    assert resolve_reference({"kind": "cup", "color": "red"}, after) == []
    assert resolve_reference({"kind": "cup", "color": "blue"}, after) == [0, 1]
    for seed in range(10):
        ref = refer(after.get(1), after, np.random.default_rng(seed))
        assert resolve_reference(ref, after) == [1]
        assert ref.get("color") in (None, "blue")


def test_text_objects_are_never_targets(composed):
    for sample in composed:
        state = Scene.from_dict(sample.private["scene"])
        for sub in sample.sub_edits:
            if sub.type not in ("add", "add_text", "background"):
                assert all(state.get(i).kind != TEXT_KIND for i in sub.object_ids)
            state = apply_sub_edit(state, sub)
