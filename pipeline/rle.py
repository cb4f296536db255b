"""COCO run-length encoding of binary masks: `{"size": [h, w], "counts": str}`, byte-compatible
with pycocotools' `mask.encode` (column-major runs starting with zeros, LEB128-like text), the
form COCO tools and ImgEdit read."""

from __future__ import annotations

from typing import Any

import numpy as np


def _runs(mask: np.ndarray) -> list[int]:
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    if flat.size == 0:
        return [0]
    edges = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], edges, [flat.size]])
    runs = np.diff(bounds).tolist()
    return ([0] + runs) if flat[0] else runs


def encode(mask: np.ndarray) -> dict[str, Any]:
    """Bool HxW → COCO compressed RLE."""
    h, w = mask.shape
    counts = _runs(mask)
    chars = []
    for i, count in enumerate(counts):
        x = count - counts[i - 2] if i > 2 else count
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = (x != -1) if (c & 0x10) else (x != 0)
            if more:
                c |= 0x20
            chars.append(chr(c + 48))
    return {"size": [int(h), int(w)], "counts": "".join(chars)}


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
