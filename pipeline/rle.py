"""COCO run-length encoding of binary masks: `{"size": [h, w], "counts": str}`, byte-compatible
with pycocotools' `mask.encode` (column-major runs starting with zeros, LEB128-like text), the
form COCO tools and ImgEdit read."""

from __future__ import annotations

from typing import Any

import numpy as np


def _runs(mask: np.ndarray) -> np.ndarray:
    """Run lengths of the column-major pixel sequence, starting with a run of zeros."""
    mask = np.asarray(mask, dtype=bool)
    h, w = mask.shape
    if mask.size == 0:
        return np.zeros(1, np.int64)
    # Where the column-major sequence changes value, found without transposing the mask: inside
    # a column (row i+1 differs from row i) and across columns (top of j vs bottom of j - 1).
    rows, cols = np.divmod(np.flatnonzero(mask[1:] != mask[:-1]), w)
    inside = cols * h + rows + 1
    across = (np.flatnonzero(mask[0, 1:] != mask[-1, :-1]) + 1).astype(np.int64) * h
    edges = np.sort(np.concatenate([inside, across]))
    runs = np.diff(np.concatenate([[0], edges, [h * w]]))
    return np.concatenate([[0], runs]) if mask[0, 0] else runs


# Groups of 5 bits a count may need: counts are below 2**(5 * 12 - 1), far beyond any image.
_MAX_GROUPS = 12


def encode(mask: np.ndarray) -> dict[str, Any]:
    """Bool HxW → COCO compressed RLE.

    pycocotools' text form, vectorised: from the fourth run on, a run is stored as its difference
    with the run two before; each value is written low 5-bit group first, as few groups as hold it
    in two's complement, bit 0x20 on every group but the last, plus 48."""
    h, w = mask.shape
    counts = _runs(mask).astype(np.int64)
    values = counts.copy()
    values[3:] -= counts[1:-2]
    # groups needed: the smallest k with -2**(5k-1) <= value < 2**(5k-1)
    needed = np.ones(values.size, np.int64)
    for k in range(1, _MAX_GROUPS):
        half = 1 << (5 * k - 1)
        wider = (values < -half) | (values >= half)
        if not wider.any():
            break
        needed += wider
    column = np.arange(int(needed.max()))
    groups = (values[:, None] >> (5 * column)) & 0x1F
    groups[column < (needed - 1)[:, None]] |= 0x20
    chars = (groups[column < needed[:, None]] + 48).astype(np.uint8)
    return {"size": [int(h), int(w)], "counts": chars.tobytes().decode("ascii")}


def decode(rle: dict[str, Any]) -> np.ndarray:
    """COCO RLE (compressed string or uncompressed list of counts) → bool HxW.
    ValueError if the runs do not fill the stated size."""
    try:
        h, w = (int(v) for v in rle["size"])
        counts_field = rle["counts"]
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"not a COCO RLE (needs size [h, w] and counts): {str(rle)[:80]}") from None
    if isinstance(counts_field, (bytes, str)):
        text = counts_field.encode() if isinstance(counts_field, str) else counts_field
        counts: list[int] = []
        p = 0
        while p < len(text):
            x, k, more = 0, 0, True
            while more:
                if p >= len(text):
                    raise ValueError("truncated RLE counts")
                c = text[p] - 48
                x |= (c & 0x1F) << (5 * k)
                more = bool(c & 0x20)
                p += 1
                k += 1
                if not more and (c & 0x10):
                    x |= -1 << (5 * k)
            if len(counts) > 2:
                x += counts[-2]
            counts.append(x)
    else:
        counts = [int(c) for c in counts_field]
    if any(c < 0 for c in counts) or sum(counts) != h * w:
        raise ValueError(f"RLE runs cover {sum(counts)} pixels, size says {h}x{w}")
    values = np.zeros(len(counts), dtype=bool)
    values[1::2] = True
    flat = np.repeat(values, counts)
    return flat.reshape((w, h)).T.copy()
