"""The pixel judge's checks of photo sub-edits (params["domain"] == "photo").

A photo has no palette to test against, so each sub-edit is checked for what pixels can show,
from the two images and the sub-edit's structured params and mask (the pixels the editor says it
changed) only. Per sub-edit i, with `own` = its mask minus the masks of later sub-edits (which
may paint over it):

- coverage: share of `own` that differs between source and target. A skipped sub-edit, one done
  to another object, or one done in part leaves much of its mask untouched. Where an EARLIER
  sub-edit changed the same pixels (a blurred background under an added object), source against
  target cannot show whether sub-edit i was done, so two more tests:
  - exclusive coverage: on the pixels of its mask no other sub-edit changed, target != source
    exactly in a clean pair (the editor's masks are the changed pixels), so the share that does
    differ is taken when there are EXCLUSIVE_MIN of them;
  - presence, for an add or replace lying at least half in an earlier background edit's
    pixels: the earlier state there is re-made from the source with that blur, tint or
    desaturation (`editors.photo.apply_photo_edit`), and the new content must differ from it
    (PRESENT_LEVEL) on most of them; after a background "photo" (another photo the judge never
    sees) it is unknown. (Inpainting the region from the target around it was measured and
    dropped: a textured background differs from its inpainting as much as a pasted object.)
- plus a check of its type (1 = what was asked shows, 0 = it does not; None = pixels cannot tell,
  with the reason):
  - recolor:    share of `own` whose target colour bears chroma at the asked hue (LCh, within
                HUE_TOLERANCE degrees; a gray asked colour: share without chroma);
  - remove:     the old content is gone: the lightness of `own` in the target no longer
                correlates with the source's (or, for a flat object, its mean colour moved);
  - move, swap: the source content found at the destination: share of the object's pixels p
                (`own` pixels whose destination p + d is in `own`) with target[p + d] within
                MATCH_LEVEL of source[p], against the same share for the unmoved source
                (content that looks the same shifted cannot tell a move, so it is None);
  - resize:     the same through the asked scale about the mask's box centre (searched ±2 px);
  - add, replace: the change sits at the asked place (the centroid of `own` near (cx, cy));
  - add_text:   the glyphs re-rendered exactly (`editors.photo.text_glyphs`): min(share of the
                glyph pixels in the asked colour, share of the changed pixels that are glyphs);
  - texture:    share of `own` on the asked pattern's marks, darkened there;
  - background: the op: tint (the a*b* change points to the asked colour), desaturate (no
                chroma left), blur (high frequencies lost: Laplacian energy ratio), photo
                (lightness no longer correlates with the source's).
- score = min(coverage, type check); a type check of None makes the score None ("unknown"):
  routing never accepts such a pair (it goes to a person).
- a free-text sub-edit (imported from an edit dataset: `params["free_text"]`, or of type
  `other`) has no params to check its type against: its type check is None, so it scores None
  (unknown) once its region changed, and its coverage when most of its region did not change
  (an edit that did nothing where it says is a failure pixels can show).
"""

from __future__ import annotations

import math
from typing import Any

import cv2
import numpy as np

from pipeline import imagediff
from pipeline.record import GLOBAL, OTHER, JudgeView, SubEdit
from pipeline.sources.scene import pattern_mask

MIN_PIXELS = 24  # fewer own pixels than this: nothing to judge
EXCLUSIVE_MIN = 8  # exclusive pixels (no other sub-edit changed them) worth a coverage of their own
PRESENT_LEVEL = 10  # channel difference from the re-made earlier state of "new content here"
PRESENT_FULL = 0.6  # share of new-content pixels of a clean add (its soft edge and the donor's
PRESENT_NONE = 0.15  # parts like the background make up the rest); at or below NONE: not added
REMAKE_OPS = ("blur", "tint", "desaturate")  # background ops the judge can re-make from the source
HUE_TOLERANCE = 30.0  # degrees
MIN_CHROMA = 6.0  # C* of a pixel that shows a hue
GRAY_CHROMA = 12.0  # C* below this is a gray
MATCH_LEVEL = 24  # largest channel difference of "the same content"
SAMPLE_LIMIT = 40000  # pixels a statistic looks at (strided beyond)


def _lab(pixels: np.ndarray) -> np.ndarray:
    """CIELAB of (n, 3) uint8 colours."""
    flat = np.ascontiguousarray(pixels, dtype=np.uint8).reshape(-1, 1, 3)
    return cv2.cvtColor(flat.astype(np.float32) * (1.0 / 255.0), cv2.COLOR_RGB2Lab).reshape(-1, 3)


def _hue(lab: np.ndarray) -> np.ndarray:
    return np.degrees(np.arctan2(lab[..., 2], lab[..., 1])) % 360.0


def _hue_gap(h: np.ndarray, target: float) -> np.ndarray:
    d = np.abs(h - target) % 360.0
    return np.minimum(d, 360.0 - d)


def _lch(rgb: Any) -> tuple[float, float, float]:
    lab = _lab(np.asarray(rgb, dtype=np.uint8).reshape(1, 3))[0]
    return float(lab[0]), float(math.hypot(lab[1], lab[2])), float(_hue(lab))


def _rgb(params: dict[str, Any], key: str) -> tuple[int, int, int]:
    value = params.get(key)
    if value is None or len(value) != 3:
        raise ValueError(f"photo sub-edit params lack an RGB {key!r}: {params}")
    return tuple(int(c) for c in value)  # type: ignore[return-value]


def _ncc(a: np.ndarray, b: np.ndarray) -> float | None:
    a = a.astype(np.float32)
    b = b.astype(np.float32)
    a -= a.mean()
    b -= b.mean()
    denom = float(np.sqrt((a * a).sum() * (b * b).sum()))
    if denom < 1e-6 or a.size < MIN_PIXELS:
        return None
    return float((a * b).sum()) / denom


def _grey(image: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY)


class PhotoPair:
    """The two images of a photo view, with the per-pixel arrays the checks share."""

    def __init__(self, view: JudgeView):
        self.view = view
        self.source, self.target = view.source, view.target
        self.h, self.w = view.source.shape[:2]
        unequal = view.source != view.target
        self.changed = unequal[..., 0] | unequal[..., 1] | unequal[..., 2]
        big = np.maximum(view.source, view.target) - np.minimum(view.source, view.target)
        self.diff = np.maximum(np.maximum(big[..., 0], big[..., 1]), big[..., 2])


def _box(mask: np.ndarray, pad: int = 0) -> tuple[slice, slice]:
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    h, w = mask.shape
    return (slice(max(0, rows[0] - pad), min(h, rows[-1] + 1 + pad)),
            slice(max(0, cols[0] - pad), min(w, cols[-1] + 1 + pad)))


def _stride(n: int) -> int:
    return max(1, int(math.ceil(n / SAMPLE_LIMIT)))


def _share(hit: np.ndarray, total: int) -> float:
    return float(np.count_nonzero(hit)) / max(1, total)


def _close(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pixels of two uint8 RGB images within MATCH_LEVEL of each other in every channel."""
    d = cv2.absdiff(a, b)
    return (d[..., 0] <= MATCH_LEVEL) & (d[..., 1] <= MATCH_LEVEL) & (d[..., 2] <= MATCH_LEVEL)


def _found_at(pair: PhotoPair, own: np.ndarray, movers: list[np.ndarray]) -> tuple[float | None, str]:
    """Share of the object pixels whose content reappears where one of the affine maps takes it.

    `movers`: 2x3 matrices taking a source pixel to its destination (frame coordinates): one for
    a move or resize, one per object for a swap. A pixel p of `own` counts where some map takes
    it into `own`; it matches where, for one of those maps, target[dest] is within MATCH_LEVEL of
    source[p] in every channel. Returns (the matched share above the share that matches with no
    edit at all, scaled to 0..1; reason)."""
    box = _box(own, 2)
    src, tgt = np.ascontiguousarray(pair.source[box]), np.ascontiguousarray(pair.target[box])
    own_c = own[box]
    h, w = own_c.shape
    origin = np.array([box[1].start, box[0].start], dtype=np.float64)
    counted = np.zeros((h, w), dtype=bool)
    matched = np.zeros((h, w), dtype=bool)
    unmoved = np.zeros((h, w), dtype=bool)
    for matrix in movers:
        m = np.array(matrix, dtype=np.float64)
        m[:, 2] += m[:, :2] @ origin - origin  # into crop coordinates
        inverse = cv2.invertAffineTransform(m)

        def pull(image: np.ndarray) -> np.ndarray:  # pulled[p] = image[dest(p)]
            return cv2.warpAffine(np.ascontiguousarray(image), inverse, (w, h),
                                  flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT,
                                  borderValue=0)

        lands = own_c & pull(own_c.astype(np.uint8)).astype(bool)
        counted |= lands
        matched |= lands & _close(pull(tgt), src)
        unmoved |= lands & _close(pull(src), src)
    total = int(np.count_nonzero(counted))
    if total < MIN_PIXELS:
        return None, "too few object pixels land inside the region to find them"
    found = float(np.count_nonzero(matched)) / total
    baseline = float(np.count_nonzero(unmoved)) / total
    if baseline > 0.8:
        return None, f"the content looks the same shifted ({baseline:.0%} of it matches unmoved)"
    value = min(1.0, max(0.0, (found - baseline) / max(0.3 * (1 - baseline), 0.05)))
    return value, f"{found:.0%} of the object found at its destination ({baseline:.0%} unmoved)"


def _translation(dx: float, dy: float) -> np.ndarray:
    return np.array([[1.0, 0.0, dx], [0.0, 1.0, dy]])


def _scaling(s: float, cx: float, cy: float) -> np.ndarray:
    return np.array([[s, 0.0, cx * (1 - s)], [0.0, s, cy * (1 - s)]])


# ---- type checks: (pair, own, sub, mask) -> (value in [0, 1] or None, reason) -------------------

def _recolor(pair: PhotoPair, own: np.ndarray, sub: SubEdit, mask: np.ndarray):
    _, tc, th = _lch(_rgb(sub.params, "to_rgb"))
    pixels = pair.target[own]
    lab = _lab(pixels[::_stride(len(pixels))])
    chroma = np.hypot(lab[:, 1], lab[:, 2])
    visible = (lab[:, 0] > 12) & (lab[:, 0] < 97)  # black or blown-out pixels show no colour
    if np.count_nonzero(visible) < 0.5 * len(lab):
        return None, "too dark or too bright to show a colour"
    name = sub.params.get("to_color", "asked")
    if tc < GRAY_CHROMA:
        share = _share(visible & (chroma < GRAY_CHROMA), np.count_nonzero(visible))
        return min(1.0, share / 0.9), f"{share:.0%} of the region is {name} (no chroma)"
    ok = visible & (chroma >= MIN_CHROMA) & (_hue_gap(_hue(lab), th) <= HUE_TOLERANCE)
    share = _share(ok, np.count_nonzero(visible))
    return min(1.0, share / 0.9), f"{share:.0%} of the region shows the {name} hue"


def _remove(pair: PhotoPair, own: np.ndarray, sub: SubEdit, mask: np.ndarray):
    step = _stride(int(np.count_nonzero(own)))
    src = _grey(pair.source)[own][::step]
    tgt = _grey(pair.target)[own][::step]
    if src.std() >= 4:
        ncc = _ncc(src, tgt)
        if ncc is not None:
            value = min(1.0, max(0.0, (0.95 - ncc) / 0.15))
            return value, f"the old content is gone (lightness correlation {ncc:.2f})"
    delta = float(np.abs(_lab(pair.source[own][::step]) - _lab(pair.target[own][::step])).mean(axis=0).sum())
    if delta >= 6:
        return 1.0, f"the flat object's colour is gone (mean ΔLab {delta:.0f})"
    return None, "the object is too like what replaced it to tell it is gone"


def _move(pair: PhotoPair, own: np.ndarray, sub: SubEdit, mask: np.ndarray):
    p = sub.params
    return _found_at(pair, own, [_translation(p["dx"], p["dy"])])


def _swap(pair: PhotoPair, own: np.ndarray, sub: SubEdit, mask: np.ndarray):
    (dxa, dya), (dxb, dyb) = sub.params["offsets"]
    return _found_at(pair, own, [_translation(dxa, dya), _translation(dxb, dyb)])


def _resize(pair: PhotoPair, own: np.ndarray, sub: SubEdit, mask: np.ndarray):
    s = float(sub.params["scale"])
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    cx, cy = (cols[0] + cols[-1]) / 2, (rows[0] + rows[-1]) / 2
    best: tuple[float | None, str] = (None, "")
    for ddy in (-2, 0, 2):
        for ddx in (-2, 0, 2):
            value, reason = _found_at(pair, own, [_scaling(s, cx + ddx, cy + ddy)])
            if value is not None and (best[0] is None or value > best[0]):
                best = (value, reason)
            elif best[0] is None and not best[1]:
                best = (None, reason)
    return best


def _placed(pair: PhotoPair, own: np.ndarray, sub: SubEdit, mask: np.ndarray):
    p = sub.params
    ys, xs = np.nonzero(own)
    cx, cy = float(xs.mean()), float(ys.mean())
    span = max(float(xs.max() - xs.min()), float(ys.max() - ys.min()), 8.0)
    off = math.hypot(cx - float(p["cx"]), cy - float(p["cy"]))
    value = min(1.0, max(0.0, 1.0 - max(0.0, off - 0.25 * span) / (0.25 * span)))
    return value, f"the new content sits {off:.0f} px from the asked place"


def _add_text(pair: PhotoPair, own: np.ndarray, sub: SubEdit, mask: np.ndarray):
    from pipeline.editors.photo import text_glyphs

    p = sub.params
    glyphs = text_glyphs(str(p["text"]), int(p["cx"]), int(p["cy"]), int(p["size_px"]),
                         (pair.h, pair.w))
    later = mask & ~own
    glyphs &= ~later
    n = int(np.count_nonzero(glyphs))
    if n < MIN_PIXELS:
        return None, "the text's glyphs fall outside the frame or under later edits"
    rgb = np.array(_rgb(p, "rgb"), dtype=np.int16)
    painted = np.abs(pair.target[glyphs].astype(np.int16) - rgb).max(axis=1) <= 6
    recall = float(np.count_nonzero(painted)) / n
    precision = _share(own & glyphs, int(np.count_nonzero(own)))
    return min(recall, precision), (f"text {p['text']!r}: {recall:.0%} of its glyphs in "
                                    f"{p.get('color', 'the asked colour')}, {precision:.0%} of "
                                    "the changed pixels are glyphs")


def _texture(pair: PhotoPair, own: np.ndarray, sub: SubEdit, mask: np.ndarray):
    p = sub.params
    marks = pattern_mask(str(p["to_pattern"]), pair.w, pair.h, int(p["period"]))
    if marks is None:
        return None, f"no marks for pattern {p['to_pattern']!r}"
    n = int(np.count_nonzero(own))
    on = own & marks
    on_share = float(np.count_nonzero(on)) / n
    if np.count_nonzero(on) < MIN_PIXELS:
        return 0.0, "the change does not follow the pattern's marks"
    src = pair.source[on].astype(np.float32).sum(axis=1)
    tgt = pair.target[on].astype(np.float32).sum(axis=1)
    darker = float(np.count_nonzero(tgt <= 0.8 * src + 6)) / len(src)
    value = min(1.0, min(on_share, darker) / 0.9)
    return value, f"{on_share:.0%} of the change on the {p['to_pattern']} marks, {darker:.0%} darkened"


def _background(pair: PhotoPair, own: np.ndarray, sub: SubEdit, mask: np.ndarray):
    p = sub.params
    op = p.get("op")
    step = _stride(int(np.count_nonzero(own)))
    if op in ("tint", "desaturate"):
        tgt = _lab(pair.target[own][::step])
        if op == "desaturate":
            share = _share(np.hypot(tgt[:, 1], tgt[:, 2]) < 3.0, len(tgt))
            return min(1.0, share / 0.9), f"{share:.0%} of the background has no colour left"
        src = _lab(pair.source[own][::step])
        asked = _lab(np.array(_rgb(p, "to_rgb"), dtype=np.uint8).reshape(1, 3))[0]
        want = asked[1:] - src[:, 1:]
        got = tgt[:, 1:] - src[:, 1:]
        wn, gn = np.hypot(*want.T), np.hypot(*got.T)
        # Too dark or too bright a pixel holds no tint an 8-bit image can show.
        useful = (wn > 8) & (src[:, 0] > 15) & (src[:, 0] < 95)
        if np.count_nonzero(useful) < max(MIN_PIXELS, 0.2 * len(src)):
            return None, "the background is too dark, too bright or already the asked tint"
        cos = (want * got).sum(axis=1) / np.maximum(wn * gn, 1e-6)
        ok = useful & (cos >= math.cos(math.radians(HUE_TOLERANCE))) & (gn >= 0.25 * wn)
        share = _share(ok, np.count_nonzero(useful))
        return min(1.0, share / 0.9), f"{share:.0%} of the background pulled toward {p.get('to_color', 'the tint')}"
    if op == "blur":
        box = _box(own, 1)
        inner = cv2.erode(own[box].astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
        lap_s = cv2.Laplacian(_grey(pair.source[box]).astype(np.float32), cv2.CV_32F)[inner]
        lap_t = cv2.Laplacian(_grey(pair.target[box]).astype(np.float32), cv2.CV_32F)[inner]
        energy = float((lap_s ** 2).mean()) if lap_s.size else 0.0
        if energy < 4.0:
            return None, "the background has no detail to lose"
        ratio = float((lap_t ** 2).mean()) / energy
        return min(1.0, max(0.0, (0.75 - ratio) / 0.35)), f"{1 - ratio:.0%} of the fine detail lost"
    if op == "photo":
        ncc = _ncc(_grey(pair.source)[own][::step], _grey(pair.target)[own][::step])
        if ncc is None:
            return None, "flat background: cannot tell it was replaced"
        return min(1.0, max(0.0, (0.8 - ncc) / 0.3)), f"background replaced (lightness correlation {ncc:.2f})"
    return None, f"unknown background op {op!r}"


CHECKS = {
    "recolor": _recolor,
    "remove": _remove,
    "move": _move,
    "swap": _swap,
    "resize": _resize,
    "add": _placed,
    "replace": _placed,
    "add_text": _add_text,
    "texture": _texture,
    "background": _background,
}


def is_free_text(edit: SubEdit) -> bool:
    """An imported sub-edit: its type inferred from free text (or `other`, `global`), no
    structured params to check it against."""
    return edit.type in (OTHER, GLOBAL) or bool(edit.params.get("free_text"))


def is_photo(view: JudgeView) -> bool:
    return any(e.params.get("domain") == "photo" or is_free_text(e) for e in view.sub_edits)


def _presence(pair: PhotoPair, shared: np.ndarray, mask: np.ndarray,
              background: tuple[int, SubEdit, np.ndarray]) -> tuple[float | None, str]:
    """Whether new content sits on `shared` (pixels of an add/replace that the earlier background
    edit `background` = (index, sub-edit, mask) also changed): the share of them that differ by
    more than PRESENT_LEVEL from the background edit re-made on the source, scaled to 0..1."""
    from pipeline.editors.photo import apply_photo_edit

    j, sub, bg_mask = background
    op = sub.params.get("op")
    if op not in REMAKE_OPS:
        return None, f"it lies on a background {op!r} edit the judge cannot re-make"
    # The background edit's region held these pixels too (they were background then).
    earlier, _ = apply_photo_edit(pair.source, sub, bg_mask | mask, None, j)
    box = _box(shared)
    far = np.abs(pair.target[box].astype(np.int16) - earlier[box].astype(np.int16)).max(axis=2)
    share = _share(far[shared[box]] > PRESENT_LEVEL, int(np.count_nonzero(shared)))
    value = min(1.0, max(0.0, (share - PRESENT_NONE) / (PRESENT_FULL - PRESENT_NONE)))
    return value, f"{share:.0%} of it differs from the {op} background it was put on"


def _owns(masks: list[np.ndarray]) -> list[np.ndarray]:
    """Each mask less the masks of the sub-edits after it (they may paint over it)."""
    later = np.zeros(masks[0].shape, dtype=bool)
    owns: list[np.ndarray] = [None] * len(masks)  # type: ignore[list-item]
    for i in range(len(masks) - 1, -1, -1):
        owns[i] = masks[i] & ~later
        later |= masks[i]
    return owns


REAL_CHANGED_MIN = 0.05  # share of a real sub-edit's region that must show a change


def score_real_sub_edits(view: JudgeView, change: imagediff.Changes) -> tuple[list[float | None], list[str]]:
    """Per sub-edit score and reason for an imported (real) pair: its region must show a change
    of content beyond the pair's noise (`change`, over the whole frame): 0 where under
    REAL_CHANGED_MIN of it does; else None (unknown): free text has nothing to check its type
    against."""
    scores: list[float | None] = []
    reasons: list[str] = []
    for edit, own in zip(view.sub_edits, _owns([e.mask.astype(bool) for e in view.sub_edits])):
        region = imagediff.coarse_any(own, change.factor)
        n = int(np.count_nonzero(region))
        if n == 0:
            scores.append(None)
            reasons.append(f"{edit.type}: unknown: too few pixels of its own left to judge")
            continue
        share = float(np.count_nonzero(change.changed & region)) / n
        if share < REAL_CHANGED_MIN:
            scores.append(0.0)
            reasons.append(f"{edit.type}: nothing changed in its region beyond the pair's noise "
                           f"({share:.0%} of it)")
        else:
            scores.append(None)
            reasons.append(f"{edit.type}: unknown: free text, nothing to check its type against "
                           f"({share:.0%} of its region changed)")
    return scores, reasons


def broken(image: np.ndarray) -> str | None:
    """Why an image is no picture at all (blank, or nearly all clipped), None when it is one."""
    grey = _grey(image[::2, ::2])
    if float(grey.std()) < 2.0:
        return f"the target is blank (one flat tone, lightness spread {grey.std():.1f})"
    clipped = float(np.count_nonzero((grey <= 2) | (grey >= 253))) / grey.size
    if clipped > 0.98:
        return f"the target is {clipped:.0%} clipped to black or white"
    return None


def score_sub_edits(view: JudgeView) -> tuple[list[float | None], list[str]]:
    """Per sub-edit score (None: unknown) and reason, for a photo view."""
    pair = PhotoPair(view)
    masks = [e.mask.astype(bool) for e in view.sub_edits]
    owns = _owns(masks)
    counts = np.zeros((pair.h, pair.w), dtype=np.uint8)  # how many sub-edits changed a pixel
    for mask in masks:
        counts += mask
    scores: list[float | None] = []
    reasons: list[str] = []
    for i, (edit, mask, own) in enumerate(zip(view.sub_edits, masks, owns)):
        n = int(np.count_nonzero(own))
        if n < MIN_PIXELS:
            scores.append(None)
            reasons.append(f"{edit.type}: too few pixels of its own left to judge")
            continue
        coverage = float(np.count_nonzero(pair.changed & own)) / n
        said = f"{coverage:.0%} of its region changed"
        exclusive = mask & (counts == 1)
        n_exclusive = int(np.count_nonzero(exclusive))
        if n_exclusive >= EXCLUSIVE_MIN:
            alone = float(np.count_nonzero(pair.changed & exclusive)) / n_exclusive
            if alone < 1.0:
                said += f", {alone:.0%} of the {n_exclusive} px only it changed"
                coverage = min(coverage, alone)
        if coverage < 0.5:  # nothing much was done: no need to look closer
            scores.append(round(coverage, 4))
            reasons.append(f"{edit.type}: only {said}")
            continue
        if is_free_text(edit):
            value, reason = None, "free-text sub-edit: no structured params to check its type against"
        else:
            value, reason = CHECKS[edit.type](pair, own & pair.changed, edit, mask)
        if value is not None and edit.type in ("add", "replace"):
            # Laid (at least half) on pixels an earlier background edit changed: is it there at
            # all? (A few pixels only it changed cannot vouch for the rest of it.)
            background = next(((j, view.sub_edits[j], masks[j]) for j in range(i)
                               if view.sub_edits[j].type == "background"
                               and np.count_nonzero(own & masks[j]) >= 0.5 * n), None)
            if background is not None:
                present, why = _presence(pair, own & background[2], mask, background)
                reason = f"{reason}; {why}"
                value = None if present is None else min(value, present)
        if value is None:
            scores.append(None)
            reasons.append(f"{edit.type}: unknown: {reason} ({said})")
            continue
        scores.append(round(min(coverage, float(value)), 4))
        reasons.append(f"{edit.type}: {reason}; {said}")
    return scores, reasons
