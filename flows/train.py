"""The train flow: MCIE-E1 on a build's train shards, through the trainer's Python API.

A thin wrapper: `trainer.train.train(data, config, out, steps)` does the work and resumes from the
newest checkpoint in `out` by itself, so a rerun of the flow (or a Prefect retry after a crash)
continues where the last checkpoint left off.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact


@task(name="train-model", retries=1, retry_delay_seconds=30)
def train_model(data: str, config: str, out: str, steps: int, overrides: dict[str, Any],
                val_data: str | None = None, backbone: str | None = None) -> dict[str, Any]:
    from trainer.config import load_config, with_train
    from trainer.checkpoints import latest_checkpoint
    from trainer.train import train

    resolved = with_train(load_config(config, backbone), **overrides)
    resolved.model.check_paths()
    result = train(data, resolved, out, steps, val_data)
    last = result.losses[max(result.losses)] if result.losses else None
    return {"step": result.step, "resumed_from": result.resumed_from, "last_loss": last,
            "samples_per_s": result.samples_per_s,
            "checkpoint": str(latest_checkpoint(Path(out)) or "")}


@flow(name="train", log_prints=True)
def train_flow(
    data: str,
    out: str = "checkpoints",
    config: str = "tiny",
    steps: int = 100,
    batch_size: int | None = None,
    learning_rate: float | None = None,
    checkpoint_every: int | None = None,
    mixed_precision: str | None = None,
    seed: int | None = None,
    compile_mode: str | None = None,
    val_data: str | None = None,
    backbone: str | None = None,
) -> dict[str, Any]:
    """Train MCIE-E1 on DATA (a build OUT) up to `steps` steps; checkpoints in `out`.
    `compile_mode`: off or a torch.compile mode for the denoiser (else the config's `train.compile`);
    `val_data`: a build OUT for the validation loss (in `out/metrics.jsonl`); `backbone`: unet,
    flux-kontext or qwen-image-edit (else the config's)."""
    logger = get_run_logger()
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    overrides = {"batch_size": batch_size, "learning_rate": learning_rate,
                 "checkpoint_every": checkpoint_every, "mixed_precision": mixed_precision, "seed": seed,
                 "compile": compile_mode}
    result = train_model(data, config, out, steps, {k: v for k, v in overrides.items() if v is not None},
                         val_data, backbone)
    logger.info("trained to step %d (resumed from %s), last loss %s", result["step"],
                result["resumed_from"], result["last_loss"])
    create_table_artifact(key="train-summary", table=[result],
                          description="steps reached, last loss, throughput, newest checkpoint")
    return result
