"""The OUT layout of a build: one work unit's files, the completion marker, and the merge.

`write_unit` routes each finished sample by verdict:

    accept       → shards/train-{unit:06d}.tar       (webdataset tar, see pipeline.dataset.shards)
    reject       → shards/negatives-{unit:06d}.tar   (not written when the unit has none)
    borderline   → review/{id}/                      (a sample dir)
    judge_error  → rejudge/{id}/                     (a sample dir)
    error        → quarantine/{id}.json              (+ {id}.source.png, .target.png, masks: every
                                                      pixel the sample had, so nothing is lost)

then writes the unit's hidden defect log `parts/unit-{unit:06d}.defects.jsonl` and, LAST, its
manifest rows `parts/unit-{unit:06d}.parquet`: the unit's completion marker. Every file goes through
`pipeline.storage.atomic_file` (a temporary name and `os.replace` locally, one PUT on an object
store), so a killed writer leaves no partial file under a final name, and a rerun of the unit first
removes the marker, stale temporaries and every earlier output of the unit's ids, then writes the
same bytes again. OUT may be a local path or a URL (`pipeline.storage.location`): the same code
writes the same bytes to both.

A sample that cannot be written where its verdict sends it (missing pixels, unknown verdict) is
quarantined with error_stage "write" instead of failing the unit; only I/O errors fail the unit
(the flow retries it).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path, PurePosixPath

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.record import MANIFEST_SCHEMA, EditSample, dumps, manifest_row
from pipeline.dataset.shards import (
    atomic_file,
    atomic_write_bytes,
    check_key,
    checksum,
    decode_sample,
    encode_png,
    ordered,
    remove_path,
    sample_members,
    temp_names_of,
    write_members_dir,
    write_tar_members,
)
from pipeline.dataset.stats import BuildStats

log = logging.getLogger(__name__)

MANIFEST = "manifest.parquet"
DEFECTS = "defects.jsonl"
SHARDS, PARTS, REVIEW, REJUDGE, QUARANTINE = "shards", "parts", "review", "rejudge", "quarantine"
PREFERENCE = "preference"  # best-of-N negatives of generative editors
WRITE_STAGE = "write"


# ---- names ----------------------------------------------------------------------------------------

def train_shard_name(unit: int) -> str:
    return f"train-{unit:06d}.tar"


def negatives_shard_name(unit: int) -> str:
    return f"negatives-{unit:06d}.tar"


def part_path(out: Path, unit: int) -> Path:
    return storage.location(out) / PARTS / f"unit-{unit:06d}.parquet"


def defects_part_path(out: Path, unit: int) -> Path:
    return storage.location(out) / PARTS / f"unit-{unit:06d}.defects.jsonl"


def quarantine_file_name(sample_id: str, suffix: str) -> str:
    return f"{sample_id}.{suffix}"


class OutsideOut(ValueError):
    """A manifest location naming a file outside OUT: an absolute path, a `..` part, or a path
    whose resolution (symlinks included) leaves OUT. Never read, written or removed."""


def location_path(out: Path, shard: str) -> Path:
    """The file or dir a manifest `shard` value names: `train-000003.tar` lives under shards/,
    `review/{id}`, `rejudge/{id}` and `quarantine/{id}.json` under OUT itself. OUT's tables never
    name files outside OUT: raises `OutsideOut` (one line) for a value that would."""
    path = inside_out(out, shard if "/" in str(shard) else f"{SHARDS}/{shard}")
    if path is None:
        raise OutsideOut(f"manifest location {str(shard)[:200]!r} names a file outside {out}: refused")
    return path


def inside_out(out: Path, relative: str) -> Path | None:
    """OUT/relative if it stays inside OUT (no absolute path, no `..`, no symlink out), else None.
    On an object store there are no symlinks: the name checks are the whole test."""
    if not isinstance(relative, str) or not relative or "\0" in relative:
        return None
    parts = PurePosixPath(relative).parts
    if PurePosixPath(relative).is_absolute() or ".." in parts or "\\" in relative:
        return None
    out = storage.location(out)
    if not storage.is_local(out):
        return out / relative
    path = Path(out) / relative
    try:
        if not path.resolve().is_relative_to(Path(out).resolve()):
            return None
    except (OSError, RuntimeError):  # a symlink loop
        return None
    return path


def unit_done(out: Path, unit: int) -> bool:
    """A unit is complete once its manifest part exists (it is written last, atomically)."""
    return part_path(out, unit).is_file()


# ---- one work unit --------------------------------------------------------------------------------

def destination(sample: EditSample) -> str:
    """Where a finished sample goes: train, negatives, review, rejudge or quarantine. A sample
    with an error (other than a judge error) or no valid verdict is quarantined."""
    if sample.verdict == "judge_error":
        return REJUDGE
    if sample.error is not None or sample.verdict == "error":
        return QUARANTINE
    route = {"accept": "train", "reject": "negatives", "borderline": REVIEW}.get(sample.verdict or "")
    if route is None:
        sample.fail(WRITE_STAGE, f"sample reached the writer with verdict {sample.verdict!r}")
        return QUARANTINE
    return route


def write_unit(out: Path, unit: int, samples: list[EditSample]) -> BuildStats:
    """Write one finished work unit into OUT and return its stats (seconds left at 0: the caller
    times the whole unit). See the module docstring for the layout and guarantees."""
    out = storage.location(out)
    if unit < 0:
        raise ValueError(f"unit must be non-negative, got {unit}")
    samples = sorted(samples, key=lambda s: (s.index, s.id))
    ids = [check_key(s.id) for s in samples]
    if len(set(ids)) != len(ids):
        raise ValueError(f"unit {unit}: duplicate sample ids")
    if storage.is_local(out):  # an object store needs no folders: a prefix exists with its objects
        for name in (SHARDS, PARTS, REVIEW, REJUDGE, QUARANTINE):
            (out / name).mkdir(parents=True, exist_ok=True)
    _remove_previous(out, unit, ids)

    # Encode everything first: a sample that cannot be encoded is quarantined, not a unit failure.
    routed: dict[str, list[tuple[EditSample, dict[str, bytes]]]] = {
        "train": [], "negatives": [], REVIEW: [], REJUDGE: [], QUARANTINE: []
    }
    for sample in samples:
        where = destination(sample)
        if where != QUARANTINE:
            try:
                routed[where].append((sample, sample_members(sample)))
                continue
            except (ValueError, TypeError) as exc:
                log.warning("sample %s cannot go to %s, quarantined: %s", sample.id, where, exc)
                sample.fail(WRITE_STAGE, exc)
        routed[QUARANTINE].append((sample, _quarantine_members(sample)))

    locations: dict[str, tuple[str, str]] = {}  # id -> (manifest shard value, checksum)
    for kind, name in (("train", train_shard_name(unit)), ("negatives", negatives_shard_name(unit))):
        if routed[kind]:
            sums = write_tar_members(out / SHARDS / name, [(s.id, m) for s, m in routed[kind]])
            locations.update({key: (name, value) for key, value in sums.items()})
    for kind in (REVIEW, REJUDGE):
        for sample, members in routed[kind]:
            value = write_members_dir(out / kind / sample.id, members)
            locations[sample.id] = (f"{kind}/{sample.id}", value)
    for sample, members in routed[QUARANTINE]:
        locations[sample.id] = (f"{QUARANTINE}/{sample.id}.json", _write_quarantine(out, sample.id, members))

    write_preference(out, unit, samples)
    lines = [dumps({"id": s.id, "index": s.index, "defects": s.defects}) + b"\n" for s in samples]
    atomic_write_bytes(defects_part_path(out, unit), b"".join(lines))

    rows = [manifest_row(s, *locations[s.id]) for s in samples]
    table = pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)
    with atomic_file(part_path(out, unit)) as handle:  # the completion marker: last
        pq.write_table(table, handle)
    return BuildStats.from_samples(samples)


def write_preference(out: Path, unit: int, samples: list[EditSample]) -> Path | None:
    """The best-of-N negatives of a unit's samples (`sample.private["preference"]`, filled by a
    generative editor with `candidates` > 1) as OUT/preference/preference-<unit>.tar, written
    atomically: one entry per rejected candidate, keyed <sample id>-e<sub-edit>-c<candidate>,
    with json (sub-instruction, seeds, its scores and the chosen one's), source.png (the image
    before that sub-edit), chosen.png and rejected.png. Rewritten whole when the unit reruns."""
    path = storage.location(out) / PREFERENCE / f"preference-{unit:05d}.tar"
    entries = []
    for sample in sorted(samples, key=lambda s: (s.index, s.id)):
        if sample.failed:
            continue
        for item in sample.private.get("preference", ()):
            meta = {k: v for k, v in item.items() if k not in ("source", "chosen", "rejected")}
            meta["id"] = sample.id
            entries.append((f"{sample.id}-e{item['sub_edit']}-c{item['candidate']}", {
                "json": dumps(meta), "source.png": encode_png(item["source"]),
                "chosen.png": encode_png(item["chosen"]),
                "rejected.png": encode_png(item["rejected"])}))
    if not entries:
        remove_path(path)  # a rerun that no longer has negatives leaves none behind
        return None
    if storage.is_local(path):
        path.parent.mkdir(parents=True, exist_ok=True)
    write_tar_members(path, entries)
    return path


def _remove_previous(out: Path, unit: int, ids: list[str]) -> None:
    """Before (re)writing a unit: drop its completion marker first (so a crash from here on leaves
    the unit not done), then whatever an earlier or killed attempt left for it."""
    for path in (part_path(out, unit), defects_part_path(out, unit)):
        remove_path(path)
        for tmp in temp_names_of(path.parent, path.name):
            remove_path(tmp)
    for name in (train_shard_name(unit), negatives_shard_name(unit)):
        remove_path(out / SHARDS / name)
        for tmp in temp_names_of(out / SHARDS, name):
            remove_path(tmp)
    if storage.is_local(out):
        for sample_id in ids:
            for kind in (REVIEW, REJUDGE):
                remove_path(out / kind / sample_id)
                for tmp in temp_names_of(out / kind, sample_id):
                    remove_path(tmp)
    else:  # one listing per queue instead of a few requests per id (no temporaries on a store)
        for kind in (REVIEW, REJUDGE):
            queued = {path.name for path in storage.children(out / kind)}
            for sample_id in ids:
                if sample_id in queued:
                    remove_path(out / kind / sample_id)
    wanted = set(ids)
    for path in storage.children(out / QUARANTINE):
        # ids contain no dots: `{id}.{suffix}` and temporaries `.{id}.{suffix}.<random>.tmp`
        if path.name.lstrip(".").split(".", 1)[0] in wanted:
            remove_path(path)


# ---- quarantine -----------------------------------------------------------------------------------

def _quarantine_members(sample: EditSample) -> dict[str, bytes]:
    """Everything the sample has; if even that cannot be encoded, keep its identity and errors."""
    try:
        return sample_members(sample, complete=False)
    except (ValueError, TypeError) as exc:
        log.warning("sample %s: quarantined without pixels: %s", sample.id, exc)
        meta = {
            "id": sample.id,
            "index": sample.index,
            "seed": sample.seed,
            "instruction": sample.instruction,
            "verdict": "error",
            "error": sample.error,
            "error_stage": sample.error_stage,
            "write_error": f"{type(exc).__name__}: {exc}"[:500],
        }
        return {"json": dumps(meta)}


def _write_quarantine(out: Path, sample_id: str, members: dict[str, bytes]) -> str:
    # pixels first, the json (the file the manifest names) last
    for suffix, data in reversed(ordered(members)):
        atomic_write_bytes(out / QUARANTINE / quarantine_file_name(sample_id, suffix), data)
    return checksum(members)


def quarantine_members(out: Path, sample_id: str) -> dict[str, bytes]:
    """The files of one quarantined sample, as members (suffix → bytes)."""
    members = {}
    for path in sorted((storage.location(out) / QUARANTINE).glob(f"{sample_id}.*"), key=lambda p: p.name):
        members[path.name.split(".", 1)[1]] = path.read_bytes()
    return dict(ordered(members))


def read_quarantine(out: Path, sample_id: str) -> EditSample:
    """A quarantined sample back as a record (pixels it had; error and error_stage set)."""
    members = quarantine_members(out, sample_id)
    if "json" not in members:
        raise FileNotFoundError(f"no quarantine/{sample_id}.json in {out}")
    return decode_sample(members)


# ---- manifest -------------------------------------------------------------------------------------

def conform(table: pa.Table, what: str) -> pa.Table:
    """Columns in MANIFEST_SCHEMA order and types; a missing or extra column is an error."""
    names = set(table.column_names)
    expected = set(MANIFEST_SCHEMA.names)
    if names != expected:
        raise ValueError(
            f"{what} does not match the manifest schema: "
            f"missing {sorted(expected - names)}, unexpected {sorted(names - expected)}"
        )
    return table.select(MANIFEST_SCHEMA.names).cast(MANIFEST_SCHEMA)


def write_manifest(out: Path, table: pa.Table) -> pa.Table:
    """Write OUT/manifest.parquet atomically, rows sorted by index. Returns the table written."""
    table = conform(table, "manifest table")
    table = table.sort_by([("index", "ascending")])
    with atomic_file(storage.location(out) / MANIFEST) as handle:
        pq.write_table(table, handle)
    return table


def read_parquet(path: Path, columns: list[str] | None = None) -> pa.Table:
    """One Parquet file, as `pq.read_table` reads it (same table, same schema metadata), without
    pyarrow.dataset: that imports pandas, ≈ 1 s of a small build's driver and of every worker.
    `path` may be an object-store location: its bytes are read whole (a part or a manifest is
    small next to the shards it lists)."""
    path = storage.location(path)
    if not storage.is_local(path):
        return pq.ParquetFile(pa.BufferReader(path.read_bytes())).read(columns=columns)
    return pq.ParquetFile(path).read(columns=columns)


def read_manifest(out: Path) -> pa.Table:
    path = storage.location(out) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (the build is not finalized)")
    return conform(read_parquet(path), str(path))


def _parts(out: Path) -> list[Path]:
    """The units' manifest parts, by name (local temporaries start with "." and never match)."""
    parts = storage.location(out) / PARTS
    if not parts.is_dir():
        return []
    return sorted(parts.glob("unit-*.parquet"), key=lambda p: p.name)


def read_parts(out: Path) -> pa.Table:
    """All units' manifest parts, concatenated, sorted by index."""
    parts = _parts(out)
    tables = [conform(read_parquet(path), str(path)) for path in parts]
    if not tables:
        return MANIFEST_SCHEMA.empty_table()
    return pa.concat_tables(tables).sort_by([("index", "ascending")])


def update_rows(out: Path, rows: list[dict]) -> pa.Table:
    """Replace the manifest rows of samples that moved after their unit was written (a human
    decided a review sample, a re-judge scored a rejudge sample), keyed by id, in their unit parts
    (atomically, one part at a time) and then in manifest.parquet. Parts stay the source of truth,
    so a later `finalize` (e.g. a rerun of `mcie build`) keeps the move instead of undoing it.

    Intended order for a mover: write the new shard (`shards.write_tar`), then `update_rows` with
    `record.manifest_row(sample, shard_name, checksum)`, then remove the old review/rejudge dir.
    Returns the new manifest."""
    out = storage.location(out)
    wanted = {row["id"]: row for row in rows}
    if len(wanted) != len(rows):
        raise ValueError("update_rows: an id is given more than once")
    found: set[str] = set()
    changed: dict[Path, pa.Table] = {}
    for part in _parts(out):
        new_rows, hit = [], False
        for row in conform(read_parquet(part), str(part)).to_pylist():
            new = wanted.get(row["id"])
            if new is not None:
                if new["index"] != row["index"]:
                    raise ValueError(f"update_rows: {row['id']} would change index {row['index']}")
                row, hit = new, True
                found.add(new["id"])
            new_rows.append(row)
        if hit:
            changed[part] = pa.Table.from_pylist(new_rows, schema=MANIFEST_SCHEMA)
    missing = sorted(set(wanted) - found)
    if missing:  # checked before writing anything
        raise KeyError(f"update_rows: no unit part holds {missing[:5]}")
    for part, table in changed.items():
        with atomic_file(part) as handle:
            pq.write_table(table, handle)
    return finalize(out)


def finalize(out: Path) -> pa.Table:
    """Merge every finished unit into OUT/manifest.parquet and OUT/defects.jsonl (one line per
    sample, clean ones with an empty list), both sorted by index and written atomically, under
    OUT's writer lock (re-entrant: the build and the movers already hold it)."""
    from pipeline.dataset.lock import out_lock

    out = storage.location(out)
    with out_lock(out):
        return _finalize(out)


def _finalize(out: Path) -> pa.Table:
    table = write_manifest(out, read_parts(out))
    entries = []
    for part in _parts(out):
        log_path = part.with_name(part.name.replace(".parquet", ".defects.jsonl"))
        if not log_path.is_file():
            raise FileNotFoundError(f"{log_path} is missing although {part.name} exists")
        for line in log_path.read_bytes().splitlines():
            if line.strip():
                entry = json.loads(line)
                entries.append((entry["index"], entry["id"], line))
    entries.sort()
    atomic_write_bytes(out / DEFECTS, b"".join(line + b"\n" for _, _, line in entries))
    log.info("finalized %s: %d samples", out, table.num_rows)
    return table
