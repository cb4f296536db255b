"""Masks in Label Studio's brush RLE, the `rle` of a `brushlabels` result.

The format (Label Studio's frontend, after thi-ng's rle-pack; `label_studio_sdk.converter.brush`
writes and reads the same): the mask as an RGBA image, H x W x 4 bytes in row order, run-length
packed into a bit stream — 32 bits value count, 5 bits word size - 1, four 4-bit run-size classes
(each size - 1), then segments: 1 bit repeat flag, 2 bits size class, `size` bits length - 1, then
one word (a repeated run) or `length` words (literals). The alpha channel is the mask. Ours is
written with every channel 255 on the mask, as `converter.brush.mask2rle` does; a human's strokes
come back as whatever the canvas held, so a pixel is in the mask when its alpha is >= 128.

Implemented here with numpy (the SDK's converter takes seconds to import and is quadratic in
pure Python); tests hold it to the SDK's encoder and decoder.
"""

from __future__ import annotations

import numpy as np

from pipeline import bounds

WORD_SIZE = 8
RUN_SIZES = (3, 4, 8, 16)  # bits of a run length - 1, per size class (the SDK's and LS's default)
ALPHA_THRESHOLD = 128
MAX_VALUES = bounds.MAX_PIXELS * 4  # bounded like every decoded image (`pipeline.bounds`)


def encode(mask: np.ndarray) -> list[int]:
    """A bool HxW mask → brush RLE bytes (as the list of ints a result's `value.rle` holds)."""
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"a brush mask is 2-D, got shape {mask.shape}")
    flat = mask.ravel()
    count = flat.size * 4
    bits: list[str] = [f"{count:032b}", f"{WORD_SIZE - 1:05b}"] + [f"{s - 1:04b}" for s in RUN_SIZES]
    # runs of the RGBA stream: a pixel's four bytes are equal, so runs are 4 x the mask's runs
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    starts = np.concatenate([[0], change])
    lengths = np.diff(np.concatenate([starts, [flat.size]])) * 4
    for start, length in zip(starts.tolist(), lengths.tolist()):
        word = f"{255 if flat[start] else 0:08b}"
        while length > 0:
            piece = min(length, 1 << RUN_SIZES[-1])
            size_class = next(k for k, s in enumerate(RUN_SIZES) if piece <= 1 << s)
            bits.append(f"1{size_class:02b}{piece - 1:0{RUN_SIZES[size_class]}b}{word}")
            length -= piece
    stream = "".join(bits)
    stream += "0" * (-len(stream) % 8)
    packed = np.packbits(np.frombuffer(stream.encode(), np.uint8) - ord("0"))
    return packed.tolist()


class _Bits:
    def __init__(self, data: list[int]) -> None:
        self.bits = np.unpackbits(np.asarray(data, dtype=np.uint8))
        self.pos = 0

    def read(self, n: int) -> int:
        if self.pos + n > self.bits.size:
            raise ValueError("brush RLE ends early")
        chunk = self.bits[self.pos:self.pos + n]
        self.pos += n
        return int("".join("1" if b else "0" for b in chunk.tolist()) or "0", 2)


def decode(rle: list[int], height: int, width: int, *,
           expected: tuple[int, int] | None = None) -> np.ndarray:
    """Brush RLE (any word size and run-size classes) of an HxW image → bool HxW mask (alpha >=
    128). Raises ValueError when the stream is damaged or is not H x W x 4 values.

    Bounded before decoding (`pipeline.bounds`): with `expected` (the (h, w) of the sample the
    region belongs to) a declared size that differs is refused unread; in any case the size is
    within `bounds.MAX_PIXELS` and the stream's own count must be H x W x 4. Only the alpha
    channel is kept, one bool per pixel (the RGBA values are never materialised)."""
    h, w = bounds.check_mask_size(height, width, expected=expected, what="brush mask")
    if not isinstance(rle, (list, tuple)) or not all(isinstance(v, int) and 0 <= v < 256 for v in rle):
        raise ValueError("brush RLE is not a list of bytes")
    bits = _Bits(list(rle))
    count = bits.read(32)
    if count != h * w * 4 or count > MAX_VALUES:
        raise ValueError(f"brush RLE holds {count} values, not {h}x{w}x4")
    word = bits.read(5) + 1
    sizes = [bits.read(4) + 1 for _ in range(4)]
    alpha = np.zeros(h * w, dtype=bool)  # value k of the RGBA stream is alpha when k % 4 == 3
    i = 0
    while i < count:
        repeat = bits.read(1)
        j = min(count, i + 1 + bits.read(sizes[bits.read(2)]))
        if repeat:
            alpha[i // 4:j // 4] = bits.read(word) >= ALPHA_THRESHOLD
        else:
            for k in range(i, j):
                value = bits.read(word)
                if k % 4 == 3:
                    alpha[k // 4] = value >= ALPHA_THRESHOLD
        i = j
    return alpha.reshape(h, w)
