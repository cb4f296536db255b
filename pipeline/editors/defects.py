"""Fault injection: spoil a clean procedural target the way generative editors fail.

One defect per spoiled sample, its type drawn uniformly from the allowed types; a type that does
not apply to the sample (no colour-bearing sub-edit for `wrong_color`, nothing else to pick for
`wrong_object`, ...) or whose result is not measurably different from the clean target (a blur
over a flat background changes nothing) gives way to another draw. The record's sub-edits and
regions stay those of the INTENDED edit, so a judge has to catch the difference; what was done is
returned as {"type", "sub_edit": i or None, "detail": {...}} for the hidden defect log.

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

import copy
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw

from pipeline.record import SubEdit
from pipeline.sources.scene import BACKGROUND_COLORS, COLORS, TEXT_KIND, Scene, SceneObject

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


@dataclass
class EditTrace:
    """What the editor knows about a clean edit, for the injectors.

    `states[i]`/`images[i]`: the scene and its render before sub-edit i (the last: the target).
    `replay(sub_edits, start)`: the render of the source scene after `sub_edits` (a full list,
    None = skipped) whose entries before `start` are the intended ones: it starts at states[start].
    """

    states: list[Scene]
    images: list[np.ndarray]
    sub_edits: list[SubEdit]
    regions: list[np.ndarray]
    background_mask: np.ndarray
    replay: Callable[[list[SubEdit | None], int], np.ndarray]

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


def _retarget(sub: SubEdit, intended: int, other: SceneObject) -> SubEdit | None:
    """`sub` done to `other` instead of object `intended`, or None where it would be a no-op."""
    p = sub.params
    wrong = SubEdit(sub.type, sub.text, sub.target, list(sub.object_ids), copy.deepcopy(p))
    wrong.object_ids = [other.id if k == intended else k for k in sub.object_ids]
    if sub.type == "recolor" and other.color == p["to_color"]:
        return None
    if sub.type == "texture" and other.pattern == p["to_pattern"]:
        return None
    if sub.type == "replace" and other.kind == p["to_kind"]:
        return None
    if sub.type == "resize" and other.size == p["to_size"]:
        return None
    if sub.type == "move":  # the same displacement, kept inside the frame
        dx, dy = p["to_cx"] - p["from_cx"], p["to_cy"] - p["from_cy"]
        wrong.params["to_cx"] = float(np.clip(other.cx + dx, 0.1, 0.9))
        wrong.params["to_cy"] = float(np.clip(other.cy + dy, 0.1, 0.9))
    return wrong


def inject_wrong_object(rng: np.random.Generator, trace: EditTrace) -> Injected | None:
    touched = trace.touched_ids()
    targeted = ("remove", "replace", "recolor", "resize", "move", "swap", "texture")
    for i in _order(rng, len(trace.sub_edits)):
        sub = trace.sub_edits[i]
        if sub.type not in targeted:
            continue
        state = trace.states[i]
        intended = sub.object_ids[int(rng.integers(len(sub.object_ids)))]
        meant = state.get(intended)
        others = [o for o in state.objects if o.id not in touched and o.kind != TEXT_KIND
                  and (o.kind != meant.kind or o.color != meant.color)]
        for k in _order(rng, len(others)):
            other = others[k]
            wrong = _retarget(sub, intended, other)
            if wrong is None:
                continue
            detail = {"intended_object": intended, "actual_object": other.id,
                      "actual_kind": other.kind, "actual_color": other.color}
            return trace.with_sub_edit(i, wrong), {"type": "wrong_object", "sub_edit": i,
                                                  "detail": detail}
    return None


_COLOR_FIELDS = {"recolor": "to_color", "add": "color", "replace": "to_color",
                 "add_text": "color", "background": "to_colors"}


def inject_wrong_color(rng: np.random.Generator, trace: EditTrace) -> Injected | None:
    for i in _order(rng, len(trace.sub_edits)):
        sub = trace.sub_edits[i]
        field = _COLOR_FIELDS.get(sub.type)
        if field is None:
            continue
        palette = BACKGROUND_COLORS if sub.type == "background" else COLORS
        asked = sub.params[field][0] if sub.type == "background" else sub.params[field]
        far = [c for c in palette if math.dist(palette[c], palette[asked]) >= WRONG_COLOR_DISTANCE]
        # Prefer a colour that is not simply "no change" (recolor) or invisible (text on a sign).
        avoid: set[str] = set()
        if sub.type == "recolor":
            avoid.add(sub.params["from_color"])
        if sub.type == "add_text" and sub.params.get("on_object") is not None:
            sign = trace.states[i].get(sub.params["on_object"])
            avoid.update(c for c in COLORS if math.dist(COLORS[c], COLORS[sign.color]) < 100)
        preferred = [c for c in far if c not in avoid] or far
        if not preferred:
            continue
        color = preferred[int(rng.integers(len(preferred)))]
        wrong = SubEdit(sub.type, sub.text, sub.target, list(sub.object_ids),
                        copy.deepcopy(sub.params))
        if sub.type == "background":
            wrong.params[field][0] = color
            if color in wrong.params[field][1:]:
                continue
        else:
            wrong.params[field] = color
        detail = {"asked": asked, "used": color,
                  "distance": round(math.dist(palette[color], palette[asked]), 1)}
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
