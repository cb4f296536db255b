"""`--source parquet`: images in parquet rows (a file, or a directory of `.parquet` files).

The image column is `image_column` or found by type: a Hugging Face image struct
`{bytes, path}` (bytes first, else the path), a binary column of encoded bytes, or a string
column of paths, relative to the parquet file's folder and inside it: an absolute path or one that
leads outside (`../`, a symlink) is refused for that row alone, with a one-line reason, unless
the source option `allow_outside_root=true` (`--allow-outside-root`) is given. Keys are the `id`
(or `key`) column when it is present, complete and unique over all files, else `"<file>:<row>"`
(the file's path relative to the directory, the row within the file); keys come in file then row
order. `path` may be an object-store URL (`s3://bucket/data`, a prefix or one object): files are
read through range GETs (the footer, then a row group's columns), and path cells resolve against
the object's prefix.

`caption` (or `text`), `url` and `license` columns go into the item's meta. Regions given by
the rows — `boxes` (list of [x0, y0, x1, y1] in original pixels), `labels` (list of names),
`masks` (list of COCO RLE dicts, or their JSON text, at the original size: a mask of another
size is refused before it is decoded; at most `bounds.MAX_REGIONS` per row) — come as
`InventoryObject`s carried through the image's frame (`Frame`: the same scale and centre crop as
its pixels; a region the crop cuts away is dropped; producer "parquet").

Rows are read one row group at a time (the last few groups are cached, per process), never a
whole file for one row; a row group declaring more than `bounds.MAX_ROW_GROUP_BYTES` uncompressed
(over the columns read) is refused, for its rows, before it is read.
"""

from __future__ import annotations

import bisect
import threading
from collections import OrderedDict
from contextlib import contextmanager
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import bounds, rle
from pipeline.record import InventoryObject
from pipeline.sources.base import SOURCES, SourceError, SourceItem, path_inside
from pipeline.sources.decode import check_options, is_regular, mask_box, one_line, read_bytes, to_item
from pipeline.sources.frame import Frame
from pipeline.storage import fs_path, is_local, location, objects_under

KEY_COLUMNS = ("id", "key")
PATH_NAMES = ("image", "image_path", "path", "file", "file_name", "filename", "image_file")
META_COLUMNS = {"caption": ("caption", "text"), "url": ("url",), "license": ("license",)}
REGION_COLUMNS = ("boxes", "labels", "masks")
CACHED_GROUPS = 4  # row groups kept per process (a thread pool reads neighbouring keys)


@SOURCES.register("parquet")
class ParquetSource:
    name = "parquet"

    def __init__(self, *, path: str, resolution: int = 512, min_side: int = 32,
                 max_aspect: float = 4.0, image_column: str | None = None,
                 allow_outside_root: bool = False):
        check_options(resolution, min_side, max_aspect)
        self.allow_outside_root = bool(allow_outside_root)
        root = location(path)
        if not is_local(root) and root.is_dir():
            self.files = objects_under(root, ".parquet")
        elif root.is_dir():
            files = sorted(p for p in root.rglob("*.parquet") if p.is_file()
                           and not any(part.startswith(".") for part in p.relative_to(root).parts))
            self.files = {p.relative_to(root).as_posix(): p for p in files}
        elif root.is_file():
            self.files = {root.name: root}
        else:
            raise ValueError(f"parquet path does not exist: {path}")
        if not self.files:
            raise ValueError(f"no .parquet files in {path}")
        self.resolution = int(resolution)
        self.min_side = int(min_side)
        self.max_aspect = float(max_aspect)
        try:
            first = next(iter(self.files.values()))
            if is_local(first):
                schema = pq.read_schema(first)
            else:
                with open_parquet(first) as file:
                    schema = file.schema_arrow
        except (OSError, pa.ArrowException) as exc:
            raise ValueError(one_line(f"cannot read parquet schema of {path}: {exc}")) from None
        self.image_column, self.image_kind = _image_column(schema, image_column)
        names = {n.lower(): n for n in schema.names}
        self.key_column = next((names[c] for c in KEY_COLUMNS if c in names), None)
        self.meta_columns = {field: next((names[c] for c in options if c in names), None)
                             for field, options in META_COLUMNS.items()}
        self.region_columns = {c: names[c] for c in REGION_COLUMNS if c in names}
        self.columns = [self.image_column] + [c for c in self.meta_columns.values() if c] \
            + list(self.region_columns.values())
        self._keys: list[str] | None = None
        self._rows: dict[str, tuple[str, int]] | None = None  # id key → (file, row)
        self._groups: dict[str, list[int]] = {}  # file → first row of each row group
        self._cached: OrderedDict[tuple[str, int], pa.Table] = OrderedDict()  # recent groups
        self._lock = threading.Lock()  # the build reads keys from a thread pool

    def __getstate__(self) -> dict[str, Any]:  # workers rebuild lookups and caches lazily
        state = dict(self.__dict__)
        state.update(_keys=None, _rows=None, _groups={}, _cached=OrderedDict(), _lock=None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def keys(self) -> list[str]:
        if self._keys is None:
            self._build_keys()
        return list(self._keys or [])

    def _build_keys(self) -> None:
        ids: list[tuple[str, int, Any]] = []
        counts: dict[str, int] = {}
        for name, file in self.files.items():
            try:
                if self.key_column is not None and is_local(file):
                    values = pq.read_table(file, columns=[self.key_column]).column(0).to_pylist()
                elif self.key_column is not None:
                    with open_parquet(file) as opened:
                        values = opened.read(columns=[self.key_column]).column(0).to_pylist()
                if self.key_column is not None:
                    ids.extend((name, row, v) for row, v in enumerate(values))
                    counts[name] = len(values)
                else:
                    with open_parquet(file) as opened:
                        counts[name] = opened.metadata.num_rows
            except (OSError, pa.ArrowException, KeyError) as exc:
                raise ValueError(one_line(f"cannot read parquet file {file}: {exc}")) from None
        texts = [str(v) for _, _, v in ids]
        if ids and None not in (v for _, _, v in ids) and len(set(texts)) == len(texts):
            self._keys = texts
            self._rows = {t: (name, row) for t, (name, row, _) in zip(texts, ids)}
        else:
            self._keys = [f"{name}:{row}" for name, n in counts.items() for row in range(n)]
            self._rows = {}

    def _locate(self, key: str) -> tuple[str, int]:
        if self._rows is None:
            self._build_keys()
        rows = self._rows or {}
        if key in rows:
            return rows[key]
        name, sep, row = key.rpartition(":")
        if not rows and sep and name in self.files and row.isdigit():
            return name, int(row)
        raise SourceError(f"key not in this parquet source: {one_line(key)}")

    def read(self, key: str) -> SourceItem:
        name, row = self._locate(key)
        values = self._row(name, row)
        data = self._image_bytes(values.get(self.image_column), self.files[name].parent)
        meta = {field: bounds.clip_text(values[column], bounds.MAX_TEXT_CHARS)
                for field, column in self.meta_columns.items()
                if column is not None and values.get(column) not in (None, "")}
        item = to_item(data, resolution=self.resolution, min_side=self.min_side,
                       max_aspect=self.max_aspect, meta=meta)
        if self.region_columns:
            frame = Frame.fit(*item.meta["original_size"], self.resolution)
            item.objects = _regions(values, self.region_columns, frame)
        return item

    def _row(self, name: str, row: int) -> dict[str, Any]:
        try:
            if name not in self._groups:
                with open_parquet(self.files[name]) as opened:
                    metadata = opened.metadata
                starts, total = [], 0
                for g in range(metadata.num_row_groups):
                    starts.append(total)
                    total += metadata.row_group(g).num_rows
                starts.append(total)
                self._groups[name] = starts
            starts = self._groups[name]
            if not 0 <= row < starts[-1]:
                raise SourceError(f"row {row} is beyond {name}'s {starts[-1]} rows")
            group = bisect.bisect_right(starts, row) - 1
            with self._lock:
                table = self._cached.get((name, group))
                if table is not None:
                    self._cached.move_to_end((name, group))
            if table is None:
                with open_parquet(self.files[name]) as file:
                    try:
                        bounds.check_row_group(file.metadata, group, self.columns, name)
                    except bounds.OutOfBounds as exc:
                        raise SourceError(one_line(str(exc))) from None
                    table = file.read_row_group(group, columns=self.columns)
                with self._lock:
                    self._cached[(name, group)] = table
                    while len(self._cached) > CACHED_GROUPS:
                        self._cached.popitem(last=False)
            return table.slice(row - starts[group], 1).to_pylist()[0]
        except (OSError, pa.ArrowException, KeyError) as exc:
            raise SourceError(one_line(f"cannot read row {row} of {name}: {exc}")) from None

    def _image_bytes(self, value: Any, folder: Any) -> bytes:
        if value is None:
            raise SourceError("row has no image")
        if self.image_kind == "struct":
            if value.get("bytes"):
                value = value["bytes"]
                if len(value) > bounds.MAX_CELL_BYTES:
                    raise SourceError(f"image cell is {len(value):,} bytes, over the limit of "
                                      f"{bounds.MAX_CELL_BYTES:,}")
                return bytes(value)
            value = value.get("path")
            if not value:
                raise SourceError("image struct has neither bytes nor path")
        if isinstance(value, (bytes, bytearray, memoryview)):
            if len(value) > bounds.MAX_CELL_BYTES:
                raise SourceError(f"image cell is {len(value):,} bytes, over the limit of "
                                  f"{bounds.MAX_CELL_BYTES:,}")
            return bytes(value)
        if "://" in str(value):
            raise SourceError(f"URLs are not fetched (no network): {one_line(str(value))}")
        path = path_inside(str(value), folder, allow_outside_root=self.allow_outside_root,
                           what="the parquet file's folder")
        if not path.exists():
            raise SourceError(f"file not found: {one_line(str(value))}")
        if not is_regular(path):
            raise SourceError("not a regular file")
        return read_bytes(path)


@contextmanager
def open_parquet(file: Any) -> Iterator[pq.ParquetFile]:
    """A parquet file open for reading. On an object store: an fsspec file with no read-ahead
    cache, so each of pyarrow's reads (the footer, a row group's column chunks) is one range GET
    of what it asks for."""
    if is_local(file):
        yield pq.ParquetFile(file)
        return
    fs, name = fs_path(file)
    with fs.open(name, "rb", cache_type="none") as handle:
        yield pq.ParquetFile(handle)


def _image_column(schema: pa.Schema, chosen: str | None) -> tuple[str, str]:
    """(column, kind) with kind "struct" (HF image), "binary" or "path"."""

    def kind(t: pa.DataType) -> str | None:
        if pa.types.is_struct(t) and t.get_field_index("bytes") >= 0:
            return "struct"
        if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t):
            return "binary"
        if pa.types.is_string(t) or pa.types.is_large_string(t):
            return "path"
        return None

    if chosen is not None:
        if chosen not in schema.names:
            raise ValueError(f"image_column {chosen!r} is not a column; columns: "
                             f"{', '.join(schema.names)}")
        found = kind(schema.field(chosen).type)
        if found is None:
            raise ValueError(f"image_column {chosen!r} has type {schema.field(chosen).type}, "
                             f"not an image struct, binary or path string")
        return chosen, found
    fields = list(schema)
    for wanted in ("struct", "binary"):
        for f in sorted(fields, key=lambda f: f.name.lower() != "image"):
            if kind(f.type) == wanted:
                return f.name, wanted
    for name in PATH_NAMES:
        for f in fields:
            if f.name.lower() == name and kind(f.type) == "path":
                return f.name, "path"
    raise ValueError(f"no image column found (an image struct, a binary column or a path column "
                     f"named one of {', '.join(PATH_NAMES)}); columns: {', '.join(schema.names)}; "
                     f"name one with image_column=")


def _regions(values: dict[str, Any], columns: dict[str, str], frame: Frame) -> list[InventoryObject]:
    """The row's regions (in the original pixels) carried through the image's `frame`."""
    boxes = values.get(columns.get("boxes", "")) or []
    labels = values.get(columns.get("labels", "")) or []
    masks = values.get(columns.get("masks", "")) or []
    original = frame.original
    objects: list[InventoryObject] = []
    for column, values_of in (("boxes", boxes), ("labels", labels), ("masks", masks)):
        if not isinstance(values_of, (list, tuple)):
            raise SourceError(f"the {column} cell is not a list ({type(values_of).__name__})")
        if len(values_of) > bounds.MAX_REGIONS:
            raise SourceError(f"the {column} cell holds {len(values_of):,} regions, over the "
                              f"limit of {bounds.MAX_REGIONS:,}")
    # a mask's JSON text is at most its runs' text (`bounds.MAX_RLE_GROUPS` per run) plus a little
    json_bytes = bounds.MAX_RLE_GROUPS * (original[0] * original[1] + 1) + 4096
    for i in range(max(len(boxes), len(masks))):
        try:
            mask = None
            if i < len(masks) and masks[i] is not None:
                given = bounds.json_value(masks[i], what=f"mask {i}", max_bytes=json_bytes) \
                    if isinstance(masks[i], (str, bytes)) else masks[i]
                # a mask is never bigger than its image: its size must be the image's
                full = rle.decode(given, expected=(original[1], original[0]))
                mask = frame.mask(full)
            box = mask_box(mask) if mask is not None else None
            if mask is None and i < len(boxes) and boxes[i] is not None:
                if len(boxes[i]) != 4:
                    raise ValueError(f"box has {len(boxes[i])} numbers, not 4")
                box = frame.box([bounds.finite(v, 'a box coordinate') for v in boxes[i]])
        except (ValueError, TypeError, KeyError) as exc:
            raise SourceError(one_line(f"region {i} is unreadable: {exc}")) from None
        if box is None or box[2] <= box[0] or box[3] <= box[1]:
            continue  # empty, cropped away, or vanished at this resolution
        label = bounds.clip_text(labels[i]) if i < len(labels) and labels[i] is not None else "object"
        objects.append(InventoryObject(id=len(objects), label=label, box=box, mask=mask,
                                       confidence=1.0, producer="parquet"))
    return objects
