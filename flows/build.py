"""The dataset build flow: plan the work units, run the pending ones on Ray, merge the manifest.

Resume needs no Prefect state: a unit is done when its manifest part exists on disk, so the same
command run again skips finished units and completes the rest.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from flows.execute import run_units
from flows.ray_runtime import start_ray, stop_ray
from pipeline.config import BuildConfig, save_config
from pipeline.output import finalize, unit_done
from pipeline.stats import BuildStats, stats_from_manifest


@task(name="plan-build")
def plan_build(out: str, config: BuildConfig) -> list[int]:
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    save_config(root, config)
    return [u for u in range(config.num_units) if not unit_done(root, u)]


@task(name="process-units")
def process_units(
    out: str, config: BuildConfig, units: list[int], workers: int, ray_address: str | None
) -> dict[str, Any]:
    from tqdm import tqdm

    logger = get_run_logger()
    target = start_ray(ray_address, workers)
    logger.info("processing %d work units on %s with %d workers", len(units), target, workers)
    sizes = {u: len(config.unit_indices(u)) for u in units}
    bar = tqdm(total=sum(sizes.values()), unit="pair", desc="build", file=sys.stderr,
               disable=None, dynamic_ncols=True)
    started = time.perf_counter()
    try:
        stats = run_units(config, Path(out), units, workers,
                          on_unit_done=lambda unit, _stats: bar.update(sizes[unit]))
    finally:
        bar.close()
        if not ray_address:
            stop_ray()
    result = stats.to_dict()
    result["wall_seconds"] = time.perf_counter() - started
    return result


@task(name="finalize-build")
def finalize_build(out: str) -> dict[str, Any]:
    table = finalize(Path(out))
    return stats_from_manifest(table).to_dict()


@flow(name="build-dataset", log_prints=True)
def build_dataset(
    out: str,
    count: int,
    seed: int = 0,
    resolution: int = 512,
    workers: int = 2,
    shard_size: int = 64,
    defect_rate: float = 0.25,
    min_edits: int = 2,
    max_edits: int = 5,
    judge: str = "pixel",
    judge_options: dict[str, Any] | None = None,
    routing: dict[str, float] | None = None,
    ray_address: str | None = None,
) -> dict[str, Any]:
    """Build a complex-edit dataset into `out`; returns the build's totals."""
    logger = get_run_logger()
    config = BuildConfig(
        count=count, seed=seed, resolution=resolution, shard_size=shard_size,
        defect_rate=defect_rate, min_edits=min_edits, max_edits=max_edits, judge=judge,
        judge_options=judge_options or {}, routing=routing or {},
    )
    pending = plan_build(out, config)
    run: dict[str, Any] = {"units_processed": len(pending), "units_total": config.num_units}
    if not pending and (Path(out) / "manifest.parquet").exists():
        logger.info("%s is already complete (%d units): nothing to do", out, config.num_units)
        run["already_complete"] = True
    else:
        if pending:
            run["this_run"] = process_units(out, config, pending, workers, ray_address)
        run["already_complete"] = False
    totals = finalize_build(out)
    run["totals"] = totals
    summary = BuildStats.from_dict(totals).summary_table(
        seconds=(run.get("this_run") or {}).get("wall_seconds")
    )
    create_markdown_artifact(
        key="build-summary",
        markdown=f"## Build `{out}`\n\n```\n{summary}\n```\n",
        description="counts per verdict, accept rate, per-edit-type pass rates",
    )
    run["summary"] = summary
    return run
