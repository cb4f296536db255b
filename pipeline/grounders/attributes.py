"""Words for what a grounder found: colour names in a perceptual space, size and position words.

Shared by every grounder (classical, given, ...) so an inventory says the same thing in the same
words whoever produced it, and by the photo composer (its colour palettes) and judge.

Colour names: `COLOR_NAMES` maps each name to a representative sRGB colour. A colour is named in
CIELAB: when its chroma C* is below `ACHROMATIC_CHROMA` it is black, dark gray, gray, light gray
or white by lightness L*; otherwise it takes the nearest chromatic name by a CIE94-like distance in LCh where hue
differences count fully and lightness and chroma differences are divided by `LIGHTNESS_WEIGHT`
and `CHROMA_WEIGHT` (hue decides the family, lightness the "dark"/"light" modifier).
Every representative colour is named by its own name (`color_name(COLOR_NAMES[n]) == n`).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import cv2
import numpy as np

from pipeline.compose.frame import CELLS
from pipeline.sources.scene import bbox

# name -> representative sRGB. Achromatic names first, then hue families with their shades.
COLOR_NAMES: dict[str, tuple[int, int, int]] = {
    "black": (20, 20, 20),
    "dark gray": (70, 70, 70),
    "gray": (128, 128, 128),
    "light gray": (190, 190, 190),
    "white": (245, 245, 245),
    "dark red": (120, 20, 25),
    "red": (205, 35, 35),
    "pink": (240, 135, 165),
    "orange": (240, 130, 30),
    "dark brown": (75, 45, 25),
    "brown": (140, 90, 50),
    "beige": (215, 190, 150),
    "dark yellow": (170, 140, 20),
    "yellow": (240, 215, 40),
    "light yellow": (245, 235, 150),
    "olive": (110, 115, 40),
    "dark green": (25, 85, 35),
    "green": (50, 160, 60),
    "light green": (150, 220, 130),
    "teal": (20, 130, 130),
    "dark blue": (25, 35, 110),
    "blue": (45, 85, 210),
    "light blue": (135, 190, 240),
    "dark purple": (70, 25, 90),
    "purple": (135, 55, 175),
    "light purple": (195, 155, 225),
    "magenta": (200, 40, 160),
}
ACHROMATIC = ("black", "dark gray", "gray", "light gray", "white")
# The hue family of each name: "dark red" and "red" are the same colour to a reader asked to
# tell them apart after a recolour, "brown" and "orange" are not.
COLOR_FAMILY: dict[str, str] = {
    **{n: "neutral" for n in ACHROMATIC},
    "dark red": "red", "red": "red", "pink": "pink", "magenta": "pink",
    "orange": "orange", "dark brown": "brown", "brown": "brown", "beige": "brown",
    "dark yellow": "yellow", "yellow": "yellow", "light yellow": "yellow", "olive": "olive",
    "dark green": "green", "green": "green", "light green": "green", "teal": "teal",
    "dark blue": "blue", "blue": "blue", "light blue": "blue",
    "dark purple": "purple", "purple": "purple", "light purple": "purple",
}
ACHROMATIC_CHROMA = 12.0  # C* below this is a gray
LIGHTNESS_WEIGHT = 2.0  # lightness differences count half among chromatic names
CHROMA_WEIGHT = 2.0  # and so do chroma differences: hue matters most
# Achromatic names by L* upper bound.
_GRAY_STEPS = ((22.0, "black"), (42.0, "dark gray"), (68.0, "gray"), (88.0, "light gray"),
               (math.inf, "white"))

# Size words by the object's share of the image area (upper bounds).
SIZE_STEPS = ((0.02, "small"), (0.08, "medium"), (math.inf, "large"))


def rgb_to_lab(rgb: np.ndarray | Sequence[float]) -> np.ndarray:
    """CIELAB (D65; L* 0..100) of sRGB uint8 values, any shape (..., 3)."""
    arr = np.asarray(rgb, dtype=np.float32)
    flat = (arr.reshape(-1, 1, 3) / 255.0).astype(np.float32)
    return cv2.cvtColor(flat, cv2.COLOR_RGB2Lab).reshape(arr.shape)


def lab_to_rgb(lab: np.ndarray | Sequence[float]) -> np.ndarray:
    """sRGB uint8 of CIELAB values, any shape (..., 3) (out-of-gamut colours clipped)."""
    arr = np.asarray(lab, dtype=np.float32)
    rgb = cv2.cvtColor(arr.reshape(-1, 1, 3), cv2.COLOR_Lab2RGB).reshape(arr.shape)
    return np.clip(np.round(rgb * 255), 0, 255).astype(np.uint8)


_CHROMATIC = [n for n in COLOR_NAMES if n not in ACHROMATIC]
_CHROMATIC_LAB = rgb_to_lab(np.array([COLOR_NAMES[n] for n in _CHROMATIC]))
_CHROMATIC_C = np.hypot(_CHROMATIC_LAB[:, 1], _CHROMATIC_LAB[:, 2])


def color_names(rgb: np.ndarray) -> list[str]:
    """Colour names of many sRGB colours (N x 3)."""
    lab = rgb_to_lab(np.asarray(rgb).reshape(-1, 3))
    chroma = np.hypot(lab[:, 1], lab[:, 2])
    d_l = lab[:, None, 0] - _CHROMATIC_LAB[None, :, 0]
    d_c = chroma[:, None] - _CHROMATIC_C[None, :]
    d_ab2 = ((lab[:, None, 1:] - _CHROMATIC_LAB[None, :, 1:]) ** 2).sum(axis=2)
    d_h2 = np.maximum(d_ab2 - d_c ** 2, 0.0)  # squared hue difference ΔH²
    distance = (d_l / LIGHTNESS_WEIGHT) ** 2 + (d_c / CHROMA_WEIGHT) ** 2 + d_h2
    nearest = np.argmin(distance, axis=1)
    names = []
    for (lightness, _, _), c, k in zip(lab, chroma, nearest):
        if c < ACHROMATIC_CHROMA:
            names.append(next(name for bound, name in _GRAY_STEPS if lightness < bound))
        else:
            names.append(_CHROMATIC[int(k)])
    return names


def color_name(rgb: Sequence[float]) -> str:
    """The colour name of one sRGB colour (see the module docstring)."""
    return color_names(np.asarray(rgb, dtype=np.float32).reshape(1, 3))[0]


def lightness(rgb: Sequence[float]) -> float:
    """CIELAB L* (0..100) of one sRGB colour."""
    return float(rgb_to_lab(np.asarray(rgb, dtype=np.float32).reshape(1, 3))[0, 0])


def same_family(a: str, b: str) -> bool:
    return COLOR_FAMILY.get(a, a) == COLOR_FAMILY.get(b, b)


def size_word(area_share: float) -> str:
    return next(word for bound, word in SIZE_STEPS if area_share < bound)


def position_word(box: Sequence[int], shape: Sequence[int]) -> str:
    """The REGIONS word of the cell (thirds of the frame) holding the box centre."""
    h, w = int(shape[0]), int(shape[1])
    cx = (box[0] + box[2]) / 2 / w
    cy = (box[1] + box[3]) / 2 / h
    return CELLS[(min(int(cy * 3), 2), min(int(cx * 3), 2))]


def median_rgb(image: np.ndarray, mask: np.ndarray, max_pixels: int = 20000) -> list[int]:
    """Per-channel median colour of the image under the mask (a strided subsample of big masks)."""
    count = int(mask.sum())
    if count == 0:
        raise ValueError("empty mask has no colour")
    step = max(1, int(math.sqrt(count / max_pixels)))
    sub = mask[::step, ::step]
    pixels = image[::step, ::step][sub] if sub.any() else image[mask]
    return [int(v) for v in np.median(pixels, axis=0)]


def region_attributes(image: np.ndarray, mask: np.ndarray,
                      known: dict[str, Any] | None = None) -> dict[str, Any]:
    """What can be said of the image region under `mask`: colour name and rgb, size and position
    words, area share. Values already `known` are kept."""
    known = dict(known or {})
    h, w = mask.shape[:2]
    box = bbox(mask)
    if box is None:
        raise ValueError("empty mask")
    area = float(mask.sum()) / (h * w)
    if "rgb" not in known:
        known["rgb"] = median_rgb(image, mask)
    if "color" not in known:
        known["color"] = color_name(known["rgb"])
    known.setdefault("size", size_word(area))
    known.setdefault("position", position_word(box, (h, w)))
    known.setdefault("area", round(area, 5))
    return known
