"""Duplicates within a build: exact (same decoded pixels) and near (perceptual hash).

`fingerprint` gives each decoded image a sha256 of its pixels and shape and a 64-bit DCT
perceptual hash (pHash: 32x32 grey downscale, the 8x8 lowest frequencies against their median),
which survives resizing, recompression and small colour changes. `find_duplicates` walks the
entries in list order and maps every later copy to its first occurrence, so the outcome depends
only on the order of the keys — the same for every run of the same build.

Near-duplicate search uses the pigeonhole principle. For d = `max_distance` ≤ 7 the 64 bits are
four 16-bit bands: two hashes within distance d differ in at most one bit of some band (four bands
with two or more would make 8 > d), so each hash looks up its four band values and their 16
one-bit neighbours (68 lookups into 65,536 buckets) and only those entries are compared, with one
vectorised popcount. With d + 1 bands of ≈ 9 bits (what larger d use) every bucket holds N/512
entries, so a corpus of N costs O(N²): 100k keys took a minute of the driver's time, and more
memory than the keys themselves.
"""

from __future__ import annotations

import hashlib

import numpy as np
from PIL import Image

HASH_SIZE = 8
DCT_SIZE = 32


def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)[:, None]
    x = np.arange(n)[None, :]
    m = np.cos(np.pi * (2 * x + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    m[0] /= np.sqrt(2.0)
    return m


_DCT = _dct_matrix(DCT_SIZE)


def fingerprint(image: np.ndarray) -> tuple[str, int]:
    """(sha256 hex of shape + pixels, 64-bit pHash as an int) of an RGB uint8 image."""
    pixels = np.ascontiguousarray(image, dtype=np.uint8)
    digest = hashlib.sha256(repr(pixels.shape).encode() + pixels.tobytes()).hexdigest()
    return digest, phash(pixels)


def phash(image: np.ndarray) -> int:
    """DCT perceptual hash: bit i is set when low frequency i is above the median of the 64."""
    grey = Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).convert("L")
    small = np.asarray(grey.resize((DCT_SIZE, DCT_SIZE), Image.Resampling.LANCZOS),
                       dtype=np.float64)
    low = (_DCT @ small @ _DCT.T)[:HASH_SIZE, :HASH_SIZE].ravel()
    bits = low > np.median(low)
    return int(sum(1 << i for i, bit in enumerate(bits) if bit))


def hamming(a: int, b: int) -> int:
    return (int(a) ^ int(b)).bit_count()


def find_duplicates(entries: list[tuple[str, str, int]], max_distance: int = 6) -> dict[str, str]:
    """{duplicate key: key of its first occurrence} over (key, sha256, phash) entries in order.

    An entry is a duplicate when its sha256 equals an earlier original's, or its pHash is within
    `max_distance` bits of one; it then maps to the earliest such original. Duplicates are never
    themselves originals, so the mapping has no chains."""
    if max_distance < 0:
        raise ValueError(f"max_distance must be non-negative, got {max_distance}")
    if max_distance <= 7:
        return _find_duplicates_16(entries, max_distance)
    bands = _bands(max_distance)
    exact: dict[str, str] = {}
    buckets: list[dict[int, list[int]]] = [{} for _ in bands]
    originals: list[tuple[str, int]] = []  # (key, phash) of non-duplicates, in order
    duplicates: dict[str, str] = {}
    for key, sha, ph in entries:
        ph = int(ph)
        if sha in exact:
            duplicates[key] = exact[sha]
            continue
        candidates: set[int] = set(range(len(originals))) if max_distance >= 64 else set()
        for (shift, mask), bucket in zip(bands, buckets):
            candidates.update(bucket.get((ph >> shift) & mask, ()))
        match = next((i for i in sorted(candidates)
                      if hamming(originals[i][1], ph) <= max_distance), None)
        if match is not None:
            duplicates[key] = originals[match][0]
            continue
        index = len(originals)
        originals.append((key, ph))
        exact[sha] = key
        for (shift, mask), bucket in zip(bands, buckets):
            bucket.setdefault((ph >> shift) & mask, []).append(index)
    return duplicates


_FLIPS = [0] + [1 << bit for bit in range(16)]  # a band value and its one-bit neighbours


def _find_duplicates_16(entries: list[tuple[str, str, int]], max_distance: int) -> dict[str, str]:
    """`find_duplicates` for max_distance ≤ 7: four 16-bit bands, radius 1 (module docstring)."""
    exact: dict = {}
    buckets: list[dict[int, list[int]]] = [{} for _ in range(4)]
    keys: list[str] = []  # of the originals, in order
    hashes = np.zeros(max(1, len(entries)), dtype=np.uint64)  # their pHashes
    duplicates: dict[str, str] = {}
    for key, sha, ph in entries:
        ph = int(ph)
        if sha in exact:
            duplicates[key] = exact[sha]
            continue
        parts = [(ph >> (16 * band)) & 0xFFFF for band in range(4)]
        found = [i for band, part in enumerate(parts) for flip in _FLIPS
                 for i in buckets[band].get(part ^ flip, ())]
        if found:
            candidates = np.unique(np.asarray(found, dtype=np.int64))  # sorted: earliest first
            distance = np.bitwise_count(hashes[candidates] ^ np.uint64(ph))
            near = np.flatnonzero(distance <= max_distance)
            if near.size:
                duplicates[key] = keys[int(candidates[near[0]])]
                continue
        index = len(keys)
        keys.append(key)
        hashes[index] = ph
        exact[sha] = key
        for band, part in enumerate(parts):
            buckets[band].setdefault(part, []).append(index)
    return duplicates


def _bands(max_distance: int) -> list[tuple[int, int]]:
    """(shift, mask) of max_distance + 1 bands covering the 64 bits (capped at 64 bands)."""
    count = min(max_distance + 1, 64)
    edges = np.linspace(0, 64, count + 1).round().astype(int)
    return [(int(lo), (1 << int(hi - lo)) - 1) for lo, hi in zip(edges[:-1], edges[1:])]
