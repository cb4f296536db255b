"""The embedded pixel judge: scores an edit from the two images and the structured sub-edits only.

It reads a `JudgeView` (source, target, the sub-edits with their params and region masks, the
background mask) and nothing else: no scene graph, no defect log. The procedural world paints every
object in one saturated colour (pattern marks in `scene.pattern_color` of it) on a pale ground, so
"is this pixel the asked colour" is a sharp test, and each sub-edit's check is a few array
operations inside its box.

Per sub-edit, a score in [0, 1] ("was the described change carried out inside its region"):
- recolor:    share of the object's source pixels (inside the region) now in the new colour
              (plain or pattern shade);
- remove:     share of the object's source pixels that changed and no longer show its colour;
- add:        share of the asked shape (kind, size, place: drawn exactly) showing the asked colour;
- add_text:   min(recall, precision) of the asked text's glyphs (drawn exactly) in its colour;
- replace:    the old kind's outline is fitted to the object's source pixels (size and centre);
              min(share of the new kind's outline, at that centre and size, showing the new
              colour; share of the old object's pixels outside it that changed);
- resize:     the same with the old and new sizes, and the visible area must change by about
              the asked ratio (a generous slack for occlusion);
- move:       min(share of the object's source pixels, shifted by the asked displacement, that
              show its colour where the region holds them; share of its old pixels left behind
              that changed and lost the colour);
- swap:       each object (told apart by colour, or by place when both share one) moves by the
              measured displacement, which must match the distance between the two; then as for
              move, for both at once;
- texture:    min(share of the new pattern's mark pixels painted in the shade, share of the
              other object pixels painted plain), best over the pattern periods of the three sizes;
- background: share of the background region's pixels matching the asked background (exactly
              rendered for flat/gradient/texture; for horizon, the two tones split at the row
              that fits best).
Outlines are compared 1 px in from (or out from) their edge, so rasterisation never counts.
A partly done sub-edit (only part of its region changed) scores about the part done; a skipped
one, one done to another object or in another colour, scores near 0.
Colour checks of recolor/remove/texture/background leave out pixels that other sub-edits' regions
share (a later edit may paint over them), unless that leaves too little to judge.

Background consistency (`background`): let `changed` be the share of pixels OUTSIDE all regions
(`view.background_mask`) whose largest channel difference between source and target exceeds
`change_tolerance`. Then background = clip(1 - changed / background_budget, 0, 1): untouched is 1,
`background_budget` (default 0.1 %) of the outside changed is 0: a blob, a blur, a
shift or noise outside the regions all fail it. `background_changed` keeps the raw
share and `background_psnr` the PSNR over the outside pixels, for inspection.

Quality (`quality`): share of the changed pixels inside the regions (every other row and column)
whose target colour is one the procedural world paints (object colours and shades, background
tones, the source's own colours, a gradient between asked background tones). Noise, blur or
blending artefacts inside the regions lower it.

Photo pairs (sub-edits with params["domain"] == "photo") are scored by `pixel_photo` instead:
coverage of each sub-edit's own mask plus a check of its type, None ("unknown") where pixels
cannot tell; background consistency as above; quality None.

Imported pairs (`view.kind == "imported"`: an edit dataset's, re-encoded or regenerated, never
bit-exact outside the edit) are judged against their own noise floor (`pipeline.imagediff`):
- background = min(1 - changed / `real_budget`, 1 - max(0, shift - `real_shift`) / (2 ·
  `real_shift`)), where `changed` is the share of the background whose content changed beyond the
  pair's codec/resampling noise (coarse scale, after a global colour alignment) and `shift` the
  ΔE that alignment moved it by: re-encoding, resampling, a VAE's blur or a mild colour shift
  pass, a moved, replaced or regenerated object, a blurred or tinted background and a new scene
  do not. `background_floor` and `background_shift` keep the figures;
- each sub-edit (free text: nothing structured to check it against) is unknown (None) once its
  region changed beyond that noise, and 0 when it did not (`pixel_photo.score_real_sub_edits`);
  a global edit's region is the whole frame, so it has no background to keep;
- quality is 0 for a broken target (blank, or nearly all clipped), else None (not rated).
So a faithful real pair is never rejected on a pixel technicality: it goes to a person (or to
the MLLM judge, when the build names one), and is rejected only for what pixels do show.

Overall (`overall`): min(every sub-edit score, background, quality): a pair is as good as its worst
part, which is what routing needs to catch a single failed sub-edit among many.
"""

from __future__ import annotations

import logging
import math
from functools import lru_cache
from typing import Any, Callable

import numpy as np

from pipeline import imagediff
from pipeline.judges import pixel_photo, plausibility
from pipeline.judges.base import JudgeError, register_judge
from pipeline.record import JudgeView, SubEdit
from pipeline.sources.scene import (
    BACKGROUND_COLORS,
    COLORS,
    KINDS,
    SIZES,
    TEXT_KIND,
    Background,
    SceneObject,
    pattern_color,
    pattern_mask,
    render_background,
    silhouette,
)

log = logging.getLogger(__name__)

RGB = tuple[int, int, int]

# Too few pixels to judge a colour share reliably: below this the check says so.
MIN_PIXELS = 12
# Own region (mask minus other sub-edits' masks) smaller than this share of the mask: use the mask.
MIN_OWN_SHARE = 0.25
# log-ratio of visible areas a resize may miss by before it counts against it (occlusion).
RESIZE_AREA_SLACK = 0.35
# Where a horizon background may put its split, as fractions of the height.
HORIZON_BAND = (0.35, 0.75)


def _rgb(value: Any) -> RGB:
    if value is None or len(value) != 3:
        raise ValueError(f"expected an RGB triple, got {value!r}")
    return tuple(int(c) for c in value)  # type: ignore[return-value]


def _color(params: dict[str, Any], rgb_key: str, name_key: str, table: dict[str, RGB] = COLORS) -> RGB:
    """An edit colour from its rgb param, else from its name."""
    if params.get(rgb_key) is not None:
        return _rgb(params[rgb_key])
    name = params.get(name_key)
    if name in table:
        return table[name]
    raise ValueError(f"sub-edit params name no colour ({rgb_key!r} / {name_key!r}): {params}")


def _channel_max(image: np.ndarray) -> np.ndarray:
    """HxW largest of the three channels (numpy's reduce over a length-3 axis is slow)."""
    return np.maximum(np.maximum(image[..., 0], image[..., 1]), image[..., 2])


class _Pair:
    """The two images of one view, with the per-pixel helpers the checks share."""

    def __init__(self, view: JudgeView, color_tolerance: int, change_tolerance: int):
        self.view = view
        self._palette: np.ndarray | None = None
        self.source = view.source
        self.target = view.target
        self.height, self.width = view.source.shape[:2]
        self.color_tol = color_tolerance
        self.change_tol = change_tolerance
        # Largest channel difference, in uint8 arithmetic (max - min never wraps).
        self.diff = _channel_max(np.maximum(view.source, view.target) - np.minimum(view.source, view.target))

    def is_color(self, image: np.ndarray, rgb: RGB) -> np.ndarray:
        """Bool mask of the pixels of a uint8 crop within the colour tolerance of `rgb`."""
        tol = self.color_tol
        out = None
        for c in range(3):
            lo, hi = rgb[c] - tol, rgb[c] + tol
            channel = image[..., c]
            hit = (channel >= lo) if hi >= 255 else (channel <= hi) if lo <= 0 else \
                (channel >= lo) & (channel <= hi)
            out = hit if out is None else out & hit
        return out

    def is_object(self, image: np.ndarray, rgb: RGB) -> np.ndarray:
        """Plain colour or its pattern shade: both are the object's paint."""
        return self.is_color(image, rgb) | self.is_color(image, pattern_color(rgb))

    def palette(self) -> np.ndarray:
        if self._palette is None:
            self._palette = _palette(self.view)
        return self._palette

    def is_paint_color(self, colors: np.ndarray) -> np.ndarray:
        """For (k, 3) int16 colours: does each show something this world paints (an object,
        background or asked colour, or a tone of an asked gradient)? Noise does not."""
        near = (np.abs(colors[:, None, :] - self.palette()[None, :, :]).max(axis=2)
                <= self.color_tol).any(axis=1)
        return near | _on_gradient(self.view, colors, self.color_tol)

    def is_paint(self, image: np.ndarray) -> np.ndarray:
        """Bool mask of the pixels of a uint8 crop that `is_paint_color`."""
        values, inverse = np.unique(_pack(image.reshape(-1, 3)), return_inverse=True)
        return self.is_paint_color(_unpack(values))[inverse].reshape(image.shape[:2])


class _Region:
    """One sub-edit's region, cropped to its box: the mask, the own part, and the image crops."""

    def __init__(self, pair: _Pair, mask: np.ndarray, overlap: np.ndarray | None):
        """`overlap`: uint8 HxW count of the regions covering each pixel (None: single region)."""
        rows = np.flatnonzero(mask.any(axis=1))
        if rows.size == 0:
            self.empty = True
            return
        self.empty = False
        y0, y1 = int(rows[0]), int(rows[-1]) + 1
        cols = np.flatnonzero(mask[y0:y1].any(axis=0))
        x0, x1 = int(cols[0]), int(cols[-1]) + 1
        self.y0, self.x0 = y0, x0
        self.box = (slice(y0, y1), slice(x0, x1))
        self.mask = mask[self.box]
        own = self.mask if overlap is None else self.mask & (overlap[self.box] <= 1)
        self.own = own if np.count_nonzero(own) >= MIN_OWN_SHARE * np.count_nonzero(self.mask) else self.mask
        self.src = pair.source[self.box]
        self.tgt = pair.target[self.box]
        self.changed = pair.diff[self.box] > pair.change_tol


def _share(hit: np.ndarray, where: np.ndarray) -> float | None:
    n = int(np.count_nonzero(where))
    if n < MIN_PIXELS:
        return None
    return float(np.count_nonzero(hit & where)) / n


def _clip(x: float) -> float:
    return float(min(1.0, max(0.0, x)))


Check = Callable[["PixelJudge", _Pair, _Region, SubEdit], tuple[float, str]]
CHECKS: dict[str, Check] = {}


def _check(edit_type: str) -> Callable[[Check], Check]:
    def wrap(fn: Check) -> Check:
        CHECKS[edit_type] = fn
        return fn

    return wrap


def _source_object(pair: _Pair, region: _Region, rgb: RGB) -> np.ndarray:
    """The region's own pixels that show the object's paint in the source (all of the own part
    when too few do, e.g. an object mostly hidden)."""
    obj = region.own & pair.is_object(region.src, rgb)
    return obj if np.count_nonzero(obj) >= MIN_PIXELS else region.own


@_check("recolor")
def _recolor(judge: "PixelJudge", pair: _Pair, region: _Region, edit: SubEdit) -> tuple[float, str]:
    p = edit.params
    old, new = _color(p, "from_rgb", "from_color"), _color(p, "to_rgb", "to_color")
    obj = _source_object(pair, region, old)
    share = _share(pair.is_object(region.tgt, new), obj)
    if share is None:
        return 0.0, "region too small to see the object"
    return share, f"{share:.0%} of the {p.get('from_color', 'old')} object is now {p.get('to_color', 'new')}"


@_check("remove")
def _remove(judge: "PixelJudge", pair: _Pair, region: _Region, edit: SubEdit) -> tuple[float, str]:
    p = edit.params
    rgb = _color(p, "rgb", "color")
    obj = _source_object(pair, region, rgb)
    # Gone means: changed, no longer the object's paint, and showing something this world paints
    # (the background or what stood behind), not noise or a smear.
    gone = region.changed & ~pair.is_object(region.tgt, rgb) & pair.is_paint(region.tgt)
    share = _share(gone, obj)
    if share is None:
        return 0.0, "region too small to see the object"
    return share, f"{share:.0%} of the {p.get('color', '')} {p.get('kind', 'object')} is gone"


def _expected_shape(pair: _Pair, kind: str, size: str, cx: float, cy: float,
                    text: str | None = None) -> np.ndarray:
    obj = SceneObject(id=0, kind=kind, color="red", size=size, cx=float(cx), cy=float(cy), depth=0,
                      text=text)
    return silhouette(obj, pair.width, pair.height)


@_check("add")
def _add(judge: "PixelJudge", pair: _Pair, region: _Region, edit: SubEdit) -> tuple[float, str]:
    p = edit.params
    rgb = _color(p, "rgb", "color")
    expected = region.own
    if p.get("kind") and p.get("size") in SIZES and "cx" in p and "cy" in p:
        shape = _expected_shape(pair, p["kind"], p["size"], p["cx"], p["cy"])[region.box]
        if np.count_nonzero(shape & region.own) >= MIN_PIXELS:
            expected = shape & region.own
    share = _share(pair.is_object(region.tgt, rgb), expected)
    if share is None:
        return 0.0, "the asked place is not inside the region"
    return share, f"{share:.0%} of the asked {p.get('color', '')} {p.get('kind', 'object')} is drawn"


@_check("add_text")
def _add_text(judge: "PixelJudge", pair: _Pair, region: _Region, edit: SubEdit) -> tuple[float, str]:
    p = edit.params
    rgb = _color(p, "rgb", "color")
    # Not "& changed": text may land where something of its colour stood before (and moved).
    painted = region.mask & pair.is_color(region.tgt, rgb)
    if p.get("text") and p.get("size") in SIZES and "cx" in p and "cy" in p:
        glyphs = _expected_shape(pair, TEXT_KIND, p["size"], p["cx"], p["cy"],
                                 text=str(p["text"]))[region.box] & region.mask
        if np.count_nonzero(glyphs) >= MIN_PIXELS:
            recall = float(np.count_nonzero(painted & glyphs)) / float(np.count_nonzero(glyphs))
            precision = float(np.count_nonzero(painted & glyphs)) / max(1.0, float(np.count_nonzero(painted)))
            score = min(recall, precision)
            return score, (f"text {p['text']!r}: {recall:.0%} of its glyph pixels drawn, "
                           f"{precision:.0%} of the drawn pixels where they belong")
    share = _share(painted, region.own)
    if share is None:
        return 0.0, "region too small to hold the text"
    return share, f"{share:.0%} of the text region is in the asked colour"


def _ratio_score(observed: float, expected: float, slack: float, scale: float = math.log(2)) -> float:
    """1 when observed/expected is within exp(+-slack), falling to 0 at exp(+-(slack + scale))."""
    miss = abs(math.log(max(observed, 1e-6) / max(expected, 1e-6)))
    return _clip(1 - max(0.0, miss - slack) / scale)


def _displacement_score(observed: np.ndarray, expected: np.ndarray, slack: float) -> float:
    length = float(np.hypot(*expected))
    if length < 1e-6:
        return 1.0 if float(np.hypot(*observed)) <= slack else 0.0
    error = float(np.hypot(*(observed - expected)))
    return _clip(1 - max(0.0, error - slack) / max(length - slack, 1e-6))


def _shift(mask: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """`mask` moved by (dx, dy) pixels, zero-filled (no wrap-around)."""
    out = np.zeros_like(mask)
    h, w = mask.shape
    if abs(dx) >= w or abs(dy) >= h:
        return out
    out[max(0, dy):h + min(0, dy), max(0, dx):w + min(0, dx)] = \
        mask[max(0, -dy):h - max(0, dy), max(0, -dx):w - max(0, dx)]
    return out


@_check("move")
def _move(judge: "PixelJudge", pair: _Pair, region: _Region, edit: SubEdit) -> tuple[float, str]:
    """The object's source pixels, shifted by the asked displacement, must show its colour where
    the region holds them (pixels outside the region are hidden behind something that did not
    change), and its old pixels not covered by the new place must have lost it."""
    p = edit.params
    rgb = _color(p, "rgb", "color")
    dx = int(round((p["to_cx"] - p["from_cx"]) * pair.width))
    dy = int(round((p["to_cy"] - p["from_cy"]) * pair.height))
    was = region.mask & pair.is_object(region.src, rgb)
    if np.count_nonzero(was) < MIN_PIXELS:
        return 0.0, "the object is not visible in the region before the edit"
    now = pair.is_object(region.tgt, rgb)
    moved = _shift(was, dx, dy) & region.mask
    left = was & ~moved
    arrived = _share(now, moved)
    vacated = _share(~now & region.changed, left)
    parts = [x for x in (arrived, vacated) if x is not None]
    if not parts:
        return 0.0, "the new place is hidden"
    score = min(parts)
    return score, (f"moved {p.get('direction', '')} by ({dx:+d}, {dy:+d}) px: "
                   f"{arrived if arrived is not None else 1:.0%} of the new place shows it, "
                   f"{vacated if vacated is not None else 1:.0%} of the old place is vacated")


# ---- shapes: where an object of a known kind and size sits, and where it would sit ---------------

@lru_cache(maxsize=512)
def _template(kind: str, size: str, width: int, height: int) -> tuple[np.ndarray, float, float]:
    """(bool crop of the silhouette, centre x, centre y within the crop) for `kind` at `size`."""
    obj = SceneObject(id=0, kind=kind, color="red", size=size, cx=0.5, cy=0.5, depth=0)
    full = silhouette(obj, width, height)
    rows = np.flatnonzero(full.any(axis=1))
    cols = np.flatnonzero(full.any(axis=0))
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    crop = full[y0:y1, x0:x1].copy()
    crop.flags.writeable = False
    return crop, 0.5 * width - x0, 0.5 * height - y0


def _place(template: tuple[np.ndarray, float, float], cx: float, cy: float,
           shape: tuple[int, int]) -> np.ndarray:
    """The template with its centre at (cx, cy) of a crop of `shape` (clipped at the edges)."""
    crop, tx, ty = template
    out = np.zeros(shape, dtype=bool)
    x0, y0 = int(round(cx - tx)), int(round(cy - ty))
    h, w = crop.shape
    ya, yb, xa, xb = max(0, y0), min(shape[0], y0 + h), max(0, x0), min(shape[1], x0 + w)
    if ya < yb and xa < xb:
        out[ya:yb, xa:xb] = crop[ya - y0:yb - y0, xa - x0:xb - x0]
    return out


def _erode(mask: np.ndarray) -> np.ndarray:
    out = mask.copy()
    out[1:] &= mask[:-1]
    out[:-1] &= mask[1:]
    out[:, 1:] &= mask[:, :-1]
    out[:, :-1] &= mask[:, 1:]
    return out


def _dilate(mask: np.ndarray) -> np.ndarray:
    return ~_erode(~mask)


def _fit(visible: np.ndarray, kind: str, sizes: list[str], width: int, height: int
         ) -> tuple[str, float, float] | None:
    """(size, centre x, centre y) in crop coordinates of the object of `kind` whose visible pixels
    are `visible`. Each candidate size is aligned with the visible pixels' bounding box by each
    pair of sides (a side may be hidden behind something); the candidate that holds every
    visible pixel most tightly wins."""
    rows = np.flatnonzero(visible.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(visible.any(axis=0))
    bx0, bx1, by0, by1 = cols[0], cols[-1] + 1, rows[0], rows[-1] + 1
    n = np.count_nonzero(visible)
    best, best_key = None, None
    for size in sizes:
        template = _template(kind, size, width, height)
        crop, tx, ty = template
        h, w = crop.shape
        for cx in {bx0 + tx, bx1 - w + tx}:
            for cy in {by0 + ty, by1 - h + ty}:
                placed = _place(template, cx, cy, visible.shape)
                inside = np.count_nonzero(placed & visible)
                # Holding (nearly: rasterisation differs by a pixel) every visible pixel first,
                # then the fewest template pixels not seen, then the most pixels held.
                key = (inside >= 0.95 * n, -(np.count_nonzero(crop) - inside), inside)
                if best_key is None or key > best_key:
                    best, best_key = (size, cx, cy), key
    return best


def _shape_check(pair: _Pair, region: _Region, was: np.ndarray, expected: np.ndarray,
                 color: RGB, same_color: bool) -> tuple[float, float | None, float | None]:
    """(score, filled, vacated): share of the expected silhouette (1 px in from its edge, where
    the region holds it) shown in `color`, and share of the old pixels outside it (1 px out)
    that changed (and, for a new colour, no longer show the old one)."""
    now = pair.is_object(region.tgt, color)
    filled = _share(now, _erode(expected) & region.mask)
    old = was & ~_dilate(expected)
    gone = region.changed if same_color else region.changed & ~now
    vacated = _share(gone, old)
    parts = [x for x in (filled, vacated) if x is not None]
    return (min(parts) if parts else 0.0), filled, vacated


@_check("resize")
def _resize(judge: "PixelJudge", pair: _Pair, region: _Region, edit: SubEdit) -> tuple[float, str]:
    """Fit the object's old silhouette (its kind at the old size) to its source pixels, then the
    new size's silhouette, at the same centre, must be filled and the rest of the old vacated."""
    p = edit.params
    rgb = _color(p, "rgb", "color")
    if p.get("from_size") not in SIZES or p.get("to_size") not in SIZES:
        raise ValueError(f"resize params need from_size/to_size among {list(SIZES)}: {p}")
    was = region.mask & pair.is_object(region.src, rgb)
    if np.count_nonzero(was) < MIN_PIXELS:
        return 0.0, "the object is not visible in the region"
    wanted = (SIZES[p["to_size"]] / SIZES[p["from_size"]]) ** 2
    observed = max(1, np.count_nonzero(region.mask & pair.is_object(region.tgt, rgb))) / np.count_nonzero(was)
    fit = _fit(was, p["kind"], [p["from_size"]], pair.width, pair.height) if p.get("kind") in KINDS else None
    if fit is None:  # an unknown kind: fall back on the change of visible area
        score = _ratio_score(observed, wanted, judge.area_slack, abs(math.log(wanted)) - judge.area_slack)
        return score, f"area changed {observed:.2f}x, asked {wanted:.2f}x"
    _, cx, cy = fit
    expected = _place(_template(p["kind"], p["to_size"], pair.width, pair.height), cx, cy, was.shape)
    score, filled, vacated = _shape_check(pair, region, was, expected, rgb, same_color=True)
    # The visible area must change too (an unchanged small object fills half a medium outline);
    # generous, since occlusion changes visible areas.
    slack = RESIZE_AREA_SLACK
    score = min(score, _ratio_score(observed, wanted, slack, max(abs(math.log(wanted)) - slack, 0.1)))
    return score, (f"{p['from_size']} -> {p['to_size']}: {filled if filled is not None else 1:.0%} of "
                   f"the new outline filled, {vacated if vacated is not None else 1:.0%} of the old "
                   f"one vacated (area {observed:.2f}x, asked {wanted:.2f}x)")


@_check("replace")
def _replace(judge: "PixelJudge", pair: _Pair, region: _Region, edit: SubEdit) -> tuple[float, str]:
    """Fit the old object's silhouette (kind, any size) to its source pixels; the new kind's
    silhouette at the same centre and size must show the new colour, and the rest of the old
    object must be gone."""
    p = edit.params
    old = _color(p, "from_rgb", "from_color")
    new = _color(p, "to_rgb", "to_color")
    was = region.mask & pair.is_object(region.src, old)
    if np.count_nonzero(was) < MIN_PIXELS:
        return 0.0, "the old object is not visible in the region"
    if p.get("from_kind") not in KINDS or p.get("to_kind") not in KINDS:
        raise ValueError(f"replace params need from_kind/to_kind among scene.KINDS: {p}")
    fit = _fit(was, p["from_kind"], list(SIZES), pair.width, pair.height)
    if fit is None:
        return 0.0, "cannot find the old object"
    size, cx, cy = fit
    expected = _place(_template(p["to_kind"], size, pair.width, pair.height), cx, cy, was.shape)
    score, filled, vacated = _shape_check(pair, region, was, expected, new, same_color=old == new)
    return score, (f"{p.get('from_kind')} -> {p.get('to_color', '')} {p.get('to_kind')} ({size}): "
                   f"{filled if filled is not None else 1:.0%} of the new outline filled, "
                   f"{vacated if vacated is not None else 1:.0%} of the rest of the old one gone")


def _split_two(selected: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Split the true pixels of a mask into two blobs along their main axis (two objects of one
    colour): the cut goes through the emptiest place between the two 1-D 2-means centres."""
    ys, xs = np.nonzero(selected)
    if ys.size < 2 * MIN_PIXELS:
        return None
    pts = np.stack([xs, ys], axis=1).astype(np.float64)
    centred = pts - pts.mean(axis=0)
    _, vectors = np.linalg.eigh(centred.T @ centred)
    proj = centred @ vectors[:, -1]
    cut = 0.0
    for _ in range(12):
        low, high = proj[proj < cut], proj[proj >= cut]
        if low.size == 0 or high.size == 0:
            return None
        cut = (low.mean() + high.mean()) / 2
    lo, hi = low.mean(), high.mean()
    counts, edges = np.histogram(proj, bins=np.arange(math.floor(lo), math.ceil(hi) + 2))
    if counts.size:
        cut = float(edges[int(np.argmin(counts))])
    first = np.zeros_like(selected)
    second = np.zeros_like(selected)
    first[ys[proj < cut], xs[proj < cut]] = True
    second[ys[proj >= cut], xs[proj >= cut]] = True
    return first, second


def _mass_center(selected: np.ndarray) -> np.ndarray | None:
    ys, xs = np.nonzero(selected)
    return None if ys.size < MIN_PIXELS else np.array([xs.mean(), ys.mean()])


@_check("swap")
def _swap(judge: "PixelJudge", pair: _Pair, region: _Region, edit: SubEdit) -> tuple[float, str]:
    """Each object's source pixels, moved by the displacement between the two, must show its
    colour where the region holds them, and their old pixels outside the new shapes must change.
    The displacement is measured (each object's colour mass before and after), then checked
    against the distance between the two objects."""
    colors = edit.params.get("colors") or []
    if len(colors) != 2 or any(c not in COLORS for c in colors):
        raise ValueError(f"swap params need two colours among scene.COLORS: {edit.params}")
    a, b = COLORS[colors[0]], COLORS[colors[1]]
    if a != b:
        sa, sb = region.mask & pair.is_object(region.src, a), region.mask & pair.is_object(region.src, b)
        ta, tb = region.mask & pair.is_object(region.tgt, a), region.mask & pair.is_object(region.tgt, b)
    else:  # one colour: tell the two objects apart by place
        split = _split_two(region.mask & pair.is_object(region.src, a))
        if split is None:
            return 0.0, "cannot find the two objects before the edit"
        sa, sb = split
        t_split = _split_two(region.mask & pair.is_object(region.tgt, a))
        if t_split is None:
            return 0.0, "cannot find the two objects after the edit"
        cb = _mass_center(sb)
        t1, t2 = t_split
        c1, c2 = _mass_center(t1), _mass_center(t2)
        if cb is None or c1 is None or c2 is None:
            return 0.0, "one of the two objects is too small to see"
        # Object a now stands where b stood.
        ta, tb = (t1, t2) if np.hypot(*(c1 - cb)) <= np.hypot(*(c2 - cb)) else (t2, t1)
    ca0, cb0, ca1, cb1 = (_mass_center(m) for m in (sa, sb, ta, tb))
    if any(c is None for c in (ca0, cb0, ca1, cb1)):
        return 0.0, "one of the two objects is not visible before or after"
    apart = cb0 - ca0
    moved = ((ca1 - ca0) - (cb1 - cb0)) / 2  # a moves by +d, b by -d
    slack = judge.position_slack * min(pair.width, pair.height) + 0.2 * float(np.hypot(*apart))
    placed = _displacement_score(moved, apart, slack)
    dx, dy = int(round(moved[0])), int(round(moved[1]))
    now_a = region.mask & pair.is_object(region.tgt, a)
    now_b = now_a if a == b else region.mask & pair.is_object(region.tgt, b)
    new_a, new_b = _shift(sa, dx, dy) & region.mask, _shift(sb, -dx, -dy) & region.mask
    arrived = [x for x in (_share(now_a, new_a), _share(now_b, new_b)) if x is not None]
    old = (sa | sb) & ~(new_a | new_b)
    vacated = _share(region.changed, old)
    parts = [placed] + arrived + ([vacated] if vacated is not None else [])
    score = min(parts) if arrived else 0.0
    return score, (f"moved {np.hypot(*moved):.0f} px of {np.hypot(*apart):.0f} apart; "
                   f"{min(arrived) if arrived else 0:.0%} of the new places filled, "
                   f"{vacated if vacated is not None else 1:.0%} of the old places changed")


@_check("texture")
def _texture(judge: "PixelJudge", pair: _Pair, region: _Region, edit: SubEdit) -> tuple[float, str]:
    p = edit.params
    rgb = _color(p, "rgb", "color")
    shade = pattern_color(rgb)
    obj = region.own & pair.is_object(region.src, rgb)
    if np.count_nonzero(obj) < MIN_PIXELS:
        return 0.0, "the object is not visible in the region"
    plain_now = pair.is_color(region.tgt, rgb)
    shade_now = pair.is_color(region.tgt, shade)
    pattern = p.get("to_pattern", "solid")
    if pattern == "solid":
        score = float(np.count_nonzero(plain_now & obj)) / float(np.count_nonzero(obj))
        return score, f"{score:.0%} of the object is plain {p.get('color', '')}"
    best, best_period = 0.0, 0
    # The period follows the object's size (scene.render), which the params do not name: try each.
    for period in sorted({max(4, int(s * min(pair.width, pair.height) / 2.5)) for s in SIZES.values()}):
        marks = pattern_mask(pattern, pair.width, pair.height, period)[region.box]  # cached frames
        on, off = obj & marks, obj & ~marks
        if np.count_nonzero(on) < MIN_PIXELS or np.count_nonzero(off) < MIN_PIXELS:
            continue
        score = min(float(np.count_nonzero(shade_now & on)) / float(np.count_nonzero(on)),
                    float(np.count_nonzero(plain_now & off)) / float(np.count_nonzero(off)))
        if score > best:
            best, best_period = score, period
    return best, f"{best:.0%} agreement with {pattern} marks (period {best_period} px)"


@_check("background")
def _background(judge: "PixelJudge", pair: _Pair, region: _Region, edit: SubEdit) -> tuple[float, str]:
    p = edit.params
    kind = p.get("to_kind")
    names = list(p.get("to_colors") or [])
    rgbs = [_rgb(c) for c in p["to_rgbs"]] if p.get("to_rgbs") else [BACKGROUND_COLORS[n] for n in names]
    if not rgbs:
        raise ValueError(f"background params name no colours: {p}")
    named = len(names) == len(rgbs) and all(n in BACKGROUND_COLORS for n in names)
    if kind == "flat":
        good = pair.is_color(region.tgt, rgbs[0])
    elif kind == "gradient" and named:
        # A gradient is constant along rows: render one column, compare row by row.
        column = render_background(Background(kind=kind, colors=names), 1, pair.height)
        expected = column[region.box[0]]  # rows x 1 x 3, broadcast over the crop's columns
        good = _channel_max(np.maximum(region.tgt, expected) - np.minimum(region.tgt, expected)) <= pair.color_tol
    elif kind == "texture" and named:
        expected = render_background(Background(kind=kind, colors=names), pair.width, pair.height)[region.box]
        good = _channel_max(np.maximum(region.tgt, expected) - np.minimum(region.tgt, expected)) <= pair.color_tol
    elif kind == "horizon" and len(rgbs) == 2:  # its height is free: the best split row
        top, bottom = pair.is_color(region.tgt, rgbs[0]), pair.is_color(region.tgt, rgbs[1])
        own = region.own
        top_rows = np.count_nonzero(top & own, axis=1)
        bottom_rows = np.count_nonzero(bottom & own, axis=1)
        # agreement if the split is above row k: top tone in rows < k, bottom tone in rows >= k
        agree = np.concatenate([[0], np.cumsum(top_rows)]) + (
            bottom_rows.sum() - np.concatenate([[0], np.cumsum(bottom_rows)]))
        # "X on top, Y at the bottom": a horizon across the middle of the frame (its row within
        # HORIZON_BAND of the height), not a sliver of one tone.
        lo = min(max(0, int(HORIZON_BAND[0] * pair.height) - region.y0), agree.size - 1)
        hi = max(lo + 1, min(agree.size, int(HORIZON_BAND[1] * pair.height) - region.y0 + 1))
        split = lo + int(np.argmax(agree[lo:hi]))
        good = np.zeros(region.mask.shape, dtype=bool)
        good[:split] = top[:split]
        good[split:] = bottom[split:]
    else:  # unnamed colours: any of the asked tones
        good = np.zeros(region.mask.shape, dtype=bool)
        for rgb in rgbs:
            good |= pair.is_color(region.tgt, rgb)
    share = _share(good, region.own)
    if share is None:
        return 0.0, "no background pixels to judge"
    return share, f"{share:.0%} of the background is now {kind} {' / '.join(names)}".rstrip()


def _palette(view: JudgeView) -> np.ndarray:
    """Every colour the procedural world paints, the colours this view's edits name, and the
    source's own colours (a removed object reveals a gradient's in-between tones)."""
    # Objects keep 2 px from the frame, so the outer columns show the source's background tones
    # (all of a gradient's: it is constant along rows).
    seen = np.concatenate([view.source[:, 0], view.source[:, -1]])
    packed = np.unique((seen[:, 0].astype(np.int32) << 16) | (seen[:, 1].astype(np.int32) << 8) | seen[:, 2])
    colors: list[RGB] = [(int(v >> 16), int((v >> 8) & 255), int(v & 255)) for v in packed]
    for rgb in COLORS.values():
        colors += [rgb, pattern_color(rgb)]
    colors += list(BACKGROUND_COLORS.values())
    for edit in view.sub_edits:
        for key in ("rgb", "to_rgb", "from_rgb"):
            value = edit.params.get(key)
            if value is not None and len(value) == 3:
                colors += [_rgb(value), pattern_color(_rgb(value))]
    return np.unique(np.array(colors, dtype=np.int16), axis=0)


@register_judge("pixel")
class PixelJudge:
    """Scores each sub-edit from pixels and structured params; see the module docstring."""

    name = "pixel"
    version = "1.0"

    def __init__(
        self,
        color_tolerance: int = 6,
        change_tolerance: int = 6,
        background_budget: float = 0.001,
        position_slack: float = 0.02,
        area_slack: float = 0.2,
        quality: bool = True,
        real_budget: float = 0.02,
        real_shift: float = 5.0,
        plausibility: bool = True,
    ):
        if not 0 <= color_tolerance <= 64 or not 0 <= change_tolerance <= 64:
            raise ValueError("colour and change tolerances must be within 0..64 (8-bit levels)")
        if not 0 < background_budget <= 1:
            raise ValueError(f"background budget must be within (0, 1], got {background_budget}")
        if not 0 <= position_slack < 0.5 or not 0 <= area_slack < 1:
            raise ValueError("position slack must be within [0, 0.5) and area slack within [0, 1)")
        if not 0 < real_budget <= 1 or not 0 < real_shift <= 100:
            raise ValueError(f"real_budget must be within (0, 1] and real_shift (ΔE) within "
                             f"(0, 100], got {real_budget} and {real_shift}")
        self.color_tolerance = color_tolerance
        self.change_tolerance = change_tolerance
        self.background_budget = background_budget
        self.position_slack = position_slack
        self.area_slack = area_slack
        self.quality = quality
        self.real_budget = real_budget
        self.real_shift = real_shift
        self.plausibility = bool(plausibility)  # the photo plausibility gate (bench: off to compare)

    def score_batch(self, views: list[JudgeView]) -> list[dict[str, Any] | JudgeError]:
        results: list[dict[str, Any] | JudgeError] = []
        for view in views:
            try:
                results.append(self.score(view))
            except (ValueError, KeyError, TypeError, IndexError) as exc:  # a bad view, not a bug
                log.warning("pixel judge cannot score %s: %s", view.id, exc)
                results.append(JudgeError(f"{type(exc).__name__}: {exc}"))
        return results

    def score(self, view: JudgeView) -> dict[str, Any]:
        self._validate(view)
        if view.kind == "imported":
            return self._score_real(view)
        pair = _Pair(view, self.color_tolerance, self.change_tolerance)
        if pixel_photo.is_photo(view):
            return self._score_photo(view, pair)
        overlap = None
        if len(view.sub_edits) > 1:
            overlap = np.zeros(pair.diff.shape, dtype=np.uint8)
            for edit in view.sub_edits:
                overlap += edit.mask
        scores, reasons = [], []
        for edit in view.sub_edits:
            region = _Region(pair, edit.mask, overlap)
            if region.empty:
                score, reason = 0.0, "empty region"
            else:
                score, reason = CHECKS[edit.type](self, pair, region, edit)
            scores.append(round(_clip(score), 4))
            reasons.append(f"{edit.type}: {reason}")
        background, changed, psnr = self._background(view, pair)
        quality = self._quality(view, pair) if self.quality else None
        overall = min(scores + [background] + ([quality] if quality is not None else []))
        return {
            "sub_edits": scores,
            "sub_edit_reasons": reasons,
            "background": round(background, 4),
            "background_changed": round(changed, 6),
            "background_psnr": None if psnr is None else round(psnr, 2),
            "quality": None if quality is None else round(quality, 4),
            "overall": round(overall, 4),
        }

    def _score_photo(self, view: JudgeView, pair: _Pair) -> dict[str, Any]:
        """Photo pairs: `pixel_photo`'s checks per sub-edit (None = unknown), the same background
        consistency, no quality score (a photo has no palette to test it against). Exact pairs
        then pass the plausibility gate (`plausibility.fold`): seams, ragged pastes, smeared or
        haunted holes lower a sub-edit's score to reject or review."""
        scores, reasons = pixel_photo.score_sub_edits(view)
        if self.plausibility:
            scores, reasons = plausibility.fold(view, scores, reasons)
        background, changed, psnr = self._background(view, pair)
        return _free_scores(scores, reasons, background, changed, psnr, None)

    def _score_real(self, view: JudgeView) -> dict[str, Any]:
        """Imported pairs: see the module docstring."""
        change = imagediff.changes(view.source, view.target, view.background_mask)
        scores, reasons = pixel_photo.score_real_sub_edits(view, change)
        changed, shift = change.share, change.shift
        background = min(_clip(1 - changed / self.real_budget),
                         _clip(1 - max(0.0, shift - self.real_shift) / (2 * self.real_shift)))
        broken = pixel_photo.broken(view.target)
        result = _free_scores(scores, reasons, background, changed,
                              _psnr(view.source, view.target, view.background_mask),
                              None if broken is None else 0.0)
        result.update({
            "background_floor": round(change.floor, 2),
            "background_shift": round(shift, 2),
            "background_reason": (f"{changed:.2%} of the background changed beyond the pair's "
                                  f"noise floor (ΔE {change.floor:.1f}); global colour shift "
                                  f"ΔE {shift:.1f}"),
            **({"quality_reason": broken} if broken else {}),
        })
        return result

    @staticmethod
    def _validate(view: JudgeView) -> None:
        if view.source.shape != view.target.shape or view.source.ndim != 3 or view.source.shape[2] != 3:
            raise ValueError(f"source {view.source.shape} and target {view.target.shape} must both be HxWx3")
        if view.background_mask.shape != view.source.shape[:2]:
            raise ValueError("background mask does not match the image size")
        if not view.sub_edits:
            raise ValueError("no sub-edits to judge")
        for i, edit in enumerate(view.sub_edits):
            if edit.mask is None:
                raise ValueError(f"sub-edit {i} ({edit.type}) has no region mask")
            if edit.mask.shape != view.source.shape[:2]:
                raise ValueError(f"sub-edit {i} mask {edit.mask.shape} does not match the image")
            if edit.type not in CHECKS and not pixel_photo.is_free_text(edit):
                raise ValueError(f"no pixel check for edit type {edit.type!r}")

    def _background(self, view: JudgeView, pair: _Pair) -> tuple[float, float, float | None]:
        outside = view.background_mask
        n = int(np.count_nonzero(outside))
        if n == 0:
            return 1.0, 0.0, None
        changed_pixels = pair.diff > self.change_tolerance
        changed_pixels &= outside
        changed = np.count_nonzero(changed_pixels) / n
        # PSNR only where something changed (it is infinite otherwise).
        psnr = _psnr(pair.source, pair.target, outside) if changed > 0 else None
        return _clip(1 - changed / self.background_budget), changed, psnr

    def _quality(self, view: JudgeView, pair: _Pair) -> float | None:
        # Every other pixel in both directions: a share needs no more, and it keeps this cheap
        # when a background edit changes most of the frame.
        inside = ~view.background_mask[::2, ::2] & (pair.diff[::2, ::2] > self.change_tolerance)
        pixels = pair.target[::2, ::2][inside].astype(np.int32)
        if pixels.shape[0] < MIN_PIXELS:
            return None
        # Only the distinct colours need the palette test: painted images hold a handful.
        values, counts = np.unique(_pack(pixels), return_counts=True)
        near = pair.is_paint_color(_unpack(values))
        return float(counts[near].sum()) / float(counts.sum())


def _free_scores(scores: list[float | None], reasons: list[str], background: float, changed: float,
                 psnr: float | None, quality: float | None) -> dict[str, Any]:
    """The result of a photo or real pair: sub-edit scores that may be None (unknown), overall
    the minimum of the known ones, the background and the quality (None: not rated)."""
    overall = min([s for s in scores if s is not None] + [background]
                  + ([quality] if quality is not None else []))
    return {
        "sub_edits": [None if s is None else round(_clip(s), 4) for s in scores],
        "sub_edit_reasons": reasons,
        "background": round(background, 4),
        "background_changed": round(changed, 6),
        "background_psnr": None if psnr is None else round(psnr, 2),
        "quality": quality,
        "overall": round(overall, 4),
    }


def _psnr(source: np.ndarray, target: np.ndarray, where: np.ndarray) -> float | None:
    """PSNR (dB) over `where`, estimated on every other row and column: it is for inspection,
    not for routing. None where nothing differs or `where` is empty."""
    sub = where[::2, ::2]
    err = (source[::2, ::2][sub].astype(np.float32) - target[::2, ::2][sub]).ravel()
    if err.size == 0 or not err.any():
        return None
    return 10 * math.log10(255.0 ** 2 / max(float(err @ err) / err.size, 1e-12))


def _pack(pixels: np.ndarray) -> np.ndarray:
    """(n, 3) colours as one int each, so np.unique finds the distinct ones fast."""
    pixels = pixels.astype(np.int32)
    return (pixels[:, 0] << 16) | (pixels[:, 1] << 8) | pixels[:, 2]


def _unpack(values: np.ndarray) -> np.ndarray:
    return np.stack([values >> 16, (values >> 8) & 255, values & 255], axis=1).astype(np.int16)


def _on_gradient(view: JudgeView, colors: np.ndarray, tolerance: int) -> np.ndarray:
    """Colours on the segment between two asked gradient tones (a gradient background)."""
    on = np.zeros(colors.shape[0], dtype=bool)
    for edit in view.sub_edits:
        p = edit.params
        if edit.type != "background" or p.get("to_kind") != "gradient":
            continue
        rgbs = [_rgb(c) for c in p["to_rgbs"]] if p.get("to_rgbs") else [
            BACKGROUND_COLORS[n] for n in p.get("to_colors", [])]
        if len(rgbs) != 2:
            continue
        a, b = np.asarray(rgbs[0], np.float32), np.asarray(rgbs[1], np.float32)
        d = b - a
        t = np.clip(((colors - a) @ d) / max(float(d @ d), 1e-6), 0, 1)
        closest = a + t[:, None] * d
        on |= np.abs(colors - closest).max(axis=1) <= tolerance + 1
    return on
