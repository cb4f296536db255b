"""The importer seat: a reader over a published edit dataset's sessions.

An importer lists the dataset's sessions once (`sessions()`: session key → the turn indices
present, read from the cheap columns only, no image decoded) and reads one session at a time
(`read(key)` → `RawSession`: its turns in order with their texts and *undecoded* image and mask
bytes). Decoding, the checks of a turn chain and the region of each turn are shared by every
format and live in `pipeline.importers.assemble`; a format module only knows its files.

Session keys are `"{split}/{dataset id}"` (or the dataset id where a dataset has no splits), so
the build's key list (`OUT/source_index.parquet`) is stable and every work unit is a slice of
sorted session keys, as for any source.
"""

from __future__ import annotations

import posixpath
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import bounds
from pipeline.registry import Registry
from pipeline.sources.base import SourceError
from pipeline.sources.decode import one_line, read_bytes
from pipeline.sources.parquet import open_parquet
from pipeline.storage import is_local, is_url, location, objects_under, show

# Mask encodings a dataset may use (what `assemble.decode_mask` understands):
#   "alpha"  an RGBA "masked image": transparent pixels (alpha < 128) are the edited region
#            (MagicBrush, the DALL-E 2 convention); an image without alpha falls back to "white"
#   "white"  a mask image whose white (>= 128 grey) pixels are the edited region (UltraEdit)
#   "rle"    COCO RLE {"size": [h, w], "counts": str | list} (ImgEdit, generic jsonl)
MASK_KINDS = ("alpha", "white", "rle")


@dataclass
class MaskSpec:
    kind: str  # one of MASK_KINDS
    data: Any  # image bytes, or an RLE dict


@dataclass
class RawTurn:
    index: int  # 1-based position in the session, as the dataset numbers it
    turn_id: str  # the dataset's own id of this turn (row id, file name, turn index)
    instruction: str | None
    target: Callable[[], bytes]  # this turn's output image bytes (raises SourceError)
    source: Callable[[], bytes] | None = None  # this turn's input image bytes, if the row has one
    mask: Callable[[], MaskSpec | None] | None = None  # this turn's region, if the dataset gives one


@dataclass
class RawObject:
    """An object the dataset segmented on the session's first image (ImgEdit's recap masks)."""

    label: str
    rle: dict[str, Any]  # COCO RLE at the original image size
    score: float = 1.0


@dataclass
class RawSession:
    key: str
    dataset: str
    source_id: str  # the dataset's own id of the session (MagicBrush img_id, UltraEdit idx, ...)
    split: str | None
    license: str
    turns: list[RawTurn]
    objects: list[RawObject] = field(default_factory=list)


class Importer(Protocol):
    name: str  # the dataset's name, written to provenance["dataset"]
    license: str

    def sessions(self) -> dict[str, list[int]]:
        """Session key → the turn indices present (in any order, repeats kept)."""
        ...

    def read(self, key: str) -> RawSession:
        ...


IMPORTERS: Registry[Importer] = Registry("import format", (
    "pipeline.importers.magicbrush",
    "pipeline.importers.ultraedit",
    "pipeline.importers.imgedit",
    "pipeline.importers.generic",
))


def session_key(split: str | None, source_id: str) -> str:
    return f"{split}/{source_id}" if split else str(source_id)


# ---- helpers the formats share -------------------------------------------------------------------

def listed_turn(value: Any) -> Any:
    """A turn index as a dataset row gives it, for `sessions()`: an int within 1..MAX_TURN (a
    numeric string or an integral float included) when it is one, else the value as it came —
    never an error while listing: `assemble.check_chain` refuses that session alone, with a
    one-line reason, when it is read (`Infinity`, `1e30`, a 22-digit integer, None, a list)."""
    if isinstance(value, str) and value.strip().lstrip("-").isdigit() and len(value) < 20:
        value = int(value)
    try:
        return bounds.turn_index(value)
    except bounds.OutOfBounds:
        return value


def parquet_files(path: str | Path, suffix: str = ".parquet") -> dict[str, Any]:
    """{path relative to `path`: file} of the parquet files under `path` (or `path` itself); `path`
    may be an object-store URL (a prefix or one object)."""
    root = location(path)
    if root.is_file():
        return {root.name: root}
    if not root.is_dir():
        raise ValueError(f"input path does not exist: {path}")
    if not is_local(root):
        objects = objects_under(root, suffix)
        if not objects:
            raise ValueError(f"no {suffix} files under {path}")
        return objects
    files = sorted(p for p in root.rglob(f"*{suffix}") if p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    if not files:
        raise ValueError(f"no {suffix} files under {path}")
    return {p.relative_to(root).as_posix(): p for p in files}


def input_folder(path: str | Path) -> Any:
    """The folder an importer's relative image paths resolve against: `path` if it is a folder
    (a prefix), else its parent."""
    root = location(path)
    return root if root.is_dir() else root.parent


def hf_split(file_name: str) -> str:
    """The split of a Hugging Face parquet shard: `data/train-00000-of-00051.parquet` → train."""
    return Path(file_name).name.split("-", 1)[0].split(".", 1)[0]


def split_parquet_files(path: str | Path, split: str | None, dataset: str) -> dict[str, Path]:
    """The Hugging Face parquet shards under `path`, those of `split` only when one is given."""
    files = parquet_files(path)
    if split is not None:
        files = {n: p for n, p in files.items() if hf_split(n) == split}
        if not files:
            raise ValueError(f"no {dataset} parquet shards of split {split!r} under {path}")
    return files


class RowReader:
    """Reads single rows of parquet files one row group at a time (the last few cached per
    process), never a whole file for one row."""

    CACHED_GROUPS = 4

    def __init__(self, files: dict[str, Path]):
        self.files = files
        self._offsets: dict[str, list[int]] = {}
        self._cache: OrderedDict[tuple[str, int], pa.Table] = OrderedDict()
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        return {"files": self.files}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["files"])

    def columns(self, name: str, columns: list[str]) -> pa.Table:
        """Only `columns` of a whole file (the cheap listing columns)."""
        try:
            if is_local(self.files[name]):
                return pq.read_table(self.files[name], columns=columns)
            with open_parquet(self.files[name]) as file:
                return file.read(columns=columns)
        except (OSError, pa.ArrowException, KeyError) as exc:
            raise ValueError(one_line(f"cannot read {name}: {exc}")) from None

    def schema(self, name: str) -> pa.Schema:
        """A file's schema, from its footer alone."""
        if is_local(self.files[name]):
            return pq.read_schema(self.files[name])
        with open_parquet(self.files[name]) as file:
            return file.schema_arrow

    def row(self, name: str, row: int) -> dict[str, Any]:
        try:
            with self._lock:
                offsets = self._offsets.get(name)
                if offsets is None:
                    with open_parquet(self.files[name]) as file:
                        meta = file.metadata
                    offsets = [0]
                    for g in range(meta.num_row_groups):
                        offsets.append(offsets[-1] + meta.row_group(g).num_rows)
                    self._offsets[name] = offsets
                group = next(g for g in range(len(offsets) - 1) if offsets[g] <= row < offsets[g + 1])
                table = self._cache.get((name, group))
                if table is None:
                    with open_parquet(self.files[name]) as file:
                        try:
                            bounds.check_row_group(file.metadata, group, None, name)
                        except bounds.OutOfBounds as exc:
                            raise SourceError(one_line(str(exc))) from None
                        table = file.read_row_group(group)
                    self._cache[(name, group)] = table
                    while len(self._cache) > self.CACHED_GROUPS:
                        self._cache.popitem(last=False)
                else:
                    self._cache.move_to_end((name, group))
            return table.slice(row - offsets[group], 1).to_pylist()[0]
        except (OSError, pa.ArrowException, StopIteration) as exc:
            raise SourceError(one_line(f"cannot read row {row} of {name}: {exc}")) from None


def image_value_bytes(value: Any, folder: Any = None) -> bytes:
    """Bytes of a Hugging Face image value: the struct `{bytes, path}` (bytes first, else the path
    relative to `folder`), raw bytes, or a path string. SourceError when there is none."""
    if isinstance(value, dict):
        if value.get("bytes"):
            value = value["bytes"]
        else:
            value = value.get("path")
    if isinstance(value, (bytes, bytearray)):
        if not value:
            raise SourceError("empty image bytes")
        if len(value) > bounds.MAX_CELL_BYTES:
            raise SourceError(f"image cell is {len(value):,} bytes, over the limit of "
                              f"{bounds.MAX_CELL_BYTES:,}")
        return bytes(value)
    if isinstance(value, str) and value:
        return file_bytes(value, folder)
    raise SourceError("the row holds no image")


def file_bytes(relative: str, folder: Any) -> bytes:
    """A file named by a dataset row, resolved inside `folder` (never outside it)."""
    if folder is None:
        raise SourceError(f"image {relative!r} is a path but no image folder is known")
    if not is_local(folder):  # a bucket has no symlinks: inside is a matter of the key alone
        normal = posixpath.normpath(relative)
        if normal.startswith(("/", "~")) or normal == ".." or normal.startswith("../") \
                or is_url(relative):
            raise SourceError(f"image path {relative!r} leads outside {show(folder)}")
        return read_bytes(folder / normal)
    root = Path(folder).resolve()
    path = (root / relative).resolve()
    if root != path and root not in path.parents:
        raise SourceError(f"image path {relative!r} leads outside {root}")
    return read_bytes(path)
