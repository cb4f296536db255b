"""The build's key list, fixed once: OUT/source_index.parquet.

A build's work units are slices of its source's key list, so the list must not move under a
resumed build (a file added to the folder later is not part of it). The first run lists the
source's keys, reads each image once to fingerprint it (exact pixel hash and perceptual hash) and
records which keys repeat an earlier one; later runs read the list back. A key whose image cannot
be read keeps its place (its samples are quarantined with the reason); a duplicate's samples are
quarantined as "duplicate of ID". A generator source (procedural) has no list: every index is a
key and nothing is written.

The fingerprints are what the first run costs (one decode per key): `flows.index` spreads them
over Ray workers in chunks of keys, `make_index` computes them here (threads). Both give the same
table: the driver keeps only the keys and two 64-bit numbers per key (the exact hash is the first
8 bytes of the sha256 — a collision between two different images of one corpus is about
n²/2⁶⁵, 3·10⁻⁴ for 10⁸ images — and the pHash), and `index_table` finds the duplicates over them in
key order, so the outcome does not depend on how the work was spread. An index written before
`exact` became a number (a sha256 string) is still read: `read_index` reads only the keys and
`duplicate_of`.
"""

from __future__ import annotations

import io
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.sources.base import Source, SourceError
from pipeline.storage import is_local, location, write_atomic

log = logging.getLogger(__name__)

SOURCE_INDEX = "source_index.parquet"
SCHEMA = pa.schema([
    ("key", pa.string()),
    ("exact", pa.uint64()),  # first 8 bytes of the decoded pixels' sha256 (None: unreadable)
    ("phash", pa.uint64()),
    ("duplicate_of", pa.string()),  # the key of the first occurrence, or None
    ("error", pa.string()),  # why the image could not be read, or None
])


@dataclass
class KeyIndex:
    keys: list[str] | None  # None: a generator source
    duplicate_of: dict[str, str] = field(default_factory=dict)

    def key(self, position: int) -> str:
        return str(position) if self.keys is None else self.keys[position]

    @property
    def size(self) -> int | None:
        return None if self.keys is None else len(self.keys)


# One key's fingerprint: (exact hash as a 64-bit number, pHash, why unreadable), None when unreadable
Print = tuple[int | None, int | None, str | None]


def exact64(digest: str) -> int:
    """The exact hash kept per key: the first 8 bytes of the sha256 hex digest, as a uint64."""
    return int(digest[:16], 16)


def _fingerprint(source: Source, key: str) -> Print:
    from pipeline.sources.dedup import fingerprint

    try:
        exact, phash = fingerprint(source.read(key).image)
        return exact64(exact), phash, None
    except SourceError as exc:
        return None, None, str(exc)
    except Exception as exc:  # a broken item never stops the build: it is quarantined later
        return None, None, f"{type(exc).__name__}: {exc}"[:300]


def needs_fingerprints(source: Source) -> bool:
    """False for a source with nothing to dedup (e.g. an importer's sessions)."""
    return bool(getattr(source, "fingerprints", True))


def fingerprint_keys(source: Source, keys: list[str], threads: int = 4) -> list[Print]:
    """The fingerprints of `keys`, in their order (decoding releases the GIL: a thread pool)."""
    if threads <= 1:
        return [_fingerprint(source, k) for k in keys]
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(lambda k: _fingerprint(source, k), keys))


def list_keys(source: Source) -> list[str] | None:
    """The source's keys (None: a generator source); ValueError for a key listed twice."""
    keys = source.keys()
    if keys is None:
        return None
    keys = list(keys)
    if len(set(keys)) != len(keys):
        raise ValueError(f"source {source.name!r} listed a key twice")
    return keys


def index_table(name: str, keys: list[str], prints: list[Print]) -> tuple[KeyIndex, pa.Table]:
    """The index and its table from every key's fingerprint, in key order: duplicates are
    decided here, over the whole list (first occurrence wins)."""
    from pipeline.sources.dedup import find_duplicates

    if len(prints) != len(keys):
        raise ValueError(f"{len(prints)} fingerprints for {len(keys)} keys")
    readable = [(k, e, p) for k, (e, p, err) in zip(keys, prints) if err is None and e is not None]
    duplicates = find_duplicates(readable)
    table = pa.table({
        "key": keys,
        "exact": [e for e, _, _ in prints],
        "phash": [p for _, p, _ in prints],
        "duplicate_of": [duplicates.get(k) for k in keys],
        "error": [err for _, _, err in prints],
    }, schema=SCHEMA)
    log.info("indexed %d keys of %s: %d unreadable, %d duplicates", len(keys), name,
             sum(err is not None for *_, err in prints), len(duplicates))
    return KeyIndex(keys=keys, duplicate_of=duplicates), table


def make_index(source: Source, threads: int = 4) -> tuple[KeyIndex, pa.Table | None]:
    """List and fingerprint the source's keys in this process: (the index, its table to save;
    None for a generator source). `flows.index.index_source` is the same on Ray workers."""
    keys = list_keys(source)
    if keys is None:
        return KeyIndex(keys=None), None
    if not needs_fingerprints(source):
        prints: list[Print] = [(None, None, None)] * len(keys)
    else:
        prints = fingerprint_keys(source, keys, threads)
    return index_table(source.name, keys, prints)


def write_index(out: Any, table: pa.Table) -> None:
    """OUT/source_index.parquet, appearing whole (a local rename, or one object PUT)."""
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    write_atomic(location(out) / SOURCE_INDEX, buffer.getvalue())


def read_index(out: Any) -> KeyIndex:
    path = location(out) / SOURCE_INDEX
    if not path.is_file():
        return KeyIndex(keys=None)
    columns = ["key", "duplicate_of"]
    if is_local(path):
        from pipeline.dataset.output import read_parquet

        table = read_parquet(path, columns=columns)
    else:
        with path.open("rb") as handle:
            table = pq.ParquetFile(handle).read(columns=columns)
    keys = table.column("key").to_pylist()
    dups = table.column("duplicate_of").to_pylist()
    return KeyIndex(keys=keys, duplicate_of={k: d for k, d in zip(keys, dups) if d is not None})
