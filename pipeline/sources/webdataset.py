"""`--source webdataset`: tar shards as img2dataset writes them (`KEY.jpg` + `KEY.json`/`KEY.txt`).

`path` is one `.tar` file or a directory of `.tar` shards (sorted by name), on disk or on an object
store (`s3://bucket/shards`, or one `.tar` object): an object is read by seeking, through range
GETs, one open file per shard per process. A sample's key is
`"<shard stem>/<KEY>"`, in shard then member order, where KEY is the member name up to the first
dot of its base name (the webdataset convention: `a/b.c.jpg` is key `a/b`, extension `c.jpg`).
Every key that has a regular member is listed; one without an image member reads as a
`SourceError`. A damaged shard (truncated, compressed, not a tar, garbage between members) keeps
every sample its readable headers list — the listing resumes at the next valid header after
garbage — plus one key `"<shard stem>/#damaged"` that reads as a `SourceError` naming each damaged
byte range and the member before it, so the manifest shows what the damage cost. The caption comes from `KEY.txt` or the json's `caption`; `url` and `license`
from the json.

Shards are plain (uncompressed) tars, read by seeking: each shard's member offsets are indexed
once per process, lazily, from the headers alone, by `pipeline.dataset.tarscan` (an extended
header over 64 KiB is never read; no declared size is trusted past the file's end). A member whose
header says it is larger than `max_member_bytes`, or a sparse one, is refused without reading it.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections import OrderedDict
from typing import Any

from pipeline.dataset.tarscan import TarDamage, scan_tar
from pipeline.sources.base import SOURCES, SourceError, SourceItem
from pipeline.sources.decode import check_options, one_line, to_item
from pipeline.storage import fs_path, is_local, location

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif")
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)[.]([^/]*)$")

# Object-store shards: listing reads headers through a 1 MiB read-ahead (many small members a
# GET); a member read fetches the member plus 64 KiB, which holds the json/txt beside it.
SCAN_BLOCK_BYTES = 1024 * 1024
MEMBER_BLOCK_BYTES = 64 * 1024
OPEN_SHARDS = 16  # open shard objects kept per process (the least recently read is dropped)

DAMAGED = "#damaged"  # the key that accounts for what a damaged shard's headers hid

# {key: {extension: (data offset, size, why it is refused or None)}} for one shard, in member order
ShardIndex = dict[str, dict[str, tuple[int, int, str | None]]]


@SOURCES.register("webdataset")
class WebDatasetSource:
    name = "webdataset"

    def __init__(self, *, path: str, resolution: int = 512, min_side: int = 32,
                 max_aspect: float = 4.0, max_member_bytes: int = 64 * 1024 * 1024):
        check_options(resolution, min_side, max_aspect)
        root = location(path)
        if not is_local(root) and root.is_dir():  # a bucket prefix: its .tar objects, one listing
            fs, prefix = fs_path(root)
            names = sorted(info["name"].rstrip("/").rsplit("/", 1)[-1]
                           for info in fs.ls(prefix, detail=True) if info.get("type") == "file")
            shards = [root / n for n in names if n.endswith(".tar") and not n.startswith(".")]
        elif root.is_dir():
            shards = sorted(p for p in root.glob("*.tar") if p.is_file() and not p.name.startswith("."))
        elif root.is_file():
            shards = [root]
        else:
            raise ValueError(f"webdataset path does not exist: {path}")
        if not shards:
            raise ValueError(f"no .tar shards in {path}")
        self.shards = {p.stem: p for p in shards}
        if len(self.shards) != len(shards):
            raise ValueError(f"two shards in {path} share a name")
        self.resolution = int(resolution)
        self.min_side = int(min_side)
        self.max_aspect = float(max_aspect)
        self.max_member_bytes = int(max_member_bytes)
        self._index: dict[str, tuple[ShardIndex, str | None]] = {}  # shard → (index, damage)
        self._open: OrderedDict[str, tuple[Any, threading.Lock]] = OrderedDict()  # shard → file, lock
        self._lock = threading.Lock()  # guards `_open` (keys are read from threads)

    def __getstate__(self) -> dict[str, Any]:  # each worker indexes the shards it reads
        state = dict(self.__dict__)
        state.update(_index={}, _open=OrderedDict(), _lock=None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def keys(self) -> list[str]:
        keys = []
        for shard in self.shards:
            # not kept: the driver lists every shard and reads none, so caching each shard's
            # member offsets would cost it ≈ 0.7 KiB a key (a reader indexes its shards lazily)
            index, damage = self._index.get(shard) or _index_shard(self.shards[shard])
            keys.extend(f"{shard}/{key}" for key in index)
            if damage is not None:  # the rest of the shard still gets a manifest row
                keys.append(f"{shard}/{DAMAGED}")
        return keys

    def read(self, key: str) -> SourceItem:
        shard, _, sample = key.partition("/")
        if shard not in self.shards or not sample:
            raise SourceError(f"key names no shard of this source: {one_line(key)}")
        index, damage = self._shard(shard)
        if sample == DAMAGED and damage is not None:
            raise SourceError(damage)
        members = index.get(sample)
        if members is None:
            raise SourceError(f"no sample {one_line(sample)} in shard {shard}")
        image_ext = next((e for e in IMAGE_EXTENSIONS if e in members), None)
        if image_ext is None:
            raise SourceError(f"sample has no image member (has: {', '.join(sorted(members))})")
        path = self.shards[shard]
        if is_local(path):
            with open(path, "rb") as f:
                data = self._member(f, sample, image_ext, members)
                meta = self._meta(f, sample, members)
        else:
            with self._lock:  # one open object per shard: a member is one or two range GETs
                if shard not in self._open:
                    self._open[shard] = (_open_object(path, MEMBER_BLOCK_BYTES), threading.Lock())
                    while len(self._open) > OPEN_SHARDS:  # each holds its last read: bounded
                        self._open.popitem(last=False)  # (its reader, if any, keeps its own ref)
                self._open.move_to_end(shard)
                f, lock = self._open[shard]
            with lock:  # its seek and reads go together; other shards are read meanwhile
                data = self._member(f, sample, image_ext, members)
                meta = self._meta(f, sample, members)
        return to_item(data, resolution=self.resolution, min_side=self.min_side,
                       max_aspect=self.max_aspect, meta=meta)

    def _member(self, f: Any, sample: str, ext: str, members: dict[str, tuple[int, int, str | None]]) -> bytes:
        offset, size, refused = members[ext]
        if refused is not None:
            raise SourceError(one_line(f"tar member {sample}.{ext} is refused unread: {refused}"))
        if size > self.max_member_bytes:
            raise SourceError(f"tar member {sample}.{ext} is {size:,} bytes, over "
                              f"max_member_bytes {self.max_member_bytes:,}")
        f.seek(offset)
        data = f.read(size)
        if len(data) != size:
            raise SourceError(f"tar member {sample}.{ext} is truncated "
                              f"({len(data):,} of {size:,} bytes)")
        return data

    def _meta(self, f: Any, sample: str, members: dict[str, tuple[int, int, str | None]]) -> dict[str, Any]:
        meta: dict[str, Any] = {}
        if "json" in members:
            try:
                info = json.loads(self._member(f, sample, "json", members))
            except ValueError as exc:
                raise SourceError(one_line(f"{sample}.json is not json: {exc}")) from None
            if isinstance(info, dict):
                for field in ("caption", "url", "license"):
                    if info.get(field) not in (None, ""):
                        meta[field] = info[field]
        if "txt" in members:
            caption = self._member(f, sample, "txt", members).decode("utf-8", "replace").strip()
            if caption:
                meta["caption"] = caption
        return meta

    def _shard(self, shard: str) -> tuple[ShardIndex, str | None]:
        if shard not in self._index:
            self._index[shard] = _index_shard(self.shards[shard])
        return self._index[shard]


def _open_object(path: Any, block_size: int) -> Any:
    """A shard on an object store open for seek/read: a read-ahead cache of `block_size` past each
    read, so a member and the small json/txt members after it come in one range GET."""
    fs, name = fs_path(path)
    return fs.open(name, "rb", block_size=block_size, cache_type="readahead")


def _index_shard(path: Any) -> tuple[ShardIndex, str | None]:
    """The shard's samples from its headers alone (`tarscan.scan_tar`: every declared size is
    bounded before anything is read), and what damage it found (None). Garbage between members is
    reported and the listing resumes at the next valid header, so the samples after it are kept."""
    index: ShardIndex = {}
    damages: list[str] = []
    before = 0  # samples listed before the first damage
    try:
        with (open(path, "rb") if is_local(path) else _open_object(path, SCAN_BLOCK_BYTES)) as handle:
            for member in scan_tar(handle):
                if isinstance(member, TarDamage):
                    before = len(index) if not damages else before
                    damages.append(member.reason)
                    continue
                if not member.isreg():
                    continue
                name = member.name[2:] if member.name.startswith("./") else member.name
                if name.rsplit("/", 1)[-1].startswith("."):
                    continue
                match = _KEY_EXT.match(name)
                if match is None:
                    continue
                key, ext = match.group(1), match.group(2).lower()
                # a sparse member, or one whose extended header was refused, is listed but never read
                index.setdefault(key, {}).setdefault(ext, (member.offset_data, member.size, member.error))
    except OSError as exc:
        before = len(index) if not damages else before
        damages.append(f"unreadable: {exc}")
    if not damages:
        return index, None
    # The damage is one more key, whose manifest row carries the reasons.
    shown = "; ".join(damages[:3]) + (f"; and {len(damages) - 3} more" if len(damages) > 3 else "")
    damage = one_line(f"shard {path.name} is damaged after {before} samples ({len(index)} listed; "
                      f"a plain tar is needed): {shown}")
    log.warning("webdataset %s", damage)
    return index, damage
