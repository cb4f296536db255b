"""`mcie verify OUT`: check that a finished build is whole and consistent, sample by sample.

Every manifest row is checked against what is on disk:
- ids (and indices) are unique;
- a tar row's sample is in exactly one place across all `shards/*.tar`, the one its row names; it
  decodes; it has exactly the members json, source, target, edit_mask and regions (format 2);
  each sub-edit's `mask_rle` in the json equals its bit of regions.png;
  images and masks have the row's width/height; its checksum matches; the json's id, index,
  verdict and sub-edit count match the row;
- a review/rejudge row's sample dir is complete in the same way; a quarantine row's json exists
  (with any pixels beside it) and matches its checksum;
- every location agrees with the verdict: train* ↔ accept, negatives* ↔ reject, review/ ↔
  borderline, rejudge/ ↔ judge_error, quarantine/ ↔ error;
- nothing is on disk that the manifest does not list (tar samples, sample dirs, quarantine files),
  and no temporary file of an interrupted write is left anywhere;
- the units' parts hold the same samples (id and index) as the manifest, and defects.jsonl has one
  line per sample. Verdicts and locations may differ between parts and manifest: a human review or
  a re-judge legitimately moves a sample after its unit was written.
Each problem names the sample id (or the file, when no sample can be named) and what is wrong.
Damaged bytes never end the check: whatever a reader raises on them (`CORRUPT_DATA_ERRORS`) becomes
a problem for that sample or file, and what was found before is kept. A tar member declaring more
than `shards.MAX_MEMBER_BYTES` is never read, nor an extended tar header over 64 KiB; garbage
between a tar's members is one problem naming its bytes, and the members after it are still checked. A directory that is not a build, or a build in shard
format 1, is refused with one line (exit 2).

OUT may be a local folder or an object-store prefix (`s3://bucket/out`, see `pipeline.storage`):
the same checks read the objects through file objects; an object store has no temporaries, so the
temporary check only finds leftovers copied there from a local OUT.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.dataset.output import (
    DEFECTS,
    PARTS,
    QUARANTINE,
    REJUDGE,
    REVIEW,
    SHARDS,
    OutsideOut,
    inside_out,
    location_path,
    quarantine_members,
    read_manifest,
    read_parts,
)
from pipeline.dataset.shards import (
    CORRUPT_DATA_ERRORS,
    DAMAGED,
    FORMAT_VERSION,
    checksum,
    decode_sample,
    expected_suffixes,
    is_temp_name,
    iter_tar_groups,
    read_members_dir,
)
from pipeline.dataset.move import is_sample_id
from pipeline.rle import encode as rle_encode

# Which verdict each kind of location holds.
LOCATION_VERDICT = {"train": "accept", "negatives": "reject", REVIEW: "borderline",
                    REJUDGE: "judge_error", QUARANTINE: "error"}


@dataclass
class VerifyReport:
    problems: list[str] = field(default_factory=list)
    samples: int = 0
    verdicts: Counter = field(default_factory=Counter)
    tars: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        counts = ", ".join(f"{v} {n}" for v, n in sorted(self.verdicts.items()))
        return f"{self.samples} samples ({counts}) in {self.tars} tar shards"


def verify(out: Path) -> list[str]:
    """The problems of a build directory; empty when it is whole and consistent."""
    return check_build(out).problems


def location_kind(shard: str | None, sample_id: str) -> str | None:
    """train / negatives (tar rows), review / rejudge / quarantine, or None if malformed."""
    if not shard:
        return None
    if "/" not in shard:
        if shard.endswith(".tar"):
            prefix = shard.split("-", 1)[0]
            return prefix if prefix in ("train", "negatives") else None
        return None
    if shard in (f"{REVIEW}/{sample_id}", f"{REJUDGE}/{sample_id}"):
        return shard.split("/", 1)[0]
    if shard == f"{QUARANTINE}/{sample_id}.json":
        return QUARANTINE
    return None


def check_build(out: Path) -> VerifyReport:
    out = storage.location(out)
    if not out.is_dir():
        raise FileNotFoundError(f"{out} is not a directory")
    report = VerifyReport()
    problems = report.problems
    try:
        rows = read_manifest(out).to_pylist()
    except (*CORRUPT_DATA_ERRORS, pa.ArrowException) as exc:
        problems.append(f"manifest.parquet: {exc}")
        rows = []
    report.samples = len(rows)
    report.verdicts = Counter(row["verdict"] for row in rows)

    by_id: dict[str, dict[str, Any]] = {}
    for row in rows:
        if row["id"] in by_id:
            problems.append(f"{row['id']}: listed more than once in the manifest")
        by_id.setdefault(row["id"], row)
    for index, count in Counter(row["index"] for row in rows).items():
        if count > 1:
            problems.append(f"index {index}: {count} manifest rows share it")

    problems += _check_tars(out, by_id, report)
    for sample_id, row in by_id.items():
        refusal = _outside(out, row)
        if refusal is not None:  # never read: OUT's tables name files inside OUT only
            problems.append(refusal)
            continue
        kind = location_kind(row["shard"], sample_id)
        if kind is None:
            problems.append(f"{sample_id}: manifest location {row['shard']!r} is not a valid location")
        elif kind in (REVIEW, REJUDGE):
            problems += _check_dir(out / row["shard"], row)
        elif kind == QUARANTINE:
            problems += _check_quarantine(out, row)
        if kind is not None and row["verdict"] != LOCATION_VERDICT[kind]:
            problems.append(f"{sample_id}: verdict {row['verdict']!r} but stored in {row['shard']}")
    problems += _check_orphans(out, by_id)
    problems += _check_temporaries(out)
    problems += _check_parts(out, by_id)
    return report


def _outside(out: Path, row: dict[str, Any]) -> str | None:
    """Why a row must not be read (one line), or None: an id the factory never writes (it becomes
    a path), or a location that resolves outside OUT (`review/../../x`, a symlink out)."""
    if not is_sample_id(row["id"]):
        return f"{str(row['id'])[:200]!r}: not a sample id the factory writes; its files are not read"
    try:
        location_path(out, row["shard"] or "")
    except OutsideOut as exc:
        return f"{row['id']}: {exc}"
    return None


# ---- one sample's members against its row ---------------------------------------------------------

def _check_members(row: dict[str, Any], members: dict[str, bytes], where: str, complete: bool) -> list[str]:
    sample_id = row["id"]
    if "__error__" in members:  # a member refused unread (over the size cap)
        return [f"{sample_id}: {where}: {members['__error__']}"]
    problems = []
    if complete:
        expected = set(expected_suffixes(row["num_sub_edits"] or 0))
        missing = sorted(expected - set(members))
        extra = sorted(set(members) - expected)
        if missing:
            problems.append(f"{sample_id}: {where} lacks members {missing}")
        if extra:
            problems.append(f"{sample_id}: {where} has unexpected members {extra}")
    if checksum(members) != row["checksum"]:
        problems.append(f"{sample_id}: checksum mismatch in {where}")
    try:
        sample = decode_sample(members)
        views = json.loads(members["json"]).get("sub_edits") if complete else None
    except CORRUPT_DATA_ERRORS as exc:  # what Pillow, zlib and json really raise on bad bytes
        problems.append(f"{sample_id}: {where} does not decode: {type(exc).__name__}: {exc}")
        return problems
    for name, found, wanted in (
        ("id", sample.id, sample_id),
        ("index", sample.index, row["index"]),
        ("verdict", sample.verdict, row["verdict"]),
    ):
        if found != wanted:
            problems.append(f"{sample_id}: json {name} {found!r} in {where}, manifest says {wanted!r}")
    if complete and len(sample.sub_edits) != row["num_sub_edits"]:
        problems.append(f"{sample_id}: json has {len(sample.sub_edits)} sub-edits, manifest says {row['num_sub_edits']}")
    for i, (edit, view) in enumerate(zip(sample.sub_edits, views or [])):
        if edit.mask is not None and view.get("mask_rle") != rle_encode(edit.mask):
            problems.append(f"{sample_id}: sub-edit {i}'s mask_rle differs from bit {i} of regions.png in {where}")
    size = (row["height"], row["width"])
    arrays = [("source", sample.source), ("target", sample.target), ("edit_mask", sample.background_mask)]
    arrays += [(f"mask_{i}", edit.mask) for i, edit in enumerate(sample.sub_edits)]
    for name, array in arrays:
        if array is not None and tuple(array.shape[:2]) != size:
            problems.append(f"{sample_id}: {name} is {array.shape[1]}x{array.shape[0]} in {where}, "
                            f"manifest says {row['width']}x{row['height']}")
    return problems


def _check_tars(out: Path, by_id: dict[str, dict[str, Any]], report: VerifyReport) -> list[str]:
    problems: list[str] = []
    found: dict[str, list[str]] = defaultdict(list)  # id -> tar names holding it (with repeats)
    tars = sorted((out / SHARDS).glob("*.tar")) if (out / SHARDS).is_dir() else []
    report.tars = len(tars)
    for tar in tars:
        if inside_out(out, f"{SHARDS}/{tar.name}") is None:
            problems.append(f"shards/{tar.name}: a link to a file outside {out}: not read")
            continue
        try:
            for key, members in iter_tar_groups(tar, damage="report"):
                if key == DAMAGED:  # garbage between members: named, and the members after it checked
                    problems.append(f"shards/{tar.name}: unreadable tar: {members['__error__']}")
                    continue
                first_here = tar.name not in found[key]
                found[key].append(tar.name)
                row = by_id.get(key)
                if row is None:
                    problems.append(f"{key}: in shards/{tar.name} but not in the manifest")
                elif row["shard"] == tar.name and first_here:
                    problems += _check_members(row, members, f"shards/{tar.name}", complete=True)
        except CORRUPT_DATA_ERRORS as exc:  # problems found before the damage are kept
            problems.append(f"shards/{tar.name}: unreadable tar: {type(exc).__name__}: {exc}")
    for sample_id, row in by_id.items():
        if location_kind(row["shard"], sample_id) not in ("train", "negatives"):
            if found.get(sample_id):
                problems.append(f"{sample_id}: in shards/{', shards/'.join(found[sample_id])} "
                                f"but the manifest places it in {row['shard']}")
            continue
        places = found.get(sample_id, [])
        if not places:
            missing = "" if (out / SHARDS / row["shard"]).is_file() else " (that file is missing)"
            problems.append(f"{sample_id}: not found in any shard; manifest says shards/{row['shard']}{missing}")
        elif len(places) > 1:
            problems.append(f"{sample_id}: present {len(places)} times across shards ({', '.join(places)})")
        if places and row["shard"] not in places:
            problems.append(f"{sample_id}: manifest says shards/{row['shard']} but it is in {', '.join(places)}")
    return problems


def _check_dir(directory: Path, row: dict[str, Any]) -> list[str]:
    where = f"{directory.parent.name}/{directory.name}"
    if not directory.is_dir():
        return [f"{row['id']}: {where}/ is missing"]
    try:
        members = read_members_dir(directory)
    except CORRUPT_DATA_ERRORS as exc:
        return [f"{row['id']}: {where}/ unreadable: {exc}"]
    return _check_members(row, members, where, complete=True)


def _check_quarantine(out: Path, row: dict[str, Any]) -> list[str]:
    where = f"{QUARANTINE}/{row['id']}.json"
    if not (out / where).is_file():
        return [f"{row['id']}: {where} is missing"]
    return _check_members(row, quarantine_members(out, row["id"]), where, complete=False)


# ---- what the manifest does not list --------------------------------------------------------------

def _check_orphans(out: Path, by_id: dict[str, dict[str, Any]]) -> list[str]:
    problems = []
    for kind in (REVIEW, REJUDGE):
        folder = out / kind
        if not folder.is_dir():
            continue
        for path in storage.children(folder):
            if is_temp_name(path.name):
                continue  # reported as a temporary
            row = by_id.get(path.name)
            if row is None or row["shard"] != f"{kind}/{path.name}":
                problems.append(f"{path.name}: {kind}/{path.name} is not in the manifest at that location")
    folder = out / QUARANTINE
    if folder.is_dir():
        for path in storage.children(folder):
            if is_temp_name(path.name):
                continue
            sample_id = path.name.split(".", 1)[0]
            row = by_id.get(sample_id)
            if row is None or row["shard"] != f"{QUARANTINE}/{sample_id}.json":
                problems.append(f"{sample_id}: {QUARANTINE}/{path.name} is not in the manifest at that location")
    return problems


def _check_temporaries(out: Path) -> list[str]:
    problems = []
    if storage.is_local(out):
        for root, dirs, files in os.walk(out):
            for name in sorted(dirs + files):
                if is_temp_name(name):
                    rel = Path(root, name).relative_to(out)
                    problems.append(f"{rel}: temporary file of an interrupted write")
        return problems
    for rel in _object_names(out):
        if is_temp_name(rel.rsplit("/", 1)[-1]):
            problems.append(f"{rel}: temporary file of an interrupted write")
    return problems


def _object_names(out: Path) -> list[str]:
    """Every object under an object-store OUT and every prefix of one, as sorted paths relative
    to it (one listing of the whole prefix)."""
    fs, root = storage.fs_path(out)
    root = root.rstrip("/")
    names = set()
    for found in fs.find(root):
        rel = found[len(root):].strip("/")
        parts = rel.split("/") if rel else []
        # an object store has no folders: each prefix of a key is one
        names.update("/".join(parts[:i]) for i in range(1, len(parts) + 1))
    return sorted(names)


def _check_parts(out: Path, by_id: dict[str, dict[str, Any]]) -> list[str]:
    problems = []
    try:
        parts = read_parts(out).select(["id", "index"]).to_pylist()
    except (*CORRUPT_DATA_ERRORS, pa.ArrowException) as exc:
        return [f"{PARTS}/: unreadable: {exc}"]
    in_parts = {}
    for row in parts:
        if row["id"] in in_parts:
            problems.append(f"{row['id']}: in more than one unit part")
        in_parts[row["id"]] = row["index"]
    for sample_id in sorted(set(in_parts) - set(by_id)):
        problems.append(f"{sample_id}: in {PARTS}/ but not in the manifest")
    for sample_id in sorted(set(by_id) - set(in_parts)):
        problems.append(f"{sample_id}: in the manifest but in no unit part")
    for sample_id in sorted(set(by_id) & set(in_parts)):
        if in_parts[sample_id] != by_id[sample_id]["index"]:
            problems.append(f"{sample_id}: index {in_parts[sample_id]} in its part, "
                            f"{by_id[sample_id]['index']} in the manifest")
    path = out / DEFECTS
    if not path.is_file():
        return problems + [f"{DEFECTS}: missing"]
    logged: Counter = Counter()
    for number, line in enumerate(path.read_bytes().splitlines(), 1):
        try:
            logged[json.loads(line)["id"]] += 1
        except (ValueError, KeyError, TypeError):
            problems.append(f"{DEFECTS}: line {number} is not a defect entry")
    for sample_id in sorted(set(by_id) - set(logged)):
        problems.append(f"{sample_id}: no line in {DEFECTS}")
    for sample_id, count in sorted(logged.items()):
        if sample_id not in by_id:
            problems.append(f"{sample_id}: in {DEFECTS} but not in the manifest")
        elif count > 1:
            problems.append(f"{sample_id}: {count} lines in {DEFECTS}")
    return problems


# ---- CLI ------------------------------------------------------------------------------------------

def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "verify", help="check a finished build: every manifest row against shards, queues and parts"
    )
    parser.add_argument("out", metavar="OUT", help="the build's output directory, or its URL (s3://bucket/out)")
    parser.set_defaults(func=run_verify)


BUILD_MARKERS = ("manifest.parquet", "config.json", PARTS)


def not_a_build(out: Path) -> str | None:
    """Why `out` cannot be verified (one line), or None: not a directory, not a build (none of
    manifest.parquet, config.json, parts/), or a build written in another shard format."""
    if not out.is_dir():
        return f"{out} is not a directory"
    if not any((out / name).exists() for name in BUILD_MARKERS):
        return f"{out} is not a build (no manifest.parquet, config.json or parts/)"
    manifest = out / "manifest.parquet"
    if manifest.is_file():
        try:
            with manifest.open("rb") as handle:
                meta = pq.read_schema(handle).metadata or {}
        except (*CORRUPT_DATA_ERRORS, pa.ArrowException):
            return None  # reported as a problem by the check itself
        version = meta.get(b"mcie.format", b"1").decode(errors="replace")
        if version != str(FORMAT_VERSION):
            return (f"{out} holds shard format {version}; this mcie reads and verifies format "
                    f"{FORMAT_VERSION} (rebuild it, or use the mcie that wrote it)")
    return None


def run_verify(args: argparse.Namespace) -> int:
    out = storage.location(args.out)
    refusal = not_a_build(out)
    if refusal:
        print(f"mcie verify: error: {refusal}", file=sys.stderr)
        return 2
    report = check_build(out)
    if report.ok:
        print(f"OK {out}: {report.summary()}")
        return 0
    for problem in report.problems:
        print(problem)
    print(f"{len(report.problems)} problem(s) in {out}: {report.summary()}", file=sys.stderr)
    return 1
