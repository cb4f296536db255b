"""The source seat: a reader over stable keys.

A source lists its keys once, in a stable order (`keys()`), and reads one key at a time
(`read(key)`). A build's work units are slices of that key list, so resume, determinism and
"same parameters → same manifest" hold whatever the source. A generator source (procedural
scenes) has no list: `keys()` returns None and every non-negative integer is a key.

`read` returns the image already decoded to RGB uint8 at the build's resolution with what the
source knows about it: the file is scaled uniformly to a short side of `resolution` and its long
side centre-cropped to a multiple of 64 (`pipeline.sources.frame.Frame`: never stretched, never
padded), and a file source records `original_size` and `crop` (the window of the file the sample
shows) in the item's meta, which `new_sample` copies into the provenance. An unreadable item
raises `SourceError` with a one-line reason, and the build quarantines that item alone.
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import numpy as np

from pipeline import __version__
from pipeline.record import EditSample, InventoryObject, sample_id
from pipeline.registry import Registry
from pipeline.storage import is_local, is_url, location


class SourceError(ValueError):
    """This item cannot be read (corrupt, too small, a bomb, ...): the reason is one line.
    `context` is what the source still knows about the item (e.g. an import's dataset, split,
    license, instructions, failed turn): the quarantined record keeps it as its `source_meta`
    (`pipeline.unit.read_sample`)."""

    def __init__(self, *args: Any, context: dict[str, Any] | None = None):
        super().__init__(*args)
        self.context: dict[str, Any] = dict(context or {})


OUTSIDE_ROOT_HINT = "pass --allow-outside-root to read it"


def path_inside(written: str, root: Path, *, allow_outside_root: bool = False,
                what: str = "the list file's folder") -> Path:
    """The file a source row names, resolved against `root` (the list or parquet file's folder).
    SourceError (one line, the row's path as written) for an absolute path, a `~` path or one
    whose resolved location (symlinks followed) is outside `root`, unless `allow_outside_root`
    (`--allow-outside-root`, or the source option `allow_outside_root=true`) is given."""
    shown = " ".join(str(written).split())[:160]
    if not is_local(root) or is_url(str(written)):
        return _object_inside(str(written), root, shown, allow_outside_root, what)
    path = Path(written)
    if allow_outside_root:
        path = path.expanduser()
        return path if path.is_absolute() else root / path
    if path.is_absolute() or str(written).startswith("~"):
        raise SourceError(f"absolute path refused: {shown} is not relative to {what} "
                          f"({OUTSIDE_ROOT_HINT})")
    inside = Path(os.path.realpath(root))
    resolved = Path(os.path.realpath(inside / path))
    if not resolved.is_relative_to(inside):
        raise SourceError(f"path refused: {shown} leads outside {what} ({OUTSIDE_ROOT_HINT})")
    return resolved


def _object_inside(written: str, root: Any, shown: str, allow_outside_root: bool,
                   what: str) -> Any:
    """`path_inside` where the root or the row is an object-store URL. A bucket has no symlinks,
    so "inside" is a matter of the key alone: `..` that climbs above the root, an absolute key
    or a URL leaves it. An http(s) URL is never fetched (no network), whatever the flag."""
    if urlsplit(written).scheme in ("http", "https"):
        raise SourceError(f"URLs are not fetched (no network): {shown}")
    if is_url(written):
        if not allow_outside_root:
            raise SourceError(f"absolute URL refused: {shown} is not relative to {what} "
                              f"({OUTSIDE_ROOT_HINT})")
        return location(written)
    if written.startswith(("/", "~")):  # a path on this machine, named from a bucket's list
        if allow_outside_root:
            return Path(written).expanduser()
        raise SourceError(f"absolute path refused: {shown} is not relative to {what} "
                          f"({OUTSIDE_ROOT_HINT})")
    normal = posixpath.normpath(written)
    if normal == ".." or normal.startswith("../"):
        if not allow_outside_root:
            raise SourceError(f"path refused: {shown} leads outside {what} ({OUTSIDE_ROOT_HINT})")
        parent = root
        while normal == ".." or normal.startswith("../"):
            parent, normal = parent.parent, normal[3:]
        return parent / normal if normal else parent
    if normal in ("", "."):
        raise SourceError(f"path names {what} itself: {shown}")
    return root / normal


@dataclass
class SourceItem:
    image: np.ndarray  # uint8 HxWx3 at the build's resolution
    meta: dict[str, Any] = field(default_factory=dict)  # caption, url, license, decode notes
    objects: list[InventoryObject] | None = None  # regions the source knows (given/exact)
    private: dict[str, Any] = field(default_factory=dict)  # e.g. the procedural scene graph


class Source(Protocol):
    """A source class may say which grounder and editor suit its images (`default_grounder`,
    `default_editor`) and that it generates images rather than listing them (`generator`)."""

    name: str

    def keys(self) -> list[str] | None:
        """Every key, in a stable order; None for a generator source (any index is a key)."""
        ...

    def read(self, key: str) -> SourceItem:
        ...


SOURCES: Registry[Source] = Registry("source", (
    "pipeline.sources.procedural",
    "pipeline.sources.folder",
    "pipeline.sources.listfile",
    "pipeline.sources.webdataset",
    "pipeline.sources.parquet",
    "pipeline.importers.seats",  # source "import": an edit dataset's sessions
))


# What a source of photographs gets unless its class says otherwise.
DEFAULT_GROUNDER = "classical"
DEFAULT_EDITOR = "photo"


def defaults_of(source_class: type) -> tuple[str, str]:
    """(grounder, editor) a build uses for this source when none is named."""
    return (getattr(source_class, "default_grounder", DEFAULT_GROUNDER),
            getattr(source_class, "default_editor", DEFAULT_EDITOR))


def new_sample(item: SourceItem, source: str, seed: int, key: str, index: int,
                edit_index: int = 0) -> EditSample:
    """The first form of a record: what source `source` read for `key`."""
    sample = EditSample(id=sample_id(seed, key, edit_index), index=index, seed=seed,
                        source_key=key, edit_index=edit_index, source=item.image,
                        source_meta=dict(item.meta), objects=list(item.objects or []),
                        private=dict(item.private))
    sample.provenance = {"source": source, "source_id": key, "seed": seed,
                         "code_version": __version__}
    for name in ("license", "url", "caption", "original_size", "crop"):
        if item.meta.get(name) is not None:
            sample.provenance[name] = item.meta[name]
    return sample

