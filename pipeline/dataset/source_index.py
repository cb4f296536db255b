"""The build's key list, fixed once: OUT/source_index.parquet.

A build's work units are slices of its source's key list, so the list must not move under a
resumed build (a file added to the folder later is not part of it). The first run lists the
source's keys, reads each image once to fingerprint it (exact pixel hash and perceptual hash) and
records which keys repeat an earlier one; later runs read the list back. A key whose image cannot
be read keeps its place (its samples are quarantined with the reason); a duplicate's samples are
quarantined as "duplicate of ID". A generator source (procedural) has no list: every index is a
key and nothing is written.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.sources.base import Source, SourceError

log = logging.getLogger(__name__)

SOURCE_INDEX = "source_index.parquet"
SCHEMA = pa.schema([
    ("key", pa.string()),
    ("exact", pa.string()),  # sha256 of the decoded pixels (None: unreadable)
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


def _fingerprint(source: Source, key: str) -> tuple[str | None, int | None, str | None]:
    from pipeline.sources.dedup import fingerprint

    try:
        exact, phash = fingerprint(source.read(key).image)
        return exact, phash, None
    except SourceError as exc:
        return None, None, str(exc)
    except Exception as exc:  # a broken item never stops the build: it is quarantined later
        return None, None, f"{type(exc).__name__}: {exc}"[:300]


def make_index(source: Source, threads: int = 4) -> tuple[KeyIndex, pa.Table | None]:
    """List and fingerprint the source's keys: (the index, its table to save; None for a
    generator source)."""
    keys = source.keys()
    if keys is None:
        return KeyIndex(keys=None), None
    if len(set(keys)) != len(keys):
        raise ValueError(f"source {source.name!r} listed a key twice")
    from pipeline.sources.dedup import find_duplicates

    if not getattr(source, "fingerprints", True):  # e.g. an importer's sessions: nothing to dedup
        prints = [(None, None, None)] * len(keys)
    else:
        with ThreadPoolExecutor(threads) as pool:  # decoding releases the GIL
            prints = list(pool.map(lambda k: _fingerprint(source, k), keys))
    readable = [(k, e, p) for k, (e, p, err) in zip(keys, prints) if err is None and e is not None]
    duplicates = find_duplicates(readable)
    table = pa.table({
        "key": keys,
        "exact": [e for e, _, _ in prints],
        "phash": [p for _, p, _ in prints],
        "duplicate_of": [duplicates.get(k) for k in keys],
        "error": [err for _, _, err in prints],
    }, schema=SCHEMA)
    log.info("indexed %d keys of %s: %d unreadable, %d duplicates", len(keys), source.name,
             sum(err is not None for *_, err in prints), len(duplicates))
    return KeyIndex(keys=list(keys), duplicate_of=duplicates), table


def write_index(out: Path, table: pa.Table) -> None:
    path = Path(out) / SOURCE_INDEX
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)


def read_index(out: Path) -> KeyIndex:
    path = Path(out) / SOURCE_INDEX
    if not path.is_file():
        return KeyIndex(keys=None)
    from pipeline.dataset.output import read_parquet

    table = read_parquet(path, columns=["key", "duplicate_of"])
    keys = table.column("key").to_pylist()
    dups = table.column("duplicate_of").to_pylist()
    return KeyIndex(keys=keys, duplicate_of={k: d for k, d in zip(keys, dups) if d is not None})
