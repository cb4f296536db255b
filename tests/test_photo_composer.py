"""The inventory composer on real photos: regions, distinct objects, texts, donors, bounds."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from pipeline.compose.base import COMPOSERS
from pipeline.compose.photo import OVERLAP_TOLERANCE, InventoryComposer
from pipeline.compose.procedural import split_instruction
from pipeline.compose.referring import resolve
from pipeline.compose.regions import region_of
from pipeline.grounders.classical import ClassicalGrounder
from pipeline.record import EDIT_TYPES, MAX_SUB_EDITS, EditSample, InventoryObject
from pipeline.sources.scene import bbox
from tests.test_grounders import PHOTOS, load_photo

SEEDS = range(4)


def names_everything(sample: EditSample) -> None:
    """The classical inventory as a grounder that names real things would give it: its 12 best
    regions, every one nameable, no subject (the drafting contract is tested over all types)."""
    objects = [o for o in sample.objects if o.attributes["role"] != "subject"][:12]
    for obj in objects:
        obj.attributes.pop("role")
    sample.objects = objects


@pytest.fixture(scope="module")
def grounded() -> list[EditSample]:
    batch = [EditSample(id=f"p{i}", index=i, seed=0, source=load_photo(name), source_key=name)
             for i, name in enumerate(PHOTOS)]
    ClassicalGrounder()(batch)
    assert not any(s.failed for s in batch)
    for sample in batch:
        names_everything(sample)
    return batch


def fresh(grounded: list[EditSample], seed: int) -> list[EditSample]:
    return [EditSample(id=s.id, index=s.index, seed=seed, source=s.source,
                       source_key=s.source_key, objects=s.objects) for s in grounded]


@pytest.fixture(scope="module")
def composed(grounded) -> list[EditSample]:
    out = []
    for seed in SEEDS:
        out += InventoryComposer(edit_types=EDIT_TYPES)(fresh(grounded, seed))
    return out


def test_registered_and_bounds_checked():
    assert isinstance(COMPOSERS.make("inventory", min_edits=3), InventoryComposer)
    InventoryComposer(1, MAX_SUB_EDITS)
    for low, high in ((0, 3), (3, 2), (1, MAX_SUB_EDITS + 1)):
        with pytest.raises(ValueError, match="min edits"):
            InventoryComposer(low, high)


def test_sub_edits_follow_the_contract(composed):
    assert sum(s.failed for s in composed) <= len(composed) // 10
    for sample in composed:
        if sample.failed:
            continue
        shape = sample.source.shape
        donors = sample.private.get("donors", {})
        assert 2 <= len(sample.sub_edits) <= 5
        assert split_instruction(sample.instruction) == [s.text for s in sample.sub_edits]
        acted_on: list[int] = []
        for i, sub in enumerate(sample.sub_edits):
            assert sub.params["domain"] == "photo"
            assert sub.text[0].islower() and not any(c in sub.text for c in ",.;"), sub.text
            assert sub.target
            assert sub.mask.dtype == bool and sub.mask.shape == shape[:2] and sub.mask.any()
            assert np.array_equal(sub.mask, region_of(sub, sample.objects, shape, donors, index=i))
            assert sub.box == bbox(sub.mask)
            if sub.type == "background":
                assert i == 0 and sub.object_ids == [o.id for o in sample.objects]
            else:
                acted_on += sub.object_ids
            if sub.type in ("add", "replace"):
                donor = donors[str(i)]
                assert donor["rgb"].dtype == np.uint8 and donor["rgb"].ndim == 3
                assert donor["alpha"].dtype == bool
                assert donor["alpha"].shape == donor["rgb"].shape[:2] and donor["alpha"].any()
                assert sub.params["donor_key"] != sample.source_key  # another photo's
            elif sub.type == "background" and sub.params["op"] == "photo":
                assert donors[str(i)]["rgb"].shape == shape
            else:
                assert str(i) not in donors
        assert len(acted_on) == len(set(acted_on)), "an object is acted on twice"


def test_regions_of_different_sub_edits_barely_overlap(composed):
    for sample in composed:
        regions = [s.mask for s in sample.sub_edits if s.type != "background"]
        for j, later in enumerate(regions):
            for earlier in regions[:j]:
                assert (later & earlier).sum() <= OVERLAP_TOLERANCE * later.sum() + 1


def test_targets_resolve_to_their_objects(composed):
    """A reference is phrased against the inventory as it is when its sub-edit applies: the
    first sub-edit that acts on objects sees the grounder's inventory unchanged."""
    checked = 0
    for sample in composed:
        first = next((s for s in sample.sub_edits if s.type != "background"), None)
        if first is None or not first.object_ids:
            continue
        refs = first.params.get("refs") or [first.params["ref"]]
        for ref, oid in zip(refs, first.object_ids):
            assert resolve(ref, sample.objects) == [oid]
            checked += 1
    assert checked >= 5


def test_moves_and_pastes_stay_in_the_frame(composed):
    for sample in composed:
        h, w = sample.source.shape[:2]
        objects = {o.id: o for o in sample.objects}
        for sub in sample.sub_edits:
            if sub.type == "move":
                x0, y0, x1, y1 = objects[sub.object_ids[0]].box
                dx, dy = sub.params["dx"], sub.params["dy"]
                assert 0 <= x0 + dx and x1 + dx <= w and 0 <= y0 + dy and y1 + dy <= h
                assert sub.params["direction"] in sub.text


def test_every_edit_type_is_drafted_and_types_are_balanced(composed):
    counts = Counter(s.type for sample in composed for s in sample.sub_edits)
    # A swap needs two objects of similar size, both on smooth surroundings (their old places
    # are inpainted): these five photos rarely have them.
    assert set(counts) >= set(EDIT_TYPES) - {"swap"}, counts
    for sample in composed:
        per = Counter(s.type for s in sample.sub_edits)
        # least-used first: a type repeats only when the others found no place
        assert max(per.values()) <= 2 and per["add_text"] <= 1 and per["background"] <= 1


def test_deterministic(grounded, composed):
    again = InventoryComposer(edit_types=EDIT_TYPES)(fresh(grounded, SEEDS[0]))
    for a, b in zip(composed[:len(grounded)], again):
        assert a.instruction == b.instruction
        assert all(np.array_equal(x.mask, y.mask) for x, y in zip(a.sub_edits, b.sub_edits))


def test_a_batch_of_one_borrows_from_its_own_image(grounded):
    seen = set()
    for seed in range(12):
        (sample,) = InventoryComposer(3, 5, EDIT_TYPES)(fresh(grounded[1:2], seed))
        assert not sample.failed
        for i, sub in enumerate(sample.sub_edits):
            if sub.type in ("add", "replace"):
                assert sub.params["donor_key"] == sample.source_key
                assert str(i) in sample.private["donors"]
                if sub.type == "replace":
                    assert sub.params["donor_object"] != sub.object_ids[0]
                seen.add(sub.type)
            if sub.type == "background":
                assert sub.params["op"] != "photo"  # no other photo to take
    assert seen == {"add", "replace"}


def test_fails_with_a_reason_when_too_few_edits_fit():
    image = np.full((96, 128, 3), 100, np.uint8)
    mask = np.zeros((96, 128), bool)
    mask[4:92, 4:124] = True  # one object filling the frame: little fits
    image[mask] = (200, 40, 40)
    obj = InventoryObject(0, "region", bbox(mask), mask,
                          {"color": "red", "rgb": [200, 40, 40], "size": "large",
                           "position": "middle", "area": float(mask.mean())})
    sample = EditSample(id="t", index=0, seed=0, source=image, objects=[obj])
    InventoryComposer(MAX_SUB_EDITS, MAX_SUB_EDITS)([sample])
    assert sample.failed and "could only place" in sample.error
    bare = EditSample(id="u", index=0, seed=0, source=image)
    InventoryComposer()([bare])
    assert bare.failed and "objects with masks" in bare.error


def test_edits_of_one_photo_never_lend_each_other_their_photo(grounded):
    """Edits of the same image share its photo: a "different photo" background or a cut-out must
    come from another image of the batch (else the edit shows nothing new)."""
    from pipeline.compose.photo import donor_pools

    first, other = grounded[0], grounded[1]
    twins = [EditSample(id=f"t{k}", index=k, seed=0, source=first.source,
                        source_key=first.source_key, edit_index=k, objects=first.objects)
             for k in range(3)]
    pools = donor_pools(twins)
    assert all(pools[id(s)] and all(d.own for d in pools[id(s)]) for s in twins)
    pools = donor_pools([*twins, other])
    assert all([d.key for d in pools[id(s)]] == [other.source_key] for s in twins)
