"""Regions of photo sub-edits: the pixels each sub-edit may change, fixed by the composer.

`region_of(sub, objects, shape, donors)` is the one definition, shared by the composer (which
stores it as `sub.mask`), the photo editor (which clips what it changed to it) and the defect
injector (which recomputes it for a retargeted sub-edit). Per edit type:

- recolor, texture: the object's mask;  remove: the mask dilated by FEATHER_PX;
- move: dilate(mask ∪ mask shifted by (dx, dy));
- resize: dilate(mask ∪ mask scaled by `scale` about its box centre);
- swap: dilate(both masks ∪ each shifted by its offset);
- add: dilate(donor alpha placed centred at (cx, cy));
- replace: dilate(target mask ∪ donor alpha placed centred at (cx, cy));
- add_text: the ink bbox of the word (default font at size_px, anchor "mm", binary glyphs)
  grown by 2 px;
- background: everything outside the kept objects' masks (`object_ids` = the objects kept).

Everything is clipped to the image. Conventions the editor must share (use these helpers):
a cut-out of size h x w placed "centred at (cx, cy)" has its top-left pixel at
(cx - w // 2, cy - h // 2) (`paste_origin`); a mask is scaled about a point with `scale_about`
(nearest-neighbour affine warp); a mask is shifted with `shift` (no wrap-around).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Mapping, Sequence

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pipeline.record import InventoryObject, SubEdit
from pipeline.sources.scene import bbox

__all__ = [
    "FEATHER_PX", "TEXT_PAD_PX", "bbox", "dilate", "shift", "scale_about", "paste_origin",
    "place", "box_centre", "text_ink_box", "region_of", "donor_for",
]

FEATHER_PX = 4  # feather radius of pasted edges, and the margin inpainting may touch
TEXT_PAD_PX = 2  # an add_text region is the ink bbox grown by this much


@lru_cache(maxsize=16)
def _disk(px: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * px + 1, 2 * px + 1))


def dilate(mask: np.ndarray, px: int = FEATHER_PX) -> np.ndarray:
    """The mask grown by a disk of radius `px` (bool, same shape)."""
    if px <= 0:
        return mask.astype(bool, copy=True)
    return cv2.dilate(mask.astype(np.uint8), _disk(int(px))).astype(bool)


def shift(mask: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """The mask translated by (dx, dy) pixels; what leaves the frame is lost, nothing wraps."""
    h, w = mask.shape[:2]
    dx, dy = int(dx), int(dy)
    out = np.zeros_like(mask)
    if abs(dx) >= w or abs(dy) >= h:
        return out
    out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        mask[max(-dy, 0):h - max(dy, 0), max(-dx, 0):w - max(dx, 0)]
    return out


def box_centre(box: Sequence[int]) -> tuple[float, float]:
    """Centre (cx, cy) of an [x0, y0, x1, y1] box with exclusive upper bounds."""
    x0, y0, x1, y1 = box
    return (x0 + x1 - 1) / 2, (y0 + y1 - 1) / 2


def scale_about(mask: np.ndarray, factor: float, cx: float, cy: float) -> np.ndarray:
    """The mask scaled by `factor` about the point (cx, cy), nearest neighbour, same shape."""
    h, w = mask.shape[:2]
    matrix = np.array([[factor, 0.0, cx * (1 - factor)], [0.0, factor, cy * (1 - factor)]])
    warped = cv2.warpAffine(mask.astype(np.uint8), matrix, (w, h), flags=cv2.INTER_NEAREST,
                            borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return warped.astype(bool)


def paste_origin(h: int, w: int, cx: int, cy: int) -> tuple[int, int]:
    """Top-left (x0, y0) of an h x w cut-out placed centred at (cx, cy)."""
    return int(cx) - w // 2, int(cy) - h // 2


def place(alpha: np.ndarray, cx: int, cy: int, shape: Sequence[int]) -> np.ndarray:
    """A bool mask of `shape` (H, W, ...) with the cut-out `alpha` placed centred at (cx, cy),
    clipped to the frame."""
    H, W = int(shape[0]), int(shape[1])
    h, w = alpha.shape[:2]
    x0, y0 = paste_origin(h, w, cx, cy)
    out = np.zeros((H, W), dtype=bool)
    ax0, ay0 = max(0, -x0), max(0, -y0)
    ax1, ay1 = min(w, W - x0), min(h, H - y0)
    if ax0 < ax1 and ay0 < ay1:
        out[y0 + ay0:y0 + ay1, x0 + ax0:x0 + ax1] = alpha[ay0:ay1, ax0:ax1].astype(bool)
    return out


@lru_cache(maxsize=64)
def _font(size_px: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size_px)


def text_ink_box(text: str, cx: int, cy: int, size_px: int) -> list[int] | None:
    """[x0, y0, x1, y1] of the ink of `text` drawn at (cx, cy) (default font at `size_px`,
    anchor "mm", binary glyphs), in image coordinates (not clipped); None if no ink."""
    font = _font(int(size_px))
    left, top, right, bottom = font.getbbox(text, anchor="mm")
    pad = 2
    w, h = right - left + 2 * pad, bottom - top + 2 * pad
    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    draw.fontmode = "1"
    draw.text((pad - left, pad - top), text, fill=255, font=font, anchor="mm")
    ink = bbox(np.asarray(canvas) > 0)
    if ink is None:
        return None
    ox, oy = int(cx) + left - pad, int(cy) + top - pad
    return [ink[0] + ox, ink[1] + oy, ink[2] + ox, ink[3] + oy]


def donor_for(donors: Mapping[str, Any] | None, index: int | None) -> Mapping[str, Any] | None:
    """The donor entry of one sub-edit: `donors` is either that entry itself ({"rgb", "alpha"})
    or the sample's `private["donors"]` mapping (str(sub-edit index) → entry) with `index`."""
    if donors is None:
        return None
    if "rgb" in donors or "alpha" in donors:
        return donors
    if index is not None:
        return donors.get(str(index))
    with_alpha = [d for d in donors.values() if "alpha" in d]
    if len(with_alpha) == 1:
        return with_alpha[0]
    raise ValueError("several donors: pass the sub-edit's index to region_of")


def _objects_by_id(objects: Sequence[InventoryObject]) -> dict[int, InventoryObject]:
    return {o.id: o for o in objects}


def _mask(objects: dict[int, InventoryObject], oid: int, shape: tuple[int, int]) -> np.ndarray:
    obj = objects.get(int(oid))
    if obj is None:
        raise ValueError(f"object {oid} is not in the inventory")
    if obj.mask is None:
        raise ValueError(f"object {oid} has no mask")
    if obj.mask.shape[:2] != shape:
        raise ValueError(f"object {oid}'s mask is {obj.mask.shape[:2]}, image is {shape}")
    return obj.mask.astype(bool)


def region_of(
    sub: SubEdit,
    objects: Sequence[InventoryObject],
    shape: Sequence[int],
    donors: Mapping[str, Any] | None = None,
    index: int | None = None,
) -> np.ndarray:
    """Bool HxW: every pixel this sub-edit may change (see the module docstring).

    `shape` is the image's (H, W[, C]). `donors` is this sub-edit's donor entry, or the
    sample's whole `private["donors"]` mapping together with the sub-edit's `index`."""
    H, W = int(shape[0]), int(shape[1])
    hw = (H, W)
    by_id = _objects_by_id(objects)
    p = sub.params
    kind = sub.type
    if kind in ("recolor", "texture"):
        return _mask(by_id, sub.object_ids[0], hw).copy()
    if kind == "remove":
        return dilate(_mask(by_id, sub.object_ids[0], hw))
    if kind == "move":
        m = _mask(by_id, sub.object_ids[0], hw)
        return dilate(m | shift(m, p["dx"], p["dy"]))
    if kind == "resize":
        m = _mask(by_id, sub.object_ids[0], hw)
        cx, cy = box_centre(bbox(m))
        return dilate(m | scale_about(m, float(p["scale"]), cx, cy))
    if kind == "swap":
        a, b = (_mask(by_id, oid, hw) for oid in sub.object_ids[:2])
        (dxa, dya), (dxb, dyb) = p["offsets"]
        return dilate(a | b | shift(a, dxa, dya) | shift(b, dxb, dyb))
    if kind in ("add", "replace"):
        donor = donor_for(donors, index)
        if donor is None or "alpha" not in donor:
            raise ValueError(f"{kind} needs its donor cut-out")
        placed = place(donor["alpha"], p["cx"], p["cy"], hw)
        if kind == "replace":
            placed |= _mask(by_id, sub.object_ids[0], hw)
        return dilate(placed)
    if kind == "add_text":
        out = np.zeros(hw, dtype=bool)
        box = text_ink_box(p["text"], p["cx"], p["cy"], p["size_px"])
        if box is not None:
            x0, y0, x1, y1 = box
            out[max(0, y0 - TEXT_PAD_PX):max(0, min(H, y1 + TEXT_PAD_PX)),
                max(0, x0 - TEXT_PAD_PX):max(0, min(W, x1 + TEXT_PAD_PX))] = True
        return out
    if kind == "background":
        kept = np.zeros(hw, dtype=bool)
        for oid in sub.object_ids:
            kept |= _mask(by_id, oid, hw)
        return ~kept
    raise ValueError(f"no region rule for edit type {kind!r}")
