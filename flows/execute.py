"""Running work units on Ray actors with back-pressure.

Each actor builds the stages once (`UnitPipeline`) and then processes units. At most
`IN_FLIGHT_PER_ACTOR` units are queued per actor (the bounded-actor pattern: `ray.wait` on the
refs in flight, submit the next unit when one returns), so memory stays bounded however large the
build; a unit's samples never travel back to the driver, only its small `BuildStats` and the node
that ran it. Actors are spread over the cluster's nodes (`SPREAD`). A unit whose actor dies is
retried on a fresh actor; its outputs are written atomically and completed by the unit's manifest
part, so a retried or resumed unit never leaves half a shard.
"""

from __future__ import annotations

import errno
import logging
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from pipeline.config import BuildConfig
from pipeline.dataset.stats import BuildStats

log = logging.getLogger(__name__)

IN_FLIGHT_PER_ACTOR = 2  # one running, one queued: the actor never waits for the driver
MAX_UNIT_ATTEMPTS = 3


# A full disk, a quota or a read-only OUT: retrying the unit cannot help, so none is retried.
FATAL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS})


class UnitFailed(RuntimeError):
    pass


class OutputUnwritable(UnitFailed):
    """OUT cannot be written (disk full, read-only): one line, no retry; a rerun resumes."""


def root_cause(exc: BaseException) -> BaseException:
    """The exception a Ray task raised (`RayTaskError.cause`), else `exc`."""
    return getattr(exc, "cause", None) or exc


def fatal_io_error(exc: BaseException) -> OSError | None:
    """The OSError behind `exc` that no retry can fix (see FATAL_ERRNOS), else None."""
    seen = 0
    cause: BaseException | None = root_cause(exc)
    while cause is not None and seen < 10:
        if isinstance(cause, OSError) and cause.errno in FATAL_ERRNOS:
            return cause
        cause, seen = cause.__cause__ or cause.__context__, seen + 1
    return None


def one_line(exc: BaseException) -> str:
    """`Type: message`, first line only (a RayTaskError's text is the whole remote traceback)."""
    cause = root_cause(exc)
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[-1] if text else ''}"[:500]


@dataclass
class UnitsResult:
    stats: BuildStats = field(default_factory=BuildStats)
    unit_nodes: dict[int, str] = field(default_factory=dict)  # unit → node that wrote it
    retries: int = 0

    def units_per_node(self) -> dict[str, int]:
        return dict(sorted(Counter(self.unit_nodes.values()).items()))


def node_labels() -> dict[str, str]:
    """node id → a short name: the node's address and the head of its id (the nodes of a test
    cluster on one machine share an address)."""
    import ray

    return {n["NodeID"]: f"{n.get('NodeManagerAddress', '?')}/{n['NodeID'][:8]}" for n in ray.nodes()}


def _worker_class():
    import ray

    @ray.remote(num_cpus=1, max_restarts=0)
    class UnitWorker:
        def __init__(self, config: dict, out: str):
            from pipeline.unit import UnitPipeline

            logging.basicConfig(level=logging.WARNING)
            self.pipeline = UnitPipeline(BuildConfig.from_dict(config), Path(out))
            self.node_id = ray.get_runtime_context().get_node_id()

        def run(self, unit: int) -> tuple[dict, str]:
            return self.pipeline.run(unit).to_dict(), self.node_id

    return UnitWorker


def _settle(in_flight: dict) -> None:
    """Before giving up: collect the units still in flight (their errors are the same story), so
    Ray has no unretrieved task error to print as a traceback when their refs are dropped."""
    import ray

    for ref in list(in_flight):
        try:
            ray.get(ref)
        except Exception:  # noqa: BLE001 - already reported by the failure being raised
            pass
    in_flight.clear()


def run_units(
    config: BuildConfig,
    out: Path,
    units: list[int],
    workers: int,
    on_unit_done: Callable[[int, BuildStats, str], None] = lambda unit, stats, node: None,
    num_gpus: float = 0,
) -> UnitsResult:
    """Process `units` on `workers` Ray actors; returns the merged stats of these units and the
    node each unit ran on."""
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    # A generative editor's actors ask Ray for GPUs (`mcie build --num-gpus`, per actor).
    gpus = {"num_gpus": num_gpus} if num_gpus else {}
    worker_cls = _worker_class().options(scheduling_strategy="SPREAD", **gpus)
    config_dict = config.to_dict()

    def new_actor():
        return worker_cls.remote(config_dict, str(out))

    actors = [new_actor() for _ in range(min(workers, max(1, len(units))))]
    todo = deque(units)
    attempts: Counter = Counter()
    in_flight: dict = {}  # ObjectRef -> (unit, actor slot, actor)
    load = [0] * len(actors)
    result = UnitsResult()
    labels: dict[str, str] = {}

    while todo or in_flight:
        for slot in range(len(actors)):
            while todo and load[slot] < IN_FLIGHT_PER_ACTOR:
                unit = todo.popleft()
                attempts[unit] += 1
                in_flight[actors[slot].run.remote(unit)] = (unit, slot, actors[slot])
                load[slot] += 1
        (ref,), _ = ray.wait(list(in_flight), num_returns=1)
        unit, slot, actor = in_flight.pop(ref)
        load[slot] -= 1
        try:
            stats_dict, node_id = ray.get(ref)
        except (RayActorError, RayTaskError) as exc:
            fatal = fatal_io_error(exc)
            if fatal is not None:
                _settle(in_flight)
                raise OutputUnwritable(f"cannot write {out}: {fatal} (free space or fix "
                                       f"permissions, then run the same command to resume)") from None
            if attempts[unit] >= MAX_UNIT_ATTEMPTS:
                _settle(in_flight)
                raise UnitFailed(f"unit {unit} failed {attempts[unit]} times: {one_line(exc)}") from None
            log.warning("unit %d failed (attempt %d), retrying: %s", unit, attempts[unit], one_line(exc))
            result.retries += 1
            if isinstance(exc, RayActorError) and actors[slot] is actor:  # replace it once
                actors[slot] = new_actor()
            todo.appendleft(unit)
            continue
        if node_id not in labels:
            labels.update(node_labels())
        node = labels.get(node_id, node_id[:8])
        stats = BuildStats.from_dict(stats_dict)
        result.stats = result.stats + stats
        result.unit_nodes[unit] = node
        log.info("unit %d done on node %s (%d samples)", unit, node, stats.samples)
        on_unit_done(unit, stats, node)
    return result
