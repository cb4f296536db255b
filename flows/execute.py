"""Running work units on Ray actors with back-pressure.

Each actor builds the stages once (`UnitPipeline`) and then processes units. At most
`IN_FLIGHT_PER_ACTOR` units are queued per actor (the bounded-actor pattern: `ray.wait` on the
refs in flight, submit the next unit when one returns), so memory stays bounded however large the
build; a unit's samples never travel back to the driver, only its small `BuildStats` and the node
that ran it. Actors are spread over the cluster's nodes (`SPREAD`). A unit whose actor dies is
retried on a fresh actor; its outputs are written atomically and completed by the unit's manifest
part, so a retried or resumed unit never leaves half a shard.

A generative editor's model runs in model actors of its own (`pipeline.model_actors`): one per
model and GPU share, loaded once, holding the GPUs (`num_gpus`), while the unit workers are CPU actors that send
it their units' batches, each blocking on its own request only, so the device serves one worker's
batch while the others decode, ground, compose, judge and write. `model_actors=False` keeps the
model inside each unit worker (each then asks for `num_gpus` and loads its own copy).
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
MAX_ITEM_ATTEMPTS = 2  # an item run alone: a second try tells a poisoned input from a passing fault


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
    from pipeline.record import failure_reason

    cause = root_cause(exc)
    text = [line for line in str(cause).strip().splitlines() if line.strip()]
    return failure_reason(f"{type(cause).__name__}: {text[-1]}" if text else cause)


WORKER_DIED = ("its worker process died while running it (killed, by the out-of-memory killer "
               "for one, or crashed)")


def failure_cause(exc: BaseException) -> str:
    """Why a job failed, short: a dead worker said in words (Ray's own text is a paragraph),
    else `one_line` capped to 200 characters."""
    from ray.exceptions import RayActorError

    if isinstance(exc, RayActorError):
        return WORKER_DIED
    return one_line(exc)[:200]


@dataclass(frozen=True)
class Job:
    """What an actor is asked: a whole unit; one item of it alone (`item`: run, nothing written);
    or the unit item by item with `poisoned` items quarantined unread."""

    unit: int
    item: int | None = None
    poisoned: tuple[tuple[int, str], ...] | None = None

    def submit(self, actor):
        if self.item is not None:
            return actor.probe.remote(self.item)
        return actor.run.remote(self.unit, None if self.poisoned is None else dict(self.poisoned))


def unit_items(config: BuildConfig, out: Path, unit: int) -> list[int]:
    """Sample numbers of `unit` (from OUT's key list, as the actors count them)."""
    from pipeline.dataset.source_index import read_index

    return list(config.unit_indices(unit, config.total_samples(read_index(out).size)))


@dataclass
class UnitsResult:
    stats: BuildStats = field(default_factory=BuildStats)
    # per model actor: calls, frames, busy share, queue depth (`ModelServer.stats`)
    models: list[dict] = field(default_factory=list)
    unit_nodes: dict[int, str] = field(default_factory=dict)  # unit → node that wrote it
    retries: int = 0
    # unit → {sample number: reason} of the items quarantined by isolation (see the docstring)
    isolated: dict[int, dict[int, str]] = field(default_factory=dict)

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
        def __init__(self, config: dict, out: str, model_servers: dict | None = None):
            from pipeline.model_actors import attach
            from pipeline.unit import UnitPipeline

            logging.basicConfig(level=logging.WARNING)
            attach(model_servers)  # the editor's models: these actors' clients (before it is built)
            # OUT as text, a path or a URL: each worker writes its units straight there (no shared disk)
            self.pipeline = UnitPipeline(BuildConfig.from_dict(config), out)
            self.node_id = ray.get_runtime_context().get_node_id()

        def run(self, unit: int, poisoned: dict[int, str] | None = None) -> tuple[dict, str]:
            return self.pipeline.run(unit, poisoned).to_dict(), self.node_id

        def probe(self, number: int) -> tuple[None, str]:
            self.pipeline.process_item(number)  # raises, or kills the worker, like its unit did
            return None, self.node_id

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
    model_actors: bool = True,
) -> UnitsResult:
    """Process `units` on `workers` Ray actors; returns the merged stats of these units and the
    node each unit ran on. A generative editor's model is served by model actors (see the module
    docstring) unless `model_actors` is False."""
    import ray

    servers = _model_servers(config, workers, num_gpus) if model_actors and units else {}
    try:
        result = _run(config, out, units, workers, on_unit_done, num_gpus, servers)
        from pipeline.model_actors import server_stats

        result.models = server_stats(servers)
        return result
    finally:
        for replicas in servers.values():
            for server in replicas:
                ray.kill(server)


def _model_servers(config: BuildConfig, workers: int, num_gpus: float) -> dict:
    """The model actors of the build's editor ({} when it calls no model)."""
    from pipeline.editors.base import EDITORS
    from pipeline.editors.inpaint import GenerativeEditor
    from pipeline.model_actors import start_servers

    factory = EDITORS.factory(config.editor)
    if not (isinstance(factory, type) and issubclass(factory, GenerativeEditor)):
        return {}
    # built here for its models' names only: a model loads on first use, i.e. in the model actor
    editor = EDITORS.make(config.editor, context=config.context(), **config.editor_options)
    return start_servers(editor, workers, num_gpus)


def _run(config: BuildConfig, out: Path, units: list[int], workers: int,
         on_unit_done: Callable[[int, BuildStats, str], None], num_gpus: float,
         servers: dict) -> UnitsResult:
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    # The GPUs go to the model actors; without them, each unit worker asks for its share
    # (`mcie build --num-gpus`, per actor) and holds its own copy of the model. A grounder that
    # puts SAM on a GPU (`sam_device=cuda`) runs in the unit workers: they keep their share too.
    sam_on_gpu = str(config.grounder_options.get("sam_device", "")).startswith("cuda")
    gpus = {"num_gpus": num_gpus} if num_gpus and (not servers or sam_on_gpu) else {}
    worker_cls = _worker_class().options(scheduling_strategy="SPREAD", **gpus)
    config_dict = config.to_dict()

    def new_actor(slot: int):  # worker `slot` sends its batches to replica slot mod replicas
        return worker_cls.remote(config_dict, str(out),
                                 {key: replicas[slot % len(replicas)]
                                  for key, replicas in servers.items()})

    actors = [new_actor(slot) for slot in range(min(workers, max(1, len(units))))]
    todo: deque[Job] = deque(Job(u) for u in units)
    attempts: Counter = Counter()
    in_flight: dict = {}  # ObjectRef -> (job, actor slot, actor)
    load = [0] * len(actors)
    alone = [False] * len(actors)  # an item runs alone there: nothing is queued behind it
    isolating: dict[int, tuple[set[int], dict[int, str]]] = {}  # unit → (items to run, poisoned)
    result = UnitsResult()
    labels: dict[str, str] = {}

    def item_settled(unit: int, number: int) -> None:
        pending, poisoned = isolating[unit]
        pending.discard(number)
        if not pending:
            todo.appendleft(Job(unit, poisoned=tuple(sorted(poisoned.items()))))

    while todo or in_flight:
        for slot in range(len(actors)):
            while todo and load[slot] < IN_FLIGHT_PER_ACTOR and not alone[slot]:
                if todo[0].item is not None and load[slot]:
                    break  # an item runs alone: a worker it kills takes no other job with it
                job = todo.popleft()
                attempts[job] += 1
                in_flight[job.submit(actors[slot])] = (job, slot, actors[slot])
                load[slot] += 1
                alone[slot] = job.item is not None
        (ref,), _ = ray.wait(list(in_flight), num_returns=1)
        job, slot, actor = in_flight.pop(ref)
        unit = job.unit
        load[slot] -= 1
        alone[slot] = alone[slot] and job.item is None
        try:
            stats_dict, node_id = ray.get(ref)
        except (RayActorError, RayTaskError) as exc:
            fatal = fatal_io_error(exc)
            if fatal is not None:
                _settle(in_flight)
                raise OutputUnwritable(f"cannot write {out}: {fatal} (free space or fix "
                                       f"permissions, then run the same command to resume)") from None
            if isinstance(exc, RayActorError) and actors[slot] is actor:  # replace it once
                actors[slot] = new_actor(slot)  # what was queued on the dead one fails too (retried)
            if job.item is not None:  # an item run alone
                if attempts[job] < MAX_ITEM_ATTEMPTS:
                    todo.appendleft(job)
                    continue
                reason = (f"processing this sample alone failed {attempts[job]} times: "
                          f"{failure_cause(exc)}; quarantined unread so that the other samples "
                          f"of unit {unit} could be written")
                isolating[unit][1][job.item] = reason
                log.warning("unit %d: sample %d quarantined: %s", unit, job.item, reason)
                item_settled(unit, job.item)
                continue
            if attempts[job] >= MAX_UNIT_ATTEMPTS:
                if job.poisoned is None:  # isolate it by item (see the module docstring)
                    numbers = unit_items(config, out, unit)
                    log.warning("unit %d failed %d times (%s): running its %d samples one by one "
                                "to find the one that fails", unit, attempts[job], failure_cause(exc),
                                len(numbers))
                    isolating[unit] = (set(numbers), {})
                    todo.extendleft(Job(unit, item=n) for n in reversed(numbers))
                    if not numbers:
                        item_settled(unit, -1)
                    continue
                _settle(in_flight)
                raise UnitFailed(f"unit {unit} failed {attempts[job]} times, even sample by sample "
                                 f"with {len(job.poisoned)} quarantined: {one_line(exc)}") from None
            log.warning("unit %d failed (attempt %d), retrying: %s", unit, attempts[job], one_line(exc))
            result.retries += 1
            todo.appendleft(job)
            continue
        if job.item is not None:  # it ran alone without failing: not the poisoned one
            item_settled(unit, job.item)
            continue
        if job.poisoned:
            result.isolated[unit] = dict(job.poisoned)
        if node_id not in labels:
            labels.update(node_labels())
        node = labels.get(node_id, node_id[:8])
        stats = BuildStats.from_dict(stats_dict)
        result.stats = result.stats + stats
        result.unit_nodes[unit] = node
        log.info("unit %d done on node %s (%d samples)", unit, node, stats.samples)
        on_unit_done(unit, stats, node)
    return result
