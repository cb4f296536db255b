"""`mcie rejudge OUT`: judge again the samples the judge could not score, and move them.

A sample whose judge failed (verdict `judge_error`: server down, timeouts, bad answers after
retries) waits in `OUT/rejudge/{id}/` with its manifest row pointing there. This re-judges exactly
those rows (each validated first: its dir inside OUT, its files matching the row's checksum, its
json's id and index matching the row; a sample that fails is left in rejudge/ with a one-line
warning and counted unreadable, the others go on), routes them with the build's policy, and moves each one that now has a verdict:

    accept      → shards/train-{unit:06d}.tar       (the unit's tar is rewritten with it, in index
    reject      → shards/negatives-{unit:06d}.tar    order, atomically; its other samples unchanged)
    borderline  → review/{id}/
    still failing → stays in rejudge/{id}/, untouched, for the next run

Order of writes, so that a crash at any point loses nothing and a rerun finishes the job: the new
locations first (tar, review dir), then the unit's manifest part, then OUT/manifest.parquet (both
atomic), and only then the old rejudge dir. A rerun first removes copies an interrupted run left
behind (a rejudge dir whose row already points elsewhere; a copy in a tar or review dir of a
sample whose row still says rejudge), so the build verifies clean again.

The manifest part of the unit is updated as well as the manifest, so a later `finalize` (which
merges parts) keeps the move. Do not run it while a build writes into the same OUT.

OUT may be an object-store prefix (`pipeline.storage`): the same steps, each file one whole object
(`pipeline.dataset.move` says what replaces the renames there).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipeline import storage
from pipeline.dataset.lock import OutLocked, out_lock
from pipeline.dataset.move import Move, is_sample_id, move_samples, rewrite_tar
from pipeline.dataset.output import (
    REJUDGE,
    inside_out,
    REVIEW,
    SHARDS,
    negatives_shard_name,
    read_manifest,
    train_shard_name,
)
from pipeline.dataset.shards import (
    CORRUPT_DATA_ERRORS,
    checksum,
    is_temp_name,
    iter_tar_groups,
    member_metadata,
    read_members_dir,
    read_sample_dir,
    remove_path,
    sample_members,
)
from pipeline.judges.base import Judge, JudgeStage
from pipeline.record import EditSample
from pipeline.routing import RouteStage, RoutingPolicy

log = logging.getLogger(__name__)

MOVED = ("accept", "reject", "borderline")


@dataclass
class RejudgeStats:
    candidates: int = 0  # manifest rows waiting in rejudge/
    accept: int = 0
    reject: int = 0
    borderline: int = 0
    still_failing: int = 0  # judged again without a verdict: left in rejudge/
    unreadable: int = 0  # rejudge dir missing or broken, or an id no build writes: left, reported
    cleaned: int = 0  # leftovers of an interrupted run removed

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    def summary(self) -> str:
        return (f"re-judged {self.candidates}: {self.accept} accepted, {self.reject} rejected, "
                f"{self.borderline} to review, {self.still_failing} still failing"
                + (f", {self.unreadable} unreadable" if self.unreadable else "")
                + (f", {self.cleaned} leftovers cleaned" if self.cleaned else ""))


def load_build_config(out: Path) -> dict[str, Any]:
    path = storage.location(out) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: {out} is not a build output")
    return json.loads(path.read_text())


def rejudge(out: Path, judge: Judge, policy: RoutingPolicy | None = None,
            chunk_size: int = 256) -> RejudgeStats:
    """Re-judge every `rejudge/{id}` sample of a finalized build; see the module docstring."""
    out = storage.location(out)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    with out_lock(out):
        return _rejudge(out, judge, policy, chunk_size)


def _rejudge(out: Path, judge: Judge, policy: RoutingPolicy | None, chunk_size: int) -> RejudgeStats:
    config = load_build_config(out)
    shard_size = int(config["shard_size"])
    policy = policy or RoutingPolicy.for_judge(judge, config.get("routing"))
    rows = read_manifest(out).to_pylist()
    stats = RejudgeStats()
    candidates = []
    for row in rows:
        if row["verdict"] != "judge_error" or row["shard"] != f"{REJUDGE}/{row['id']}":
            continue
        if not is_sample_id(row["id"]):  # data, not a path: `../../x` must never be opened or removed
            log.warning("rejudge: manifest row %d has the id %r, which the factory never writes; "
                        "left as it is", row["index"], row["id"])
            stats.unreadable += 1
            continue
        candidates.append(row)
    stats.candidates = len(candidates) + stats.unreadable
    # Every sample is validated before anything moves: a bad one is left where it is, with a reason.
    valid = []
    for row in candidates:
        reason = _invalid(out, row)
        if reason is None:
            valid.append(row)
        else:
            log.warning("rejudge: %s/%s left as it is: %s", REJUDGE, row["id"], reason)
            stats.unreadable += 1
    candidates = valid
    stats.cleaned = _clean_leftovers(out, rows, candidates, shard_size)
    judge_stage, route_stage = JudgeStage(judge), RouteStage(policy)
    for start in range(0, len(candidates), chunk_size):
        samples = []
        for row in candidates[start:start + chunk_size]:
            try:
                sample = read_sample_dir(out / REJUDGE / row["id"])
                if sample.id != row["id"]:
                    raise ValueError(f"its sample.json names another id, {sample.id!r}")
                samples.append(_reset(sample))
            except CORRUPT_DATA_ERRORS as exc:  # whatever a damaged PNG makes Pillow raise
                log.warning("rejudge: cannot read %s/%s, left as it is: %s", REJUDGE, row["id"], exc)
                stats.unreadable += 1
        route_stage(judge_stage(samples))
        done = [s for s in samples if s.verdict in MOVED and s.error is None]
        stats.still_failing += len(samples) - len(done)
        for sample in done:
            setattr(stats, sample.verdict, getattr(stats, sample.verdict) + 1)
        if done:
            rows = _move(out, done, rows, shard_size)
    log.info("rejudge %s: %s", out, stats.summary())
    return stats


def _invalid(out: Path, row: dict[str, Any]) -> str | None:
    """Why a waiting sample must not be moved (one line), or None: its dir is outside OUT (a
    symlink), unreadable, or differs from its manifest row (checksum, id, index — the index picks
    the unit whose tar and part it moves into)."""
    directory = inside_out(out, f"{REJUDGE}/{row['id']}")
    if directory is None:
        return f"{REJUDGE}/{row['id']} resolves outside {out}: not read"
    if not directory.is_dir():
        return f"{REJUDGE}/{row['id']}/ is missing"
    try:
        members = read_members_dir(directory)
        if "__error__" in members:
            return members["__error__"]
        if checksum(members) != row["checksum"]:
            return "its files differ from the checksum in the manifest (changed after the build)"
        meta = member_metadata(members)
    except (*CORRUPT_DATA_ERRORS, KeyError) as exc:
        return f"unreadable: {type(exc).__name__}: {exc}"
    if not isinstance(meta, dict):
        return "its sample.json is not an object"
    if meta.get("id") != row["id"]:
        return f"its sample.json names another id, {str(meta.get('id'))[:80]!r}"
    if meta.get("index") != row["index"]:
        return f"its sample.json says index {str(meta.get('index'))[:40]}, the manifest {row['index']}"
    return None


def _reset(sample: EditSample) -> EditSample:
    """Back to the state the judge stage expects: no scores, no verdict, no judge error."""
    sample.scores, sample.verdict, sample.verdict_by = {}, None, None
    sample.error, sample.error_stage = None, None
    return sample


def _move(out: Path, samples: list[EditSample], rows: list[dict[str, Any]],
          shard_size: int) -> list[dict[str, Any]]:
    """Move the re-judged samples where their verdicts send them (`move.move_samples`).
    Returns the new manifest rows."""
    moves = [Move(s, sample_members(s), came_from=out / REJUDGE / s.id) for s in samples]
    move_samples(out, moves, shard_size)
    return read_manifest(out).to_pylist()


def _clean_leftovers(out: Path, rows: list[dict[str, Any]], candidates: list[dict[str, Any]],
                     shard_size: int) -> int:
    """Undo what an interrupted run left: rejudge dirs (and temporaries) of samples whose row
    already points elsewhere, and copies of still-waiting samples in review dirs or unit tars."""
    cleaned = 0
    location = {row["id"]: row["shard"] for row in rows}
    rejudge_dir = out / REJUDGE
    if rejudge_dir.is_dir():
        for path in storage.children(rejudge_dir):
            stale = path.name in location and location[path.name] != f"{REJUDGE}/{path.name}"
            if is_temp_name(path.name) or stale:
                remove_path(path)
                cleaned += 1
    waiting = {row["id"] for row in candidates}
    for sample_id in waiting:
        if _holds_files(out / REVIEW / sample_id):
            remove_path(out / REVIEW / sample_id)
            cleaned += 1
    units = {row["index"] // shard_size for row in candidates}
    for unit in sorted(units):
        for name in (train_shard_name(unit), negatives_shard_name(unit)):
            path = out / SHARDS / name
            if not path.is_file():
                continue
            try:
                keys = {key for key, _ in iter_tar_groups(path, read=False)}
            except CORRUPT_DATA_ERRORS as exc:  # verify names a damaged tar; nothing to clean here
                log.warning("rejudge: cannot list shards/%s: %s", name, exc)
                continue
            stale = keys & waiting
            if stale:
                rewrite_tar(path, add={}, drop=stale)
                cleaned += len(stale)
    return cleaned


def _holds_files(path: Path) -> bool:
    return path.exists() if storage.is_local(path) else bool(storage.child_names(path))


# ---- command line ---------------------------------------------------------------------------------

def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "rejudge", help="judge again the samples whose judge failed (OUT/rejudge) and move them")
    p.add_argument("out", help="a finalized build output directory (or its URL: s3://bucket/out)")
    p.add_argument("--judge", default=None,
                   help="judge backend (default: the build's, from OUT/config.json)")
    p.add_argument("--judge-url", help="vLLM OpenAI-compatible base URL, e.g. http://HOST:8000/v1")
    p.add_argument("--judge-model", help="model name served by vLLM")
    p.add_argument("--judge-max-in-flight", type=int, help="concurrent judge requests")
    p.add_argument("--judge-timeout-s", type=float, help="per-request timeout in seconds")
    p.add_argument("--judge-max-retries", type=int, help="retries of timeouts, 429 and 5xx")
    p.add_argument("--chunk-size", type=int, default=256, help="samples judged per batch")
    p.set_defaults(func=run_rejudge)


def run_rejudge(args: argparse.Namespace) -> int:
    out = storage.location(args.out)
    if not out.is_dir():
        return _run_rejudge(args)  # says what is wrong
    try:
        with out_lock(out):  # before anything else: a build still writing OUT is named as such
            return _run_rejudge(args)
    except OutLocked as exc:
        print(f"mcie rejudge: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a read-only or full OUT
        print(f"mcie rejudge: failed: {exc}", file=sys.stderr)
        return 1


def _run_rejudge(args: argparse.Namespace) -> int:
    from pipeline.judges.base import make_judge

    out = storage.location(args.out)
    try:
        config = load_build_config(out)
        if not (out / "manifest.parquet").is_file():
            raise ValueError(f"{out} has no manifest.parquet: finish the build first")
        if args.chunk_size < 1:
            raise ValueError(f"--chunk-size must be positive, got {args.chunk_size}")
        name = args.judge or config.get("judge", "pixel")
        # the build's own options apply only to the build's own judge
        options = dict(config.get("judge_options") or {}) if name == config.get("judge") else {}
        for flag, key in (("judge_url", "url"), ("judge_model", "model"),
                          ("judge_max_in_flight", "max_in_flight"), ("judge_timeout_s", "timeout_s"),
                          ("judge_max_retries", "max_retries")):
            if getattr(args, flag) is not None:
                options[key] = getattr(args, flag)
        judge = make_judge(name, **options)
        policy = RoutingPolicy.for_judge(judge, config.get("routing"))
    except (OSError, ValueError, TypeError, KeyError) as exc:
        print(f"mcie rejudge: error: {exc}", file=sys.stderr)
        return 2
    try:
        stats = rejudge(out, judge, policy, chunk_size=args.chunk_size)
    finally:
        close = getattr(judge, "close", None)
        if callable(close):
            close()
    print(stats.summary())
    return 0
