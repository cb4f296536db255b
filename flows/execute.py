"""Running work units on Ray actors with back-pressure.

Each actor builds the stages once (`UnitPipeline`) and then processes units. At most
`IN_FLIGHT_PER_ACTOR` units are queued per actor, so memory stays bounded however large the build;
a unit's samples never travel back to the driver — only its small `BuildStats` does.
A unit whose actor dies is retried on a fresh actor; its outputs are written atomically and
completed by the unit's manifest part, so a retried or resumed unit never leaves half a shard.
"""

from __future__ import annotations

import logging
from collections import deque
from pathlib import Path
from typing import Callable

from pipeline.config import BuildConfig
from pipeline.stats import BuildStats

log = logging.getLogger(__name__)

IN_FLIGHT_PER_ACTOR = 2
MAX_UNIT_ATTEMPTS = 3


class UnitFailed(RuntimeError):
    pass


def _worker_class():
    import ray

    @ray.remote(num_cpus=1, max_restarts=0)
    class UnitWorker:
        def __init__(self, config: dict, out: str):
            from pipeline.unit import UnitPipeline

            logging.basicConfig(level=logging.WARNING)
            self.pipeline = UnitPipeline(BuildConfig.from_dict(config), Path(out))

        def run(self, unit: int) -> dict:
            return self.pipeline.run(unit).to_dict()

    return UnitWorker


def run_units(
    config: BuildConfig,
    out: Path,
    units: list[int],
    workers: int,
    on_unit_done: Callable[[int, BuildStats], None] = lambda unit, stats: None,
) -> BuildStats:
    """Process `units` on `workers` Ray actors; returns the merged stats of these units."""
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    worker_cls = _worker_class()
    config_dict = config.to_dict()

    def new_actor():
        return worker_cls.remote(config_dict, str(out))

    actors = [new_actor() for _ in range(min(workers, max(1, len(units))))]
    todo = deque(units)
    attempts: dict[int, int] = {}
    in_flight: dict = {}  # ObjectRef -> (unit, actor index)
    load = [0] * len(actors)
    total = BuildStats()

    def submit(slot: int) -> None:
        unit = todo.popleft()
        attempts[unit] = attempts.get(unit, 0) + 1
        in_flight[actors[slot].run.remote(unit)] = (unit, slot)
        load[slot] += 1

    while todo or in_flight:
        for slot in range(len(actors)):
            while todo and load[slot] < IN_FLIGHT_PER_ACTOR:
                submit(slot)
        done, _ = ray.wait(list(in_flight), num_returns=1)
        ref = done[0]
        unit, slot = in_flight.pop(ref)
        load[slot] -= 1
        try:
            stats = BuildStats.from_dict(ray.get(ref))
        except (RayActorError, RayTaskError) as exc:
            if attempts[unit] >= MAX_UNIT_ATTEMPTS:
                raise UnitFailed(f"unit {unit} failed {attempts[unit]} times: {exc}") from exc
            log.warning("unit %d failed (attempt %d), retrying: %s", unit, attempts[unit], exc)
            if isinstance(exc, RayActorError):
                actors[slot] = new_actor()
            todo.appendleft(unit)
            continue
        total = total + stats
        on_unit_done(unit, stats)
    return total
