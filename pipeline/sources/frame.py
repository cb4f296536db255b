"""Where a file's pixels land in a sample: one uniform scale and a centre crop, never a stretch.

`Frame.fit(width, height, resolution)` is the rule every source and importer follows:

1. scale the file uniformly so that its short side is `resolution` (`scale = resolution / short`);
2. the long side, `long * scale`, is floored to a multiple of 64 (but kept at least `resolution`),
   so the image is cropped, never padded;
3. what the floor removes is cut from both ends of the long side equally (a centre crop).

`crop` is that window in the file's own pixels, as floats `[x0, y0, x1, y1]`: the sample is the
file cropped at `crop` and resized to `size`, and both axes get exactly the same scale (PIL's
`resize(size, box=crop)` does it in one step). A source records `original_size` and `crop` with
the sample (`Frame.meta`), so anyone can line the sample up with the original file.

An array of another resolution with the same aspect (a dataset's mask at its own resolution, a
later turn saved at another size) gets the same window, scaled to its own pixels. Two sizes have
the same aspect when either side of one, predicted from the other side and the other size's
aspect, is within one pixel (`same_aspect`): what rounding a real size to whole pixels allows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from PIL import Image

GRID = 64  # the long side of a sample is a multiple of this (or the resolution itself)


def same_aspect(a: tuple[int, int], b: tuple[int, int]) -> bool:
    """True when (w, h) sizes `a` and `b` differ by no more than rounding to whole pixels:
    `b`'s width predicted from its height and `a`'s aspect, or its height predicted from its
    width, is within one pixel."""
    (w, h), (w2, h2) = a, b
    if min(w, h, w2, h2) <= 0:
        return False
    return abs(w2 - w * h2 / h) <= 1 or abs(h2 - h * w2 / w) <= 1


@dataclass(frozen=True)
class Frame:
    original: tuple[int, int]  # (w, h) of the file, as decoded
    size: tuple[int, int]  # (w, h) of the sample
    crop: tuple[float, float, float, float]  # the window of the file that becomes the sample

    @classmethod
    def fit(cls, width: int, height: int, resolution: int) -> "Frame":
        """The frame of a `width` x `height` file at `resolution` (see the module docstring)."""
        width, height, resolution = int(width), int(height), int(resolution)
        if width <= 0 or height <= 0:
            raise ValueError(f"image has no pixels ({width}x{height})")
        short, long = min(width, height), max(width, height)
        out_long = max(resolution, math.floor(long * resolution / short / GRID + 1e-9) * GRID)
        if out_long * short == long * resolution:  # the grid fits the aspect: no crop
            span = float(long)
        else:
            span = out_long * short / resolution  # file pixels the long side keeps
        cut = (long - span) / 2
        if width >= height:
            return cls((width, height), (out_long, resolution), (cut, 0.0, cut + span, float(height)))
        return cls((width, height), (resolution, out_long), (0.0, cut, float(width), cut + span))

    @property
    def scale(self) -> float:
        """Sample pixels per file pixel (the same on both axes)."""
        return self.size[0] / (self.crop[2] - self.crop[0])

    def meta(self) -> dict[str, Any]:
        """What a sample records to be lined up with its file: `original_size` and `crop`."""
        return {"original_size": [int(v) for v in self.original],
                "crop": [round(float(v), 3) for v in self.crop]}

    def crop_in(self, size: tuple[int, int]) -> tuple[float, float, float, float]:
        """The crop window in the pixels of an array of `size` (w, h) showing the same picture
        (the same aspect, any resolution); ValueError when the aspect differs."""
        w, h = int(size[0]), int(size[1])
        if (w, h) == self.original:
            return self.crop
        if not same_aspect(self.original, (w, h)):
            raise ValueError(f"{w}x{h} is not the aspect ratio of {self.original[0]}x"
                             f"{self.original[1]}")
        sx, sy = w / self.original[0], h / self.original[1]
        x0, y0, x1, y1 = self.crop
        return (x0 * sx, y0 * sy, x1 * sx, y1 * sy)

    def image(self, image: np.ndarray) -> np.ndarray:
        """uint8 HxWx3 at the file's or another resolution of its aspect → the sample's pixels
        (cropped and resized in one Lanczos step)."""
        h, w = image.shape[:2]
        box = self.crop_in((w, h))
        if box == (0.0, 0.0, float(w), float(h)) and (w, h) == self.size:
            return image
        out = Image.fromarray(image).resize(self.size, Image.Resampling.LANCZOS, box=box,
                                            reducing_gap=3.0)
        return np.asarray(out, dtype=np.uint8)

    def mask(self, mask: np.ndarray) -> np.ndarray:
        """Bool mask at the file's or another resolution of its aspect → the sample's: area-
        weighted (bilinear when enlarging), then thresholded at one half."""
        mask = np.asarray(mask, dtype=bool)
        h, w = mask.shape[:2]
        box = self.crop_in((w, h))
        if box == (0.0, 0.0, float(w), float(h)) and (w, h) == self.size:
            return mask
        smaller = self.size[0] <= box[2] - box[0] and self.size[1] <= box[3] - box[1]
        resample = Image.Resampling.BOX if smaller else Image.Resampling.BILINEAR
        grey = Image.fromarray(mask.astype(np.uint8) * 255)
        return np.asarray(grey.resize(self.size, resample, box=box)) >= 128

    def points(self, points: Sequence[tuple[float, float]],
               of: tuple[int, int] | None = None) -> list[tuple[float, float]]:
        """(x, y) points in the file's pixels (or those of a size `of` of its aspect) → the
        sample's pixels (outside the crop they fall outside the sample)."""
        x0, y0, x1, y1 = self.crop_in(of or self.original)
        sx, sy = self.size[0] / (x1 - x0), self.size[1] / (y1 - y0)
        return [((float(x) - x0) * sx, (float(y) - y0) * sy) for x, y in points]

    def box(self, box: Sequence[float], of: tuple[int, int] | None = None) -> list[int]:
        """[x0, y0, x1, y1] in the file's pixels (or those of a size `of` of its aspect) → an
        integer box in the sample's, outward-rounded and clipped (exclusive upper bounds); a box
        outside the crop comes back empty (x1 <= x0 or y1 <= y0)."""
        (ax, ay), (bx, by) = self.points([(box[0], box[1]), (box[2], box[3])], of)
        w, h = self.size
        return [int(np.clip(math.floor(ax + 1e-6), 0, w)), int(np.clip(math.floor(ay + 1e-6), 0, h)),
                int(np.clip(math.ceil(bx - 1e-6), 0, w)), int(np.clip(math.ceil(by - 1e-6), 0, h))]
