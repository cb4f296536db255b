"""The review queue on disk, and moving a decided sample out of it.

`OUT/review/{id}/` holds one borderline sample (member files, see `pipeline.dataset.shards`). A human
decision moves it, in this order, each step atomic and each safe to repeat:

1. the sample (json member updated: verdict, verdict_by, human) is written into its unit's
   `shards/train-U.tar` or `shards/negatives-U.tar` (the tar is rewritten with the sample replaced,
   never appended twice; the opposite tar is cleaned of it too);
2. its row in `parts/unit-U.parquet` and in `manifest.parquet` is replaced (shard, checksum,
   verdict, verdict_by);
3. the review dir is renamed to a temporary name and removed.

A crash between steps leaves the review dir in place, so the next pull redoes the steps and
replaces what the first try wrote: nothing is lost and nothing is added twice. Only the presence
of `review/{id}/` makes a sample a candidate for a decision.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.dataset.output import (
    MANIFEST,
    conform,
    negatives_shard_name,
    part_path,
    read_manifest,
    read_parts,
    train_shard_name,
)
from pipeline.record import MANIFEST_SCHEMA, dumps, manifest_row
from pipeline.dataset.shards import (
    atomic_file,
    checksum,
    decode_sample,
    is_temp_name,
    iter_tar_groups,
    read_members_dir,
    remove_path,
    temp_path,
    write_tar_members,
)

log = logging.getLogger(__name__)

DECIDED_BY_HUMAN = ("human", "both")
LOCK_NAME = ".review-sync.lock"


@dataclass
class ReviewItem:
    id: str
    directory: Path
    members: dict[str, bytes]

    @property
    def meta(self) -> dict[str, Any]:
        return json.loads(self.members["json"])


def review_root(out: Path) -> Path:
    return Path(out) / "review"


def review_ids(out: Path) -> list[str]:
    """Ids of the samples waiting for a human, sorted (temporaries of killed writers skipped)."""
    root = review_root(out)
    if not root.is_dir():
        return []
    return sorted(
        p.name for p in root.iterdir()
        if p.is_dir() and not is_temp_name(p.name) and not p.name.startswith(".")
    )


def read_review(out: Path, sample_id: str) -> ReviewItem:
    directory = review_root(out) / sample_id
    members = read_members_dir(directory)
    if "json" not in members:
        raise ValueError(f"{directory} has no sample.json")
    return ReviewItem(sample_id, directory, members)


@contextmanager
def sync_lock(out: Path) -> Iterator[None]:
    """One push or pull at a time per OUT (a flow and a person may both run them)."""
    path = Path(out) / LOCK_NAME
    with open(path, "a+b") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"another review push/pull is running on {out} (lock {path})") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def shard_size(out: Path) -> int:
    path = Path(out) / "config.json"
    try:
        return int(json.loads(path.read_text())["shard_size"])
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"cannot read the build's shard size from {path}: {exc}") from None


def commit_decision(
    out: Path, item: ReviewItem, verdict: str, verdict_by: str, human: dict[str, Any]
) -> str:
    """Move a decided sample from the review queue into its shard and the manifest (see module
    doc). Returns the shard file name it went to."""
    if verdict not in ("accept", "reject") or verdict_by not in DECIDED_BY_HUMAN:
        raise ValueError(f"not a human decision: verdict={verdict!r} verdict_by={verdict_by!r}")
    out = Path(out)
    sample = decode_sample(item.members)
    sample.verdict, sample.verdict_by, sample.human = verdict, verdict_by, human
    members = dict(item.members)
    members["json"] = dumps(sample.metadata())
    unit = sample.index // shard_size(out)
    shard, other = train_shard_name(unit), negatives_shard_name(unit)
    if verdict == "reject":
        shard, other = other, shard
    shards_dir = out / "shards"
    shards_dir.mkdir(parents=True, exist_ok=True)

    _put_in_tar(shards_dir / shard, sample.id, members)
    _drop_from_tar(shards_dir / other, sample.id)

    row = manifest_row(sample, shard, checksum(members))
    _replace_row(part_path(out, unit), row, create=True)
    _replace_row(out / MANIFEST, row, create=False)

    gone = temp_path(item.directory)  # a half-removed dir must never look like a queued sample
    os.replace(item.directory, gone)
    remove_path(gone)
    log.info("sample %s decided %s by %s -> %s", sample.id, verdict, verdict_by, shard)
    return shard


def _index_of(members: dict[str, bytes]) -> int:
    return int(json.loads(members["json"])["index"])


def _put_in_tar(path: Path, key: str, members: dict[str, bytes]) -> None:
    groups = [(k, m) for k, m in iter_tar_groups(path) if k != key] if path.exists() else []
    groups.append((key, members))
    groups.sort(key=lambda g: (_index_of(g[1]), g[0]))
    write_tar_members(path, groups)


def _drop_from_tar(path: Path, key: str) -> None:
    if not path.exists():
        return
    groups = list(iter_tar_groups(path))
    kept = [(k, m) for k, m in groups if k != key]
    if len(kept) != len(groups):
        write_tar_members(path, kept)


def _replace_row(path: Path, row: dict[str, Any], create: bool) -> None:
    """Replace the row with row['id'] (or add it) in a manifest-schema parquet file, atomically."""
    if path.exists():
        rows = [r for r in conform(pq.read_table(path), str(path)).to_pylist() if r["id"] != row["id"]]
    elif create:
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = []
    else:
        return
    rows.append(row)
    rows.sort(key=lambda r: (r["index"], r["id"]))
    table = pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)
    with atomic_file(path) as handle:
        pq.write_table(table, handle)


def read_rows(out: Path) -> list[dict[str, Any]]:
    """Manifest rows: from manifest.parquet, else merged from the parts (a build still running)."""
    out = Path(out)
    if (out / MANIFEST).exists():
        return read_manifest(out).to_pylist()
    return read_parts(out).to_pylist()
