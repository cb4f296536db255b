"""The driver's duplicate decision at corpus scale (a benchmark that prints figures).

    .venv/bin/python bench/dedup.py [--sizes 100000 300000 1000000] [--index OUT/source_index.parquet]

Times `pipeline.sources.dedup.find_duplicates` (max distance 6, as a build uses) on N entries and
prints one JSON line per size: seconds, duplicates found, the process's peak RSS growth. Hashes are
uniform random 64-bit values, or with `--index` a build's real pHashes supply the lower 32 bits
(their two lowest-frequency bands, where real hashes crowd a few values; drawn with replacement)
and the upper 32 bits are random — the skew that decides how many candidates the search meets.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.sources.dedup import find_duplicates  # noqa: E402


def index_low_halves(index: Path) -> np.ndarray:
    """The lower 32 bits of every pHash in a build's source_index.parquet."""
    import pyarrow.parquet as pq

    real = np.array([p for p in pq.read_table(index, columns=["phash"]).column("phash").to_pylist()
                     if p is not None], dtype=np.uint64)
    if real.size == 0:
        raise SystemExit(f"{index}: no pHash in it")
    return real & np.uint64(0xFFFF_FFFF)


def hashes(size: int, low_halves: np.ndarray | None, rng: np.random.Generator) -> np.ndarray:
    """`size` hashes: uniform, or lower halves drawn from `low_halves` under random upper ones."""
    if low_halves is None:
        return rng.integers(0, 2**64 - 1, size, dtype=np.uint64, endpoint=True)
    low = low_halves[rng.integers(0, low_halves.size, size)]
    return low | (rng.integers(0, 2**32, size, dtype=np.uint64) << np.uint64(32))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 300_000, 1_000_000])
    parser.add_argument("--index", type=Path, help="a source_index.parquet whose pHashes give the skew")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.index is not None and not args.index.is_file():
        parser.error(f"--index {args.index}: no such file")
    low_halves = None if args.index is None else index_low_halves(args.index)  # read once
    rng = np.random.default_rng(args.seed)
    for size in args.sizes:
        entries = [(f"k{i}", f"s{i}", int(h)) for i, h in enumerate(hashes(size, low_halves, rng).tolist())]
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        started = time.perf_counter()
        found = find_duplicates(entries)
        print(json.dumps({"entries": size, "hashes": "index skew" if args.index else "uniform",
                          "seconds": round(time.perf_counter() - started, 2), "duplicates": len(found),
                          "peak_rss_growth_mib": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024}),
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
