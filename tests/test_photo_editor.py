"""The photo editor on real photographs: exact masks, untouched outsides, asked colours, faults.

Sub-edits are built here by hand per the photo sub-edit contract (regions from
`compose.regions.region_of`) on the classical grounder's inventory of scikit-image's bundled
photos, so each edit type is tested on its own.
"""

from __future__ import annotations

import copy
import json
import math
from functools import lru_cache

import numpy as np
import pytest

from photo_fixtures import skimage_photos
from pipeline.compose.regions import box_centre, region_of
from pipeline.editors.defects import DEFECT_TYPES, SUB_EDIT_DEFECTS, measurable
from pipeline.editors.photo import PhotoEditor, lch, hue_distance, to_lab
from pipeline.grounders.attributes import COLOR_NAMES, same_family
from pipeline.grounders.attributes import lightness
from pipeline.grounders.classical import ClassicalGrounder
from pipeline.record import EditSample, SubEdit, dumps, sample_id
from pipeline.sources.decode import decode_image
from pipeline.sources.frame import Frame
from pipeline.sources.scene import bbox

RESOLUTION = 256
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle_left", "hubble_deep_field")
ALL_TYPES = ("recolor", "remove", "move", "resize", "swap", "add", "replace", "add_text",
             "background", "texture")
CHROMATIC = [n for n in COLOR_NAMES if lch(COLOR_NAMES[n])[1] >= 30]


@lru_cache(maxsize=16)
def photo(name: str, resolution: int = RESOLUTION) -> np.ndarray:
    data = skimage_photos()[name].read_bytes()
    decoded = decode_image(data).image
    image = Frame.fit(decoded.shape[1], decoded.shape[0], resolution).image(decoded)
    image.flags.writeable = False
    return image


@lru_cache(maxsize=16)
def _grounded(name: str, resolution: int) -> list:
    """The grounder's best 12 regions (nameable first), whatever their role: the editor's tests
    pick objects by hand and need many of them."""
    sample = EditSample(id=name, index=0, seed=0, source=photo(name, resolution).copy())
    ClassicalGrounder(figure_ground=False)([sample])
    assert not sample.failed, sample.error
    return sample.objects[:12]


def grounded(name: str, resolution: int = RESOLUTION, seed: int = 0, index: int = 0) -> EditSample:
    sample = EditSample(id=sample_id(seed, name, index), index=index, seed=seed,
                        source=photo(name, resolution).copy(), source_key=name)
    sample.objects = copy.deepcopy(_grounded(name, resolution))
    return sample


def _donor(rng: np.random.Generator, resolution: int, exclude: str) -> tuple[dict, str, int, str]:
    """A cut-out of another photo's object: {"rgb", "alpha"}, the donor key, object id, colour."""
    names = [n for n in PHOTOS if n != exclude]
    name = names[int(rng.integers(len(names)))]
    objects = [o for o in _grounded(name, resolution) if 0.01 <= o.attributes["area"] <= 0.08]
    obj = objects[int(rng.integers(len(objects)))] if objects else _grounded(name, resolution)[0]
    x0, y0, x1, y1 = obj.box
    rgb = np.ascontiguousarray(photo(name, resolution)[y0:y1, x0:x1])
    return {"rgb": rgb, "alpha": obj.mask[y0:y1, x0:x1].copy()}, name, obj.id, obj.attributes["color"]


def _other_color(rng, obj) -> str:
    names = [n for n in CHROMATIC if not same_family(n, obj.attributes.get("color", ""))]
    return names[int(rng.integers(len(names)))]


def make_sub_edit(kind: str, sample: EditSample, rng: np.random.Generator, free: list, i: int,
                  kept: list[int] | None = None) -> SubEdit:
    """Sub-edit number `i` of type `kind` on objects taken from `free` (removed from it)."""
    h, w = sample.source.shape[:2]

    def take(n: int = 1):
        if len(free) < n:
            raise LookupError("not enough objects")
        return [free.pop(0) for _ in range(n)]

    p: dict = {"domain": "photo"}
    ids: list[int] = []
    if kind == "recolor":
        (obj,) = take()
        to = _other_color(rng, obj)
        p.update(to_color=to, to_rgb=list(COLOR_NAMES[to]), from_color=obj.attributes["color"])
        ids, text = [obj.id], f"make the region {to}"
    elif kind == "remove":
        (obj,) = take()
        p.update(label=obj.label)
        ids, text = [obj.id], "remove the region"
    elif kind == "move":
        (obj,) = take()
        x0, y0, x1, y1 = obj.box
        dx = int(rng.integers(-x0, w - x1 + 1)) if w - (x1 - x0) > 0 else 0
        dx = int(np.clip(dx, -0.3 * w, 0.3 * w)) or 12
        p.update(dx=dx, dy=0, direction="right" if dx > 0 else "left")
        ids, text = [obj.id], f"move the region to the {p['direction']}"
    elif kind == "resize":
        (obj,) = take()
        scale = float(rng.choice([0.6, 0.7, 1.3, 1.5]))
        p.update(scale=scale, to_size="smaller" if scale < 1 else "larger")
        ids, text = [obj.id], f"make the region {p['to_size']}"
    elif kind == "swap":
        a, b = take(2)
        (ax, ay), (bx, by) = box_centre(a.box), box_centre(b.box)
        p.update(offsets=[[int(round(bx - ax)), int(round(by - ay))],
                          [int(round(ax - bx)), int(round(ay - by))]])
        ids, text = [a.id, b.id], "swap the two regions"
    elif kind in ("add", "replace"):
        donor, key, oid, color = _donor(rng, h if h <= w else w, sample.source_key)
        sample.private.setdefault("donors", {})[str(i)] = donor
        if kind == "add":
            cx, cy = int(rng.integers(w // 5, 4 * w // 5)), int(rng.integers(h // 5, 4 * h // 5))
            p.update(label="region", color=color, cx=cx, cy=cy, scale=1.0, donor_key=key,
                     donor_object=oid, position="center")
            text = f"add a {color} region"
        else:
            (obj,) = take()
            cx, cy = (int(round(c)) for c in box_centre(obj.box))
            ids = [obj.id]
            p.update(from_label=obj.label, to_label="region", to_color=color, cx=cx, cy=cy,
                     scale=1.0, donor_key=key, donor_object=oid)
            text = f"replace the region with a {color} region"
    elif kind == "add_text":
        color = CHROMATIC[int(rng.integers(len(CHROMATIC)))]
        size = int(rng.integers(24, 40))
        p.update(text=str(rng.choice(["SALE", "OPEN", "HELLO", "CAFE"])), color=color,
                 rgb=list(COLOR_NAMES[color]), cx=int(rng.integers(w // 4, 3 * w // 4)),
                 cy=int(rng.integers(h // 4, 3 * h // 4)), size_px=size)
        text = f"write {p['text']} in {color}"
    elif kind == "background":
        op = str(rng.choice(["blur", "tint", "desaturate", "photo"]))
        p.update(op=op)
        if op == "blur":
            p.update(sigma=float(rng.uniform(3, 6)))
        elif op == "tint":
            to = CHROMATIC[int(rng.integers(len(CHROMATIC)))]
            p.update(to_color=to, to_rgb=list(COLOR_NAMES[to]))
        elif op == "photo":
            names = [n for n in PHOTOS if n != sample.source_key]
            key = names[int(rng.integers(len(names)))]
            other = photo(key, min(h, w))
            if other.shape[:2] != (h, w):
                import cv2
                other = cv2.resize(np.ascontiguousarray(other), (w, h), interpolation=cv2.INTER_AREA)
            sample.private.setdefault("donors", {})[str(i)] = {"rgb": other}
            p.update(donor_key=key)
        ids = list(kept or [])
        text = f"change the background ({op})"
    elif kind == "texture":
        (obj,) = take()
        p.update(to_pattern=str(rng.choice(["stripes", "dots", "checker"])),
                 period=int(rng.integers(8, 16)))
        ids, text = [obj.id], f"give the region {p['to_pattern']}"
    else:
        raise ValueError(kind)
    sub = SubEdit(kind, text, target="the region", object_ids=ids, params=p)
    sub.mask = region_of(sub, sample.objects, sample.source.shape, sample.private.get("donors"), index=i)
    sub.box = bbox(sub.mask)
    return sub


def composed(name: str, kinds: tuple[str, ...], seed: int = 0, index: int = 0,
             resolution: int = RESOLUTION) -> EditSample:
    """A grounded photo with the sub-edits `kinds` built by hand (a background keeps the
    objects of the other sub-edits and goes first, so it does not paint over them)."""
    sample = grounded(name, resolution, seed, index)
    rng = np.random.default_rng([seed, index, len(kinds)])
    # (objects light enough for every type to show, as the composer's preconditions want)
    usable = [o for o in sample.objects if 0.004 <= o.attributes["area"] <= 0.12
              and 35 <= lightness(o.attributes["rgb"]) <= 88]
    free = [usable[k] for k in rng.permutation(len(usable))]
    ordered = sorted(kinds, key=lambda k: k != "background")
    subs = []
    for i, kind in enumerate(ordered):
        if kind == "background":
            continue
        try:
            subs.append((i, make_sub_edit(kind, sample, rng, free, i)))
        except LookupError:  # a photo with few objects: fewer sub-edits
            continue
    if "background" in ordered:
        kept = sorted({k for _, s in subs for k in s.object_ids})
        subs.insert(0, (0, make_sub_edit("background", sample, rng, free, 0, kept=kept)))
    sample.sub_edits = [s for _, s in subs]
    sample.instruction = ", ".join(s.text for s in sample.sub_edits)
    return sample


def edited(sample: EditSample, **options) -> EditSample:
    sample = copy.deepcopy(sample)
    PhotoEditor(**options)([sample])
    assert not sample.failed, sample.error
    return sample


def _steps(sample: EditSample, regions: list[np.ndarray]) -> list[np.ndarray]:
    from pipeline.editors.photo import _Context, apply_photo_edit

    ctx = _Context(sample.objects, sample.private.get("donors") or {}, sample.source.shape)
    images = [sample.source]
    for i, sub in enumerate(sample.sub_edits):
        images.append(apply_photo_edit(images[-1], sub, regions[i], ctx, i)[0])
    return images


# ---- tests --------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ALL_TYPES)
def test_each_edit_type_changes_exactly_its_mask_inside_the_region(kind):
    for name in ("astronaut", "coffee"):
        base = composed(name, (kind,) if kind != "swap" else (kind,), seed=1)
        regions = [s.mask.copy() for s in base.sub_edits]
        out = edited(base, defect_rate=0.0)
        images = _steps(base, regions)
        for i, sub in enumerate(out.sub_edits):
            step = (images[i] != images[i + 1]).any(axis=2)
            assert np.array_equal(sub.mask, step), (name, kind)
            assert sub.mask.any() and not (sub.mask & ~regions[i]).any(), (name, kind)
            assert sub.box == bbox(sub.mask)
        assert np.array_equal(out.target, images[-1])
        outside = out.background_mask
        assert np.array_equal(outside, ~np.logical_or.reduce([s.mask for s in out.sub_edits]))
        assert np.array_equal(out.source[outside], out.target[outside])
        assert out.provenance["editor"].startswith("photo@") and out.defects == []


def test_complex_samples_keep_every_pixel_outside_the_regions():
    kinds = ("recolor", "move", "add_text", "texture", "remove")
    for name in ("chelsea", "rocket", "motorcycle_left"):
        base = composed(name, kinds, seed=2)
        union = np.logical_or.reduce([s.mask for s in base.sub_edits])
        out = edited(base, defect_rate=0.0)
        assert np.array_equal(out.source[~union], out.target[~union])
        changed = (out.source != out.target).any(axis=2)
        assert not (changed & out.background_mask).any()


def test_recolor_lands_on_the_asked_hue_and_keeps_lightness():
    for name in ("astronaut", "chelsea", "coffee", "rocket"):
        base = composed(name, ("recolor",), seed=3)
        out = edited(base, defect_rate=0.0)
        sub = out.sub_edits[0]
        m = sub.mask
        src, tgt = to_lab(out.source[m]), to_lab(out.target[m])
        chroma = np.hypot(tgt[:, 1], tgt[:, 2])
        hue = np.degrees(np.arctan2(tgt[:, 2], tgt[:, 1])) % 360
        _, _, asked = lch(sub.params["to_rgb"])
        bearing = chroma >= 8
        assert bearing.mean() > 0.8, name
        near = np.array([hue_distance(h, asked) <= 20 for h in hue[bearing]])
        assert near.mean() > 0.9, (name, sub.params["to_color"])
        assert np.abs(src[:, 0] - tgt[:, 0]).mean() < 3.0  # L* kept (up to gamut and rounding)


def test_editor_is_deterministic():
    base = composed("astronaut", ("recolor", "move", "add", "background"), seed=4)
    a, b = edited(base, defect_rate=1.0), edited(base, defect_rate=1.0)
    assert np.array_equal(a.target, b.target) and a.defects == b.defects
    assert all(np.array_equal(x.mask, y.mask) for x, y in zip(a.sub_edits, b.sub_edits))


def test_bad_options_and_missing_regions_fail():
    with pytest.raises(ValueError):
        PhotoEditor(defect_rate=2.0)
    with pytest.raises(ValueError):
        PhotoEditor(defect_types=("smudge",))
    sample = composed("coffee", ("recolor",))
    sample.sub_edits[0].mask = None
    PhotoEditor()([sample])
    assert sample.failed and "region" in sample.error


MIX = ("recolor", "add_text", "move", "texture", "background")


def _forced(defect_type: str, wanted: int = 3):
    pairs = []
    for index in range(12):
        name = PHOTOS[index % len(PHOTOS)]
        base = composed(name, MIX, seed=5, index=index)
        spoiled = edited(base, defect_rate=1.0, defect_types=(defect_type,))
        if spoiled.defects:
            pairs.append((edited(base, defect_rate=0.0), spoiled))
            if len(pairs) == wanted:
                break
    return pairs


@pytest.mark.parametrize("defect_type", DEFECT_TYPES)
def test_each_defect_type_is_injected_and_logged(defect_type):
    pairs = _forced(defect_type)
    assert pairs, f"no photo sample took a {defect_type} defect"
    for clean, spoiled in pairs:
        (record,) = spoiled.defects
        assert record["type"] == defect_type and set(record) == {"type", "sub_edit", "detail"}
        json.loads(dumps(spoiled.defects))
        assert [s.to_json() for s in spoiled.sub_edits] == [s.to_json() for s in clean.sub_edits]
        assert all(np.array_equal(a.mask, b.mask) for a, b in zip(spoiled.sub_edits, clean.sub_edits))
        assert np.array_equal(spoiled.background_mask, clean.background_mask)
        assert "defect" not in dumps(spoiled.metadata()).decode()
        if defect_type in SUB_EDIT_DEFECTS:
            i = record["sub_edit"]
            assert measurable(clean.target, spoiled.target, clean.sub_edits[i].mask)
        else:
            assert record["sub_edit"] is None
            assert measurable(clean.target, spoiled.target, clean.background_mask)
        if defect_type == "wrong_color":
            assert record["detail"]["distance"] >= 100
        if defect_type == "wrong_object":
            assert record["detail"]["actual_object"] != record["detail"]["intended_object"]
