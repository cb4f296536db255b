"""`--format generic`: any multi-turn edit dataset written as a jsonl file (or a folder of them),
one line per turn, images beside it:

    {"session": "s1", "turn": 1, "instruction": "add a red hat",
     "source": "img/s1_0.png",                      # the turn's input (needed for turn 1)
     "target": "img/s1_1.png",                      # the turn's output
     "mask": "masks/s1_1.png",                      # optional: white = edited
     "mask_rle": {"size": [h, w], "counts": "…"},   # optional instead: COCO RLE
     "split": "train", "license": "CC-BY-4.0"}      # optional

Paths are relative to the jsonl file's folder (never outside it). Lines of a session may come in
any order; the session key is the split (if any) and the session id. A line that is not JSON, or
lacks `session`/`turn`, fails the import with its line number (a dataset that does not parse is
not imported by guesswork); so does a line over `bounds.MAX_JSON_LINE_BYTES`. A turn index that is
not an integer within 1..`bounds.MAX_TURN` (`Infinity`, `1e30`, a 22-digit integer) only refuses
its session, with that reason.
"""

from __future__ import annotations

from typing import Any

from pipeline import bounds
from pipeline.storage import is_local, location, objects_under
from pipeline.importers.base import (IMPORTERS, MaskSpec, RawSession, RawTurn, file_bytes,
                                     listed_turn, session_key)


@IMPORTERS.register("generic")
class Generic:
    name = "generic"
    license = "unknown"

    def __init__(self, *, path: str, split: str | None = None, license: str | None = None):
        root = location(path)
        if root.is_dir() and not is_local(root):
            files = list(objects_under(root, ".jsonl").values())
        elif root.is_dir():
            files = sorted(p for p in root.rglob("*.jsonl") if p.is_file())
        elif root.is_file():
            files = [root]
        else:
            raise ValueError(f"input path does not exist: {path}")
        if not files:
            raise ValueError(f"no .jsonl files under {path}")
        self.default_license = license or self.license
        self.lines: dict[str, list[tuple[Any, dict[str, Any]]]] = {}
        for file in files:
            for number, line in enumerate(file.read_text().splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    record = bounds.json_value(line, what=f"{file.name} line {number}", strict=False)
                    sid, turn = bounds.clip_text(record["session"]), listed_turn(record["turn"])
                except bounds.OutOfBounds as exc:
                    raise ValueError(str(exc)) from None
                except (KeyError, TypeError):
                    raise ValueError(f"{file.name} line {number}: not a turn record "
                                     "(JSON with session and turn)") from None
                if split is not None and record.get("split") != split:
                    continue
                record["turn"] = turn
                record["session"] = sid
                if record.get("split") is not None:
                    record["split"] = bounds.clip_text(record["split"])
                self.lines.setdefault(session_key(record.get("split"), sid), []).append((file.parent, record))

    def sessions(self) -> dict[str, list[int]]:
        return {key: [r["turn"] for _, r in lines] for key, lines in self.lines.items()}

    def read(self, key: str) -> RawSession:
        lines = self.lines[key]
        first = lines[0][1]
        turns = [self._turn(folder, r) for folder, r in lines]
        return RawSession(key=key, dataset=self.name, source_id=str(first["session"]),
                          split=first.get("split"),
                          license=bounds.clip_text(first.get("license") or self.default_license),
                          turns=turns)

    @staticmethod
    def _turn(folder: Any, record: dict[str, Any]) -> RawTurn:
        mask = None
        if record.get("mask_rle") is not None:
            mask = lambda: MaskSpec("rle", record["mask_rle"])  # noqa: E731
        elif record.get("mask"):
            mask = lambda: MaskSpec("white", file_bytes(record["mask"], folder))  # noqa: E731
        source = record.get("source")
        return RawTurn(
            index=record["turn"], turn_id=str(record.get("id") or f"{record['session']}:{record['turn']}"),
            instruction=record.get("instruction"),
            source=None if not source else (lambda: file_bytes(source, folder)),
            target=lambda: file_bytes(str(record.get("target") or ""), folder),
            mask=mask)
