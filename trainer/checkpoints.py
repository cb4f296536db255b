"""What a training run writes where, read by training (resume) and by inference (`mcie edit`,
`mcie eval`, export) alike — kept apart from `trainer.train` so inference never imports the
trainer (which imports inference for its CIE-Bench validation)."""

from __future__ import annotations

from pathlib import Path

STATE_FILE = "trainer_state.json"  # written last: marks a checkpoint complete
CONFIG_FILE = "config.json"
EMA_FILE = "ema.safetensors"  # the EMA of the trained weights, by parameter name (for inference)


def checkpoints(out: Path) -> list[tuple[int, Path]]:
    found = []
    for path in out.glob("checkpoint-*"):
        suffix = path.name.removeprefix("checkpoint-")
        if suffix.isdigit() and (path / STATE_FILE).is_file():  # complete checkpoints only
            found.append((int(suffix), path))
    return sorted(found)


def latest_checkpoint(out: Path) -> Path | None:
    found = checkpoints(out)
    return found[-1][1] if found else None
