"""The embedded photo grounder: object-like regions from classical segmentation, on a CPU.

Steps, for speed on a copy whose long side is `work_side` px (the masks come back at full size):
1. Felzenszwalb's graph segmentation (scikit-image) of the small copy;
2. neighbouring segments whose mean CIELAB colours are within `merge_delta_e` are merged,
   closest pair first (the means updated as they merge);
3. a merged region is kept when it looks like an object: its area share lies in
   [`min_area`, `max_area`], it does not span the frame (touching opposite borders, or the
   border along more than `MAX_BORDER_SHARE` of its outline), it is not too thin (its largest
   inscribed disk) nor too ragged (its share of its box); its holes are filled;
4. the best `max_objects` (by confidence: colour contrast with its surroundings and compactness),
   none mostly inside another, are scaled to full size, and each edge is snapped to the colour
   boundary nearby (a pixel of the edge band joins the region when its colour is closer to the
   region's than to the surrounding ring's).

Each region becomes an `InventoryObject` labelled "region" with its colour name (see
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
from pipeline.record import EditSample, InventoryObject
from pipeline.sources.scene import bbox
from pipeline.stage import RecordStage

__all__ = ["COLOR_NAMES", "ClassicalGrounder", "ground"]

log = logging.getLogger(__name__)

MAX_BORDER_SHARE = 0.15  # at most this share of a region's outline may lie on the frame border
MIN_FILL = 0.3  # a region covers at least this share of its box
MIN_THICKNESS = 0.025  # radius of its largest inscribed disk, as a share of the short side
MAX_NESTED = 0.5  # a region this much inside a better one is dropped
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
    __slots__ = ("mask", "slc", "area", "confidence")

    def __init__(self, mask: np.ndarray, slc: tuple[slice, slice], area: int, confidence: float):
        self.mask, self.slc, self.area, self.confidence = mask, slc, area, confidence


def _candidates(labels: np.ndarray, lab: np.ndarray, min_area: float, max_area: float
                ) -> list[_Candidate]:
    """Object-like regions of the small label map, with their confidence."""
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
        # Spanning the frame, or lying along its border: not an object.
        touches = (ys.start == 0, ys.stop == h, xs.start == 0, xs.stop == w)
        if (touches[0] and touches[1]) or (touches[2] and touches[3]):
            continue
        y0, y1 = max(ys.start - 2, 0), min(ys.stop + 2, h)
        x0, x1 = max(xs.start - 2, 0), min(xs.stop + 2, w)
        crop = labels[y0:y1, x0:x1] == index
        crop = fill_holes(crop)
        region_area = int(crop.sum())
        if region_area / total > max_area:
            continue
        box_area = (ys.stop - ys.start) * (xs.stop - xs.start)
        fill = region_area / box_area
        if fill < MIN_FILL:
            continue
        eroded = cv2.erode(crop.astype(np.uint8), np.ones((3, 3), np.uint8), borderValue=0)
        outline = crop & ~eroded.astype(bool)
        on_border = 0
        if touches[0]:
            on_border += int(outline[ys.start - y0].sum())
        if touches[1]:
            on_border += int(outline[ys.stop - 1 - y0].sum())
        if touches[2]:
            on_border += int(outline[:, xs.start - x0].sum())
        if touches[3]:
            on_border += int(outline[:, xs.stop - 1 - x0].sum())
        perimeter = max(int(outline.sum()), 1)
        if on_border / perimeter > MAX_BORDER_SHARE:
            continue
        padded = np.pad(crop, 1).astype(np.uint8)
        thickness = float(cv2.distanceTransform(padded, cv2.DIST_L2, 3).max())
        if thickness < max(1.5, MIN_THICKNESS * short):
            continue
        ring = cv2.dilate(crop.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool) & ~crop
        inside = lab[y0:y1, x0:x1][crop].mean(axis=0)
        contrast = (float(np.linalg.norm(inside - lab[y0:y1, x0:x1][ring].mean(axis=0)))
                    if ring.any() else 0.0)
        roundness = min(1.0, 4 * math.pi * region_area / perimeter ** 2)
        confidence = (0.55 * min(contrast / 30.0, 1.0) + 0.25 * min(fill / 0.75, 1.0)
                      + 0.2 * roundness) * (0.8 if any(touches) else 1.0)
        out.append(_Candidate(crop, (slice(y0, y1), slice(x0, x1)), region_area,
                              round(float(confidence), 4)))
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
           merge_delta_e: float = 10.0) -> list[InventoryObject]:
    """Object-like regions of an RGB uint8 image (see the module docstring)."""
    from skimage.segmentation import felzenszwalb

    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"need an RGB uint8 image, got {image.dtype} {image.shape}")
    small = _small_copy(image, work_side)
    h, w = small.shape[:2]
    lab = rgb_to_lab(small)
    min_size = max(4, int(0.5 * min_area * h * w))
    labels = felzenszwalb(small, scale=scale, sigma=0.6, min_size=min_size)
    merged = _merge_similar(labels, lab, merge_delta_e)
    candidates = sorted(_candidates(merged, lab, min_area, max_area),
                        key=lambda c: (-c.confidence, -c.area, c.slc[0].start, c.slc[1].start))
    chosen: list[tuple[_Candidate, np.ndarray]] = []
    for cand in candidates:
        if len(chosen) >= max_objects:
            break
        small_mask = np.zeros((h, w), dtype=bool)
        small_mask[cand.slc] = cand.mask
        if any((small_mask & other).sum() > MAX_NESTED * min(cand.area, other.sum())
               for _, other in chosen):
            continue
        chosen.append((cand, small_mask))
    if not chosen:
        return []
    objects = []
    total = image.shape[0] * image.shape[1]
    for cand, small_mask in chosen:
        crop, y0, x0 = _full_mask(cand, (h, w), image)
        crop_box = bbox(crop)
        area = int(np.count_nonzero(crop))
        if crop_box is None or area < 0.5 * min_area * total:
            continue
        box = [crop_box[0] + x0, crop_box[1] + y0, crop_box[2] + x0, crop_box[3] + y0]
        mask = np.zeros(image.shape[:2], dtype=bool)
        mask[y0:y0 + crop.shape[0], x0:x0 + crop.shape[1]] = crop
        rgb = _median(small[small_mask])
        attributes = {"rgb": rgb, "color": color_name(rgb), "size": size_word(area / total),
                      "position": position_word(box, image.shape), "area": round(area / total, 5)}
        objects.append(InventoryObject(
            id=len(objects), label="region", box=box, mask=mask, attributes=attributes,
            confidence=cand.confidence,
            producer="classical"))
    return objects


@GROUNDERS.register("classical")
class ClassicalGrounder(RecordStage):
    """Fills `sample.objects` with object-like regions of the photo (replacing what the source
    knew); fails the sample when none is found."""

    name = "ground"

    def __init__(self, max_objects: int = 12, min_area: float = 0.004, max_area: float = 0.35,
                 work_side: int = 128, scale: float = 60.0, merge_delta_e: float = 10.0):
        if max_objects < 1:
            raise ValueError(f"max_objects must be >= 1, got {max_objects}")
        if not 0 < min_area < max_area <= 1:
            raise ValueError(f"need 0 < min_area < max_area <= 1, got {min_area}, {max_area}")
        if work_side < 32:
            raise ValueError(f"work_side must be >= 32, got {work_side}")
        self.options = dict(max_objects=max_objects, min_area=min_area, max_area=max_area,
                            work_side=work_side, scale=scale, merge_delta_e=merge_delta_e)

    def process(self, sample: EditSample) -> None:
        if sample.source is None:
            raise ValueError("no source image to ground")
        objects = ground(sample.source, **self.options)
        if not objects:
            raise ValueError("classical grounding found no object-like region")
        sample.objects = objects
        sample.provenance["grounder"] = "classical"
