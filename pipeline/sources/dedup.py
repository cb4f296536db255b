"""Duplicates within a build: exact (same decoded pixels) and near (perceptual hash).

`fingerprint` gives each decoded image a sha256 of its pixels and shape and a 64-bit DCT
perceptual hash (pHash: 32x32 grey downscale, the 8x8 lowest frequencies against their median),
which survives resizing, recompression and small colour changes. `find_duplicates` walks the
entries in list order and maps every later copy to its first occurrence, so the outcome depends
only on the order of the keys — the same for every run of the same build.

Near-duplicate search uses the pigeonhole principle. For d = `max_distance` ≤ 7 the 64 bits are
four 16-bit bands: two hashes within distance d differ in at most one bit of some band (four bands
with two or more would make 8 > d), so only the pairs whose band values agree up to one bit (a
value and its 16 one-bit neighbours, in 65,536 buckets) are compared, all at once with numpy; one
walk in list order then decides the originals. With d + 1 bands of ≈ 9 bits (what larger d use)
every bucket holds N/512 entries, so a corpus of N costs O(N²): 100k keys took a minute of the
driver's time, and more memory than the keys themselves.
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


_FLIPS = np.array([0] + [1 << bit for bit in range(16)], dtype=np.int64)  # a band value, one-bit neighbours
_PAIRS = 1 << 18  # candidate pairs gathered at once (about): bounds the memory of the search


def _find_duplicates_16(entries: list[tuple[str, str, int]], max_distance: int) -> dict[str, str]:
    """`find_duplicates` for max_distance ≤ 7: four 16-bit bands, radius 1 (module docstring).

    Two steps. (1) Vectorised: every pair (earlier i, later j) whose hashes are within the distance
    — found as the pairs that share a band value up to one bit, gathered from the band values
    sorted once per band, then popcounted — about `_PAIRS` candidates at a time. (2) One walk in list
    order settles who is an original: an entry is a duplicate of an earlier original with its
    sha256, else of its earliest neighbour that is an original. Only the walk is sequential, and it
    does a few dictionary operations per entry; the Python loop of 68 bucket lookups per entry it
    replaced cost 30 µs a key."""
    count = len(entries)
    if count == 0:
        return {}
    hashes = np.fromiter((int(ph) for _, _, ph in entries), dtype=np.uint64, count=count)
    neighbours: dict[int, list[int]] = {}  # j → its earlier near entries, ascending (few have any)
    for j, i in zip(*(part.tolist() for part in _near_pairs(hashes, max_distance))):
        neighbours.setdefault(j, []).append(i)
    original = [False] * count
    exact: dict = {}  # sha256 of an original → its index
    duplicates: dict[str, str] = {}
    for j, (key, sha, _) in enumerate(entries):
        first = exact.get(sha)
        if first is None:
            first = next((i for i in neighbours.get(j, ()) if original[i]), None)
        if first is not None:
            duplicates[key] = entries[first][0]
            continue
        original[j] = True
        exact[sha] = j
    return duplicates


def _near_pairs(hashes: np.ndarray, max_distance: int) -> tuple[np.ndarray, np.ndarray]:
    """(later j, earlier i) of every pair i < j within `max_distance` bits (≤ 7), sorted by j, then i.

    Candidates are gathered in runs of consecutive entries holding about `_PAIRS` of them: real
    pHashes crowd a few band values (the lowest frequencies), so a fixed number of entries could
    hold millions of candidates."""
    count = len(hashes)
    found = []
    for band in range(4):
        values = ((hashes >> np.uint64(16 * band)) & np.uint64(0xFFFF)).astype(np.int64)
        order = np.argsort(values, kind="stable")  # the entries bucket by bucket
        in_bucket = np.bincount(values, minlength=1 << 16)
        first_of = np.cumsum(in_bucket) - in_bucket  # where each bucket starts in `order`
        for flip in _FLIPS:
            wanted = values ^ flip
            sizes = in_bucket[wanted]  # each entry's candidates under this flip
            ends = np.cumsum(sizes)
            total = int(ends[-1])
            cuts = np.searchsorted(ends, np.arange(_PAIRS, total, _PAIRS), "right")
            edges = np.unique(np.concatenate(([0], cuts, [count])))
            for start, stop in zip(edges[:-1].tolist(), edges[1:].tolist()):
                run = sizes[start:stop]
                pairs = int(run.sum())
                if pairs == 0:
                    continue
                j = np.repeat(np.arange(start, stop, dtype=np.int64), run)
                offsets = np.arange(pairs, dtype=np.int64) - np.repeat(np.cumsum(run) - run, run)
                i = order[np.repeat(first_of[wanted[start:stop]], run) + offsets]
                keep = i < j
                j, i = j[keep], i[keep]
                near = np.bitwise_count(hashes[i] ^ hashes[j]) <= max_distance
                found.append(j[near] * count + i[near])  # one int64 per pair: sorts by j, then i
    pairs = np.unique(np.concatenate(found)) if found else np.zeros(0, dtype=np.int64)
    return pairs // count, pairs % count


def _bands(max_distance: int) -> list[tuple[int, int]]:
    """(shift, mask) of max_distance + 1 bands covering the 64 bits (capped at 64 bands)."""
    count = min(max_distance + 1, 64)
    edges = np.linspace(0, 64, count + 1).round().astype(int)
    return [(int(lo), (1 << int(hi - lo)) - 1) for lo, hi in zip(edges[:-1], edges[1:])]
