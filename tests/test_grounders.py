"""Grounders on real photos (scikit-image's bundled photographs) and on synthetic images."""

from __future__ import annotations

import importlib.resources

import numpy as np
import pytest
from PIL import Image

from pipeline.compose.frame import REGIONS
from pipeline.compose.referring import describe, refer, resolve
from pipeline.grounders.attributes import (
    COLOR_NAMES,
    color_name,
    median_rgb,
    same_family,
    size_word,
)
from pipeline.grounders.base import GROUNDERS
from pipeline.grounders.classical import ClassicalGrounder, fill_holes, ground
from pipeline.grounders.given import GivenGrounder
from pipeline.record import EditSample, InventoryObject
from pipeline.sources.scene import bbox

PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png")


def load_photo(name: str, short: int = 512) -> np.ndarray:
    """A bundled photo, short side `short`, non-square (a square one is cropped to 4:3)."""
    with Image.open(importlib.resources.files("skimage") / "data" / name) as im:
        im = im.convert("RGB")
        w, h = im.size
        if w == h:
            im = im.crop((0, h // 8, w, h - h // 8))
            w, h = im.size
        scale = short / min(w, h)
        return np.asarray(im.resize((round(w * scale), round(h * scale)), Image.BILINEAR))


@pytest.fixture(scope="module")
def photos() -> dict[str, np.ndarray]:
    return {name: load_photo(name) for name in PHOTOS}


@pytest.fixture(scope="module")
def inventories(photos) -> dict[str, list[InventoryObject]]:
    return {name: ground(image) for name, image in photos.items()}


def test_registered():
    assert isinstance(GROUNDERS.make("classical", max_objects=5), ClassicalGrounder)
    assert isinstance(GROUNDERS.make("given"), GivenGrounder)
    with pytest.raises(ValueError, match="no option"):
        GROUNDERS.make("classical", steps=3)


def test_every_colour_name_names_its_own_colour():
    assert {n: color_name(rgb) for n, rgb in COLOR_NAMES.items()} == {n: n for n in COLOR_NAMES}


@pytest.mark.parametrize("rgb, name", [
    ((255, 0, 0), "red"), ((100, 20, 30), "dark red"), ((135, 206, 235), "light blue"),
    ((20, 30, 80), "dark blue"), ((34, 139, 34), "green"), ((255, 140, 0), "orange"),
    ((100, 60, 30), "dark brown"), ((128, 128, 128), "gray"), ((250, 250, 250), "white"),
    ((10, 10, 10), "black"), ((255, 105, 180), "pink"), ((255, 215, 0), "yellow"),
])
def test_colour_names_are_perceptual(rgb, name):
    assert color_name(rgb) == name


def test_size_words():
    assert [size_word(a) for a in (0.005, 0.05, 0.2)] == ["small", "medium", "large"]


def test_red_square_on_grey_is_found_red_with_its_box():
    image = np.full((384, 576, 3), 128, np.uint8)
    image[260:360, 40:140] = (200, 30, 30)
    objects = ground(image)
    reds = [o for o in objects if same_family(o.attributes["color"], "red")]
    assert len(reds) == 1
    assert np.abs(np.array(reds[0].box) - [40, 260, 140, 360]).max() <= 2
    assert reds[0].attributes["position"] == "bottom left"  # centre (90, 310) of 576 x 384


def test_objects_are_consistent_with_their_pixels(photos, inventories):
    for name, objects in inventories.items():
        image = photos[name]
        h, w = image.shape[:2]
        roles = [o.attributes["role"] for o in objects]
        assert roles.count("object") <= 12 and roles.count("distractor") <= 24, name
        assert set(roles) <= {"object", "distractor"} and len(objects) >= 3, name
        assert [o.id for o in objects] == list(range(len(objects)))
        for obj in objects:
            assert obj.mask.dtype == bool and obj.mask.shape == (h, w)
            assert obj.box == bbox(obj.mask), (name, obj.id)
            assert obj.label == "region" and obj.producer == "classical"
            assert 0.0 <= obj.confidence <= 1.0
            attrs = obj.attributes
            assert attrs["color"] in COLOR_NAMES
            assert attrs["size"] == size_word(attrs["area"])
            assert attrs["position"] in REGIONS
            assert abs(attrs["area"] - obj.mask.mean()) < 1e-3
            assert 0.002 <= attrs["area"] <= 0.35
            assert fill_holes(obj.mask).sum() == obj.mask.sum()  # no holes
            if attrs["role"] != "object":
                continue  # a distractor's colour only rules it out: a rough one will do
            # the colour is the colour of the pixels under the mask
            full = median_rgb(image, obj.mask)
            assert np.abs(np.array(full) - attrs["rgb"]).max() <= 30, (name, obj.id)


def test_classical_grounding_is_deterministic(photos, inventories):
    image = photos["coffee.png"]
    again = ground(image.copy())
    first = inventories["coffee.png"]
    assert len(again) == len(first)
    for a, b in zip(first, again):
        assert a.box == b.box and a.attributes == b.attributes and a.confidence == b.confidence
        assert np.array_equal(a.mask, b.mask)


def test_stage_fills_objects_and_fails_on_a_flat_image(photos):
    good = EditSample(id="a", index=0, seed=0, source=photos["chelsea.png"])
    flat = EditSample(id="b", index=1, seed=0, source=np.full((256, 384, 3), 90, np.uint8))
    ClassicalGrounder()([good, flat])
    assert not good.failed and good.objects and good.provenance["grounder"] == "classical"
    assert flat.failed and "no object-like region" in flat.error


def test_given_keeps_the_source_regions_and_completes_them(photos):
    image = photos["rocket.jpg"]
    mask = np.zeros(image.shape[:2], bool)
    mask[100:160, 300:340] = True
    sample = EditSample(id="g", index=0, seed=0, source=image, objects=[
        InventoryObject(id=3, label="tower", box=[10, 20, 60, 200], producer="coco"),
        InventoryObject(id=7, label="rocket", box=[0, 0, 1, 1], mask=mask,
                        attributes={"color": "white"}),
    ])
    GivenGrounder()([sample])
    assert not sample.failed
    tower, rocket = sample.objects
    assert (tower.id, tower.label, tower.producer) == (3, "tower", "coco")
    assert tower.box == [10, 20, 60, 200] and tower.mask.sum() == 50 * 180
    assert rocket.box == [300, 100, 340, 160]  # the mask decides the box
    assert rocket.attributes["color"] == "white"  # what the source said is kept
    for obj in sample.objects:
        assert {"color", "rgb", "size", "position", "area"} <= set(obj.attributes)
    empty = EditSample(id="e", index=1, seed=0, source=image)
    GivenGrounder()([empty])
    assert empty.failed and "no regions" in empty.error


def test_describe_says_what_is_known():
    ref = {"label": "region", "color": "dark red", "size": "large", "position": "bottom left"}
    assert describe(ref) == "the large dark-red region in the bottom left"
    assert describe({"label": "cup", "relation": {"type": "left of", "landmark": {
        "label": "region", "color": "blue"}}}) == "the cup to the left of the blue region"


def test_every_referring_phrase_resolves_to_exactly_its_object(inventories):
    rng = np.random.default_rng(0)
    referred = total = 0
    for objects in inventories.values():
        for obj in objects:
            if obj.attributes["role"] != "object":
                continue  # never named (but every phrase rules it out)
            total += 1
            ref = refer(obj, objects, rng)
            if ref is None:
                continue
            referred += 1
            assert resolve(ref, objects) == [obj.id], describe(ref)
            text = describe(ref)
            assert text.startswith("the ") and not any(c in text for c in ",.;")
            # only what is known: every word attribute said is the object's own
            for key in ("color", "size"):
                assert key not in ref or ref[key] == obj.attributes[key]
    assert referred >= 0.4 * total  # (every phrase must also rule out the distractors)


def test_an_unknown_attribute_never_rules_an_object_out():
    mask = np.zeros((90, 90), bool)
    a = InventoryObject(0, "region", [10, 10, 20, 20], mask, {"color": "red"})
    b = InventoryObject(1, "region", [60, 60, 70, 70], mask, {})  # colour unknown
    assert resolve({"label": "region", "color": "red"}, [a, b]) == [0, 1]
    ref = refer(a, [a, b], np.random.default_rng(0))
    assert ref is not None and "color" not in ref and resolve(ref, [a, b]) == [0]
