"""`--source folder`: every file under a directory, recursively, keyed by its relative path.

Keys are the sorted POSIX paths, relative to the folder, of every non-hidden regular file and
symlink (hidden names — `.DS_Store`, `.git/` — are skipped, directories are walked, symlinked
directories are not entered, FIFOs and devices are skipped). `path` may be an object-store prefix
(`s3://bucket/photos`): its objects are listed once (`fs.find`), keyed the same way, and each is
read with one ranged GET. A file that is not an image is still
a key, so it gets a manifest row: it reads as `SourceError("not an image (.txt)")`. A symlink is
followed only when it resolves inside the folder.

With `annotations=` (a COCO instances json; `file_name` relative to the folder), the regions it
gives for an image come with the item as `InventoryObject`s carried through the image's frame
(`Frame`: the same scale and centre crop as its pixels; producer "coco"; the mask rasterised from
polygons or decoded from RLE — whose `size` must be the image entry's, checked before decoding —
and brought to the sample's size, the box that of that mask, or the
carried `bbox` when there is no segmentation; a region the crop cuts away is dropped): what
`--grounder given` hands the composer. An image the file does not mention has no objects.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from pipeline import bounds, rle
from pipeline.record import InventoryObject
from pipeline.sources.base import SOURCES, SourceError, SourceItem
from pipeline.sources.decode import (IMAGE_SUFFIXES, check_options, is_regular, mask_box, one_line,
                                     read_bytes, to_item)
from pipeline.sources.frame import Frame
from pipeline.storage import fs_path, is_local, is_url, location, objects_under

log = logging.getLogger(__name__)


@SOURCES.register("folder")
class FolderSource:
    name = "folder"

    def __init__(self, *, path: str, resolution: int = 512, min_side: int = 32,
                 max_aspect: float = 4.0, annotations: str | None = None):
        check_options(resolution, min_side, max_aspect)
        self.root = location(path)
        if not self.root.is_dir():
            raise ValueError(f"source folder does not exist or is not a directory: {path}")
        # a bucket has no symlinks to follow (and no resolve()): the root is its own resolution
        self.root_resolved = self.root.resolve() if is_local(self.root) else self.root
        self.resolution = int(resolution)
        self.min_side = int(min_side)
        self.max_aspect = float(max_aspect)
        self.annotations = _locate(annotations, self.root) if annotations else None
        self._coco: CocoIndex | None = None

    def __getstate__(self) -> dict[str, Any]:  # workers rebuild the COCO index lazily
        state = dict(self.__dict__)
        state["_coco"] = None
        return state

    def keys(self) -> list[str]:
        if not is_local(self.root):
            return self._object_keys()
        skip = None
        if self.annotations is not None and is_local(self.annotations):
            try:
                skip = self.annotations.resolve().relative_to(self.root_resolved).as_posix()
            except ValueError:
                skip = None
        keys = [k for k in _walk(self.root, "") if k != skip]
        return sorted(keys)

    def _object_keys(self) -> list[str]:
        """Every object under the prefix (one paginated listing, `fs.find`), relative to it,
        hidden names skipped as on disk, sorted as the local walk is."""
        skip = None
        if self.annotations is not None and not is_local(self.annotations):
            prefix = fs_path(self.root)[1].rstrip("/") + "/"
            name = fs_path(self.annotations)[1]
            skip = name[len(prefix):] if name.startswith(prefix) else None
        return [key for key in objects_under(self.root) if key != skip]

    def read(self, key: str) -> SourceItem:
        pure = PurePosixPath(key)
        if pure.is_absolute() or ".." in pure.parts or not pure.parts:
            raise SourceError(f"key is not a path inside the folder: {one_line(key)}")
        if not is_local(self.root):
            return self._item(key, pure, self.root.joinpath(*pure.parts))
        path = self.root.joinpath(*pure.parts)
        try:
            resolved = path.resolve(strict=True)
        except (OSError, RuntimeError):
            raise SourceError("broken symlink or missing file") from None
        if not resolved.is_relative_to(self.root_resolved):
            raise SourceError("symlink leads outside the source folder")
        suffix = pure.suffix.lower()
        if suffix not in IMAGE_SUFFIXES:
            raise SourceError(f"not an image ({suffix or 'no extension'})")
        if not is_regular(resolved):
            raise SourceError("not a regular file")
        return self._item(key, pure, resolved)

    def _item(self, key: str, pure: PurePosixPath, path: Any) -> SourceItem:
        if pure.suffix.lower() not in IMAGE_SUFFIXES:
            raise SourceError(f"not an image ({pure.suffix.lower() or 'no extension'})")
        item = to_item(read_bytes(path), resolution=self.resolution, min_side=self.min_side,
                       max_aspect=self.max_aspect)
        if self.annotations is not None:
            if self._coco is None:
                self._coco = CocoIndex.load(self.annotations)
            item.objects = self._coco.objects(key, Frame.fit(*item.meta["original_size"],
                                                             self.resolution))
        return item


def _locate(annotations: str, root: Any) -> Any:
    if not is_local(root) and not is_url(annotations):  # relative to the bucket folder
        path = root / annotations
    else:
        path = location(annotations)
    if is_local(path) and not path.is_file() and not path.is_absolute() and (root / path).is_file():
        path = root / path
    if not path.is_file():
        raise ValueError(f"annotations file does not exist: {annotations}")
    return path


def _walk(directory: Path, prefix: str) -> list[str]:
    keys = []
    with os.scandir(directory) as entries:
        for entry in entries:
            if entry.name.startswith("."):
                continue
            key = f"{prefix}{entry.name}"
            if entry.is_symlink():
                keys.append(key)
            elif entry.is_dir(follow_symlinks=False):
                keys.extend(_walk(Path(entry.path), key + "/"))
            elif entry.is_file(follow_symlinks=False):
                keys.append(key)
            else:
                log.warning("folder source skips %s: not a regular file", entry.path)
    return keys


class CocoIndex:
    """A COCO instances file indexed by image `file_name` (POSIX, relative to the folder)."""

    def __init__(self, images: dict[str, dict[str, Any]], annotations: dict[Any, list[dict]],
                 categories: dict[Any, str]):
        self.images = images
        self.annotations = annotations
        self.categories = categories

    @classmethod
    def load(cls, path: Path) -> "CocoIndex":
        try:
            data = json.loads(location(path).read_text(encoding="utf-8"))
            categories = {c["id"]: str(c.get("name", c["id"])) for c in data.get("categories", [])}
            images = {PurePosixPath(im["file_name"]).as_posix(): im for im in data["images"]}
            annotations: dict[Any, list[dict]] = {}
            for ann in data.get("annotations", []):
                annotations.setdefault(ann["image_id"], []).append(ann)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(one_line(f"annotations file {path} is not COCO instances json: "
                                      f"{type(exc).__name__}: {exc}")) from None
        return cls(images, annotations, categories)

    def objects(self, key: str, frame: Frame) -> list[InventoryObject]:
        """The image's annotations carried through its `frame`."""
        entry = self.images.get(PurePosixPath(key).as_posix())
        if entry is None:
            return []
        ow, oh = frame.original
        try:  # the size the annotations are drawn at: within the decoder's pixel cap
            annotated = bounds.check_pixels(entry.get("width") or ow, entry.get("height") or oh,
                                            what="COCO image")
        except bounds.OutOfBounds as exc:
            raise SourceError(one_line(f"COCO image entry is unusable: {exc}")) from None
        out: list[InventoryObject] = []
        for ann in self.annotations.get(entry["id"], []):
            try:
                obj = self._object(ann, frame, annotated, len(out))
            except (ValueError, KeyError, TypeError, IndexError, OverflowError) as exc:
                raise SourceError(one_line(f"COCO annotation {ann.get('id')} is unreadable: "
                                           f"{exc}")) from None
            if obj is not None:
                out.append(obj)
        return out

    def _object(self, ann: dict[str, Any], frame: Frame, annotated: tuple[int, int],
                index: int) -> InventoryObject | None:
        x, y, w, h = (bounds.finite(v, "a bbox value") for v in ann["bbox"])
        box = frame.box([x, y, x + w, y + h], of=annotated)
        mask = _coco_mask(ann.get("segmentation"), frame, annotated)
        if mask is not None:
            box = mask_box(mask) or [0, 0, 0, 0]
        if box[2] <= box[0] or box[3] <= box[1]:
            return None  # cropped away, or vanished at this resolution
        attributes: dict[str, Any] = {"coco_id": ann.get("id")}
        if ann.get("iscrowd"):
            attributes["iscrowd"] = True
        label = bounds.clip_text(self.categories.get(ann.get("category_id"),
                                                     ann.get("category_id", "object")))
        return InventoryObject(id=index, label=label, box=box, mask=mask, attributes=attributes,
                               confidence=1.0, producer="coco")


def _coco_mask(segmentation: Any, frame: Frame, annotated: tuple[int, int]) -> np.ndarray | None:
    """A COCO segmentation (polygons, or RLE compressed/uncompressed, in the `annotated` (w, h)
    pixels) at the sample's size."""
    if not segmentation:
        return None
    if isinstance(segmentation, dict):  # RLE: its size must be the image's, checked unread
        return frame.mask(rle.decode(segmentation, expected=(annotated[1], annotated[0])))
    canvas = Image.new("L", frame.size, 0)
    draw = ImageDraw.Draw(canvas)
    for polygon in segmentation:
        corners = [(polygon[i], polygon[i + 1]) for i in range(0, len(polygon) - 1, 2)]
        if len(corners) >= 3:
            draw.polygon(frame.points(corners, of=annotated), fill=255)
    return np.asarray(canvas) > 0
