"""The plausibility gate of exact photo pairs: would anyone train on what the editor made?

The photo checks (`pixel_photo`) say that pixels changed where the instruction says; this gate
says whether the result looks like a photograph rather than a cut-and-paste job. It sees what a
judge sees — source, target, and each sub-edit's type, params and mask (the pixels it changed) —
and applies to sub-edits with params["domain"] == "photo" of EXACT pairs only. Per sub-edit:

- seam (recolor, background): the target's colour gradient across the region's outline against
  the source's there: a strong edge in the target where the source had none nearby (a tint
  cutting through the subject, a recolour spilling past the object's edge) is a seam. The
  measure is the longest connected seam against the frame's side; "strong" is the image's own
  edge level (a high percentile of the source's gradient magnitudes), so a busy photo tolerates
  more.
- ragged (add, replace): outline roughness of the pasted mask — its boundary length against that
  of a smoothed copy (a compact feathered cut-out ≈ 1.1, a noisy hard alpha ≫ 1.5);
- halo (add, replace): a ring of foreign colour along the pasted edge (the donor's background
  dragged along): share of the paste's outer 2 px whose colour lies far from the segment between
  the paste's local inside colour and the host's local outside colour (a feather mixes the two);
- residual (remove; the old place of move / resize): the filled hole against the ring
  around it — a flat smear in a textured ring (high-frequency energy ratio), or a fill whose mean
  colour sits far from the ring's (ΔE over the ring's own spread);
- ghost (same places): the hole still holds the source's high frequencies (an outline or a part
  of the old object left, faded or not): their least-squares gain from source to target;
- stray (same places): the surround of the emptied place looks like the object that was there
  (the grounder's segment was a part of it, and the rest stays behind).

Each check gives a measure and a score: 1 up to its UNSURE level, then the borderline band
(BAND_TOP .. BAND_BOTTOM: below `RoutingPolicy.sub_edit_pass` 0.92, above `overall_reject` 0.7)
up to its FAULT level, then below FAULT_TOP (< 0.7: rejected). `fold` takes each sub-edit's
score to min(type score, worst check) and appends the reason. The levels were calibrated with
`bench/plausibility.py` (clean photo-editor outputs against crude edits from the same sub-edits);
what it measured is said beside each.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from pipeline.compose.regions import box_centre, dilate, scale_about, shift
from pipeline.record import JudgeView, SubEdit
from pipeline.sources.scene import bbox

BAND_TOP = 0.9  # a check just past UNSURE: not passed (< sub_edit_pass 0.92), not rejected
BAND_BOTTOM = 0.75  # a check just short of FAULT: still above overall_reject 0.7
FAULT_TOP = 0.6  # a check at FAULT: rejected; falls to 0 at twice the UNSURE..FAULT span past it
MIN_PIXELS = 40  # fewer pixels than this in a region, band or ring: the check abstains

# seam: the longest connected run of outline pixels with a target edge >= the image's edge level
# where the source's gradient within 2 px stays under SEAM_SOURCE_WEAK of that level, as a share
# of the frame's longer side.
EDGE_PERCENTILE = 90  # the image's own edge level: this percentile of the source's gradients
EDGE_FLOOR = 3.0  # ΔE per px: an edge level never below this (flat photos)
SEAM_SOURCE_WEAK = 0.5
# Bench (5 seeds, 384 px): clean background edits <= 0.01; the editor's recolours of random
# segments median 0.01, 90th percentile 0.21; a recolour spilling 6 px median 0.14; a tint
# cutting the subject in half 0.02-0.21.
SEAM_UNSURE, SEAM_FAULT = 0.04, 0.12
# ragged: boundary length of the mask over that of the mask smoothed with sigma RAGGED_SIGMA.
RAGGED_SIGMA = 2.0
# Bench: clean pastes (add) 1.02-1.12 (1.40 at most on an earlier grounder), clean replace
# <= 1.25; a noisy hard alpha 2.7-3.1 on an add, median 1.70 on a replace (its mask also holds
# the old object's smooth hole).
RAGGED_UNSURE, RAGGED_FAULT = 1.35, 1.6
# halo: share of the paste's outer band far (ΔE > HALO_DE) from its inside–outside mix.
HALO_DE = 14.0
# Bench: clean adds median 0.16, 90th percentile 0.20 (max 0.33); a 3 px ring of donor
# background median 0.65 on an add, 0.25 on a replace.
HALO_UNSURE, HALO_FAULT = 0.22, 0.4
# residual: 1 - (hole's high-frequency energy / ring's) where the ring is textured (>= TEXTURE_MIN
# grey levels mean |high-pass|), and mean ΔE(hole, ring) over the ring's own spread.
TEXTURE_MIN = 3.0
# Bench: a flat mean-colour fill 0.99 (median); the editor's Telea fills median 0.63-0.69,
# 90th percentile 0.82-0.86 (the smudges the issue describes: unsure, to a person).
FLAT_UNSURE, FLAT_FAULT = 0.75, 0.9
MEAN_UNSURE, MEAN_FAULT = 1.0, 1.6
RING_PX = 6
# stray: share of the emptied place's surround (2-4 px out) whose source colour is within
# max(STRAY_DE, STRAY_SPREAD x the object's own spread) of the removed object's median colour.
STRAY_DE, STRAY_SPREAD = 6.0, 1.5
# Bench: whole segments removed or moved median 0.07-0.18, 90th percentile 0.36-0.75 (segments
# of a larger thing); 40% of the object left behind median 0.19-0.23 — the weakest check: a
# segment's surround is often much like it.
STRAY_UNSURE, STRAY_FAULT = 0.3, 0.5
# ghost: share of the source's high frequencies in the hole that the target still holds.
# Bench: the editor's fills <= 0.04 (0.26 at most, a resize); the old object's detail faded
# back at 80% median 0.58-0.64, 10th percentile 0.24-0.37.
GHOST_UNSURE, GHOST_FAULT = 0.25, 0.45

CHECKS_OF = {
    "recolor": ("seam",), "background": ("seam",),
    "add": ("ragged", "halo"), "replace": ("ragged", "halo"),
    "remove": ("residual", "ghost", "stray"), "move": ("residual", "ghost", "stray"),
    "resize": ("residual", "ghost", "stray"),
}
# Not checked: texture (its marks end at the object's outline: a seam by design) and swap (each
# object lands on the other's old place: no emptied place is left to look at; the bench found
# only slivers there, "ghosts" on every clean swap).


@dataclass(frozen=True)
class Finding:
    check: str
    measure: float
    score: float
    reason: str


def grade(measure: float, unsure: float, fault: float) -> float:
    """1 up to `unsure`; BAND_TOP..BAND_BOTTOM up to `fault`; FAULT_TOP falling to 0 past it."""
    span = fault - unsure
    if measure <= unsure:
        return 1.0
    if measure < fault:
        return BAND_TOP - (BAND_TOP - BAND_BOTTOM) * (measure - unsure) / span
    return max(0.0, FAULT_TOP * (1.0 - (measure - fault) / (2.0 * span)))


class _Images:
    """Lazily computed per-pair arrays the checks share."""

    def __init__(self, view: JudgeView):
        self.source, self.target = view.source, view.target
        self.shape = view.source.shape[:2]
        self._cache: dict[str, np.ndarray] = {}

    def _get(self, key: str, make):
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def lab(self, which: str) -> np.ndarray:
        image = self.source if which == "source" else self.target
        return self._get(f"lab-{which}", lambda: cv2.cvtColor(
            image.astype(np.float32) * (1.0 / 255.0), cv2.COLOR_RGB2Lab))

    def gradient(self, which: str) -> np.ndarray:
        """Colour gradient magnitude (ΔE per px, Sobel / 8 over L*a*b*)."""
        def make():
            lab = self.lab(which)
            gx = cv2.Sobel(lab, cv2.CV_32F, 1, 0, ksize=3) / 8.0
            gy = cv2.Sobel(lab, cv2.CV_32F, 0, 1, ksize=3) / 8.0
            return np.sqrt((gx * gx + gy * gy).sum(axis=2))
        return self._get(f"grad-{which}", make)

    def highpass(self, which: str) -> np.ndarray:
        """Grey minus its Gaussian blur (sigma 1.5): texture and edges, no shading."""
        def make():
            image = self.source if which == "source" else self.target
            grey = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY).astype(np.float32)
            return grey - cv2.GaussianBlur(grey, (0, 0), sigmaX=1.5)
        return self._get(f"hp-{which}", make)

    def smooth_lab_source(self) -> np.ndarray:
        return self._get("smooth-lab", lambda: cv2.GaussianBlur(self.lab("source"), (0, 0), 1.5))

    def edge_level(self) -> float:
        def make():
            g = self.gradient("source")[::2, ::2]
            return np.array(max(EDGE_FLOOR, float(np.percentile(g, EDGE_PERCENTILE))))
        return float(self._get("edge-level", make))


def _erode(mask: np.ndarray, px: int) -> np.ndarray:
    return ~dilate(~mask, px)


def _outline(mask: np.ndarray) -> np.ndarray:
    """A 2–3 px line across the mask's boundary, off the frame's border."""
    band = dilate(mask, 1) & ~_erode(mask, 1)
    band[:2, :] = band[-2:, :] = band[:, :2] = band[:, -2:] = False
    return band


def _seam(im: _Images, region: np.ndarray, others: np.ndarray) -> Finding | None:
    band = _outline(region) & ~others
    n = int(np.count_nonzero(band))
    if n < MIN_PIXELS:
        return None
    level = im.edge_level()
    near = cv2.dilate(im.gradient("source"), np.ones((5, 5), np.uint8))
    seams = band & (im.gradient("target") >= level) & (near < SEAM_SOURCE_WEAK * level)
    # The longest connected seam, not their share: a seam through the subject is short against
    # a background's whole outline and still plain to see.
    count, _, stats, _ = cv2.connectedComponentsWithStats(seams.astype(np.uint8), connectivity=8)
    run = float(stats[1:, cv2.CC_STAT_AREA].max()) / max(im.shape) if count > 1 else 0.0
    return Finding("seam", run, grade(run, SEAM_UNSURE, SEAM_FAULT),
                   f"a hard seam where the photo had no edge ({run:.0%} of the frame long)")


def _crack_length(mask: np.ndarray) -> int:
    m = mask.astype(np.int8)
    return int(np.count_nonzero(np.diff(m, axis=0))) + int(np.count_nonzero(np.diff(m, axis=1)))


def _ragged(im: _Images, mask: np.ndarray, others: np.ndarray) -> Finding | None:
    if np.count_nonzero(mask) < 4 * MIN_PIXELS:
        return None
    smooth = cv2.GaussianBlur(mask.astype(np.float32), (0, 0), sigmaX=RAGGED_SIGMA) > 0.5
    ref = _crack_length(smooth)
    if ref < MIN_PIXELS:
        return None
    ratio = _crack_length(mask) / ref
    return Finding("ragged", ratio, grade(ratio, RAGGED_UNSURE, RAGGED_FAULT),
                   f"pasted edge {ratio:.2f}x as long as its smoothed outline (ragged cut-out)")


def _local_mean(lab: np.ndarray, where: np.ndarray, sigma: float = 4.0) -> np.ndarray:
    w = where.astype(np.float32)
    num = cv2.GaussianBlur(lab * w[..., None], (0, 0), sigmaX=sigma)
    den = cv2.GaussianBlur(w, (0, 0), sigmaX=sigma)
    return num / np.maximum(den, 1e-3)[..., None]


def _halo(im: _Images, mask: np.ndarray, others: np.ndarray) -> Finding | None:
    band = mask & ~_erode(mask, 2)
    inside = _erode(mask, 4) & ~_erode(mask, 9)
    outside = dilate(mask, 5) & ~dilate(mask, 1) & ~others
    if min(np.count_nonzero(band), np.count_nonzero(inside), np.count_nonzero(outside)) < MIN_PIXELS:
        return None
    lab = im.lab("target")
    a, b = _local_mean(lab, inside)[band], _local_mean(lab, outside)[band]
    p = lab[band]
    ab = b - a
    t = np.clip(((p - a) * ab).sum(axis=1) / np.maximum((ab * ab).sum(axis=1), 1e-6), 0.0, 1.0)
    far = np.linalg.norm(p - (a + t[:, None] * ab), axis=1) > HALO_DE
    share = float(np.count_nonzero(far)) / len(p)
    return Finding("halo", share, grade(share, HALO_UNSURE, HALO_FAULT),
                   f"{share:.0%} of the pasted edge is neither the cut-out nor its new surround "
                   "(a halo)")


def old_place(sub: SubEdit, mask: np.ndarray) -> np.ndarray:
    """The pixels of a sub-edit's mask that were emptied and not pasted over: the whole mask of a
    remove; for a move the pixels p whose content went to p + d (in the mask) and on which nothing
    landed (p - d not in it); for a resize the mask less the mask scaled about its box centre
    (the new placement)."""
    p = sub.params
    if sub.type == "remove":
        return mask.copy()
    if sub.type == "move":
        dx, dy = int(p["dx"]), int(p["dy"])
        return mask & shift(mask, -dx, -dy) & ~shift(mask, dx, dy)
    if sub.type == "resize":
        cx, cy = box_centre(bbox(mask))
        return mask & ~dilate(scale_about(mask, float(p["scale"]), cx, cy), 1)
    return np.zeros_like(mask)


def _texture(hp: np.ndarray, where: np.ndarray) -> float:
    return float(np.abs(hp[where]).mean())


def _residual(im: _Images, hole: np.ndarray, others: np.ndarray) -> Finding | None:
    inner = _erode(hole, 3)  # the high-pass near the hole's edge still sees the ring
    if np.count_nonzero(inner) < MIN_PIXELS:
        inner = _erode(hole, 1)
    ring = dilate(hole, RING_PX) & ~others
    if min(np.count_nonzero(inner), np.count_nonzero(ring)) < MIN_PIXELS:
        return None
    hp = im.highpass("target")
    ring_tex = _texture(hp, ring)
    flat = 0.0
    if ring_tex >= TEXTURE_MIN:
        flat = max(0.0, 1.0 - _texture(hp, inner) / ring_tex)
    lab = im.lab("target")
    ring_lab = lab[ring]
    spread = float(np.linalg.norm(ring_lab.std(axis=0))) + 4.0
    far = float(np.linalg.norm(lab[inner].mean(axis=0) - ring_lab.mean(axis=0))) / spread
    flat_score = grade(flat, FLAT_UNSURE, FLAT_FAULT)
    far_score = grade(far, MEAN_UNSURE, MEAN_FAULT)
    if flat_score <= far_score:
        return Finding("residual", flat, flat_score,
                       f"the filled area is a flat smear in a textured surround ({flat:.0%} of "
                       "the surround's fine texture missing)")
    return Finding("residual", far, far_score,
                   f"the filled area's colour sits far from its surround ({far:.1f}x the "
                   "surround's own spread)")


def _stray(im: _Images, hole: np.ndarray, others: np.ndarray) -> Finding | None:
    rim = dilate(hole, 4) & ~dilate(hole, 1) & ~others  # just outside the emptied place
    core = _erode(hole, 2)
    if np.count_nonzero(core) < MIN_PIXELS:
        core = hole
    if min(np.count_nonzero(rim), np.count_nonzero(core)) < MIN_PIXELS:
        return None
    lab = im.smooth_lab_source()
    obj = lab[core]
    centre = np.median(obj, axis=0)
    spread = float(np.median(np.linalg.norm(obj - centre, axis=1)))
    # A segment's surround differs from it (that is how it was found): rim pixels that look like
    # the removed object are the object going on past the mask.
    like = np.linalg.norm(lab[rim] - centre, axis=1) < max(STRAY_DE, STRAY_SPREAD * spread)
    share = float(np.count_nonzero(like)) / len(like)
    return Finding("stray", share, grade(share, STRAY_UNSURE, STRAY_FAULT),
                   f"{share:.0%} of the emptied place's surround looks like the object "
                   "(a part of it left behind)")


def _ghost(im: _Images, hole: np.ndarray, others: np.ndarray) -> Finding | None:
    core = _erode(hole, 2)  # the mask's soft rim holds the old surround in both images
    hole = core if np.count_nonzero(core) >= MIN_PIXELS else hole
    if np.count_nonzero(hole) < MIN_PIXELS:
        return None
    s, t = im.highpass("source")[hole], im.highpass("target")[hole]
    s, t = s - s.mean(), t - t.mean()
    energy = float((s * s).sum())
    if float(np.abs(s).mean()) < 1.0:  # the object had no detail to leave
        return None
    # How much of the object's detail the target still holds (least-squares gain of the source's
    # high frequencies in the target's): new texture laid over it does not hide a ghost.
    kept = max(0.0, float((s * t).sum()) / energy)
    return Finding("ghost", kept, grade(kept, GHOST_UNSURE, GHOST_FAULT),
                   f"the old object still shows at its old place ({kept:.0%} of its detail left)")


CHECKS = {"seam": _seam, "ragged": _ragged, "halo": _halo, "residual": _residual,
          "ghost": _ghost, "stray": _stray}


def assess(view: JudgeView, i: int, im: _Images | None = None) -> list[Finding]:
    """The findings of every check that applies to sub-edit `i` of a photo view (a check with too
    few pixels to look at abstains)."""
    sub = view.sub_edits[i]
    checks = CHECKS_OF.get(sub.type, ())
    mask = sub.mask.astype(bool)
    if not checks or np.count_nonzero(mask) < MIN_PIXELS:
        return []
    im = im or _Images(view)
    # What the check may look at: rings and outlines stay off the pixels other sub-edits changed
    # (and off this one's own: a ring around a hole must be what was there before).
    others = np.zeros_like(mask)
    for j, other in enumerate(view.sub_edits):
        if j != i and other.mask is not None:
            others |= other.mask.astype(bool)
    others = dilate(others, 2)
    if sub.type in ("remove", "move", "resize"):
        region, outside = old_place(sub, mask) & ~others, others | mask
    elif sub.type in ("add", "replace"):
        region, outside = mask & ~others, others
    else:
        region, outside = mask, others
    found = [CHECKS[name](im, region, outside) for name in checks]
    return [f for f in found if f is not None]


def fold(view: JudgeView, scores: list[float | None], reasons: list[str]
         ) -> tuple[list[float | None], list[str]]:
    """Each photo sub-edit's score lowered to its worst check, the check's reason appended. An
    unknown type score stays unknown unless a check is a clear fault (then it is that check's)."""
    if view.kind != "exact":
        return scores, reasons
    scores, reasons = list(scores), list(reasons)
    im = _Images(view)
    for i, sub in enumerate(view.sub_edits):
        if sub.params.get("domain") != "photo" or sub.mask is None:
            continue
        findings = assess(view, i, im)
        if not findings:
            continue
        worst = min(findings, key=lambda f: f.score)
        if worst.score >= 1.0:
            continue
        word = "implausible" if worst.score < BAND_BOTTOM else "unsure"
        reasons[i] = f"{reasons[i]}; {word}: {worst.reason}"
        if scores[i] is not None:
            scores[i] = round(min(scores[i], worst.score), 4)
        elif worst.score < BAND_BOTTOM:
            scores[i] = round(worst.score, 4)
    return scores, reasons
