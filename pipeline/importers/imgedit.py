"""ImgEdit (sysuyy/ImgEdit on Hugging Face), as published: `Parquet/*.parquet` with the prompts and
image paths, the images in `.tar` archives (extract them; the paths are relative to the folder
they were extracted into, `images`, by default the parquet folder).

- multi-turn files (`content_memory_part*`, `content_understand_part*`,
  `version_backtracking_part*`): one row per session, column `data`: a list of turns
  `{input_images: [path], output_images: [path], prompt}`; the session id is the folder of the
  images (`results_version_backtracking_part0/00031_00020_000209651/origin_0.png` →
  `00031_00020_000209651`), the split the file's stem;
- single-turn files (`add_part0`, `remove_part5`, …): one row per edit, columns `input_images`,
  `output_images`, `prompt`: a one-turn session.

ImgEdit's edit records carry no mask; its regions come from the difference between turns. With
`masks` (the recap jsons of sysuyy/ImgEdit_recap_mask: one record per photo, `path`
`00031/00020/000209651.jpg`, `resolution {height, width}`, `segmentation {object, background}`
lists of `{class_name, bbox, mask: COCO RLE counts string, score}`), the photo's segmented objects
join the sample's inventory, and a turn whose prompt names an object gets that object's mask in
its region (`mask_from: rle+diff`). A version-backtracking session whose turn starts again from
an earlier image is not a chain of edits: it is quarantined with that reason. Rows that share a
session id are all kept, the later ones under `id#2`, `id#3`, … (file then row order); a turn that
is not a record, or a session of more than `bounds.MAX_TURN` turns, refuses that session alone
with a one-line reason. License MIT (the card).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from pipeline.importers.base import (IMPORTERS, RawObject, RawSession, RawTurn, RowReader,
                                     file_bytes, input_folder, parquet_files, session_key)
from pipeline import bounds
from pipeline.sources.base import SourceError
from pipeline.storage import location

log = logging.getLogger(__name__)


def session_id(path: str) -> str:
    parts = Path(path).parts
    return parts[-2] if len(parts) >= 2 else Path(path).stem


@IMPORTERS.register("imgedit")
class ImgEdit:
    name = "imgedit"
    license = "MIT"

    def __init__(self, *, path: str, split: str | None = None, images: str | None = None,
                 masks: str | None = None):
        files = parquet_files(path)
        if split is not None:
            files = {n: p for n, p in files.items() if Path(n).stem == split}
            if not files:
                raise ValueError(f"no ImgEdit parquet file {split}.parquet under {path}")
        self.reader = RowReader(files)
        root = input_folder(path)
        self.images = location(images) if images else root
        if not self.images.is_dir():
            raise ValueError(f"ImgEdit image folder does not exist: {self.images}")
        self.masks_path = masks
        if masks is not None and not location(masks).exists():
            raise ValueError(f"ImgEdit recap mask json does not exist: {masks}")
        self._rows: dict[str, tuple[str, int]] | None = None
        self._turns: dict[str, int] = {}
        self._sids: dict[str, str] = {}  # key → the dataset's session id (a repeat's key has #n)
        self._objects: dict[str, list[RawObject]] | None = None

    def _index(self) -> dict[str, tuple[str, int]]:
        """Session key → (file, row). A row whose session id an earlier row already used is kept
        under its own key, the id with `#2`, `#3`, … (in file then row order, so stable): two rows
        are two sessions, never one silently dropped."""
        if self._rows is None:
            rows: dict[str, tuple[str, int]] = {}
            repeats = 0
            for name in self.reader.files:
                try:
                    schema = self.reader.schema(name)
                except (OSError, ValueError) as exc:
                    raise ValueError(f"cannot read {name}: {exc}") from None
                split = Path(name).stem
                if "data" in schema.names:
                    data = self.reader.columns(name, ["data"]).column("data").to_pylist()
                    listed = [(_first_input(turns), _count(turns)) for turns in data]
                elif "input_images" in schema.names:
                    inputs = self.reader.columns(name, ["input_images"]).column("input_images").to_pylist()
                    listed = [(_first(paths), 1) for paths in inputs]
                else:
                    raise ValueError(f"{name} is not an ImgEdit parquet (no data or input_images column)")
                for row, (first, turns) in enumerate(listed):
                    sid = session_id(first) if first else f"row{row}"
                    key, n = session_key(split, sid), 1
                    while key in rows:
                        n += 1
                        key = session_key(split, f"{sid}#{n}")
                    repeats += n > 1
                    rows[key] = (name, row)
                    self._sids[key] = sid
                    self._turns[key] = turns
            if repeats:
                log.info("imgedit: %d rows reuse a session id another row used; each is kept under "
                         "its own key (id#2, id#3, …)", repeats)
            self._rows = rows
        return self._rows

    def sessions(self) -> dict[str, list[int]]:
        self._index()
        return {key: list(range(1, n + 1)) if n else [0] for key, n in self._turns.items()}

    def read(self, key: str) -> RawSession:
        name, row = self._index()[key]
        values = self.reader.row(name, row)
        turns_data = values["data"] if "data" in values else [values]
        if not isinstance(turns_data, list):
            raise SourceError(f"the row's data is not a list of turns "
                              f"({type(turns_data).__name__})")
        if len(turns_data) > bounds.MAX_TURN:
            raise SourceError(f"session has {len(turns_data):,} turns, over the limit of "
                              f"{bounds.MAX_TURN}")
        turns = []
        for i, turn in enumerate(turns_data, start=1):
            if not isinstance(turn, dict):
                raise SourceError(f"turn {i} is not a turn record ({type(turn).__name__})",
                                  context={"turn": i})
            turns.append(RawTurn(
                index=i, turn_id=_first(turn.get("output_images")) or f"{name}:{row}:{i}",
                instruction=turn.get("prompt"),
                source=_file(_first(turn.get("input_images")), self.images),
                target=_file(_first(turn.get("output_images")), self.images)))
        split, _, sid = key.rpartition("/")
        sid = self._sids.get(key, sid)
        return RawSession(key=key, dataset=self.name, source_id=sid, split=split or None,
                          license=self.license, turns=turns, objects=self._objects_of(sid))

    def _objects_of(self, sid: str) -> list[RawObject]:
        if self.masks_path is None:
            return []
        if self._objects is None:
            self._objects = _read_recap(location(self.masks_path))
        return self._objects.get(sid, [])


def _first(values: Any) -> str | None:
    """The first path of a list of paths (a lone path string counts as one); None otherwise."""
    if isinstance(values, str):
        return values or None
    if isinstance(values, (list, tuple)) and values and isinstance(values[0], str):
        return values[0]
    return None


def _first_input(turns: Any) -> str | None:
    if not isinstance(turns, list):
        return None
    return next((p for p in (_first(t.get("input_images")) for t in turns if isinstance(t, dict))
                 if p), None)


def _count(turns: Any) -> int:
    """Turns listed for a session: 0 (refused when read, with the reason) when the row's data is
    not a list or is longer than `bounds.MAX_TURN`."""
    if not isinstance(turns, list) or len(turns) > bounds.MAX_TURN:
        return 0
    return len(turns)


def _file(relative: str | None, folder: Any):
    def load() -> bytes:
        if not relative:
            raise SourceError("the turn names no image")
        return file_bytes(relative, folder)
    return load


def _read_recap(path: Any) -> dict[str, list[RawObject]]:
    """{session id: objects} from recap json files (a list, one record per line, or a file per
    record; a folder of them)."""
    files = sorted(path.rglob("*.json*")) if path.is_dir() else [path]
    objects: dict[str, list[RawObject]] = {}
    for file in files:
        text = file.read_text()
        try:
            data = json.loads(text)
            records = data if isinstance(data, list) else [data]
        except json.JSONDecodeError:
            records = []
            for line in text.splitlines():
                if line.strip():
                    try:
                        records.append(bounds.json_value(line, what=f"{file.name} line"))
                    except bounds.OutOfBounds:
                        continue  # an unreadable record only loses its objects
        for record in records:
            try:
                h = bounds.integer(record["resolution"]["height"], "recap height")
                w = bounds.integer(record["resolution"]["width"], "recap width")
                sid = "_".join(Path(record["path"]).with_suffix("").parts)
                groups = record.get("segmentation") or {}
                found = []
                for group in ("object", "background"):
                    for obj in groups.get(group) or []:
                        if isinstance(obj, dict) and obj.get("mask") and obj.get("class_name"):
                            # the mask's size is checked (never above the decoder's pixel cap)
                            # when `assemble` decodes it; a bad one only loses that object
                            found.append(RawObject(
                                label=bounds.clip_text(obj["class_name"]),
                                rle={"size": [h, w], "counts": obj["mask"]},
                                score=bounds.finite(obj.get("score"), "score", default=1.0)))
            except (KeyError, TypeError, ValueError, AttributeError):
                continue  # not a recap record: it gives no objects
            objects[sid] = found
    return objects
