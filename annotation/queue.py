"""The review queue on disk, and moving a decided sample out of it.

`OUT/review/{id}/` holds one borderline sample (member files, see `pipeline.dataset.shards`). A human
decision moves it (json member updated: verdict, verdict_by, human) into its unit's train or
negatives shard and the manifest with `pipeline.dataset.move.move_samples`, the one mover, whose
steps are atomic and safe to repeat: a crash leaves the review dir in place, so the next pull
redoes the move. Only the presence of `review/{id}/` makes a sample a candidate for a decision.
OUT may be an object-store prefix (`pipeline.storage`): the queue is then the `review/` prefix.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pipeline import storage
from pipeline.dataset.lock import out_lock
from pipeline.dataset.move import Move, is_sample_id, move_samples
from pipeline.dataset.output import MANIFEST, read_manifest, read_parts
from pipeline.dataset.shards import (decode_sample, is_temp_name, member_metadata, read_members_dir,
                                     sample_members)
from pipeline.record import EditSample

log = logging.getLogger(__name__)

DECIDED_BY_HUMAN = ("human", "both")


@dataclass
class ReviewItem:
    id: str
    directory: Path
    members: dict[str, bytes]

    @property
    def meta(self) -> dict[str, Any]:
        return member_metadata(self.members)  # the full record, whatever the shard format


def review_root(out: Path) -> Path:
    return storage.location(out) / "review"


def review_ids(out: Path) -> list[str]:
    """Ids of the samples waiting for a human, sorted (temporaries of killed writers skipped)."""
    root = review_root(out)
    if not storage.is_local(root):  # one listing; a prefix emptied by a move is not a sample
        names = storage.child_names(root, folders=True)
    elif not root.is_dir():
        return []
    else:
        names = [p.name for p in root.iterdir() if p.is_dir()]
    ids = []
    for name in names:
        if is_temp_name(name) or name.startswith("."):
            continue
        if not is_sample_id(name):
            log.warning("review/%s is not a sample id: skipped", name)
            continue
        ids.append(name)
    return sorted(ids)


def read_review(out: Path, sample_id: str) -> ReviewItem:
    directory = review_root(out) / sample_id
    members = read_members_dir(directory)
    if "json" not in members:
        raise ValueError(f"{directory} has no sample.json")
    return ReviewItem(sample_id, directory, members)


def sync_lock(out: Path):
    """Push and pull take OUT's one writer lock (`pipeline.dataset.lock`): a build, a rejudge or
    another push/pull on the same OUT is refused at once (`OutLocked`)."""
    return out_lock(out)


def shard_size(out: Path) -> int:
    path = storage.location(out) / "config.json"
    try:
        return int(json.loads(path.read_text())["shard_size"])
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"cannot read the build's shard size from {path}: {exc}") from None


def commit_decision(
    out: Path, item: ReviewItem, verdict: str, verdict_by: str, human: dict[str, Any],
    corrections: Callable[[EditSample], None] | None = None,
) -> str:
    """Move a decided sample from the review queue into its shard and the manifest
    (`pipeline.dataset.move`). Returns the shard file name it went to."""
    if verdict not in ("accept", "reject") or verdict_by not in DECIDED_BY_HUMAN:
        raise ValueError(f"not a human decision: verdict={verdict!r} verdict_by={verdict_by!r}")
    out = storage.location(out)
    sample = decode_sample(item.members)
    sample.verdict, sample.verdict_by, sample.human = verdict, verdict_by, human
    if corrections is not None:
        corrections(sample)  # a reviewer's corrected regions and texts (annotation.sync)
    members = sample_members(sample)  # re-encoded: json, and regions/edit mask if corrected
    shard = move_samples(out, [Move(sample, members, came_from=item.directory)],
                         shard_size(out))[sample.id]
    log.info("sample %s decided %s by %s -> %s", sample.id, verdict, verdict_by, shard)
    return shard


def read_rows(out: Path) -> list[dict[str, Any]]:
    """Manifest rows: from manifest.parquet, else merged from the parts (a build still running)."""
    out = storage.location(out)
    if (out / MANIFEST).exists():
        return read_manifest(out).to_pylist()
    return read_parts(out).to_pylist()
