"""UltraEdit's region-based subset (BleachNick/UltraEdit_Region_Based_100k on Hugging Face), as
published: parquet shards `data/RegionBase-NNNNN-of-NNNNN.parquet` with the columns of UltraEdit
(`clip_sim_source`, `clip_sim_target`, `clip_sim_dir`, `clip_sim_image`, `dinov2_sim`, `ssim`,
`source_caption`, `target_caption`, `idx`, `edit_prompt`, `source_image`, `edited_image`) plus
`mask_image`: a mask image whose white pixels are the edited region. Every row is one edit, so a
session has one turn (import it with `--min-edits 1`); its key is the split and `idx`.
The free-form subset (UltraEdit_500k, no `mask_image`) imports the same way, regions from the
difference. License CC BY 4.0.
"""

from __future__ import annotations

from pipeline.importers.base import (IMPORTERS, MaskSpec, RawSession, RawTurn, RowReader, hf_split,
                                     image_value_bytes, input_folder, session_key,
                                     split_parquet_files)


@IMPORTERS.register("ultraedit")
class UltraEdit:
    name = "ultraedit"
    license = "CC-BY-4.0"

    def __init__(self, *, path: str, split: str | None = None):
        self.reader = RowReader(split_parquet_files(path, split, "UltraEdit"))
        self.folder = input_folder(path)
        self._rows: dict[str, list[tuple[str, int]]] | None = None

    def _index(self) -> dict[str, list[tuple[str, int]]]:
        if self._rows is None:
            rows: dict[str, list[tuple[str, int]]] = {}
            for name in self.reader.files:
                table = self.reader.columns(name, ["idx"])
                split = hf_split(name)
                for row, idx in enumerate(table.column("idx").to_pylist()):
                    rows.setdefault(session_key(split, str(idx)), []).append((name, row))
            self._rows = rows
        return self._rows

    def sessions(self) -> dict[str, list[int]]:
        return {key: [1] * len(rows) for key, rows in self._index().items()}  # a repeat is flagged

    def read(self, key: str) -> RawSession:
        rows = self._index()[key]
        split, _, idx = key.rpartition("/")
        turns = [self._turn(name, row) for name, row in rows]
        return RawSession(key=key, dataset=self.name, source_id=idx, split=split or None,
                          license=self.license, turns=turns)

    def _turn(self, name: str, row: int) -> RawTurn:
        values = self.reader.row(name, row)
        mask = values.get("mask_image")
        return RawTurn(
            index=1, turn_id=f"{name}:{row}", instruction=values.get("edit_prompt"),
            source=lambda: image_value_bytes(values.get("source_image"), self.folder),
            target=lambda: image_value_bytes(values.get("edited_image"), self.folder),
            mask=None if mask is None else (lambda: MaskSpec("white", image_value_bytes(mask, self.folder))))
