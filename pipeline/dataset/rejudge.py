"""`mcie rejudge OUT`: judge again the samples the judge could not score, and move them.

A sample whose judge failed (verdict `judge_error`: server down, timeouts, bad answers after
retries) waits in `OUT/rejudge/{id}/` with its manifest row pointing there. This re-judges exactly
those rows, routes them with the build's policy, and moves each one that now has a verdict:

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
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tarfile
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.judges.base import Judge, JudgeStage
from pipeline.dataset.output import (
    REJUDGE,
    REVIEW,
    SHARDS,
    conform,
    negatives_shard_name,
    part_path,
    read_manifest,
    train_shard_name,
    write_manifest,
)
from pipeline.record import MANIFEST_SCHEMA, EditSample, manifest_row
from pipeline.routing import RouteStage, RoutingPolicy
from pipeline.dataset.shards import (
    atomic_file,
    is_temp_name,
    iter_tar_groups,
    read_sample_dir,
    remove_path,
    sample_members,
    write_sample_dir,
    write_tar_members,
)

log = logging.getLogger(__name__)

MOVED = ("accept", "reject", "borderline")


@dataclass
class RejudgeStats:
    candidates: int = 0  # manifest rows waiting in rejudge/
    accept: int = 0
    reject: int = 0
    borderline: int = 0
    still_failing: int = 0  # judged again without a verdict: left in rejudge/
    unreadable: int = 0  # rejudge dir missing or broken: left as it is, reported
    cleaned: int = 0  # leftovers of an interrupted run removed

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    def summary(self) -> str:
        return (f"re-judged {self.candidates}: {self.accept} accepted, {self.reject} rejected, "
                f"{self.borderline} to review, {self.still_failing} still failing"
                + (f", {self.unreadable} unreadable" if self.unreadable else "")
                + (f", {self.cleaned} leftovers cleaned" if self.cleaned else ""))


def load_build_config(out: Path) -> dict[str, Any]:
    path = Path(out) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: {out} is not a build output")
    return json.loads(path.read_text())


def rejudge(out: Path, judge: Judge, policy: RoutingPolicy | None = None,
            chunk_size: int = 256) -> RejudgeStats:
    """Re-judge every `rejudge/{id}` sample of a finalized build; see the module docstring."""
    out = Path(out)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    config = load_build_config(out)
    shard_size = int(config["shard_size"])
    policy = policy or RoutingPolicy.for_judge(judge, config.get("routing"))
    rows = read_manifest(out).to_pylist()
    stats = RejudgeStats()
    candidates = [r for r in rows if r["verdict"] == "judge_error" and r["shard"] == f"{REJUDGE}/{r['id']}"]
    stats.candidates = len(candidates)
    stats.cleaned = _clean_leftovers(out, rows, candidates, shard_size)
    judge_stage, route_stage = JudgeStage(judge), RouteStage(policy)
    for start in range(0, len(candidates), chunk_size):
        samples = []
        for row in candidates[start:start + chunk_size]:
            try:
                samples.append(_reset(read_sample_dir(out / REJUDGE / row["id"])))
            except (OSError, ValueError) as exc:
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


def _reset(sample: EditSample) -> EditSample:
    """Back to the state the judge stage expects: no scores, no verdict, no judge error."""
    sample.scores, sample.verdict, sample.verdict_by = {}, None, None
    sample.error, sample.error_stage = None, None
    return sample


def _shard_name(sample: EditSample, shard_size: int) -> str:
    unit = sample.index // shard_size
    return train_shard_name(unit) if sample.verdict == "accept" else negatives_shard_name(unit)


def _move(out: Path, samples: list[EditSample], rows: list[dict[str, Any]],
          shard_size: int) -> list[dict[str, Any]]:
    """Write the samples where their verdicts send them, then the parts and the manifest, then
    drop their rejudge dirs. Returns the new manifest rows."""
    new_rows: dict[str, dict[str, Any]] = {}
    to_tar: dict[str, list[EditSample]] = defaultdict(list)
    for sample in samples:
        if sample.verdict == "borderline":
            value = write_sample_dir(out / REVIEW / sample.id, sample)
            new_rows[sample.id] = manifest_row(sample, f"{REVIEW}/{sample.id}", value)
        else:
            to_tar[_shard_name(sample, shard_size)].append(sample)
    for name, group in sorted(to_tar.items()):
        sums = _rewrite_tar(out / SHARDS / name, add=group, drop={s.id for s in group})
        for sample in group:
            new_rows[sample.id] = manifest_row(sample, name, sums[sample.id])

    units = sorted({row["index"] // shard_size for row in new_rows.values()})
    for unit in units:
        _update_part(out, unit, new_rows)
    rows = [new_rows.get(row["id"], row) for row in rows]
    write_manifest(out, pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA))
    for sample_id in new_rows:
        remove_path(out / REJUDGE / sample_id)
    return rows


def _rewrite_tar(path: Path, add: list[EditSample], drop: set[str]) -> dict[str, str]:
    """The tar with the samples `drop` taken out and `add` put in, in index order, atomically.
    The other samples keep their bytes (and so their checksums)."""
    kept: list[tuple[int, str, dict[str, bytes]]] = []
    if path.exists():
        for key, members in iter_tar_groups(path):
            if key not in drop:
                kept.append((int(json.loads(members["json"])["index"]), key, members))
    kept += [(s.index, s.id, sample_members(s)) for s in add]
    if not kept:
        path.unlink(missing_ok=True)
        return {}
    kept.sort(key=lambda item: (item[0], item[1]))
    return write_tar_members(path, [(key, members) for _, key, members in kept])


def _update_part(out: Path, unit: int, new_rows: dict[str, dict[str, Any]]) -> None:
    path = part_path(out, unit)
    if not path.is_file():  # a unit without its part is not done: finalize would not list it
        log.warning("rejudge: %s is missing; only the manifest records the move", path.name)
        return
    rows = conform(pq.read_table(path), str(path)).to_pylist()
    rows = [new_rows.get(row["id"], row) for row in rows]
    with atomic_file(path) as handle:
        pq.write_table(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA), handle)


def _clean_leftovers(out: Path, rows: list[dict[str, Any]], candidates: list[dict[str, Any]],
                     shard_size: int) -> int:
    """Undo what an interrupted run left: rejudge dirs (and temporaries) of samples whose row
    already points elsewhere, and copies of still-waiting samples in review dirs or unit tars."""
    cleaned = 0
    location = {row["id"]: row["shard"] for row in rows}
    rejudge_dir = out / REJUDGE
    if rejudge_dir.is_dir():
        for path in rejudge_dir.iterdir():
            stale = path.name in location and location[path.name] != f"{REJUDGE}/{path.name}"
            if is_temp_name(path.name) or stale:
                remove_path(path)
                cleaned += 1
    waiting = {row["id"] for row in candidates}
    for sample_id in waiting:
        if (out / REVIEW / sample_id).exists():
            remove_path(out / REVIEW / sample_id)
            cleaned += 1
    units = {row["index"] // shard_size for row in candidates}
    for unit in sorted(units):
        for name in (train_shard_name(unit), negatives_shard_name(unit)):
            path = out / SHARDS / name
            if not path.is_file():
                continue
            with tarfile.open(path, mode="r") as tar:
                keys = {member.name.split(".", 1)[0] for member in tar.getmembers()}
            stale = keys & waiting
            if stale:
                _rewrite_tar(path, add=[], drop=stale)
                cleaned += len(stale)
    return cleaned


# ---- command line ---------------------------------------------------------------------------------

def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "rejudge", help="judge again the samples whose judge failed (OUT/rejudge) and move them")
    p.add_argument("out", help="a finalized build output directory")
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
    from pipeline.judges.base import make_judge

    out = Path(args.out)
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
