"""`mcie export OUT --format ip2p|hf --out DIR`: a build as parquet the Hugging Face ecosystem reads.

- `ip2p`: the columns of diffusers' InstructPix2Pix example (`examples/instruct_pix2pix/
  train_instruct_pix2pix.py`: `--original_image_column input_image`, `--edit_prompt_column
  edit_prompt`, `--edited_image_column edited_image`), so `--dataset_name DIR` trains on it as it is;
- `hf`: the full schema: the manifest's columns, the four images (source, target, edit mask,
  regions — bit i is sub-edit i's mask), per sub-edit type/text/target/box/params and its mask in
  COCO RLE, and the complete record as JSON text.

Files: `DIR/data/train-NNNNN-of-MMMMM.parquet` (one row group per source shard or sample dir batch,
so memory holds one shard at a time) and, where the build has best-of-N negatives of a generative
editor (`OUT/preference/`), `DIR/preference/train-*.parquet` (only when there is a pair to write) with prompt, source, chosen and
rejected images — only for samples the export includes. Image columns carry the Hugging Face
`Image` feature in the parquet's schema metadata, so `load_dataset("parquet", ...)` and
`load_dataset(DIR)` give PIL images. `--verdict accept|reject|all` picks samples by verdict (all =
accept, reject, borderline and judge_error; quarantined samples are never exported). A dataset card
(`DIR/README.md`, see `pipeline.dataset.card`) names the configs.

Everything is written under a work dir beside DIR (`.DIR.export-<pid>-<random>.tmp`) renamed at the
end: a full disk or read-only file system ends the command with one line (exit 1) and leaves
nothing, and the work dirs a killed export left are removed by the next export to the same DIR.
Refused with one line (exit 2), before anything is created: an existing non-empty DIR, a DIR that
is a symbolic link, a DIR inside OUT. A manifest row whose location resolves outside OUT
(`review/../../x`, a symlink out) is skipped with one warning and never read.

OUT and DIR may be object-store URLs (`s3://bucket/hf`, see `pipeline.storage`). There is no rename
on a bucket: the files are written as whole objects under the work prefix beside DIR, then copied
into DIR server-side (the card, README.md, last) and the work prefix removed; a failure removes
the work prefix and whatever was copied. `load_dataset("parquet", data_files="s3://bucket/hf/data/
*.parquet", storage_options=...)` (or `streaming=True`) reads it from the bucket. Work prefixes of
killed exports on a bucket are not cleaned automatically (another host's pid cannot be checked):
they are hidden names beside DIR, removed with any object-store tool.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import shutil
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.dataset.move import is_sample_id
from pipeline.dataset.output import (
    PREFERENCE,
    QUARANTINE,
    OutsideOut,
    inside_out,
    location_path,
    read_manifest,
)
from pipeline.dataset.shards import (
    CORRUPT_DATA_ERRORS,
    DAMAGED,
    TEMP_SUFFIX,
    atomic_write_bytes,
    iter_tar_groups,
    member_metadata,
    read_members_dir,
    remove_path,
    temp_names_of,
)
from pipeline.record import MANIFEST_SCHEMA, SHARD_FORMAT

log = logging.getLogger(__name__)

FORMATS = ("ip2p", "hf")
VERDICT_CHOICES = ("accept", "reject", "all")
ALL_VERDICTS = ("accept", "reject", "borderline", "judge_error")

IMAGE = pa.struct({"bytes": pa.binary(), "path": pa.string()})  # datasets.Image's storage type
RLE = pa.struct({"size": pa.list_(pa.int32()), "counts": pa.string()})
SUB_EDIT = pa.struct({"type": pa.string(), "text": pa.string(), "target": pa.string(),
                      "box": pa.list_(pa.int32()), "mask_rle": RLE, "params": pa.string()})

IP2P_SCHEMA = pa.schema([("input_image", IMAGE), ("edit_prompt", pa.string()),
                         ("edited_image", IMAGE), ("id", pa.string())])
_MANIFEST_FIELDS = [f for f in MANIFEST_SCHEMA if f.name not in ("shard", "checksum")]
HF_SCHEMA = pa.schema(_MANIFEST_FIELDS + [
    pa.field("source_image", IMAGE), pa.field("target_image", IMAGE),
    pa.field("edit_mask", IMAGE), pa.field("regions", IMAGE),
    pa.field("sub_edits", pa.list_(SUB_EDIT)), pa.field("record", pa.string()),
])
PREFERENCE_SCHEMA = pa.schema([("id", pa.string()), ("sub_edit", pa.int32()), ("candidate", pa.int32()),
                               ("prompt", pa.string()), ("source_image", IMAGE), ("chosen_image", IMAGE),
                               ("rejected_image", IMAGE), ("meta", pa.string())])


class ExportError(ValueError):
    """A one-line reason the export cannot run (bad OUT, bad DIR)."""


def _with_image_features(schema: pa.Schema) -> pa.Schema:
    """Mark the image columns as Hugging Face `Image` features (the other columns' features are
    derived from their arrow types by `datasets`)."""
    features = {f.name: {"_type": "Image"} for f in schema if f.type == IMAGE}
    return schema.with_metadata({"huggingface": json.dumps({"info": {"features": features}}),
                                 "mcie.format": str(SHARD_FORMAT)})


def _image(data: bytes, name: str) -> dict[str, Any]:
    return {"bytes": data, "path": name}


# ---- reading the build ----------------------------------------------------------------------------

def selected_rows(out: Path, verdict: str) -> list[dict[str, Any]]:
    """The manifest rows to export. A row whose id is not one the factory writes, or whose
    location resolves outside OUT (`review/../../x`, a symlink out), is refused with one warning
    line and never read: it counts as skipped."""
    if verdict not in VERDICT_CHOICES:
        raise ExportError(f"--verdict must be one of {', '.join(VERDICT_CHOICES)}, got {verdict!r}")
    wanted = ALL_VERDICTS if verdict == "all" else (verdict,)
    rows = read_manifest(out).to_pylist()
    selected = []
    for row in rows:
        if row["verdict"] not in wanted or not row["shard"] or row["shard"].startswith(QUARANTINE):
            continue
        try:
            if not is_sample_id(row["id"]):
                raise OutsideOut(f"id {str(row['id'])[:200]!r} is not one the factory writes: refused")
            location_path(out, row["shard"])
        except OutsideOut as exc:
            log.warning("export: row %s skipped: %s", row["index"], exc)
            continue
        selected.append(row)
    return selected


def iter_members(out: Path, rows: list[dict[str, Any]]) -> Iterator[list[tuple[dict, dict[str, bytes]]]]:
    """Batches of (manifest row, members): one batch per tar (each read once, in its order), then
    the sample dirs in batches of 64. A damaged sample is logged and skipped (counted by caller)."""
    by_tar: dict[str, dict[str, dict]] = defaultdict(dict)
    dirs = []
    for row in rows:
        (by_tar[row["shard"]].__setitem__(row["id"], row) if row["shard"].endswith(".tar") else dirs.append(row))
    for shard in sorted(by_tar):
        batch = []
        try:
            for key, members in iter_tar_groups(location_path(out, shard), damage="report"):
                if key == DAMAGED:  # garbage between members: named; the samples after it are kept
                    log.warning("export: %s", members["__error__"])
                    continue
                row = by_tar[shard].pop(key, None)  # a sample is exported once, from its first group
                if row is not None and "__error__" not in members:
                    batch.append((row, members))
        except CORRUPT_DATA_ERRORS as exc:
            log.warning("export: %s is damaged (%s: %s); its readable samples are kept",
                        shard, type(exc).__name__, exc)
        yield batch
    for start in range(0, len(dirs), 64):
        batch = []
        for row in dirs[start:start + 64]:
            try:
                members = read_members_dir(location_path(out, row["shard"]))
            except CORRUPT_DATA_ERRORS as exc:
                log.warning("export: cannot read %s: %s", row["shard"], exc)
                continue
            if "__error__" not in members:
                batch.append((row, members))
        yield batch


# ---- rows of each format ------------------------------------------------------------------------

def ip2p_row(row: dict, members: dict[str, bytes]) -> dict[str, Any]:
    return {"input_image": _image(members["source.png"], f"{row['id']}.source.png"),
            "edit_prompt": row["instruction"],
            "edited_image": _image(members["target.png"], f"{row['id']}.target.png"),
            "id": row["id"]}


def hf_row(row: dict, members: dict[str, bytes]) -> dict[str, Any]:
    view = json.loads(members["json"])
    meta = member_metadata(members)
    out = {f.name: row[f.name] for f in _MANIFEST_FIELDS}
    for column, suffix in (("source_image", "source.png"), ("target_image", "target.png"),
                           ("edit_mask", "edit_mask.png"), ("regions", "regions.png")):
        out[column] = _image(members[suffix], f"{row['id']}.{suffix}")
    out["sub_edits"] = [
        {"type": v["type"], "text": v["text"], "target": v["target"], "box": v["box"],
         "mask_rle": v["mask_rle"], "params": json.dumps(m.get("params", {}), sort_keys=True)}
        for v, m in zip(view["sub_edits"], meta.get("sub_edits", []))
    ]
    out["record"] = view["record"]
    return out


# ---- writing ----------------------------------------------------------------------------------------

def _write_parts(directory: Path, schema: pa.Schema, batches: Iterator[list[dict]]) -> int:
    """One parquet file per non-empty batch, named train-NNNNN-of-MMMMM.parquet. Returns rows.
    The directory is made for the first file: nothing to write leaves no empty folder."""
    schema = _with_image_features(schema)
    written: list[Path] = []
    total = 0
    for batch in batches:
        if not batch:
            continue
        table = pa.Table.from_pylist(batch, schema=schema)
        if storage.is_local(directory):
            directory.mkdir(parents=True, exist_ok=True)
            path = directory / f"part-{len(written):05d}.parquet"
            pq.write_table(table, path)
        else:  # no rename on a bucket: the final name is given when the work prefix is copied
            path = directory / f"part-{len(written):05d}.parquet"
            with storage.atomic_file(path) as handle:
                pq.write_table(table, handle)
        written.append(path)
        total += len(batch)
    for number, path in enumerate(written):
        final = f"train-{number:05d}-of-{len(written):05d}.parquet"
        if storage.is_local(path):
            path.rename(directory / final)
        else:
            fs, name = storage.fs_path(path)
            fs.mv(name, storage.fs_path(directory / final)[1])  # server-side copy, then delete
    return total


def _preference_batches(out: Path, ids: set[str]) -> Iterator[list[dict]]:
    folder = out / PREFERENCE
    for tar in sorted(folder.glob("preference-*.tar")) if folder.is_dir() else []:
        if inside_out(out, f"{PREFERENCE}/{tar.name}") is None:
            log.warning("export: %s/%s links outside %s: not read", PREFERENCE, tar.name, out)
            continue
        batch = []
        try:
            for key, members in iter_tar_groups(tar):
                meta = json.loads(members["json"])
                if meta.get("id") not in ids:
                    continue
                batch.append({"id": meta["id"], "sub_edit": int(meta.get("sub_edit", 0)),
                              "candidate": int(meta.get("candidate", 0)), "prompt": str(meta.get("text", "")),
                              "source_image": _image(members["source.png"], f"{key}.source.png"),
                              "chosen_image": _image(members["chosen.png"], f"{key}.chosen.png"),
                              "rejected_image": _image(members["rejected.png"], f"{key}.rejected.png"),
                              "meta": json.dumps(meta, sort_keys=True)})
        except CORRUPT_DATA_ERRORS as exc:
            log.warning("export: %s is damaged (%s: %s)", tar.name, type(exc).__name__, exc)
        yield batch


WORK_TAG = "export-"  # the work dir: DEST's parent/.DEST.export-<pid>-<random>.tmp


def _check_destination(out: Path, dest: Path) -> None:
    """Refuse (one line, before anything is created) a DEST that is a symbolic link, is not a new
    or empty directory, or lies inside OUT (an export must never change the build it reads)."""
    if storage.is_local(dest) and dest.is_symlink():
        raise ExportError(f"{dest} is a symbolic link: give the real directory")
    if storage.is_local(dest) and storage.is_local(out):
        resolved = dest.resolve()
        inside = resolved == out.resolve() or resolved.is_relative_to(out.resolve())
    else:  # a URL: the same store and a path under OUT's (a local path and a URL never are)
        inside = _url_inside(dest, out)
    if inside:
        raise ExportError(f"{dest} is inside the build {out}: export somewhere else")
    if not storage.is_local(dest):  # a prefix is empty when it holds no object
        if dest.is_file() or storage.child_names(dest):
            raise ExportError(f"{dest} exists and is not an empty directory")
    elif dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ExportError(f"{dest} exists and is not an empty directory")


def _url_inside(dest: Path, out: Path) -> bool:
    """DEST is OUT or under it, on the same store (a local path and a URL never are)."""
    if storage.is_local(dest) or storage.is_local(out):
        return False
    (dest_fs, dest_path), (out_fs, out_path) = storage.fs_path(dest), storage.fs_path(out)
    if dest_fs.protocol != out_fs.protocol:
        return False
    dest_path, out_path = dest_path.rstrip("/"), out_path.rstrip("/")
    return dest_path == out_path or dest_path.startswith(out_path + "/")


def _publish(work: Path, dest: Path) -> None:
    """Copy an object-store work prefix into DEST (server-side), the card last, so a reader who
    sees README.md sees every data file; then remove the work prefix."""
    fs, root = storage.fs_path(work)
    _, target = storage.fs_path(dest)
    root, target = root.rstrip("/"), target.rstrip("/")
    names = sorted(name[len(root) + 1:] for name in fs.find(root))
    for name in sorted(names, key=lambda n: n == "README.md"):
        fs.copy(f"{root}/{name}", f"{target}/{name}")
    storage.remove_tree(work)


def clean_stale_work(dest: Path) -> list[Path]:
    """Remove the work dirs a killed export to `dest` left (`.DEST.export-<pid>-….tmp` whose pid
    is no longer running); a running export's work dir is left alone. Returns what it removed."""
    removed = []
    for path in temp_names_of(dest.parent, dest.name):
        tag = path.name[len(dest.name) + 2:]
        if not tag.startswith(WORK_TAG):
            continue
        pid = tag[len(WORK_TAG):].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and _running(int(pid)):
            continue
        remove_path(path)
        removed.append(path)
        log.info("export: removed %s, left by an interrupted export", path)
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def export(out: Path, dest: Path, fmt: str = "ip2p", verdict: str = "accept",
           license: str | None = None) -> dict[str, Any]:
    """Export OUT to DEST (see the module docstring). Returns counts: samples, skipped, pairs."""
    out, dest = storage.location(out), storage.location(dest)
    local = storage.is_local(dest)
    if fmt not in FORMATS:
        raise ExportError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if not (out / "manifest.parquet").is_file():
        raise ExportError(f"{out} is not a finished build (no manifest.parquet)")
    _check_destination(out, dest)
    rows = selected_rows(out, verdict)
    if local:
        dest.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_work(dest)
    work = dest.with_name(f".{dest.name}.{WORK_TAG}{os.getpid()}-{secrets.token_hex(4)}{TEMP_SUFFIX}")
    try:
        make = ip2p_row if fmt == "ip2p" else hf_row
        schema = IP2P_SCHEMA if fmt == "ip2p" else HF_SCHEMA
        exported: set[str] = set()

        def batches() -> Iterator[list[dict]]:
            for batch in iter_members(out, rows):
                converted = []
                for row, members in batch:
                    try:
                        converted.append(make(row, members))
                        exported.add(row["id"])
                    except CORRUPT_DATA_ERRORS as exc:
                        log.warning("export: %s skipped: %s: %s", row["id"], type(exc).__name__, exc)
                yield converted

        if local:  # always there: the card's default config names it (a bucket has no empty folder)
            (work / "data").mkdir(parents=True)
        count = _write_parts(work / "data", schema, batches())
        pairs = _write_parts(work / "preference", PREFERENCE_SCHEMA, _preference_batches(out, exported))
        from pipeline.dataset.card import export_card

        summary = {"format": fmt, "verdict": verdict, "samples": count,
                   "skipped": len(rows) - count, "preference_pairs": pairs}
        atomic_write_bytes(work / "README.md", export_card(out, summary, license).encode())
        if not local:
            _publish(work, dest)
        else:
            if dest.exists():
                dest.rmdir()
            work.rename(dest)
    except BaseException:
        if local:
            shutil.rmtree(work, ignore_errors=True)
        else:
            for leftover in (work, dest):  # DEST was empty: whatever is there now is this export's
                try:
                    storage.remove_tree(leftover)
                except OSError as exc:
                    log.warning("export: could not remove %s: %s", storage.show(leftover), exc)
        raise
    return summary


# ---- CLI ------------------------------------------------------------------------------------------

def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "export", help="write a build as parquet for diffusers' InstructPix2Pix example or the HF hub",
        description="Write a finished build's pairs as parquet: --format ip2p trains diffusers' "
                    "InstructPix2Pix example as it is (train_instruct_pix2pix.py --dataset_name DIR), "
                    "--format hf carries every field for the Hugging Face hub.")
    parser.add_argument("out", metavar="OUT", help="a finished build's output directory (or its URL)")
    parser.add_argument("--format", choices=FORMATS, default="ip2p",
                        help="ip2p: input_image/edit_prompt/edited_image; hf: every field, RLE masks")
    parser.add_argument("--out", dest="dest", required=True, metavar="DIR",
                        help="new (or empty) directory to write into (or a URL: s3://bucket/prefix)")
    parser.add_argument("--verdict", choices=VERDICT_CHOICES, default="accept",
                        help="which samples: accepted, rejected, or all that have pixels")
    parser.add_argument("--license", default=None,
                        help="license for the card (default: the build's)")
    parser.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    try:
        summary = export(storage.location(args.out), storage.location(args.dest), args.format,
                         args.verdict, args.license)
    except (ExportError, FileNotFoundError) as exc:
        print(f"mcie export: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a full disk, a read-only file system: nothing is left half-written
        reason = f"{exc.strerror or type(exc).__name__}" + (f": {exc.filename}" if exc.filename else "")
        print(f"mcie export: failed: {reason}; nothing was written to {args.dest}", file=sys.stderr)
        return 1
    print(json.dumps(summary, sort_keys=True))
    return 0
