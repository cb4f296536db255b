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


class UnitFailed(RuntimeError):
    pass


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


def run_units(
    config: BuildConfig,
    out: Path,
    units: list[int],
    workers: int,
    on_unit_done: Callable[[int, BuildStats, str], None] = lambda unit, stats, node: None,
) -> UnitsResult:
    """Process `units` on `workers` Ray actors; returns the merged stats of these units and the
    node each unit ran on."""
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    worker_cls = _worker_class().options(scheduling_strategy="SPREAD")
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
            if attempts[unit] >= MAX_UNIT_ATTEMPTS:
                raise UnitFailed(f"unit {unit} failed {attempts[unit]} times: {exc}") from exc
            log.warning("unit %d failed (attempt %d), retrying: %s", unit, attempts[unit], exc)
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
