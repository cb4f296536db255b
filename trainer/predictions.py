"""An editor's outputs on CIE-Bench, one image per case: where they are and how they are read —
shared by `trainer.evaluate` (scoring) and `trainer.eval_report` (the report's examples), which
`trainer.evaluate` imports, so they live in neither."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.ciebench.metrics import PredictionError

# An image larger than this many pixels is refused (a decompression bomb, not an edit).
MAX_PREDICTION_PIXELS = 64_000_000


def prediction_path(directory: Path, case_id: str) -> Path:
    return Path(directory) / f"{case_id}.png"


def read_prediction(path: Path) -> np.ndarray | PredictionError:
    """The image at `path` as uint8 RGB, or the PredictionError saying why not."""
    if not path.is_file():
        return PredictionError(f"missing {path.name}")
    try:
        with Image.open(path) as image:
            if image.width * image.height > MAX_PREDICTION_PIXELS:
                return PredictionError(f"{path.name} is {image.width}x{image.height} px, too large")
            return np.asarray(image.convert("RGB")).copy()
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        return PredictionError(f"unreadable {path.name}: {type(exc).__name__}: {exc}")
