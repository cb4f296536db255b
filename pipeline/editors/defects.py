"""Fault injection: spoil a clean target the way generative editors fail, for any editor.

One defect per spoiled sample, its type drawn uniformly from the allowed types; a type that does
not apply to the sample (no colour-bearing sub-edit for `wrong_color`, nothing else to pick for
`wrong_object`, ...) or whose result is not measurably different from the clean target (a blur
over a flat background changes nothing) gives way to another draw. The record's sub-edits and
regions stay those of the INTENDED edit, so a judge has to catch the difference; what was done is
returned as {"type", "sub_edit": i or None, "detail": {...}} for the hidden defect log.

The injectors are editor-neutral: they see an `EditTrace` (the images before and after each
sub-edit, the regions, a `replay` that re-runs the edit from sub-edit i with one sub-edit changed)
and, for the two defects that change what a sub-edit means, the editor's `EditorHooks` (which
other object it could wrongly act on, which wrong colour it could use). The procedural editor
(scene graphs) and the photo editor (real pixels) each supply their own hooks.

Magnitudes (shared with the pixel judge's author):
- skip: sub-edit i is not applied.
- wrong_object: sub-edit i is applied to another object (different colour or kind).
- wrong_color: a colour-bearing sub-edit uses a colour at RGB distance >= 100 from the asked one.
- partial: only 30-60% of region i (split by a random line) gets its change; the rest keeps the
  source pixels.
- background_shift: global colour shift of 12-30 levels (>= 12 in at least one channel) outside
  the regions.
- background_blur: Gaussian blur, radius (sigma) 1.5-3, outside the regions (blurred with
  the outside pixels only, so nothing of the regions bleeds out).
- background_noise: Gaussian noise, sigma 6-15, outside the regions.
- artifact: 1-3 saturated blobs/scribbles, each >= 0.3% of the image, outside the regions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import numpy as np
from PIL import Image, ImageDraw

from pipeline.record import SubEdit

DEFECT_TYPES = (
    "skip",
    "wrong_object",
    "wrong_color",
    "partial",
    "background_shift",
    "background_blur",
    "background_noise",
    "artifact",
)
SUB_EDIT_DEFECTS = ("skip", "wrong_object", "wrong_color", "partial")

WRONG_COLOR_DISTANCE = 100
PARTIAL_FRACTION = (0.3, 0.6)
SHIFT_LEVELS = (12, 30)
BLUR_RADIUS = (1.5, 3.0)
NOISE_SIGMA = (6.0, 15.0)
ARTIFACT_COUNT = (1, 3)
ARTIFACT_MIN_AREA = 0.003  # of the image
ARTIFACT_COLORS = ((255, 0, 255), (0, 255, 0), (255, 0, 0), (0, 255, 255), (255, 255, 0),
                   (0, 0, 255))
# "Measurably different": this many pixels (at least) differ by >= CHANGE_LEVEL in some channel,
# in the place the defect is meant to be.
CHANGE_LEVEL = 8
MIN_CHANGED_FRACTION = 0.0005
MIN_CHANGED_PIXELS = 32

Injected = tuple[np.ndarray, dict[str, Any]]


Detail = dict[str, Any]


class EditorHooks(Protocol):
    """What only the editor knows about its sub-edits, asked by `wrong_object` and `wrong_color`.

    A hook returns a sub-edit to replay in place of the intended one (a new object: the record
    keeps the intended one) with the detail for the defect log, or None where the change would be
    a no-op (nothing visible to catch)."""

    def wrong_objects(self, trace: "EditTrace", i: int, sub: SubEdit, intended: int) -> list[Any]:
        """The objects sub-edit i could wrongly act on instead of object `intended` (the editor's
        own handles, in a stable order; empty: none)."""
        ...

    def retarget(self, trace: "EditTrace", i: int, sub: SubEdit, intended: int,
                 other: Any) -> tuple[SubEdit, Detail] | None:
        """Sub-edit i done to `other` instead of `intended`; the detail names at least
        "intended_object" and "actual_object"."""
        ...

    def wrong_colors(self, trace: "EditTrace", i: int, sub: SubEdit) -> list[str]:
        """Colour names sub-edit i could wrongly use (RGB distance >= WRONG_COLOR_DISTANCE from the
        asked one, the preferred ones only); empty where it bears no colour."""
        ...

    def recolor(self, trace: "EditTrace", i: int, sub: SubEdit,
                color: str) -> tuple[SubEdit, Detail] | None:
        """Sub-edit i in `color`; the detail names "asked", "used" and "distance"."""
        ...


@dataclass
class EditTrace:
    """What the editor knows about a clean edit, for the injectors.

    `images[i]`: the image before sub-edit i (the last: the target). `regions[i]`: the pixels
    sub-edit i changed. `replay(sub_edits, start)`: the image after `sub_edits` (a full list,
    None = skipped) whose entries before `start` are the intended ones: it starts at images[start].
    `states[i]`: the editor's own state before sub-edit i (a scene graph, ...), opaque here and
    read by its `hooks`; without hooks `wrong_object` and `wrong_color` do not apply.
    """

    images: list[np.ndarray]
    sub_edits: list[SubEdit]
    regions: list[np.ndarray]
    background_mask: np.ndarray
    replay: Callable[[list[SubEdit | None], int], np.ndarray]
    states: list[Any] = field(default_factory=list)
    hooks: EditorHooks | None = None

    @property
    def source(self) -> np.ndarray:
        return self.images[0]

    @property
    def target(self) -> np.ndarray:
        return self.images[-1]

    def with_sub_edit(self, i: int, sub: SubEdit | None) -> np.ndarray:
        subs: list[SubEdit | None] = list(self.sub_edits)
        subs[i] = sub
        return self.replay(subs, i)

    def touched_ids(self) -> set[int]:
        return {i for sub in self.sub_edits for i in sub.object_ids}


def changed_mask(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bool HxW: where two images differ by at least CHANGE_LEVEL in some channel."""
    far = np.abs(a.astype(np.int16) - b.astype(np.int16)) >= CHANGE_LEVEL
    return far[..., 0] | far[..., 1] | far[..., 2]


def measurable(clean: np.ndarray, spoiled: np.ndarray, where: np.ndarray) -> bool:
    """Whether `spoiled` differs from `clean` visibly, inside `where`."""
    needed = max(MIN_CHANGED_PIXELS, int(MIN_CHANGED_FRACTION * where.size))
    return int((changed_mask(clean, spoiled) & where).sum()) >= needed


def _order(rng: np.random.Generator, n: int) -> list[int]:
    return [int(k) for k in rng.permutation(n)]


# ---- sub-edit defects ---------------------------------------------------------------------------

def inject_skip(rng: np.random.Generator, trace: EditTrace) -> Injected | None:
    i = int(rng.integers(len(trace.sub_edits)))
    return trace.with_sub_edit(i, None), {"type": "skip", "sub_edit": i, "detail": {}}


# Sub-edit types that act on objects already in the image (the others add or keep objects).
TARGETED_TYPES = ("remove", "replace", "recolor", "resize", "move", "swap", "texture")


def inject_wrong_object(rng: np.random.Generator, trace: EditTrace) -> Injected | None:
    if trace.hooks is None:
        return None
    for i in _order(rng, len(trace.sub_edits)):
        sub = trace.sub_edits[i]
        if sub.type not in TARGETED_TYPES:
            continue
        intended = sub.object_ids[int(rng.integers(len(sub.object_ids)))]
        others = trace.hooks.wrong_objects(trace, i, sub, intended)
        for k in _order(rng, len(others)):
            result = trace.hooks.retarget(trace, i, sub, intended, others[k])
            if result is None:
                continue
            wrong, detail = result
            return trace.with_sub_edit(i, wrong), {"type": "wrong_object", "sub_edit": i,
                                                  "detail": detail}
    return None


def inject_wrong_color(rng: np.random.Generator, trace: EditTrace) -> Injected | None:
    if trace.hooks is None:
        return None
    for i in _order(rng, len(trace.sub_edits)):
        sub = trace.sub_edits[i]
        preferred = trace.hooks.wrong_colors(trace, i, sub)
        if not preferred:
            continue
        color = preferred[int(rng.integers(len(preferred)))]
        result = trace.hooks.recolor(trace, i, sub, color)
        if result is None:
            continue
        wrong, detail = result
        return trace.with_sub_edit(i, wrong), {"type": "wrong_color", "sub_edit": i,
                                              "detail": detail}
    return None


def inject_partial(rng: np.random.Generator, trace: EditTrace) -> Injected | None:
    n = len(trace.sub_edits)
    i = int(rng.integers(n))
    region = trace.regions[i]
    others = [trace.regions[j] for j in range(n) if j != i]
    own = region & ~np.logical_or.reduce(others) if others else region
    if not own.any():
        return None
    # The line splits the pixels only this sub-edit changes, so 40-70 % of them stay undone even
    # when the region is mostly shared with other sub-edits.
    ys, xs = np.nonzero(own)
    angle = float(rng.uniform(0, 2 * math.pi))
    projection = xs * math.cos(angle) + ys * math.sin(angle)
    fraction = float(rng.uniform(*PARTIAL_FRACTION))
    cut = float(np.quantile(projection, fraction))
    # Pixels of the region past the line keep the source; only region i changes them (`own`),
    # so there the source is exactly "sub-edit i not done".
    h, w = region.shape
    yy, xx = np.mgrid[0:h, 0:w]
    rest = own & ((xx * math.cos(angle) + yy * math.sin(angle)) > cut)
    spoiled = trace.target.copy()
    spoiled[rest] = trace.source[rest]
    detail = {"applied_fraction": round(fraction, 3), "angle": round(angle, 4),
              "offset": round(cut, 2)}
    return spoiled, {"type": "partial", "sub_edit": i, "detail": detail}


# ---- background defects -------------------------------------------------------------------------

def inject_background_shift(rng: np.random.Generator, trace: EditTrace) -> Injected | None:
    outside = trace.background_mask
    if not outside.any():
        return None
    low, high = SHIFT_LEVELS
    magnitude = rng.integers(0, high + 1, size=3)
    magnitude[int(rng.integers(3))] = rng.integers(low, high + 1)
    # Shift away from the nearer end of the range, so clipping cannot eat the shift.
    means = trace.target[outside].mean(axis=0)
    shift = np.where(means > 127, -magnitude, magnitude).astype(np.int16)
    spoiled = trace.target.copy()
    spoiled[outside] = np.clip(trace.target[outside].astype(np.int16) + shift, 0, 255)
    return spoiled, {"type": "background_shift", "sub_edit": None,
                     "detail": {"shift": [int(v) for v in shift]}}


def _gaussian_blur(values: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of an HxWxC float array (edges reflected)."""
    r = max(1, int(math.ceil(3 * sigma)))
    taps = np.exp(-(np.arange(-r, r + 1) ** 2) / (2 * sigma * sigma)).astype(np.float32)
    taps /= taps.sum()
    h, w = values.shape[:2]
    padded = np.pad(values, ((r, r), (0, 0), (0, 0)), mode="reflect")
    rows = sum(t * padded[k:k + h] for k, t in enumerate(taps))
    padded = np.pad(rows, ((0, 0), (r, r), (0, 0)), mode="reflect")
    return sum(t * padded[:, k:k + w] for k, t in enumerate(taps))


def inject_background_blur(rng: np.random.Generator, trace: EditTrace) -> Injected | None:
    outside = trace.background_mask
    if not outside.any():
        return None
    radius = float(rng.uniform(*BLUR_RADIUS))
    # Blur the outside with itself only (normalised convolution): the regions' colours do not
    # bleed out, so a flat background stays flat and only real structure there gets soft.
    weight = outside.astype(np.float32)[..., None]
    stacked = np.concatenate([trace.target.astype(np.float32) * weight, weight], axis=2)
    blurred = _gaussian_blur(stacked, radius)
    mean = blurred[..., :3] / np.maximum(blurred[..., 3:], 1e-6)
    spoiled = trace.target.copy()
    spoiled[outside] = np.clip(np.rint(mean[outside]), 0, 255).astype(np.uint8)
    return spoiled, {"type": "background_blur", "sub_edit": None,
                     "detail": {"radius": round(radius, 3)}}


def inject_background_noise(rng: np.random.Generator, trace: EditTrace) -> Injected | None:
    outside = trace.background_mask
    if not outside.any():
        return None
    sigma = float(rng.uniform(*NOISE_SIGMA))
    noise = rng.normal(0.0, sigma, size=(int(outside.sum()), 3))
    spoiled = trace.target.copy()
    spoiled[outside] = np.clip(np.rint(trace.target[outside] + noise), 0, 255).astype(np.uint8)
    return spoiled, {"type": "background_noise", "sub_edit": None,
                     "detail": {"sigma": round(sigma, 3)}}


def _artifact_shape(rng: np.random.Generator, w: int, h: int) -> tuple[np.ndarray, str]:
    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    side = min(w, h)
    x, y = rng.uniform(0.05, 0.95) * w, rng.uniform(0.05, 0.95) * h
    if rng.random() < 0.5:
        rx, ry = rng.uniform(0.035, 0.07, size=2) * side
        draw.ellipse([x - rx, y - ry, x + rx, y + ry], fill=255)
        shape = "blob"
    else:
        points = [(x, y)]
        for _ in range(int(rng.integers(3, 7))):
            x = float(np.clip(x + rng.uniform(-0.12, 0.12) * w, 0, w - 1))
            y = float(np.clip(y + rng.uniform(-0.12, 0.12) * h, 0, h - 1))
            points.append((x, y))
        draw.line(points, fill=255, width=max(3, int(rng.uniform(0.012, 0.025) * side)),
                  joint="curve")
        shape = "scribble"
    return np.asarray(canvas) > 0, shape


def inject_artifact(rng: np.random.Generator, trace: EditTrace) -> Injected | None:
    h, w = trace.background_mask.shape
    need = ARTIFACT_MIN_AREA * h * w
    spoiled = trace.target.copy()
    marks = []
    for _ in range(int(rng.integers(ARTIFACT_COUNT[0], ARTIFACT_COUNT[1] + 1))):
        for _ in range(40):
            shape, kind = _artifact_shape(rng, w, h)
            shape &= trace.background_mask  # outside the regions only
            if shape.sum() >= need:
                break
        else:
            continue
        color = ARTIFACT_COLORS[int(rng.integers(len(ARTIFACT_COLORS)))]
        spoiled[shape] = color
        marks.append({"shape": kind, "color": list(color), "pixels": int(shape.sum())})
    if not marks:
        return None
    return spoiled, {"type": "artifact", "sub_edit": None, "detail": {"marks": marks}}


INJECTORS: dict[str, Callable[[np.random.Generator, EditTrace], Injected | None]] = {
    "skip": inject_skip,
    "wrong_object": inject_wrong_object,
    "wrong_color": inject_wrong_color,
    "partial": inject_partial,
    "background_shift": inject_background_shift,
    "background_blur": inject_background_blur,
    "background_noise": inject_background_noise,
    "artifact": inject_artifact,
}


def expected_place(trace: EditTrace, record: dict[str, Any]) -> np.ndarray:
    """Where a defect must show: region i for a sub-edit defect, outside the regions otherwise."""
    if record["sub_edit"] is None:
        return trace.background_mask
    return trace.regions[record["sub_edit"]]


def check_defect_settings(defect_rate: float, defect_types: Sequence[str]) -> tuple[str, ...]:
    """The editor's fault-injection settings, checked: ValueError for a rate outside 0..1 or an
    unknown or empty set of types; returns the types as a tuple."""
    if not 0.0 <= defect_rate <= 1.0:
        raise ValueError(f"defect_rate must be within 0..1, got {defect_rate}")
    defect_types = tuple(defect_types)
    unknown = [t for t in defect_types if t not in DEFECT_TYPES]
    if unknown or not defect_types:
        raise ValueError(f"defect_types must be a non-empty subset of {DEFECT_TYPES}, "
                         f"got {defect_types}")
    return defect_types


def inject_defect(
    rng: np.random.Generator, trace: EditTrace, types: Sequence[str] = DEFECT_TYPES
) -> Injected | None:
    """One measurable defect of a type drawn uniformly from `types` (redrawn while a type does
    not apply), or None if none of them applies to this sample."""
    remaining = list(types)
    while remaining:
        kind = remaining.pop(int(rng.integers(len(remaining))))
        result = INJECTORS[kind](rng, trace)
        if result is None:
            continue
        spoiled, record = result
        if measurable(trace.target, spoiled, expected_place(trace, record)):
            return spoiled, record
    return None
