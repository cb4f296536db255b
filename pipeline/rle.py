"""COCO run-length encoding of binary masks: `{"size": [h, w], "counts": str}`, byte-compatible
with pycocotools' `mask.encode` (column-major runs starting with zeros, LEB128-like text), the
form COCO tools and ImgEdit read."""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline import bounds


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


def decode(rle: dict[str, Any], *, expected: tuple[int, int] | None = None,
           max_pixels: int = bounds.MAX_PIXELS) -> np.ndarray:
    """COCO RLE (compressed string or uncompressed list of counts) → bool HxW.

    Bounded before anything of the declared size is allocated (`pipeline.bounds`): the `size`
    must equal `expected` (the image's (h, w)) when the caller knows it, else hold at most
    `max_pixels` pixels; the counts must number at most h * w + 1, be non-negative and sum to
    h * w. The compressed text is decoded with numpy (no Python int per run). ValueError
    (`bounds.OutOfBounds` for a limit) with a one-line reason otherwise."""
    try:
        size, counts_field = rle["size"], rle["counts"]
        if len(size) != 2:
            raise ValueError
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"not a COCO RLE (needs size [h, w] and counts): "
                         f"{bounds.clip_text(rle, 80)}") from None
    h, w = bounds.check_mask_size(size[0], size[1], expected=expected, max_pixels=max_pixels,
                                  what="RLE mask")
    most = h * w + 1  # runs a mask of h * w pixels can have (the first may be empty)
    if isinstance(counts_field, (bytes, str)):
        text = counts_field.encode("latin-1", "replace") if isinstance(counts_field, str) \
            else counts_field
        if len(text) > most * bounds.MAX_RLE_GROUPS:
            raise bounds.OutOfBounds(f"RLE counts text of {len(text):,} characters for a "
                                     f"{w}x{h} mask")
        counts = _counts_from_text(text, most)
    else:
        if not isinstance(counts_field, (list, tuple, np.ndarray)):
            raise ValueError(f"RLE counts are neither text nor a list ({type(counts_field).__name__})")
        if len(counts_field) > most:
            raise bounds.OutOfBounds(f"RLE has {len(counts_field):,} runs, a {w}x{h} mask at "
                                     f"most {most:,}")
        try:
            counts = np.array([bounds.integer(c, "an RLE count") for c in counts_field],
                              dtype=np.int64)
        except bounds.OutOfBounds as exc:
            raise ValueError(str(exc)) from None
    if counts.size and (counts.min() < 0 or counts.max() > h * w):
        raise ValueError(f"RLE has a run outside 0..{h * w} pixels")
    covered = int(counts.sum())
    if covered != h * w:
        raise ValueError(f"RLE runs cover {covered} pixels, size says {h}x{w}")
    values = np.zeros(counts.size, dtype=bool)
    values[1::2] = True
    flat = np.repeat(values, counts)
    return flat.reshape((w, h)).T.copy()


def _counts_from_text(text: bytes, most: int) -> np.ndarray:
    """pycocotools' compressed counts text → int64 runs, vectorised (see `encode`)."""
    chars = np.frombuffer(text, dtype=np.uint8).astype(np.int64) - 48
    if chars.size == 0:
        return np.zeros(0, np.int64)
    if chars.min() < 0 or chars.max() > 63:
        raise ValueError("RLE counts text holds characters outside '0'..'o'")
    last = (chars & 0x20) == 0  # the last group of each value
    if not last[-1]:
        raise ValueError("truncated RLE counts")
    ends = np.flatnonzero(last)
    if ends.size > most:
        raise bounds.OutOfBounds(f"RLE has {ends.size:,} runs, its mask at most {most:,}")
    starts = np.concatenate([[0], ends[:-1] + 1])
    lengths = ends - starts + 1
    if lengths.max() > bounds.MAX_RLE_GROUPS:
        raise bounds.OutOfBounds("RLE count wider than any mask needs")
    position = np.arange(chars.size) - np.repeat(starts, lengths)  # group index within its value
    parts = (chars & 0x1F) << (5 * position)
    values = np.add.reduceat(parts, starts)
    negative = (chars[ends] & 0x10) != 0
    values[negative] |= -1 << (5 * lengths[negative])
    # from the fourth run on, a value is the difference with the run two before
    counts = values.copy()
    if counts.size > 3:
        counts[3::2] = np.cumsum(values[1::2])[1:]
    if counts.size > 4:
        counts[4::2] = np.cumsum(values[2::2])[1:]
    return counts
