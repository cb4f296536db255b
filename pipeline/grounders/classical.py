"""The embedded photo grounder: object-like regions from classical segmentation, on a CPU.

Steps, for speed on a copy whose long side is `work_side` px (the masks come back at full size):
1. Felzenszwalb's graph segmentation (scikit-image) of the small copy;
2. neighbouring segments whose mean CIELAB colours are within `merge_delta_e` are merged,
   closest pair first (the means updated as they merge);
3. every merged region whose area share lies in [`min_area`, `max_area`] and that does not span
   the frame (touching opposite borders) is an inventory object; its holes are filled;
4. an object is NAMEABLE (role "object": a composer may refer to it) only when a person would
   find it by its words: it does not touch the frame, it is compact (`MIN_SOLIDITY` of its
   convex hull, `MIN_FILL` of its box, not too thin), it contrasts with its surrounding ring by
   `MIN_CONTRAST` ΔE, a strong image edge runs along `MIN_EDGE_SUPPORT` of its outline, its
   share of the frame is within `NAMEABLE_AREA`, and it is not part of the photo's main subject
   (`figure_ground.subject_mask`: a patch of a face is not a thing a patch grounder can name).
   The others are role "distractor": never named, but every phrase must rule them out too, so
   "the red object on the left" is unambiguous among everything a person sees there;
5. the `max_objects` nameable objects and `max_distractors` distractors with the best confidence
   (colour contrast with the surroundings and compactness), none mostly inside another, are
   scaled to full size, and each edge is snapped to the colour boundary nearby (a pixel of the
   edge band joins the region when its colour is closer to the region's than to the ring's);
6. the main subject itself, when the photo has a clear one, is one more object of role
   "subject", label "subject": never named, it is what a background edit keeps.

Each region becomes an `InventoryObject` labelled "region" with its role, its colour name (see
`COLOR_NAMES`, chosen in CIELAB), rgb, size and position words and area share
(`pipeline.grounders.attributes`). Deterministic: no randomness anywhere.
"""

from __future__ import annotations

import heapq
import logging
import math
from functools import lru_cache

import cv2
import numpy as np
from scipy import ndimage

from pipeline.grounders.attributes import (
    COLOR_NAMES,
    color_name,
    position_word,
    rgb_to_lab,
    size_word,
)
from pipeline.grounders.base import GROUNDERS
from pipeline.grounders.figure_ground import subject_mask
from pipeline.record import EditSample, InventoryObject
from pipeline.sources.scene import bbox
from pipeline.stage import RecordStage

__all__ = ["COLOR_NAMES", "ClassicalGrounder", "ground"]

log = logging.getLogger(__name__)

MIN_FILL = 0.3  # a nameable region covers at least this share of its box
MIN_THICKNESS = 0.025  # radius of its largest inscribed disk, as a share of the short side
MIN_SOLIDITY = 0.8  # a nameable region covers this share of its convex hull
MIN_CONTRAST = 22.0  # ΔE between a nameable region's mean colour and its ring's
MIN_EDGE_SUPPORT = 0.75  # share of its outline on a strong edge (the image's 80th percentile)
NAMEABLE_AREA = (0.006, 0.15)  # a smaller region is hard to find; a bigger one is scenery
MAX_NESTED = 0.5  # a region this much inside a better one is dropped
IN_SUBJECT = 0.5  # a region this much inside the main subject is a part of it
ROLES = ("object", "distractor", "subject")  # attributes["role"]; absent means "object"
EDGE_BAND_PX = 3  # full-size edge refinement looks this far either side of the upsampled edge


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """The bool mask with every hole (background not connected to the frame) filled."""
    h, w = mask.shape
    padded = np.ones((h + 2, w + 2), np.uint8)  # a frame of background around it
    padded[1:-1, 1:-1] = ~mask
    flood = np.zeros((padded.shape[0] + 2, padded.shape[1] + 2), np.uint8)
    cv2.floodFill(padded, flood, (0, 0), 2)
    return (padded[1:-1, 1:-1] != 2)


def _small_copy(image: np.ndarray, work_side: int) -> np.ndarray:
    h, w = image.shape[:2]
    scale = min(1.0, work_side / max(h, w))
    size = (max(8, round(w * scale)), max(8, round(h * scale)))
    if size == (w, h):
        return image
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def _adjacent_pairs(labels: np.ndarray) -> np.ndarray:
    """Unique (a, b) label pairs, a < b, of 4-neighbouring pixels."""
    n = int(labels.max()) + 1
    codes = []
    for a, b in ((labels[:, :-1], labels[:, 1:]), (labels[:-1, :], labels[1:, :])):
        differ = a != b
        lo, hi = np.minimum(a[differ], b[differ]), np.maximum(a[differ], b[differ])
        codes.append(lo.astype(np.int64) * n + hi)
    unique = np.unique(np.concatenate(codes))
    return np.stack([unique // n, unique % n], axis=1)


def _merge_similar(labels: np.ndarray, lab: np.ndarray, delta_e: float) -> np.ndarray:
    """Merge neighbouring segments with close mean colours, closest pair first; new label map."""
    n = int(labels.max()) + 1
    flat = labels.ravel()
    area = np.bincount(flat, minlength=n).astype(np.float64)
    sums = np.stack([np.bincount(flat, lab[..., c].ravel(), minlength=n) for c in range(3)], 1)
    means = (sums / np.maximum(area, 1)[:, None]).tolist()
    area = area.tolist()
    neighbours: list[set[int]] = [set() for _ in range(n)]
    for a, b in _adjacent_pairs(labels).tolist():
        neighbours[a].add(b)
        neighbours[b].add(a)
    parent = list(range(n))
    version = [0] * n
    heap = [(math.dist(means[a], means[b]), a, b, 0, 0)
            for a in range(n) for b in neighbours[a] if a < b]
    heapq.heapify(heap)
    while heap:
        d, a, b, va, vb = heapq.heappop(heap)
        if d > delta_e:
            break
        if parent[a] != a or parent[b] != b or version[a] != va or version[b] != vb:
            continue  # stale entry: one of the two has merged since
        total = area[a] + area[b]  # merge b into a
        means[a] = [(x * area[a] + y * area[b]) / total for x, y in zip(means[a], means[b])]
        area[a] = total
        parent[b] = a
        version[a] += 1
        neighbours[a] = (neighbours[a] | neighbours[b]) - {a, b}
        for c in neighbours[b]:
            neighbours[c].discard(b)
            if c != a:
                neighbours[c].add(a)
        for c in neighbours[a]:
            lo, hi = min(a, c), max(a, c)
            heapq.heappush(heap, (math.dist(means[a], means[c]), lo, hi, version[lo], version[hi]))
    root = np.arange(n)
    for i in range(n):
        r = i
        while parent[r] != r:
            r = parent[r]
        root[i] = r
    _, compact = np.unique(root, return_inverse=True)  # labels 0..k-1, in order of first root
    return compact.reshape(-1)[labels]


class _Candidate:
    __slots__ = ("mask", "slc", "area", "confidence", "nameable")

    def __init__(self, mask: np.ndarray, slc: tuple[slice, slice], area: int, confidence: float,
                 nameable: bool):
        self.mask, self.slc, self.area, self.confidence = mask, slc, area, confidence
        self.nameable = nameable


def _strong_edges(small: np.ndarray) -> np.ndarray:
    """Bool HxW of the small copy: within 1 px of a gradient above the image's 80th percentile."""
    grey = cv2.cvtColor(small, cv2.COLOR_RGB2GRAY).astype(np.float32)
    magnitude = cv2.magnitude(cv2.Sobel(grey, cv2.CV_32F, 1, 0), cv2.Sobel(grey, cv2.CV_32F, 0, 1))
    strong = (magnitude > np.percentile(magnitude, 80)).astype(np.uint8)
    return cv2.dilate(strong, np.ones((3, 3), np.uint8)).astype(bool)


def _candidates(labels: np.ndarray, lab: np.ndarray, edges: np.ndarray, min_area: float,
                max_area: float) -> list[_Candidate]:
    """Every region of the small label map that may be an object, with its confidence and
    whether a person could find it by its words (see the module docstring)."""
    h, w = labels.shape
    total = h * w
    short = min(h, w)
    n = int(labels.max()) + 1
    area = np.bincount(labels.ravel(), minlength=n)
    out = []
    for index, slc in enumerate(ndimage.find_objects(labels + 1)):
        if slc is None or not min_area <= area[index] / total <= max_area:
            continue
        ys, xs = slc
        touches = (ys.start == 0, ys.stop == h, xs.start == 0, xs.stop == w)
        if (touches[0] and touches[1]) or (touches[2] and touches[3]):
            continue  # spanning the frame: the scene itself, not an object in it
        y0, y1 = max(ys.start - 2, 0), min(ys.stop + 2, h)
        x0, x1 = max(xs.start - 2, 0), min(xs.stop + 2, w)
        crop = fill_holes(labels[y0:y1, x0:x1] == index)
        region_area = int(crop.sum())
        if region_area / total > max_area:
            continue
        fill = region_area / ((ys.stop - ys.start) * (xs.stop - xs.start))
        crop8 = crop.astype(np.uint8)
        outline = crop & ~cv2.erode(crop8, np.ones((3, 3), np.uint8), borderValue=0).astype(bool)
        perimeter = max(int(outline.sum()), 1)
        ring = cv2.dilate(crop8, np.ones((5, 5), np.uint8)).astype(bool) & ~crop
        inside = lab[y0:y1, x0:x1][crop].mean(axis=0)
        contrast = (float(np.linalg.norm(inside - lab[y0:y1, x0:x1][ring].mean(axis=0)))
                    if ring.any() else 0.0)
        roundness = min(1.0, 4 * math.pi * region_area / perimeter ** 2)
        confidence = (0.55 * min(contrast / 30.0, 1.0) + 0.25 * min(fill / 0.75, 1.0)
                      + 0.2 * roundness) * (0.8 if any(touches) else 1.0)
        nameable = (not any(touches) and fill >= MIN_FILL and contrast >= MIN_CONTRAST
                    and NAMEABLE_AREA[0] <= region_area / total <= NAMEABLE_AREA[1])
        if nameable:
            hull = cv2.convexHull(cv2.findNonZero(crop8))
            thickness = float(cv2.distanceTransform(np.pad(crop8, 1), cv2.DIST_L2, 3).max())
            support = float(edges[y0:y1, x0:x1][outline].mean())
            nameable = (region_area >= MIN_SOLIDITY * max(cv2.contourArea(hull), 1.0)
                        and thickness >= max(1.5, MIN_THICKNESS * short)
                        and support >= MIN_EDGE_SUPPORT)
        out.append(_Candidate(crop, (slice(y0, y1), slice(x0, x1)), region_area,
                              round(float(confidence), 4), nameable))
    return out


def _full_mask(cand: _Candidate, small_shape: tuple[int, int], image: np.ndarray
               ) -> tuple[np.ndarray, int, int]:
    """The candidate at full size as (crop, y0, x0), its edge snapped to the colour boundary."""
    H, W = image.shape[:2]
    h, w = small_shape
    sy, sx = H / h, W / w
    ys, xs = cand.slc
    Y0, Y1 = int(math.floor(ys.start * sy)), min(H, int(math.ceil(ys.stop * sy)))
    X0, X1 = int(math.floor(xs.start * sx)), min(W, int(math.ceil(xs.stop * sx)))
    # Sample the small mask at full-size pixel centres (bilinear), threshold at one half.
    gx = ((np.arange(X0, X1) + 0.5) / sx - 0.5 - xs.start).astype(np.float32)
    gy = ((np.arange(Y0, Y1) + 0.5) / sy - 0.5 - ys.start).astype(np.float32)
    map_x, map_y = np.meshgrid(gx, gy)
    soft = cv2.remap(cand.mask.astype(np.float32), map_x, map_y, cv2.INTER_LINEAR,
                     borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    crop = (soft >= 0.5).astype(np.uint8)
    kernel = _band_kernel()
    grown = cv2.dilate(crop, kernel)
    shrunk = cv2.erode(crop, kernel, borderValue=1)
    outer_zone = cv2.dilate(grown, kernel) - grown
    if cv2.countNonZero(shrunk) and cv2.countNonZero(outer_zone):
        pixels = image[Y0:Y1, X0:X1]
        inner = np.array(cv2.mean(pixels, mask=shrunk)[:3], dtype=np.float32)
        outer = np.array(cv2.mean(pixels, mask=outer_zone)[:3], dtype=np.float32)
        # |p - inner|² < |p - outer|²  ⇔  p · (outer - inner) < (|outer|² - |inner|²) / 2
        direction = outer - inner
        threshold = float(direction @ (outer + inner)) / 2
        closer = pixels.astype(np.float32) @ direction < threshold
        band = (grown > shrunk)
        crop = np.where(band, closer, shrunk > 0)
        crop = fill_holes(crop)
        # keep the largest connected piece
        count, comp, stats, _ = cv2.connectedComponentsWithStats(crop.astype(np.uint8),
                                                                 connectivity=4)
        if count > 2:
            crop = comp == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    return crop.astype(bool), Y0, X0


@lru_cache(maxsize=1)
def _band_kernel() -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * EDGE_BAND_PX + 1, 2 * EDGE_BAND_PX + 1))


def _median(pixels: np.ndarray) -> list[int]:
    return [int(v) for v in np.median(pixels, axis=0)]


def ground(image: np.ndarray, max_objects: int = 12, min_area: float = 0.004,
           max_area: float = 0.35, work_side: int = 128, scale: float = 60.0,
           merge_delta_e: float = 10.0, max_distractors: int = 24,
           subject: np.ndarray | None = None) -> list[InventoryObject]:
    """Inventory of an RGB uint8 image (see the module docstring). `subject`: the main subject's
    bool mask when known (its parts are not nameable); it is not added to the inventory here."""
    from skimage.segmentation import felzenszwalb

    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"need an RGB uint8 image, got {image.dtype} {image.shape}")
    small = _small_copy(image, work_side)
    h, w = small.shape[:2]
    lab = rgb_to_lab(small)
    min_size = max(4, int(0.5 * min_area * h * w))
    labels = felzenszwalb(small, scale=scale, sigma=0.6, min_size=min_size)
    merged = _merge_similar(labels, lab, merge_delta_e)
    small_subject = None
    if subject is not None:
        small_subject = cv2.resize(subject.astype(np.uint8), (w, h),
                                   interpolation=cv2.INTER_NEAREST).astype(bool)
    candidates = sorted(_candidates(merged, lab, _strong_edges(small), min_area, max_area),
                        key=lambda c: (not c.nameable, -c.confidence, -c.area, c.slc[0].start,
                                       c.slc[1].start))
    chosen: list[tuple[_Candidate, np.ndarray, bool]] = []
    limits = {True: max_objects, False: max_distractors}
    for cand in candidates:
        small_mask = np.zeros((h, w), dtype=bool)
        small_mask[cand.slc] = cand.mask
        nameable = cand.nameable and not (
            small_subject is not None
            and (small_mask & small_subject).sum() > IN_SUBJECT * cand.area)
        if sum(1 for *_, named in chosen if named == nameable) >= limits[nameable]:
            continue
        if any((small_mask & other).sum() > MAX_NESTED * min(cand.area, other.sum())
               for _, other, _ in chosen):
            continue
        chosen.append((cand, small_mask, nameable))
    objects = []
    total = image.shape[0] * image.shape[1]
    for cand, small_mask, nameable in chosen:
        crop, y0, x0 = _full_mask(cand, (h, w), image)
        crop_box = bbox(crop)
        area = int(np.count_nonzero(crop))
        if crop_box is None or area < 0.5 * min_area * total:
            continue
        box = [crop_box[0] + x0, crop_box[1] + y0, crop_box[2] + x0, crop_box[3] + y0]
        mask = np.zeros(image.shape[:2], dtype=bool)
        mask[y0:y0 + crop.shape[0], x0:x0 + crop.shape[1]] = crop
        objects.append(_inventory_object(len(objects), "region", box, mask, _median(
            small[small_mask]), image.shape, "object" if nameable else "distractor",
            cand.confidence))
    return objects


def _inventory_object(oid: int, label: str, box: list[int], mask: np.ndarray, rgb: list[int],
                      shape: tuple[int, ...], role: str, confidence: float) -> InventoryObject:
    share = float(np.count_nonzero(mask)) / (shape[0] * shape[1])
    attributes = {"rgb": rgb, "color": color_name(rgb), "size": size_word(share),
                  "position": position_word(box, shape), "area": round(share, 5), "role": role}
    return InventoryObject(id=oid, label=label, box=box, mask=mask, attributes=attributes,
                           confidence=confidence, producer="classical")


def subject_object(image: np.ndarray, mask: np.ndarray, oid: int) -> InventoryObject:
    """The main subject as an inventory object (role and label "subject")."""
    return _inventory_object(oid, "subject", bbox(mask), mask, _median(image[mask]), image.shape,
                             "subject", 1.0)


@GROUNDERS.register("classical")
class ClassicalGrounder(RecordStage):
    """Fills `sample.objects` with the photo's regions (nameable objects and distractors) and its
    main subject (replacing what the source knew); fails the sample when no region is found.
    `figure_ground=False` skips the subject estimate (no subject, every part nameable)."""

    name = "ground"

    def __init__(self, max_objects: int = 12, min_area: float = 0.004, max_area: float = 0.35,
                 work_side: int = 128, scale: float = 60.0, merge_delta_e: float = 10.0,
                 max_distractors: int = 24, figure_ground: bool = True):
        if max_objects < 1:
            raise ValueError(f"max_objects must be >= 1, got {max_objects}")
        if not 0 < min_area < max_area <= 1:
            raise ValueError(f"need 0 < min_area < max_area <= 1, got {min_area}, {max_area}")
        if work_side < 32:
            raise ValueError(f"work_side must be >= 32, got {work_side}")
        if max_distractors < 0:
            raise ValueError(f"max_distractors must be >= 0, got {max_distractors}")
        self.options = dict(max_objects=max_objects, min_area=min_area, max_area=max_area,
                            work_side=work_side, scale=scale, merge_delta_e=merge_delta_e,
                            max_distractors=max_distractors)
        self.figure_ground = bool(figure_ground)

    def process(self, sample: EditSample) -> None:
        if sample.source is None:
            raise ValueError("no source image to ground")
        subject = subject_mask(sample.source) if self.figure_ground else None
        objects = ground(sample.source, subject=subject, **self.options)
        if not objects:
            raise ValueError("classical grounding found no object-like region")
        if subject is not None:
            objects.append(subject_object(sample.source, subject, len(objects)))
        sample.objects = objects
        sample.provenance["grounder"] = "classical"
