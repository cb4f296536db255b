"""The dataset build flow: plan the work units, run the pending ones on Ray, merge the manifest,
write the report, publish the numbers as Prefect artifacts.

Resume needs no Prefect state: a unit is done when its manifest part exists on disk, so the same
command run again (after a crash or a `kill -9`) skips finished units and completes the rest; a
finished build is recognised from OUT alone (`flows.plan.is_complete`) and left as it is.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.states import Failed

from flows.artifacts import publish_build_artifacts
from flows.execute import FATAL_ERRNOS, MAX_UNIT_ATTEMPTS, OutputUnwritable, run_units
from flows.plan import is_complete, pending_units, prepare_build
from flows.ray_runtime import cluster_address, ray_running, ray_start_seconds, start_ray, stop_ray
from pipeline.config import BuildConfig
from pipeline.dataset.lock import out_lock
from pipeline.dataset.output import finalize, read_manifest
from pipeline.dataset.report import write_report
from pipeline.dataset.stats import BuildStats, stats_from_manifest
from pipeline.storage import is_local, location


@task(name="plan-build")
def plan_build(out: str, config: BuildConfig, workers: int | None = None,
               ray_address: str | None = None) -> tuple[list[int], int]:
    """(pending units, number of samples), after fixing OUT's config and key list. With `workers`,
    a key list still to be made is fingerprinted on Ray (`flows.index`), which is started only
    then and left running for the units (stopped here if there are none, or planning failed)."""
    from flows.index import index_source

    root = location(out)
    if is_local(root):
        root.mkdir(parents=True, exist_ok=True)
    maker = None if workers is None else (lambda c: index_source(c, workers, ray_address))
    ray_before = ray_running()
    try:
        total = prepare_build(root, config, index_maker=maker)
        pending = pending_units(root, config)
    except BaseException:
        if ray_running() and not ray_before:
            stop_ray()
        raise
    if ray_running() and not ray_before and not pending and not cluster_address(ray_address):
        stop_ray()
    return pending, total


@task(name="process-units")
def process_units(
    out: str, config: BuildConfig, units: list[int], total: int, workers: int,
    ray_address: str | None, num_gpus: float = 0,
) -> dict[str, Any]:
    """Run `units` on Ray; returns this run's stats, the node of each unit and the timings
    (start-up of Ray and actors apart from processing)."""
    from tqdm import tqdm

    logger = get_run_logger()
    target = start_ray(ray_address, workers)
    ray_seconds = ray_start_seconds()  # the CLI may have started it, while Prefect's server started
    logger.info("processing %d work units on %s with %d workers", len(units), target, workers)
    sizes = {u: len(config.unit_indices(u, total)) for u in units}
    bar = tqdm(total=sum(sizes.values()), unit="pair", desc="build", file=sys.stderr,
               disable=None, dynamic_ncols=True)
    done: list[tuple[float, int]] = []  # (when, samples) per finished unit

    def unit_done(unit: int, _stats: BuildStats, node: str) -> None:
        done.append((time.perf_counter(), sizes[unit]))
        bar.update(sizes[unit])

    processing_started = time.perf_counter()
    try:
        result = run_units(config, location(out), units, workers, on_unit_done=unit_done,
                           num_gpus=num_gpus)
    except OutputUnwritable as exc:  # said once by the flow's final state, not as a traceback
        return {"fatal": str(exc)}
    finally:
        bar.close()
        if not cluster_address(ray_address):
            stop_ray()
    ended = done[-1][0] if done else time.perf_counter()
    run = result.stats.to_dict()
    # Steady state: once every actor has finished its first unit (actor start-up and warm-up
    # are behind), samples per second until the last unit.
    actors = min(workers, len(units))
    if len(done) > actors and done[-1][0] > done[actors - 1][0]:
        run["steady_pairs_per_s"] = sum(n for _, n in done[actors:]) / (done[-1][0] - done[actors - 1][0])
    run.update(
        target=target,
        workers=workers,
        ray_start_seconds=ray_seconds,
        wall_seconds=ended - processing_started,
        units_per_node=result.units_per_node(),
        unit_nodes={str(u): n for u, n in sorted(result.unit_nodes.items())},
        retries=result.retries,
        models=result.models,  # the model actors' calls, busy share and queue depth
        # unit → {sample number: reason}: samples quarantined by isolation (flows.execute)
        isolated={str(u): {str(n): why for n, why in items.items()} for u, items in result.isolated.items()},
    )
    for unit, node in sorted(result.unit_nodes.items()):
        logger.info("unit %d processed on node %s", unit, node)
    return run


@task(name="finalize-build")
def finalize_build(out: str) -> dict[str, Any]:
    try:
        table = finalize(location(out))
    except OSError as exc:
        if exc.errno not in FATAL_ERRNOS:
            raise
        return {"fatal": f"cannot write {out}: {exc} (free space or fix permissions, then run "
                         "the same command to resume)"}
    return stats_from_manifest(table).to_dict()


@task(name="write-report")
def build_report(out: str) -> str:
    return _report_name(write_report(location(out)))


def _report_name(path) -> str:
    """The report as the summary names it: an absolute path, or its URL on an object store."""
    return str(path.resolve()) if is_local(path) else str(path)


@flow(name="build-dataset", log_prints=True)
def build_dataset(
    out: str,
    count: int | None = None,
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
    source: str = "procedural",
    source_options: dict[str, Any] | None = None,
    grounder: str = "",
    grounder_options: dict[str, Any] | None = None,
    composer: str = "",
    composer_options: dict[str, Any] | None = None,
    editor: str = "",
    editor_options: dict[str, Any] | None = None,
    edits_per_image: int = 1,
    rewriter: str = "",
    rewriter_options: dict[str, Any] | None = None,
    license: str = "",
    ray_address: str | None = None,
    num_gpus: float = 0,
) -> dict[str, Any]:
    """Build a complex-edit dataset into `out` (resumes an interrupted build with the same
    parameters); returns the build's totals, this run's figures and the report's path."""
    logger = get_run_logger()
    flow_started = time.perf_counter()
    config = BuildConfig(
        count=count, seed=seed, resolution=resolution, shard_size=shard_size,
        defect_rate=defect_rate, min_edits=min_edits, max_edits=max_edits, judge=judge,
        judge_options=judge_options or {}, routing=routing or {}, source=source,
        source_options=source_options or {}, grounder=grounder,
        grounder_options=grounder_options or {}, composer=composer,
        composer_options=composer_options or {}, editor=editor,
        editor_options=editor_options or {}, edits_per_image=edits_per_image,
        rewriter=rewriter, rewriter_options=rewriter_options or {}, license=license,
    )
    if is_local(location(out)):  # a bucket's prefix needs no folder
        location(out).mkdir(parents=True, exist_ok=True)
    with out_lock(out):  # a scheduled run and a manual one never write into one OUT together
        return _build(out, config, workers, ray_address, logger, flow_started, num_gpus)


def _build(out: str, config: BuildConfig, workers: int, ray_address: str | None, logger,
           flow_started: float, num_gpus: float = 0) -> dict[str, Any]:
    pending, total = plan_build(out, config, workers=workers, ray_address=ray_address)
    num_units = config.num_units(total)
    run: dict[str, Any] = {"out": out, "units_processed": len(pending), "units_total": num_units}
    if is_complete(location(out), config):
        logger.info("%s is already complete (%d units): nothing to do", out, num_units)
        run["already_complete"] = True
        totals = stats_from_manifest(read_manifest(location(out))).to_dict()
    else:
        run["already_complete"] = False
        if pending:
            logger.info("%d of %d units to do (%d already done)", len(pending), num_units,
                        num_units - len(pending))
            run["this_run"] = process_units(out, config, pending, total, workers, ray_address,
                                           num_gpus)
            if "fatal" in run["this_run"]:
                return Failed(message=run["this_run"]["fatal"])
        totals = finalize_build(out)
        if "fatal" in totals:
            return Failed(message=totals["fatal"])
    run["totals"] = totals
    run["report"] = _report_name(location(out) / "report.html") if run["already_complete"] else build_report(out)
    this_run = run.get("this_run") or {}
    run["summary"] = BuildStats.from_dict(totals).summary_table()
    if this_run.get("wall_seconds"):
        run["summary"] += (
            f"\nthis run      {this_run['samples']:>9} samples in {this_run['wall_seconds']:.1f} s"
            f" = {this_run['samples'] / this_run['wall_seconds']:.2f} pairs/s"
            f" (+ {this_run['ray_start_seconds']:.1f} s Ray start-up)"
        )
        if this_run.get("steady_pairs_per_s"):
            run["summary"] += f"\nsteady state  {this_run['steady_pairs_per_s']:>9.2f} pairs/s (after each worker's first unit)"
    if this_run.get("isolated"):
        count = sum(len(items) for items in this_run["isolated"].values())
        run["summary"] += (f"\nisolated      {count:>9} samples quarantined after their unit failed "
                           f"{MAX_UNIT_ATTEMPTS} times (units {', '.join(this_run['isolated'])}); "
                           "every other sample of those units was written")
    if this_run.get("units_per_node"):
        run["summary"] += "\nunits per node\n" + "\n".join(
            f"  {count:>6}  {node}" for node, count in this_run["units_per_node"].items())
    run["flow_seconds"] = time.perf_counter() - flow_started
    publish_build_artifacts(run)
    return run
