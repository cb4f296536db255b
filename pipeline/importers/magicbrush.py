"""MagicBrush (osunlp/MagicBrush on Hugging Face), as published: parquet shards
`data/{split}-NNNNN-of-NNNNN.parquet` (splits `train`, `dev`) with the columns

    img_id (string)      the COCO id of the session's photo
    turn_index (int32)   1, 2, … within the session (rows of a session are in any order)
    source_img (image)   the turn's input: the photo (turn 1) or the previous turn's output
    mask_img (image)     the turn's free-form mask
    instruction (string)
    target_img (image)   the turn's output

where an image is the Hugging Face struct `{bytes, path}`. The mask is decoded as MagicBrush's
DALL-E 2 "masked image": an RGBA image at its own resolution whose transparent pixels are the
edited region; an opaque mask falls back to its white pixels (the card's "white region").
License CC BY 4.0.
"""

from __future__ import annotations

from collections import defaultdict

from pipeline.importers.base import (IMPORTERS, MaskSpec, RawSession, RawTurn, RowReader, hf_split,
                                     image_value_bytes, input_folder, listed_turn, session_key,
                                     split_parquet_files)

COLUMNS = ("img_id", "turn_index", "source_img", "mask_img", "instruction", "target_img")


@IMPORTERS.register("magicbrush")
class MagicBrush:
    name = "magicbrush"
    license = "CC-BY-4.0"

    def __init__(self, *, path: str, split: str | None = None):
        self.reader = RowReader(split_parquet_files(path, split, "MagicBrush"))
        self.folder = input_folder(path)
        self._rows: dict[str, list[tuple[str, int, int]]] | None = None  # key → (file, row, turn)
        self._ids: dict[str, tuple[str, str]] = {}

    def _index(self) -> dict[str, list[tuple[str, int, int]]]:
        if self._rows is None:
            rows: dict[str, list[tuple[str, int, int]]] = defaultdict(list)
            for name in self.reader.files:
                table = self.reader.columns(name, ["img_id", "turn_index"])
                missing = set(("img_id", "turn_index")) - set(table.column_names)
                if missing:
                    raise ValueError(f"{name} is not a MagicBrush shard (no {sorted(missing)[0]} column)")
                split = hf_split(name)
                for row, (img_id, turn) in enumerate(zip(table.column("img_id").to_pylist(),
                                                         table.column("turn_index").to_pylist())):
                    key = session_key(split, str(img_id))
                    self._ids[key] = (split, str(img_id))
                    rows[key].append((name, row, listed_turn(turn)))
            self._rows = dict(rows)
        return self._rows

    def sessions(self) -> dict[str, list[int]]:
        return {key: [turn for *_, turn in rows] for key, rows in self._index().items()}

    def read(self, key: str) -> RawSession:
        rows = self._index()[key]
        split, img_id = self._ids[key]
        turns = [self._turn(name, row, turn) for name, row, turn in rows]
        return RawSession(key=key, dataset=self.name, source_id=img_id, split=split,
                          license=self.license, turns=turns)

    def _turn(self, name: str, row: int, turn: int) -> RawTurn:
        values = self.reader.row(name, row)
        mask = values.get("mask_img")
        return RawTurn(
            index=turn, turn_id=f"{name}:{row}", instruction=values.get("instruction"),
            source=lambda: image_value_bytes(values.get("source_img"), self.folder),
            target=lambda: image_value_bytes(values.get("target_img"), self.folder),
            mask=None if mask is None else (lambda: MaskSpec("alpha", image_value_bytes(mask, self.folder))))
