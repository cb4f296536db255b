"""A sample as webdataset members, and the deterministic, atomic files that hold them.

Format 2 (`FORMAT_VERSION`): every sample has the SAME five members, so every third-party reader
(Hugging Face `datasets`, Ray Data `read_webdataset`, webdataset + torch `DataLoader`) sees one
schema:

    json            fixed keys and types, no nulls (`sample_json`): id, index, seed, instruction,
                    num_sub_edits, width, height, verdict, verdict_by, corrected, error,
                    error_stage, source_key, edit_index, format, and `sub_edits`: per sub-edit
                    type, text, target, box [x0, y0, x1, y1], region_bit and `mask_rle` (COCO RLE,
                    pycocotools' form). `record` is the complete metadata (`sample.metadata()`) as
                    JSON text: open dicts (params, scores, provenance, objects) live there, so
                    their varying keys never change the json's schema. It is what
                    `decode_sample` reads.
    source.png      uint8 RGB
    target.png      uint8 RGB
    edit_mask.png   union of the sub-edit regions (= not background_mask), L-mode 0/255
    regions.png     L-mode uint8: bit i is sub-edit i's mask (MAX_SUB_EDITS = 8 fits one byte)

Format 1 (before): a `mask_N.png` per sub-edit and `sample.metadata()` as the json. It is still
decoded (`decode_sample`), never written.

Member order is fixed (`MEMBER_ORDER`): json first, so a streaming reader can filter on metadata
before touching pixels. The same sample lives in three kinds of container, all with the same
member bytes:

    tar shard     `KEY.{suffix}` (KEY = sample id), samples in index order   `write_tar`/`read_shard`
    sample dir    `{suffix}` files, with `json` named `sample.json`           `write_sample_dir`/...
    quarantine    `{id}.{suffix}` files beside each other (any images present) see pipeline.dataset.output

`checksum(members)` is the sha256 of, for each member in that order, the bytes
`f"{suffix}\\n{len(data)}\\n"` followed by the data. It does not depend on the container, so a tar
sample and the same sample in a review dir have the same checksum, and verify recomputes it from
whatever it reads.

Reading is bounded: a tar member whose header declares more than `MAX_MEMBER_BYTES` is never read
(its sample fails with that reason), images larger than `MAX_PIXELS` are refused from the header,
and `CORRUPT_DATA_ERRORS` is everything Pillow, zlib, tarfile and json really raise on damaged bytes.
Tar headers are read by `tarscan.scan_tar`, never by `tarfile`: every declared size (extended
headers, members) is bounded before anything is read or allocated.

Bytes are deterministic: PNGs carry no timestamp, tar headers have a fixed mtime/uid/gid/mode and
empty owner names, members and samples are always written in the same order. Every final file is
written through `pipeline.storage.atomic_file`: locally under a temporary name in its own directory
(`.NAME.<random>.tmp`) and `os.replace`d, on an object store as one PUT, so a kill at any moment
leaves no half-written file under a final name; `is_temp_name` recognises local leftovers so
writers can clean them up and verify can flag them. Every path may be a URL (`storage.location`).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import struct
import tarfile
import zlib
from pathlib import Path
from typing import IO, Any, ContextManager, Iterable, Iterator

import numpy as np
from isal import isal_zlib
from PIL import Image

from pipeline import bounds, rle, storage
from pipeline.dataset.tarscan import TarDamage, TarMember, scan_tar
from pipeline.sources.decode import DECODE_ERRORS
from pipeline.record import MAX_SUB_EDITS, SHARD_FORMAT, EditSample, InventoryObject, SubEdit, dumps

TAR_MTIME = 0  # fixed header fields: the same samples always give the same tar bytes
TAR_MODE = 0o644

FORMAT_VERSION = SHARD_FORMAT  # 1: a mask_N.png per sub-edit; 2: one regions.png, fixed-schema json
MEMBER_ORDER = ("json", "source.png", "target.png", "edit_mask.png", "regions.png")
REGIONS = "regions.png"
SAMPLE_JSON = "sample.json"  # the json member's file name inside a sample dir
TEMP_SUFFIX = ".tmp"

_MASK_SUFFIX = re.compile(r"^mask_(\d+)\.png$")  # format 1 only

# Bounds on what a reader accepts from a file (untrusted sizes, issue 17): a member declaring more
# bytes is not read; an image declaring more pixels is not decoded.
MAX_MEMBER_BYTES = bounds.MAX_CELL_BYTES  # an encoded image, in a tar as in a parquet cell
MAX_PIXELS = bounds.MAX_PIXELS

# What damaged bytes really raise: Pillow's decoders (`DECODE_ERRORS`), and tarfile on a
# truncated or corrupt tar (json's errors are ValueErrors). Every reader of shards and sample dirs
# catches exactly these and reports a reason.
CORRUPT_DATA_ERRORS = (*DECODE_ERRORS, tarfile.TarError)
_KEY = re.compile(r"^[A-Za-z0-9_-]+$")  # no dots (webdataset splits the key at the first dot)


# ---- atomic files ---------------------------------------------------------------------------------

def temp_path(path: Path) -> Path:
    """A unique temporary name beside `path`: `.NAME.<random>.tmp` (hidden, never matched by the
    globs that find final files). Local paths only: an object store writes in one PUT."""
    return storage.temp_path(path)


def is_temp_name(name: str) -> bool:
    return name.startswith(".") and name.endswith(TEMP_SUFFIX)


def temp_names_of(directory: Path, final_name: str) -> list[Path]:
    """Temporaries left beside `directory/final_name` by a killed writer (none on an object
    store: an object appears whole or not at all, so there is nothing to list)."""
    directory = storage.location(directory)
    if not storage.is_local(directory) or not directory.is_dir():
        return []
    prefix = f".{final_name}."
    return [p for p in directory.iterdir() if p.name.startswith(prefix) and is_temp_name(p.name)]


def atomic_file(path: Path) -> ContextManager[IO[bytes]]:
    """Write a file that appears under `path` only once complete (`storage.atomic_file`: a synced
    temporary and `os.replace` locally, one PUT on an object store). On an exception nothing
    appears and `path` is left as it was."""
    return storage.atomic_file(storage.location(path))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    storage.write_atomic(storage.location(path), data)


def remove_path(path: Path) -> None:
    """Remove a file or a directory tree (a prefix on an object store) if it exists."""
    storage.remove_tree(storage.location(path))


# ---- pixels <-> PNG ---------------------------------------------------------------------------------

# ISA-L's deflate (the `isal` package) at its level 1: a 512 px photo (bench/build.py's, up to
# 768x512) encodes in ~3.5 ms CPU, where Pillow at compress_level 1 took ~25 ms and zlib level 1
# (run-length strategy) ~9 ms, into files of the same size (541 KiB on average vs Pillow's 538).
_DEFLATE_LEVEL = 1


def _png_bytes(rows: np.ndarray, width: int, color_type: int) -> bytes:
    """uint8 rows (H x W·channels) → an 8-bit PNG of `color_type` (0 grey, 2 RGB): every row
    filtered with Up, one IDAT deflated by ISA-L, no ancillary chunk (so no timestamp). The same
    pixels always give the same bytes on a machine (ISA-L's output is deterministic; it can
    differ between CPU families, as zlib's differs between zlib builds), and every PNG reader
    decodes them."""
    height = rows.shape[0]
    raw = np.empty((height, rows.shape[1] + 1), np.uint8)
    raw[:, 0] = 2  # filter type Up: each byte minus the byte above (row 0: minus zero)
    raw[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=raw[1:, 1:])
    data = isal_zlib.compress(raw, _DEFLATE_LEVEL)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def encode_png(image: np.ndarray) -> bytes:
    """uint8 HxWx3 RGB → PNG bytes (deterministic: no timestamp or text chunks)."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected a uint8 HxWx3 image, got {_describe(image)}")
    if image.size == 0:
        raise ValueError(f"expected a non-empty image, got {_describe(image)}")
    height, width = image.shape[:2]
    return _png_bytes(image.reshape(height, width * 3), width, 2)


def encode_mask(mask: np.ndarray) -> bytes:
    """bool HxW → L-mode PNG with 0 (false) and 255 (true)."""
    if not isinstance(mask, np.ndarray) or mask.ndim != 2 or mask.dtype != bool:
        raise ValueError(f"expected a bool HxW mask, got {_describe(mask)}")
    if mask.size == 0:
        raise ValueError(f"expected a non-empty mask, got {_describe(mask)}")
    return _png_bytes(mask.view(np.uint8) * np.uint8(255), mask.shape[1], 0)


def _open_png(data: bytes) -> Image.Image:
    """Open PNG bytes, refusing (ValueError) anything that is not a PNG or declares more than
    MAX_PIXELS before a pixel is decoded."""
    image = Image.open(io.BytesIO(data), formats=("PNG",))
    width, height = image.size
    if width * height > MAX_PIXELS:
        image.close()
        raise ValueError(f"PNG declares {width}x{height} pixels, over the cap of {MAX_PIXELS}")
    return image


def decode_png(data: bytes) -> np.ndarray:
    with _open_png(data) as image:
        return np.asarray(image.convert("RGB")).copy()


def decode_mask(data: bytes) -> np.ndarray:
    """PNG → bool HxW. Only 0/255 L-mode masks are accepted: anything else is a corrupt mask."""
    with _open_png(data) as image:
        if image.mode != "L":
            raise ValueError(f"expected an L-mode PNG mask, got {image.mode}")
        values = np.asarray(image)
    if not np.isin(values, (0, 255)).all():
        raise ValueError("mask has values other than 0 and 255")
    return values == 255


def encode_regions(masks: list[np.ndarray | None], shape: tuple[int, int]) -> bytes:
    """Sub-edit masks → one L-mode PNG whose bit i is mask i (a None mask leaves its bit 0)."""
    if len(masks) > MAX_SUB_EDITS:
        raise ValueError(f"{len(masks)} sub-edits do not fit regions.png ({MAX_SUB_EDITS} bits)")
    bits = np.zeros(shape, dtype=np.uint8)
    for i, mask in enumerate(masks):
        if mask is None:
            continue
        if not isinstance(mask, np.ndarray) or mask.dtype != bool or mask.shape != tuple(shape):
            raise ValueError(f"sub-edit {i}: expected a bool {shape} mask, got {_describe(mask)}")
        bits |= mask.astype(np.uint8) << i
    return _png_bytes(bits, bits.shape[1], 0)


def decode_regions(data: bytes, count: int) -> list[np.ndarray]:
    """regions.png → the first `count` sub-edit masks (bool HxW). ValueError if a bit at or above
    `count` is set (a mask for a sub-edit the sample does not have)."""
    with _open_png(data) as image:
        if image.mode != "L":
            raise ValueError(f"expected an L-mode regions.png, got {image.mode}")
        bits = np.asarray(image)
    if not 0 <= count <= MAX_SUB_EDITS:
        raise ValueError(f"{count} sub-edits do not fit regions.png")
    if int(bits.max(initial=0)) >> count:
        raise ValueError(f"regions.png has bits set beyond its {count} sub-edits")
    return [(bits >> i) & 1 == 1 for i in range(count)]


def _describe(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"array {value.dtype} {value.shape}"
    return type(value).__name__


# ---- sample <-> members -----------------------------------------------------------------------------

def member_rank(suffix: str) -> tuple[int, int, str]:
    """Sort key of the fixed member order: json, source, target, edit_mask, mask_0, mask_1, ..."""
    if suffix in MEMBER_ORDER:
        return (MEMBER_ORDER.index(suffix), 0, "")
    match = _MASK_SUFFIX.match(suffix)
    if match:
        return (len(MEMBER_ORDER), int(match.group(1)), "")
    return (len(MEMBER_ORDER) + 1, 0, suffix)


def ordered(members: dict[str, bytes]) -> list[tuple[str, bytes]]:
    return sorted(members.items(), key=lambda item: member_rank(item[0]))


def expected_suffixes(num_sub_edits: int | None = None) -> list[str]:
    """The members a complete format-2 sample (shard or sample dir) has: the same five whatever
    its sub-edit count (the argument is kept for callers that pass it)."""
    return list(MEMBER_ORDER)


def checksum(members: dict[str, bytes]) -> str:
    """sha256 over `f"{suffix}\\n{len(data)}\\n"` + data for each member in the fixed order."""
    digest = hashlib.sha256()
    for suffix, data in ordered(members):
        if suffix.startswith("__"):  # __key__, __error__: reader annotations, not members
            continue
        digest.update(f"{suffix}\n{len(data)}\n".encode())
        digest.update(data)
    return digest.hexdigest()


def check_key(key: str) -> str:
    if not isinstance(key, str) or not _KEY.match(key):
        raise ValueError(f"sample id {key!r} cannot be a shard key (letters, digits, '-', '_' only)")
    return key


def sample_json(sample: EditSample) -> bytes:
    """The format-2 json member: a fixed-schema view every reader can type (no nulls, the same
    keys in every sample) plus `record`, the complete metadata as JSON text."""
    height, width = sample.source.shape[:2] if sample.source is not None else (0, 0)
    sub_edits = []
    for i, edit in enumerate(sample.sub_edits):
        mask = edit.mask
        box = edit.box if edit.box is not None else (_mask_box(mask) if mask is not None else None)
        sub_edits.append({
            "type": edit.type,
            "text": edit.text,
            "target": edit.target,
            "region_bit": i,
            "box": [int(v) for v in box] if box is not None else [0, 0, 0, 0],
            # size [0, 0] = this sub-edit has no mask (only ever in quarantine)
            "mask_rle": rle.encode(mask) if mask is not None else {"size": [0, 0], "counts": ""},
        })
    view = {
        "format": FORMAT_VERSION,
        "id": sample.id,
        "index": int(sample.index),
        "seed": int(sample.seed),
        "source_key": str(sample.source_key),
        "edit_index": int(sample.edit_index),
        "width": int(width),
        "height": int(height),
        "instruction": sample.instruction,
        "num_sub_edits": len(sample.sub_edits),
        "sub_edits": sub_edits,
        "verdict": sample.verdict or "",
        "verdict_by": sample.verdict_by or "",
        "corrected": bool((sample.human or {}).get("corrected")),
        "error": sample.error or "",
        "error_stage": sample.error_stage or "",
        "record": dumps(sample.metadata()).decode(),
    }
    return dumps(view)


def _mask_box(mask: np.ndarray) -> list[int] | None:
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        return None
    return [int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1]


def sample_members(sample: EditSample, complete: bool = True) -> dict[str, bytes]:
    """Encode a sample as format-2 members (in the fixed order).

    complete=True (shards, sample dirs): source, target and every sub-edit mask must exist, else
    ValueError. complete=False (quarantine): whatever pixels exist are kept, nothing is required.
    """
    check_key(sample.id)
    masks = [edit.mask for edit in sample.sub_edits]
    if complete:
        missing = [name for name, value in (("source", sample.source), ("target", sample.target)) if value is None]
        missing += [f"mask_{i}" for i, mask in enumerate(masks) if mask is None]
        if missing:
            raise ValueError(f"sample {sample.id} is incomplete: no {', '.join(missing)}")
    members: dict[str, bytes] = {"json": sample_json(sample)}
    if sample.source is not None:
        members["source.png"] = encode_png(sample.source)
    if sample.target is not None:
        members["target.png"] = encode_png(sample.target)
    edit_mask = _edit_mask(sample)
    if edit_mask is not None:
        members["edit_mask.png"] = encode_mask(edit_mask)
    elif complete:
        raise ValueError(f"sample {sample.id} has no edit mask (no background mask, no sub-edit masks)")
    if complete:
        shapes = {a.shape[:2] for a in (sample.source, sample.target, edit_mask, *masks)}
        if len(shapes) != 1:
            raise ValueError(f"sample {sample.id}: images and masks differ in size {sorted(shapes)}")
    present = [m for m in masks if m is not None]
    if present:
        members[REGIONS] = encode_regions(masks, present[0].shape)
    elif complete:
        raise ValueError(f"sample {sample.id} has no sub-edits")
    return dict(ordered(members))


def _edit_mask(sample: EditSample) -> np.ndarray | None:
    if sample.background_mask is not None:
        return ~sample.background_mask
    masks = [edit.mask for edit in sample.sub_edits if edit.mask is not None]
    return np.logical_or.reduce(masks) if masks else None


def decode_sample(members: dict[str, bytes]) -> EditSample:
    """Members (suffix → bytes, webdataset style; `__key__` and other `__` entries are ignored
    except that `__key__` must match the json id, and `__error__` — a member refused unread —
    fails the sample) → EditSample. Reads format 2 and format 1. Missing images stay None; masks
    become bool arrays in `sub_edits[i].mask`, and background_mask = not edit_mask.
    Raises one of CORRUPT_DATA_ERRORS (a reason) on damaged members."""
    if "__error__" in members:
        raise ValueError(members["__error__"])
    if "json" not in members:
        raise ValueError("sample has no json member")
    try:
        view = json.loads(members["json"])
    except ValueError as exc:
        raise ValueError(f"json member is not valid JSON: {exc}") from exc
    if not isinstance(view, dict) or "id" not in view:
        raise ValueError("json member is not a sample's metadata")
    version = view.get("format", 1)
    if version == FORMAT_VERSION:
        try:
            meta = json.loads(view["record"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"json member has no readable record: {exc}") from None
        if not isinstance(meta, dict) or meta.get("id") != view["id"]:
            raise ValueError("json record does not describe the json's sample")
    elif version == 1:
        meta = view
    else:
        raise ValueError(f"sample format {version!r} is not one this version reads (1, {FORMAT_VERSION})")
    key = members.get("__key__")
    if key is not None and key != meta["id"]:
        raise ValueError(f"member key {key!r} differs from the json id {meta['id']!r}")
    sub_json = meta.get("sub_edits") or []
    masks = _decode_masks(members, meta["id"], sub_json, view if version == FORMAT_VERSION else None)
    sample = EditSample(id=meta["id"], index=int(meta["index"]), seed=int(meta["seed"]))
    sample.instruction = meta.get("instruction", "")
    sample.sub_edits = [SubEdit.from_json(data, mask=masks.get(i)) for i, data in enumerate(sub_json)]
    sample.scores = meta.get("scores") or {}
    sample.verdict = meta.get("verdict")
    sample.verdict_by = meta.get("verdict_by")
    sample.human = meta.get("human")
    sample.error = meta.get("error")
    sample.error_stage = meta.get("error_stage")
    sample.source_key = str(meta.get("source_key", ""))
    sample.edit_index = int(meta.get("edit_index", 0))
    sample.source_meta = meta.get("source_meta") or {}
    sample.objects = [InventoryObject.from_json(o) for o in meta.get("objects") or []]
    sample.provenance = meta.get("provenance") or {}
    if "source.png" in members:
        sample.source = decode_png(members["source.png"])
    if "target.png" in members:
        sample.target = decode_png(members["target.png"])
    if "edit_mask.png" in members:
        sample.background_mask = ~decode_mask(members["edit_mask.png"])
    return sample


def member_metadata(members: dict[str, bytes]) -> dict[str, Any]:
    """The complete metadata (`EditSample.metadata()`) of a sample's members, without decoding
    pixels: format 2's `record`, or format 1's json itself."""
    view = json.loads(members["json"])
    if isinstance(view, dict) and view.get("format", 1) == FORMAT_VERSION:
        return json.loads(view["record"])
    return view


def member_masks(members: dict[str, bytes]) -> list[np.ndarray]:
    """The sub-edit masks of a sample's members, in sub-edit order, without decoding its images:
    format 2 from regions.png (count from the json), format 1 from mask_0.png, mask_1.png, ..."""
    if REGIONS in members:
        count = int(json.loads(members["json"])["num_sub_edits"])
        return decode_regions(members[REGIONS], count)
    masks = []
    while f"mask_{len(masks)}.png" in members:
        masks.append(decode_mask(members[f"mask_{len(masks)}.png"]))
    return masks


def _decode_masks(members: dict[str, bytes], sample_id: str, sub_json: list,
                  view: dict | None) -> dict[int, np.ndarray]:
    """Sub-edit masks: format 2 from regions.png (a sub-edit whose view says it has no mask stays
    None), format 1 from mask_N.png members."""
    allowed = set(MEMBER_ORDER) if view is not None else set(MEMBER_ORDER) - {REGIONS}
    masks: dict[int, np.ndarray] = {}
    for suffix, data in members.items():
        if suffix.startswith("__") or suffix in allowed:
            continue
        match = _MASK_SUFFIX.match(suffix)
        if view is not None or not match:
            raise ValueError(f"sample {sample_id}: unexpected member {suffix!r}")
        number = int(match.group(1))
        if number >= len(sub_json):
            raise ValueError(f"sample {sample_id}: {suffix} but only {len(sub_json)} sub-edits")
        masks[number] = decode_mask(data)
    if view is not None and REGIONS in members:
        views = view.get("sub_edits") or []
        if len(views) != len(sub_json):
            raise ValueError(f"sample {sample_id}: json lists {len(views)} sub-edits, its record {len(sub_json)}")
        for i, mask in enumerate(decode_regions(members[REGIONS], len(sub_json))):
            if list(views[i].get("mask_rle", {}).get("size", [])) != [0, 0]:
                masks[i] = mask
    return masks


# ---- tar shards -------------------------------------------------------------------------------------

def write_tar(path: Path, samples: Iterable[EditSample]) -> dict[str, str]:
    """Write complete samples (sorted by index) as one webdataset tar, atomically.
    Returns {sample id: checksum}. Raises ValueError before writing anything if a sample is
    incomplete or an id repeats."""
    encoded = [(s.id, sample_members(s)) for s in sorted(samples, key=lambda s: (s.index, s.id))]
    return write_tar_members(path, encoded)


def write_tar_members(path: Path, encoded: list[tuple[str, dict[str, bytes]]]) -> dict[str, str]:
    """Write already-encoded samples, in the given order, as one tar, atomically."""
    ids = [key for key, _ in encoded]
    if len(set(ids)) != len(ids):
        raise ValueError(f"duplicate sample ids in one shard: {sorted({i for i in ids if ids.count(i) > 1})}")
    sums: dict[str, str] = {}
    with atomic_file(path) as handle:
        with tarfile.open(fileobj=handle, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for key, members in encoded:
                check_key(key)
                for suffix, data in ordered(members):
                    tar.addfile(_tar_info(f"{key}.{suffix}", len(data)), io.BytesIO(data))
                sums[key] = checksum(members)
    return sums


def _tar_info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = TAR_MTIME
    info.mode = TAR_MODE
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


class TarDamageError(tarfile.ReadError):
    """A tar shard is damaged (truncated, garbage between members): one line naming the bytes
    and what they cost. A `tarfile.TarError`, so it is one of CORRUPT_DATA_ERRORS."""


DAMAGED = "#damaged"  # the group key `iter_tar_groups(..., damage="report")` gives a damaged region


def iter_tar_groups(path: Path, max_member_bytes: int | None = None, damage: str = "raise",
                    read: bool = True) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {suffix: bytes}) for each sample of a tar, streaming, the way webdataset groups them:
    consecutive members with the same key. A suffix repeated within a group starts a new group, so
    a sample written twice shows up twice. Headers are read by `tarscan.scan_tar`, which bounds
    every declared size before reading. A member whose header declares more than
    `max_member_bytes` (default MAX_MEMBER_BYTES), a sparse member, or one whose extended header
    was refused is not read: its group carries `__error__` with the reason instead
    (`decode_sample` fails it). Damage (a truncated tar, garbage between members):
    `damage="raise"` raises `TarDamageError` after the groups before it; `damage="report"` yields
    `(DAMAGED, {"__error__": reason})` in its place and goes on with the members after it.
    `read=False` lists the same groups from the headers alone (every member's bytes are b"")."""
    cap = MAX_MEMBER_BYTES if max_member_bytes is None else max_member_bytes
    if damage not in ("raise", "report"):
        raise ValueError(f"damage must be 'raise' or 'report', not {damage!r}")
    path = storage.location(path)
    shard = path.name
    key: str | None = None
    members: dict[str, bytes] = {}
    with path.open("rb") as handle:
        for entry in scan_tar(handle):
            if isinstance(entry, TarDamage):
                if key is not None:
                    yield key, members
                    key, members = None, {}
                if damage == "raise":
                    raise TarDamageError(f"{shard}: {entry.reason}")
                yield DAMAGED, {"__error__": f"{shard}: {entry.reason}"}
                continue
            if not entry.isreg():
                continue
            name = entry.name.rsplit("/", 1)[-1]
            if "." not in name:
                raise ValueError(f"{shard}: member {entry.name!r} has no extension")
            member_key, suffix = name.split(".", 1)
            if key is not None and (member_key != key or suffix in members):
                yield key, members
                members = {}
            key = member_key
            if entry.error is not None or entry.declared > cap:
                # the declared size is untrusted: never read it (a sparse member expands on read)
                reason = _refusal(entry, cap)
                members.setdefault("__error__", reason)
                members[suffix] = b""
                continue
            if not read:
                members[suffix] = b""
                continue
            handle.seek(entry.offset_data)
            data = handle.read(entry.size)  # size <= cap and <= the bytes the file has
            if len(data) != entry.size:
                raise TarDamageError(f"{shard}: member {entry.name!r} is truncated")
            members[suffix] = data
    if key is not None:
        yield key, members


def _refusal(entry: TarMember, cap: int) -> str:
    if entry.error == "sparse member":
        over = f", over the cap of {cap}" if entry.declared > cap else " (a sparse member is never read)"
        return f"sparse member {entry.name!r} declares {entry.declared} bytes{over}"
    if entry.error is not None:
        return f"member {entry.name!r}: {entry.error}"
    return f"member {entry.name!r} declares {entry.declared} bytes, over the cap of {cap}"


def read_shard(path: Path) -> Iterator[EditSample]:
    """Decode every sample of a tar shard, in order."""
    for key, members in iter_tar_groups(path):
        yield decode_sample({"__key__": key, **members})


# ---- per-sample directories (review / rejudge queues) -----------------------------------------------

def member_file_name(suffix: str) -> str:
    return SAMPLE_JSON if suffix == "json" else suffix


def write_sample_dir(directory: Path, sample: EditSample) -> str:
    """Write a complete sample as a directory of member files, atomically (build a temporary
    directory beside it, then rename it into place, replacing an old one). Returns its checksum."""
    return write_members_dir(directory, sample_members(sample))


def write_members_dir(directory: Path, members: dict[str, bytes]) -> str:
    directory = storage.location(directory)
    if not storage.is_local(directory):
        # No rename of a prefix on an object store: drop the old dir, then put each member as one
        # object, the json (the file readers look for) last. A dir seen half-written is safe for
        # the same reason as below: the unit's completion marker comes later.
        remove_path(directory)
        for suffix, data in reversed(ordered(members)):
            storage.write_atomic(directory / member_file_name(suffix), data)
        return checksum(members)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(directory)
    try:
        tmp.mkdir()
        for suffix, data in ordered(members):
            with open(tmp / member_file_name(suffix), "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
        # rename cannot replace a non-empty directory: drop the old one first. Between the two
        # steps the sample is absent, which is safe: the unit's completion marker comes later.
        remove_path(directory)
        os.replace(tmp, directory)
    except BaseException:
        remove_path(tmp)
        raise
    return checksum(members)


def read_members_dir(directory: Path, max_member_bytes: int | None = None) -> dict[str, bytes]:
    """The member files of a sample dir. A file over `max_member_bytes` (default
    MAX_MEMBER_BYTES) is not read: `__error__` carries the reason (`decode_sample` fails it)."""
    cap = MAX_MEMBER_BYTES if max_member_bytes is None else max_member_bytes
    members: dict[str, bytes] = {}
    for path in sorted(storage.location(directory).iterdir(), key=lambda p: p.name):
        if path.is_file():
            suffix = "json" if path.name == SAMPLE_JSON else path.name
            size = path.stat().st_size
            if size > cap:
                members.setdefault("__error__", f"{path.name} is {size} bytes, over the cap of {cap}")
                members[suffix] = b""
                continue
            members[suffix] = path.read_bytes()
    return dict(ordered(members))


def read_sample_dir(directory: Path) -> EditSample:
    return decode_sample(read_members_dir(directory))
