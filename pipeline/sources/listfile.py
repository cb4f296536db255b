"""`--source list`: a text or csv file naming the images.

A `.txt` list holds one image path per line (blank lines and `#` comments skipped). A `.csv`
(or `.tsv`) list has a header with a `path` column (or `image` / `file`) and optionally
`caption` (or `text`), `url` and `license` columns, which are kept in the item's meta. Paths
resolve against the list file's folder and must stay inside it: an absolute path, a `~` path or
one that leads outside (`../`, a symlink) is refused for that item alone, with a one-line reason,
unless the source option `allow_outside_root=true` (`--allow-outside-root`) is given. Keys are
the paths as written, in file order; a path listed twice is read once (its first row wins). URLs
are not fetched.

The list file may be an object-store URL (`s3://bucket/lists/a.csv`): its rows are then keys
relative to its prefix (`..` may not climb above it), and a row that is itself an object-store URL
is read like an absolute path, only with `allow_outside_root`.
"""

from __future__ import annotations

import csv
from typing import Any
from urllib.parse import urlsplit

from pipeline import bounds
from pipeline.sources.base import SOURCES, SourceError, SourceItem, path_inside
from pipeline.sources.decode import check_options, is_regular, one_line, read_bytes, to_item
from pipeline.storage import is_url, location

PATH_COLUMNS = ("path", "image", "file")
META_COLUMNS = {"caption": ("caption", "text"), "url": ("url",), "license": ("license",)}


@SOURCES.register("list")
class ListSource:
    name = "list"

    def __init__(self, *, path: str, resolution: int = 512, min_side: int = 32,
                 max_aspect: float = 4.0, allow_outside_root: bool = False):
        check_options(resolution, min_side, max_aspect)
        self.allow_outside_root = bool(allow_outside_root)
        self.path = location(path)
        if not self.path.is_file():
            raise ValueError(f"list file does not exist: {path}")
        self.base = self.path.parent
        self.resolution = int(resolution)
        self.min_side = int(min_side)
        self.max_aspect = float(max_aspect)
        self._rows = _parse(self.path)

    def keys(self) -> list[str]:
        return list(self._rows)

    def read(self, key: str) -> SourceItem:
        if key not in self._rows:
            raise SourceError(f"key not in the list: {one_line(key)}")
        if ("://" in key and not is_url(key)) or urlsplit(key).scheme in ("http", "https"):
            raise SourceError(f"URLs are not fetched (no network): {one_line(key)}")
        # an object-store URL (s3://...) is read like an absolute path: only with the flag
        path = path_inside(key, self.base, allow_outside_root=self.allow_outside_root)
        if not path.exists():
            raise SourceError(f"file not found: {one_line(key)}")
        if not is_regular(path):
            raise SourceError("not a regular file")
        return to_item(read_bytes(path), resolution=self.resolution, min_side=self.min_side,
                       max_aspect=self.max_aspect, meta=dict(self._rows[key]))


def _parse(path: Any) -> dict[str, dict[str, Any]]:
    """{image path as written: meta} in file order, first occurrence kept."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(one_line(f"cannot read list file {path}: {exc}")) from None
    rows: dict[str, dict[str, Any]] = {}
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".tsv"):
        for line in text.splitlines():
            entry = line.strip()
            if entry and not entry.startswith("#"):
                rows.setdefault(entry, {})
        return rows
    reader = csv.DictReader(text.splitlines(), delimiter="\t" if suffix == ".tsv" else ",")
    columns = {name.strip().lower(): name for name in reader.fieldnames or [] if name}
    path_column = next((columns[c] for c in PATH_COLUMNS if c in columns), None)
    if path_column is None:
        raise ValueError(f"list file {path} has no path column (one of: {', '.join(PATH_COLUMNS)}); "
                         f"its columns: {', '.join(columns.values()) or 'none'}")
    meta_columns = {field: next((columns[c] for c in names if c in columns), None)
                    for field, names in META_COLUMNS.items()}
    for row in reader:
        entry = (row.get(path_column) or "").strip()
        if not entry or entry.startswith("#") or entry in rows:
            continue
        rows[entry] = {field: bounds.clip_text(row[column], bounds.MAX_TEXT_CHARS)
                       for field, column in meta_columns.items()
                       if column is not None and row.get(column) not in (None, "")}
    return rows
