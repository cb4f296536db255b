"""The embedded photo editor: every edit type on real pixels, inside the composer's regions, on a CPU.

Sub-edits are applied in order, sub-edit i acting on the result of i-1, each on the bounding box
of its region only (the rest of the frame is never touched):

- recolor:    the object's hue and chroma set to the asked colour's in CIELAB/LCh, its lightness
              kept (shading and texture stay); an achromatic colour (gray, white, black) drains the
              chroma and moves the object's mean lightness part of the way to the colour's;
- remove:     the object (its mask grown by INPAINT_GROW px) inpainted from its surroundings
              (OpenCV Telea; large holes are filled at a reduced scale, then upsampled);
- move / resize / swap: the object cut out with its mask, its old place inpainted, then pasted
              translated (move, swap) or scaled about its box centre (resize) with a feathered edge;
- add / replace: the donor cut-out (`sample.private["donors"][str(i)]`) pasted centred at
              (cx, cy), its edge feathered inwards (replace first removes the target);
- add_text:   the word's binary glyphs (`text_glyphs`: the default font at size_px, anchor "mm",
              fontmode "1") painted in the asked colour, so a judge can re-render them exactly;
- background: outside the kept objects (the photo's main subject): blur (normalised Gaussian,
              sigma; a wide one at half resolution), tint (8-bit CIELAB a*b* pulled TINT_STRENGTH
              of the way to the asked colour's, lightness kept), desaturate (a* = b* = 0), or
              another photo (the donor at the sample's size), each faded in over ~3 px from the
              subject's edge (MATTE_SIGMA) so no hard seam runs along it;
- texture:    the asked pattern's marks (`scene.pattern_mask`, frame-anchored, the asked period)
              darkened to TEXTURE_SHADE of their value inside the object.

Whatever an edit computes outside its region is discarded, so each sub-edit's mask is exactly the
pixels it changed and lies inside the composer's region; `sample.background_mask` is the rest.
With probability `defect_rate` the target is then spoiled by `pipeline.editors.defects` (the same
defect types and magnitudes as the procedural editor), with `PhotoHooks` answering which other
inventory object a sub-edit could wrongly act on (its region recomputed with
`compose.regions.region_of`) and which wrong colour it could use; the record keeps the INTENDED
sub-edits and masks, the defect goes to the hidden log `sample.defects`.
"""

from __future__ import annotations

import copy
import logging
import math
from functools import lru_cache
from typing import Any, Mapping, Sequence

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pipeline import __version__
from pipeline.compose.regions import (
    FEATHER_PX,
    box_centre,
    dilate,
    donor_for,
    paste_origin,
    region_of,
)
from pipeline.editors.base import EDITORS
from pipeline.editors.defects import (
    DEFECT_TYPES,
    check_defect_settings,
    WRONG_COLOR_DISTANCE,
    Detail,
    EditTrace,
    inject_defect,
)
from pipeline.record import EditSample, InventoryObject, SubEdit
from pipeline.sources.scene import bbox, pattern_mask
from pipeline.stage import RecordStage, sample_rng

log = logging.getLogger(__name__)

INPAINT_GROW = 2  # px the inpainted hole extends past an object's mask (its anti-aliased rim)
INPAINT_RADIUS = 3
INPAINT_MAX_HOLE = 2500  # px: larger holes are inpainted at a reduced scale, then upsampled
CONTEXT_PX = 8  # px of surroundings around a region's box an edit may read
TINT_STRENGTH = 0.6
MATTE_SIGMA = 1.5  # px: a background edit fades in over ~3 px from the subject's edge
TEXTURE_SHADE = 0.55  # pattern marks keep this share of their value
ACHROMATIC_CHROMA = 12.0  # C* below this a colour is a gray
ACHROMATIC_LIGHTNESS_PULL = 0.6  # an achromatic recolour moves the mean L* this far to the colour's
# A wrong colour (fault injection) is also this far in hue from the asked one (or of the other
# kind, chromatic vs gray): RGB distance alone lets "dark red" stand in for "red".
WRONG_HUE_DEGREES = 60.0

Box = tuple[slice, slice]


# ---- colour helpers -----------------------------------------------------------------------------

def to_lab(rgb: np.ndarray) -> np.ndarray:
    """CIELAB (L* 0..100) float32 of uint8 RGB values (any shape ..., 3)."""
    rgb = np.asarray(rgb)
    flat = rgb.reshape(-1, 1, 3) if rgb.ndim != 3 else rgb
    lab = cv2.cvtColor(flat.astype(np.float32) * (1.0 / 255.0), cv2.COLOR_RGB2Lab)
    return lab.reshape(rgb.shape)


def from_lab(lab: np.ndarray) -> np.ndarray:
    """Float RGB in 0..1 (unclipped) of CIELAB values (any shape ..., 3)."""
    lab = np.asarray(lab, dtype=np.float32)
    flat = lab.reshape(-1, 1, 3) if lab.ndim != 3 else lab
    return cv2.cvtColor(flat, cv2.COLOR_Lab2RGB).reshape(lab.shape)


def lab_of(rgb: Sequence[float]) -> np.ndarray:
    return to_lab(np.asarray(rgb, dtype=np.uint8).reshape(1, 3))[0]


def hue_distance(a: float, b: float) -> float:
    """Degrees between two hue angles (0..180)."""
    d = abs(a - b) % 360.0
    return min(d, 360.0 - d)


def lch(rgb: Sequence[float]) -> tuple[float, float, float]:
    """(L*, C*, h in degrees) of one sRGB colour."""
    lab = lab_of(rgb)
    return float(lab[0]), float(math.hypot(lab[1], lab[2])), float(math.degrees(math.atan2(lab[2], lab[1])) % 360)


def _out_of_gamut(rgb: np.ndarray) -> np.ndarray:
    return ((rgb < -0.002) | (rgb > 1.002)).any(axis=-1)


def _in_gamut_rgb(lab: np.ndarray, where: np.ndarray) -> np.ndarray:
    """uint8 RGB of a Lab crop. Pixels of `where` outside the sRGB gamut lose chroma (hue and L*
    kept) until they fit, rather than being clipped channel by channel (which turns hues)."""
    rgb = from_lab(lab)
    bad = _out_of_gamut(rgb) & where
    if bad.any():
        points = lab[bad]
        fixed = rgb[bad]
        pending = np.ones(points.shape[0], dtype=bool)
        for factor in (0.85, 0.7, 0.55, 0.4, 0.25, 0.1, 0.0):
            trial = points[pending].copy()
            trial[:, 1:] *= factor
            got = from_lab(trial)
            ok = ~_out_of_gamut(got) | (factor == 0.0)
            rows = np.flatnonzero(pending)
            fixed[rows[ok]] = got[ok]
            pending[rows[ok]] = False
            if not pending.any():
                break
        rgb[bad] = fixed
    return np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)


# ---- geometry helpers ---------------------------------------------------------------------------

def _box_of(mask: np.ndarray, pad: int = 0) -> Box | None:
    box = bbox(mask)
    if box is None:
        return None
    h, w = mask.shape
    x0, y0, x1, y1 = box
    return slice(max(0, y0 - pad), min(h, y1 + pad)), slice(max(0, x0 - pad), min(w, x1 + pad))


def _union_box(*boxes: Box | None) -> Box | None:
    boxes = [b for b in boxes if b is not None]
    if not boxes:
        return None
    return (slice(min(b[0].start for b in boxes), max(b[0].stop for b in boxes)),
            slice(min(b[1].start for b in boxes), max(b[1].stop for b in boxes)))


def _inpaint(crop: np.ndarray, hole: np.ndarray) -> np.ndarray:
    """`crop` with the `hole` pixels filled from their surroundings (Telea); a large hole is
    filled at a reduced scale and upsampled (the surroundings keep full resolution)."""
    area = int(np.count_nonzero(hole))
    if area == 0:
        return crop.copy()
    hole8 = hole.astype(np.uint8)
    factor = math.sqrt(INPAINT_MAX_HOLE / area)
    h, w = hole.shape
    if factor >= 0.8 or min(h, w) * factor < 8:
        return cv2.inpaint(crop, hole8, INPAINT_RADIUS, cv2.INPAINT_TELEA)
    sw, sh = max(8, int(round(w * factor))), max(8, int(round(h * factor)))
    small = cv2.resize(crop, (sw, sh), interpolation=cv2.INTER_AREA)
    small_hole = (cv2.resize(hole8, (sw, sh), interpolation=cv2.INTER_LINEAR) > 0)
    small_hole = cv2.dilate(small_hole.astype(np.uint8), np.ones((3, 3), np.uint8))
    filled = cv2.inpaint(small, small_hole, INPAINT_RADIUS, cv2.INPAINT_TELEA)
    up = cv2.resize(filled, (w, h), interpolation=cv2.INTER_LINEAR)
    out = crop.copy()
    out[hole] = up[hole]
    return out


def _feathered(mask: np.ndarray) -> np.ndarray:
    """Float alpha of a pasted object: 1 on its mask, falling off over ~FEATHER_PX outside."""
    grown = cv2.dilate(mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(np.float32)
    alpha = cv2.GaussianBlur(grown, (0, 0), sigmaX=FEATHER_PX / 3.0)
    alpha[mask] = 1.0
    return alpha


def _normalised_blur(crop: np.ndarray, m: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of the `m` pixels of `crop` with each other only (nothing outside `m`
    bleeds in); a wide blur is computed at half resolution."""
    h, w = m.shape
    weight = m.astype(np.float32)
    values = crop.astype(np.float32) * weight[..., None]
    factor = 2 if sigma >= 3 and min(h, w) >= 32 else 1
    if factor > 1:
        size = (max(1, w // factor), max(1, h // factor))
        values = cv2.resize(values, size, interpolation=cv2.INTER_AREA)
        weight = cv2.resize(weight, size, interpolation=cv2.INTER_AREA)
    num = cv2.GaussianBlur(values, (0, 0), sigmaX=sigma / factor)
    den = cv2.GaussianBlur(weight, (0, 0), sigmaX=sigma / factor)
    mean = num / np.maximum(den, 1e-6)[..., None]
    if factor > 1:
        mean = cv2.resize(mean, (w, h), interpolation=cv2.INTER_LINEAR)
    return np.clip(np.rint(mean), 0, 255).astype(np.uint8)


def _inward_feather(mask: np.ndarray, sigma: float = 1.0) -> np.ndarray:
    """Float alpha of a cut-out: 0 outside its mask, softened over ~2 sigma px inside its edge."""
    m = mask.astype(np.float32)
    return cv2.GaussianBlur(m, (0, 0), sigmaX=sigma) * m


def _blend(base: np.ndarray, top: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha[..., None]
    return np.clip(np.rint(base.astype(np.float32) * (1 - a) + top.astype(np.float32) * a),
                   0, 255).astype(np.uint8)


def _warp(crop: np.ndarray, matrix: np.ndarray, nearest: bool = False) -> np.ndarray:
    h, w = crop.shape[:2]
    return cv2.warpAffine(crop, matrix, (w, h),
                          flags=cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REPLICATE)


def _translation(dx: float, dy: float) -> np.ndarray:
    return np.array([[1.0, 0.0, dx], [0.0, 1.0, dy]], dtype=np.float64)


def _scaling(factor: float, cx: float, cy: float) -> np.ndarray:
    return np.array([[factor, 0.0, cx * (1 - factor)], [0.0, factor, cy * (1 - factor)]],
                    dtype=np.float64)


@lru_cache(maxsize=64)
def _font(size_px: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size_px)


def text_glyphs(text: str, cx: int, cy: int, size_px: int, shape: Sequence[int]) -> np.ndarray:
    """Bool HxW: the binary glyphs of `text` (the default font at `size_px`, anchor "mm" at
    (cx, cy), fontmode "1"), clipped to the frame: the pixels an add_text paints. Shared with the
    pixel judge, which re-renders them."""
    h, w = int(shape[0]), int(shape[1])
    font = _font(int(size_px))
    left, top, right, bottom = font.getbbox(text, anchor="mm")
    pad = 2
    x0, y0 = int(cx) + left - pad, int(cy) + top - pad
    cw, ch = right - left + 2 * pad, bottom - top + 2 * pad
    canvas = Image.new("L", (cw, ch), 0)
    draw = ImageDraw.Draw(canvas)
    draw.fontmode = "1"
    draw.text((int(cx) - x0, int(cy) - y0), text, fill=255, font=font, anchor="mm")
    ink = np.asarray(canvas) > 0
    out = np.zeros((h, w), dtype=bool)
    ix0, iy0 = max(0, -x0), max(0, -y0)
    ix1, iy1 = min(cw, w - x0), min(ch, h - y0)
    if ix0 < ix1 and iy0 < iy1:
        out[y0 + iy0:y0 + iy1, x0 + ix0:x0 + ix1] = ink[iy0:iy1, ix0:ix1]
    return out


# ---- the edits ----------------------------------------------------------------------------------

class _Context:
    """What one sub-edit may read: the inventory's masks, the donors, the frame size."""

    def __init__(self, objects: Sequence[InventoryObject], donors: Mapping[str, Any], shape):
        self.objects = {o.id: o for o in objects}
        self.donors = donors
        self.shape = (int(shape[0]), int(shape[1]))

    def mask(self, object_id: int) -> np.ndarray:
        obj = self.objects.get(int(object_id))
        if obj is None or obj.mask is None:
            raise ValueError(f"object {object_id} is not in the inventory (or has no mask)")
        return obj.mask.astype(bool)

    def donor(self, i: int) -> Mapping[str, Any]:
        donor = donor_for(self.donors, i)
        if donor is None or "rgb" not in donor:
            raise ValueError(f"sub-edit {i} needs its donor in private['donors']")
        return donor


def _params_rgb(p: Mapping[str, Any], key: str) -> tuple[int, int, int]:
    value = p.get(key)
    if value is None or len(value) != 3:
        raise ValueError(f"sub-edit params lack an RGB {key!r}: {dict(p)}")
    return tuple(int(c) for c in value)  # type: ignore[return-value]


def _recolor(image: np.ndarray, box: Box, region: np.ndarray, sub: SubEdit, ctx: _Context, i: int) -> np.ndarray:
    crop = image[box]
    m = region[box]
    lab = to_lab(crop)
    tl, tc, th = lch(_params_rgb(sub.params, "to_rgb"))
    out_lab = lab.copy()
    inside = lab[m]
    if tc < ACHROMATIC_CHROMA:
        inside[:, 1:] = 0.0
        mean_l = float(inside[:, 0].mean())
        inside[:, 0] = np.clip(inside[:, 0] + ACHROMATIC_LIGHTNESS_PULL * (tl - mean_l), 0, 100)
    else:
        chroma = np.hypot(inside[:, 1], inside[:, 2])
        # The asked chroma, modulated a little by the object's own (its texture in colour).
        new_c = tc * np.clip(0.75 + 0.25 * chroma / max(float(chroma.mean()), 1.0), 0.5, 1.5)
        rad = math.radians(th)
        inside[:, 1] = new_c * math.cos(rad)
        inside[:, 2] = new_c * math.sin(rad)
    out_lab[m] = inside
    return _in_gamut_rgb(out_lab, m)


def _remove(image: np.ndarray, box: Box, region: np.ndarray, sub: SubEdit, ctx: _Context, i: int) -> np.ndarray:
    hole = dilate(ctx.mask(sub.object_ids[0])[box], INPAINT_GROW) & region[box]
    return _inpaint(image[box], hole)


def _paste_moved(base: np.ndarray, prev: np.ndarray, obj: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """`base` with `prev`'s object pixels (`obj`, crop coordinates) warped by `matrix` on top."""
    moved = _warp(obj.astype(np.uint8), matrix, nearest=True).astype(bool)
    content = _warp(prev, matrix)
    return _blend(base, content, _feathered(moved))


def _move(image: np.ndarray, box: Box, region: np.ndarray, sub: SubEdit, ctx: _Context, i: int) -> np.ndarray:
    obj = ctx.mask(sub.object_ids[0])[box]
    crop = image[box]
    base = _inpaint(crop, dilate(obj, INPAINT_GROW) & region[box])
    return _paste_moved(base, crop, obj, _translation(sub.params["dx"], sub.params["dy"]))


def _resize(image: np.ndarray, box: Box, region: np.ndarray, sub: SubEdit, ctx: _Context, i: int) -> np.ndarray:
    full = ctx.mask(sub.object_ids[0])
    cx, cy = box_centre(bbox(full))
    obj = full[box]
    crop = image[box]
    base = _inpaint(crop, dilate(obj, INPAINT_GROW) & region[box])
    matrix = _scaling(float(sub.params["scale"]), cx - box[1].start, cy - box[0].start)
    return _paste_moved(base, crop, obj, matrix)


def _swap(image: np.ndarray, box: Box, region: np.ndarray, sub: SubEdit, ctx: _Context, i: int) -> np.ndarray:
    masks = [ctx.mask(k)[box] for k in sub.object_ids[:2]]
    crop = image[box]
    out = _inpaint(crop, dilate(masks[0] | masks[1], INPAINT_GROW) & region[box])
    order = sorted(range(2), key=lambda k: -int(np.count_nonzero(masks[k])))  # the smaller on top
    for k in order:
        dx, dy = sub.params["offsets"][k]
        out = _paste_moved(out, crop, masks[k], _translation(dx, dy))
    return out


def _paste_donor(base: np.ndarray, box: Box, donor: Mapping[str, Any], cx: int, cy: int) -> np.ndarray:
    """`base` (the crop at `box`) with the donor cut-out pasted centred at (cx, cy) (frame px)."""
    rgb = np.asarray(donor["rgb"], dtype=np.uint8)
    alpha = np.asarray(donor.get("alpha", np.ones(rgb.shape[:2], bool)), dtype=bool)
    h, w = alpha.shape
    x0, y0 = paste_origin(h, w, cx, cy)
    x0 -= box[1].start
    y0 -= box[0].start
    bh, bw = base.shape[:2]
    ax0, ay0 = max(0, -x0), max(0, -y0)
    ax1, ay1 = min(w, bw - x0), min(h, bh - y0)
    out = base.copy()
    if ax0 >= ax1 or ay0 >= ay1:
        return out
    a = _inward_feather(alpha)[ay0:ay1, ax0:ax1]
    window = (slice(y0 + ay0, y0 + ay1), slice(x0 + ax0, x0 + ax1))
    out[window] = _blend(base[window], rgb[ay0:ay1, ax0:ax1], a)
    return out


def _add(image: np.ndarray, box: Box, region: np.ndarray, sub: SubEdit, ctx: _Context, i: int) -> np.ndarray:
    p = sub.params
    return _paste_donor(image[box], box, ctx.donor(i), int(p["cx"]), int(p["cy"]))


def _replace(image: np.ndarray, box: Box, region: np.ndarray, sub: SubEdit, ctx: _Context, i: int) -> np.ndarray:
    p = sub.params
    hole = dilate(ctx.mask(sub.object_ids[0])[box], INPAINT_GROW) & region[box]
    base = _inpaint(image[box], hole)
    return _paste_donor(base, box, ctx.donor(i), int(p["cx"]), int(p["cy"]))


def _add_text(image: np.ndarray, box: Box, region: np.ndarray, sub: SubEdit, ctx: _Context, i: int) -> np.ndarray:
    p = sub.params
    glyphs = text_glyphs(str(p["text"]), int(p["cx"]), int(p["cy"]), int(p["size_px"]), ctx.shape)
    out = image[box].copy()
    out[glyphs[box]] = _params_rgb(p, "rgb")
    return out


def ground_colours(rgb: np.ndarray, op: str, to_rgb: Sequence[int] | None = None) -> np.ndarray:
    """uint8 RGB (any HxWx3) as a background "tint" (8-bit CIELAB a*b* pulled TINT_STRENGTH of the
    way to `to_rgb`'s, lightness kept) or "desaturate" (a* = b* = 0) leaves it. Shared with the
    composer, which names objects by the colours this gives them. (8-bit CIELAB: OpenCV's
    table-driven conversion, the whole frame in ~2 ms.)"""
    lab = cv2.cvtColor(np.ascontiguousarray(rgb, dtype=np.uint8), cv2.COLOR_RGB2Lab).astype(np.float32)
    if op == "desaturate":
        lab[..., 1:] = 128.0
    else:
        target = cv2.cvtColor(np.array([[to_rgb]], dtype=np.uint8),
                              cv2.COLOR_RGB2Lab)[0, 0].astype(np.float32)
        lab[..., 1:] = lab[..., 1:] * (1 - TINT_STRENGTH) + target[1:] * TINT_STRENGTH
    return cv2.cvtColor(np.clip(np.rint(lab), 0, 255).astype(np.uint8), cv2.COLOR_Lab2RGB)


def _background(image: np.ndarray, box: Box, region: np.ndarray, sub: SubEdit, ctx: _Context, i: int) -> np.ndarray:
    p = sub.params
    op = p.get("op")
    crop = image[box]
    m = region[box]
    if op == "blur":
        edited = _normalised_blur(crop, m, float(p.get("sigma", 3.0)))
    elif op in ("tint", "desaturate"):
        edited = ground_colours(crop, op, _params_rgb(p, "to_rgb") if op == "tint" else None)
    elif op == "photo":
        donor = np.asarray(ctx.donor(i)["rgb"], dtype=np.uint8)
        if donor.shape[:2] != ctx.shape:
            raise ValueError(f"background photo is {donor.shape[:2]}, the image {ctx.shape}")
        edited = donor[box]
    else:
        raise ValueError(f"unknown background op {op!r}")
    # A matte, not a cut: the edit fades in over a few px from the kept subject's edge, so a
    # tint or a blur leaves no hard seam along it (and still changes nothing outside the region).
    return _blend(crop, edited, _inward_feather(m, MATTE_SIGMA))


def _texture(image: np.ndarray, box: Box, region: np.ndarray, sub: SubEdit, ctx: _Context, i: int) -> np.ndarray:
    p = sub.params
    h, w = ctx.shape
    marks = pattern_mask(str(p["to_pattern"]), w, h, int(p["period"]))
    if marks is None:
        raise ValueError(f"texture needs a patterned to_pattern, got {p['to_pattern']!r}")
    crop = image[box]
    out = crop.copy()
    on = marks[box] & region[box]
    out[on] = np.rint(crop[on].astype(np.float32) * TEXTURE_SHADE).astype(np.uint8)
    return out


EDITS = {
    "recolor": _recolor,
    "remove": _remove,
    "move": _move,
    "resize": _resize,
    "swap": _swap,
    "add": _add,
    "replace": _replace,
    "add_text": _add_text,
    "background": _background,
    "texture": _texture,
}


def apply_photo_edit(image: np.ndarray, sub: SubEdit, region: np.ndarray, ctx: _Context,
                     i: int) -> tuple[np.ndarray, np.ndarray]:
    """(the image after sub-edit `sub` (number i) within `region`, a new array; bool HxW of the
    pixels it changed). Pixels outside the region are `image`'s own."""
    if sub.type not in EDITS:
        raise ValueError(f"no photo edit for sub-edit type {sub.type!r}")
    box = _box_of(region, CONTEXT_PX)
    if box is None:
        raise ValueError(f"sub-edit {i} ({sub.type}) has an empty region")
    edited = EDITS[sub.type](image, box, region, sub, ctx, i)
    before = image[box]
    keep = region[box]
    unequal = (edited != before)
    step = (unequal[..., 0] | unequal[..., 1] | unequal[..., 2]) & keep
    out = image.copy()
    np.copyto(out[box], edited, where=step[..., None])
    changed = np.zeros(region.shape, dtype=bool)
    changed[box] = step
    return out, changed


# ---- fault injection hooks ----------------------------------------------------------------------

# name field and rgb field of the colour a sub-edit paints in (background: only its tint).
_COLOR_FIELDS = {"recolor": ("to_color", "to_rgb"), "add_text": ("color", "rgb"),
                 "background": ("to_color", "to_rgb")}


def _color_table() -> dict[str, tuple[int, int, int]]:
    from pipeline.grounders.attributes import COLOR_NAMES

    return COLOR_NAMES


def _far_colors(asked_rgb: Sequence[int], avoid_rgb: Sequence[Sequence[int]] = ()) -> list[str]:
    """Colour names far from `asked_rgb` both in RGB (>= WRONG_COLOR_DISTANCE) and in what a
    reader sees (another hue, or gray against colour), and not near any of `avoid_rgb`."""
    _, ac, ah = lch(asked_rgb)
    out = []
    for name, rgb in _color_table().items():
        if math.dist(rgb, asked_rgb) < WRONG_COLOR_DISTANCE:
            continue
        _, c, h = lch(rgb)
        gray, asked_gray = c < ACHROMATIC_CHROMA, ac < ACHROMATIC_CHROMA
        if gray and asked_gray:
            continue
        if not gray and not asked_gray and hue_distance(h, ah) < WRONG_HUE_DEGREES:
            continue
        if any(_same_look(rgb, other) for other in avoid_rgb):
            continue
        out.append(name)
    return out


def _same_look(a: Sequence[int], b: Sequence[int]) -> bool:
    _, ca, ha = lch(a)
    _, cb, hb = lch(b)
    if ca < ACHROMATIC_CHROMA or cb < ACHROMATIC_CHROMA:
        return ca < ACHROMATIC_CHROMA and cb < ACHROMATIC_CHROMA
    return hue_distance(ha, hb) < WRONG_HUE_DEGREES


class PhotoHooks:
    """The photo editor's answers to the injectors (`defects.EditorHooks`): another inventory
    object (of another colour, away from every sub-edit's region) to act on, and a wrong colour
    from the grounder's colour names."""

    def __init__(self, objects: Sequence[InventoryObject], sub_edits: Sequence[SubEdit],
                 regions: Sequence[np.ndarray]):
        self.objects = list(objects)
        # Where the sub-edits act on objects (a background edit's region is everything else).
        self.occupied = np.zeros(regions[0].shape, dtype=bool)
        for sub, region in zip(sub_edits, regions):
            if sub.type != "background":
                self.occupied |= region

    def wrong_objects(self, trace: EditTrace, i: int, sub: SubEdit, intended: int) -> list[InventoryObject]:
        touched = trace.touched_ids()
        meant = next((o for o in self.objects if o.id == intended), None)
        out = []
        for o in self.objects:
            if o.id in touched or o.mask is None:
                continue
            area = int(np.count_nonzero(o.mask))
            if area == 0 or np.count_nonzero(o.mask & self.occupied) > 0.2 * area:
                continue
            if meant is not None and o.attributes.get("color") == meant.attributes.get("color") \
                    and o.label == meant.label:
                continue
            out.append(o)
        return out

    def retarget(self, trace: EditTrace, i: int, sub: SubEdit, intended: int,
                 other: InventoryObject) -> tuple[SubEdit, Detail] | None:
        p = copy.deepcopy(sub.params)
        ids = [other.id if k == intended else k for k in sub.object_ids]
        if sub.type == "recolor" and "rgb" in other.attributes and \
                _same_look(other.attributes["rgb"], p["to_rgb"]):
            return None  # recolouring it to its own colour shows nothing
        if sub.type == "swap":  # the two centres swap, whichever objects they are
            by_id = {o.id: o for o in self.objects}
            if any(k not in by_id or by_id[k].mask is None for k in ids):
                return None
            (ax, ay), (bx, by) = (box_centre(bbox(by_id[k].mask)) for k in ids[:2])
            p["offsets"] = [[int(round(bx - ax)), int(round(by - ay))],
                            [int(round(ax - bx)), int(round(ay - by))]]
        wrong = SubEdit(sub.type, sub.text, sub.target, ids, p)
        detail = {"intended_object": intended, "actual_object": other.id,
                  "actual_label": other.label, "actual_color": other.attributes.get("color")}
        return wrong, detail

    def wrong_colors(self, trace: EditTrace, i: int, sub: SubEdit) -> list[str]:
        fields = _COLOR_FIELDS.get(sub.type)
        if fields is None or (sub.type == "background" and sub.params.get("op") != "tint"):
            return []
        asked = sub.params.get(fields[1])
        if asked is None:
            return []
        avoid = []
        if sub.type == "recolor":  # not the object's own colour: that would be "no change"
            avoid = [o.attributes["rgb"] for o in self.objects
                     if o.id in sub.object_ids and "rgb" in o.attributes]
        return _far_colors(asked, avoid) or _far_colors(asked)

    def recolor(self, trace: EditTrace, i: int, sub: SubEdit, color: str) -> tuple[SubEdit, Detail] | None:
        name_key, rgb_key = _COLOR_FIELDS[sub.type]
        rgb = list(_color_table()[color])
        wrong = SubEdit(sub.type, sub.text, sub.target, list(sub.object_ids), copy.deepcopy(sub.params))
        wrong.params[name_key] = color
        wrong.params[rgb_key] = rgb
        asked = sub.params[rgb_key]
        detail = {"asked": sub.params.get(name_key), "used": color,
                  "distance": round(math.dist(rgb, asked), 1)}
        return wrong, detail


# ---- the stage ----------------------------------------------------------------------------------

@EDITORS.register("photo")
class PhotoEditor(RecordStage):
    """Classical edits of real photos inside the composer's regions, with optional fault
    injection (hidden defect log). See the module docstring."""

    name = "edit"

    def __init__(self, defect_rate: float = 0.25, defect_types: Sequence[str] = DEFECT_TYPES):
        self.defect_types = check_defect_settings(defect_rate, defect_types)
        self.defect_rate = defect_rate

    def process(self, sample: EditSample) -> None:
        source = sample.source
        if source is None or source.ndim != 3 or source.shape[2] != 3 or source.dtype != np.uint8:
            raise ValueError("the photo editor needs an RGB uint8 source image")
        if not sample.sub_edits:
            raise ValueError("no sub-edits to apply (run the composer first)")
        shape = source.shape[:2]
        for i, sub in enumerate(sample.sub_edits):
            if sub.mask is None or sub.mask.shape != shape:
                raise ValueError(f"sub-edit {i} ({sub.type}) has no region of the image's size "
                                 "(the composer fixes the regions)")
        donors = sample.private.get("donors") or {}
        ctx = _Context(sample.objects, donors, shape)
        allowed = [sub.mask.astype(bool) for sub in sample.sub_edits]  # the composer's regions

        images = [source]
        masks = []
        for i, sub in enumerate(sample.sub_edits):
            image, changed = apply_photo_edit(images[-1], sub, allowed[i], ctx, i)
            if not changed.any():
                raise ValueError(f"sub-edit {i} ({sub.text!r}) changes no pixel")
            images.append(image)
            masks.append(changed)
        for sub, changed in zip(sample.sub_edits, masks):
            sub.mask = changed
            sub.box = bbox(changed)
        sample.target = images[-1]
        sample.background_mask = ~np.logical_or.reduce(masks)
        sample.defects = []
        sample.provenance["editor"] = f"photo@{__version__}"
        sample.provenance["pair"] = "exact"

        rng = sample_rng(sample, "defects")
        if self.defect_rate > 0 and rng.random() < self.defect_rate:
            intended = list(sample.sub_edits)

            def replay(subs: list[SubEdit | None], start: int) -> np.ndarray:
                image = images[start]
                for j in range(start, len(subs)):
                    sub = subs[j]
                    if sub is None:
                        continue
                    region = allowed[j] if sub is intended[j] else \
                        region_of(sub, sample.objects, shape, donors, index=j)
                    if region.any():
                        image, _ = apply_photo_edit(image, sub, region, ctx, j)
                return image

            trace = EditTrace(images=images, sub_edits=sample.sub_edits, regions=masks,
                              background_mask=sample.background_mask, replay=replay,
                              states=allowed, hooks=PhotoHooks(sample.objects, intended, allowed))
            injected = inject_defect(rng, trace, self.defect_types)
            if injected is None:
                log.debug("no defect of %s applies to %s", self.defect_types, sample.id)
            else:
                sample.target, record = injected
                sample.defects = [record]
