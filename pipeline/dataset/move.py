"""The one way to move finished samples between train, negatives, review and rejudge.

A human verdict (`annotation.queue`) and a re-judge (`pipeline.dataset.rejudge`) both end here.
For each sample, in this order, each step atomic and safe to repeat:

1. it is written where its verdict sends it: accept → `shards/train-U.tar`, reject →
   `shards/negatives-U.tar` (U = index // shard size; the tar is rewritten in index order with the
   sample replaced, never appended twice, and the opposite tar of the unit is cleaned of it),
   borderline → `review/{id}/`, judge_error → `rejudge/{id}/`;
2. its rows in `parts/unit-U.parquet` and `manifest.parquet` are replaced (`output.update_rows`);
3. the directory it came from (`review/{id}` or `rejudge/{id}`), if any other than where it went,
   is renamed to a temporary name and removed.

A crash between steps leaves the old directory in place, so the next run redoes the steps and
replaces what the first try wrote: nothing is lost and nothing is added twice.
"""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from pipeline.dataset.output import (
    REJUDGE,
    REVIEW,
    SHARDS,
    negatives_shard_name,
    read_parts,
    train_shard_name,
    update_rows,
)
from pipeline import storage
from pipeline.dataset.shards import (
    SAMPLE_JSON,
    check_key,
    iter_tar_groups,
    remove_path,
    temp_path,
    write_members_dir,
    write_tar_members,
)
from pipeline.record import EditSample, manifest_row

log = logging.getLogger(__name__)


@dataclass
class Move:
    sample: EditSample  # with its new verdict (and verdict_by, human)
    members: dict[str, bytes]  # its encoded members (`shards.sample_members`), json up to date
    came_from: Path | None = None  # the review/rejudge dir it leaves, if any


def is_sample_id(value: object) -> bool:
    """The id grammar the factory writes (`shards.check_key`: letters, digits, '-', '_'): what an
    id read from a manifest, a review dir or Label Studio must match before it becomes a path."""
    try:
        check_key(value)  # type: ignore[arg-type]
        return True
    except ValueError:
        return False


def _index_of(members: dict[str, bytes]) -> int:
    return int(json.loads(members["json"])["index"])


def _holds_any(path: Path, keys: set[str]) -> bool:
    if not path.exists():
        return False
    return any(key in keys for key, _ in iter_tar_groups(path, read=False))


def rewrite_tar(path: Path, add: dict[str, dict[str, bytes]], drop: set[str]) -> dict[str, str]:
    """The tar with the keys `drop` taken out and `add` (key → members) put in, in index order,
    atomically; the other samples keep their bytes. Returns checksums of what it holds now."""
    if not add and not _holds_any(path, drop):
        return {}
    groups = [(k, m) for k, m in iter_tar_groups(path) if k not in drop and k not in add] \
        if path.exists() else []
    groups += list(add.items())
    if not groups:
        remove_path(path)
        return {}
    groups.sort(key=lambda g: (_index_of(g[1]), g[0]))
    return write_tar_members(path, groups)


def _check_indices(out: Path, moves: list[Move]) -> None:
    """Before anything is written: every sample is in a unit part with the index it carries (its
    unit, hence its tar, comes from the index), so the manifest can never be left out of step."""
    known = {row["id"]: row["index"] for row in read_parts(out).select(["id", "index"]).to_pylist()}
    for move in moves:
        sample = move.sample
        if sample.id not in known:
            raise ValueError(f"sample {sample.id} is in no unit part of {out}: nothing moved")
        if known[sample.id] != sample.index:
            raise ValueError(f"sample {sample.id} carries index {sample.index} but its unit part "
                             f"says {known[sample.id]}: nothing moved")


def move_samples(out: Path, moves: list[Move], shard_size: int) -> dict[str, str]:
    """Move the samples (see the module docstring); returns id → manifest location."""
    out = storage.location(out)
    for move in moves:  # ids are data: check them before any becomes a path
        sample_id = check_key(move.sample.id)
        if move.came_from is not None and _same_place(move.came_from) not in (
                _same_place(out / REVIEW / sample_id), _same_place(out / REJUDGE / sample_id)):
            raise ValueError(f"sample {sample_id} cannot leave {move.came_from}: only "
                             f"{REVIEW}/{sample_id} or {REJUDGE}/{sample_id} of {out}")
    _check_indices(out, moves)
    rows, locations = [], {}
    tars: dict[int, dict[str, dict[str, dict[str, bytes]]]] = defaultdict(
        lambda: {"train": {}, "negatives": {}})
    moving: dict[int, set[str]] = defaultdict(set)
    for move in moves:
        sample = move.sample
        unit = sample.index // shard_size
        moving[unit].add(sample.id)
        if sample.verdict in ("accept", "reject"):
            kind = "train" if sample.verdict == "accept" else "negatives"
            tars[unit][kind][sample.id] = move.members
        elif sample.verdict in ("borderline", "judge_error"):
            kind = REVIEW if sample.verdict == "borderline" else REJUDGE
            location = f"{kind}/{sample.id}"
            rows.append(manifest_row(sample, location, write_members_dir(out / location, move.members)))
            locations[sample.id] = location
        else:
            raise ValueError(f"cannot move sample {sample.id} with verdict {sample.verdict!r}")
    if storage.is_local(out):
        (out / SHARDS).mkdir(parents=True, exist_ok=True)
    by_id = {move.sample.id: move.sample for move in moves}
    for unit in sorted(moving):
        for kind, name in (("train", train_shard_name(unit)), ("negatives", negatives_shard_name(unit))):
            add = tars[unit][kind]
            sums = rewrite_tar(out / SHARDS / name, add, drop=moving[unit])
            for sample_id in add:
                rows.append(manifest_row(by_id[sample_id], name, sums[sample_id]))
                locations[sample_id] = name
    update_rows(out, rows)
    for move in moves:
        leaving = move.came_from
        if leaving is not None and leaving.exists() and \
                _same_place(leaving) != _same_place(out / locations[move.sample.id]):
            if not storage.is_local(leaving):  # no rename on a store: its json (what marks a
                remove_path(leaving / SAMPLE_JSON)  # queued sample) goes first, then the rest
                remove_path(leaving)
                continue
            gone = temp_path(leaving)  # a half-removed dir must never look like a queued sample
            os.replace(leaving, gone)
            remove_path(gone)
    return locations


def _same_place(path) -> str:
    """A path or URL in a form two names of one place share (local: resolved)."""
    path = storage.location(path)
    return str(Path(path).resolve()) if storage.is_local(path) else str(path).rstrip("/")
