"""The first run's key index, fingerprinted on Ray workers.

Fingerprinting (one decode, a sha256 and a pHash per key) is what a first run of a large corpus
costs before any unit starts, so it is spread: the driver lists the keys (a folder or bucket
listing, a list file, parquet key columns, a webdataset's tar headers — no image is decoded on the
driver), cuts them into chunks of `CHUNK_KEYS` consecutive keys, and `workers` Ray actors — each
with its own source built from the BuildConfig, so a webdataset shard or a parquet row group is
opened once per actor, not once per chunk — return per key (exact hash as a uint64, pHash,
error). The driver holds only the keys and these numbers and decides the duplicates over the
whole list in key order (`source_index.index_table`): the table is the same bytes whatever the
number of workers, and the same as `source_index.make_index` in one process.

A chunk whose actor dies (a decoder killed by the kernel) is given to a fresh actor once; if that
one dies too, its keys keep their places with the error, and the build quarantines them. A worker
that cannot even open the source (a cluster node without the driver's disk: put the corpus on
object storage) fails the plan with that reason rather than quarantining the corpus.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import pyarrow as pa

from pipeline.config import BuildConfig
from pipeline.dataset.source_index import (KeyIndex, Print, fingerprint_keys, index_table,
                                           list_keys, needs_fingerprints)
from pipeline.storage import is_url

log = logging.getLogger(__name__)

CHUNK_KEYS = 512  # keys per task: ~1 s of decoding for small photos, a few MB of results at most
IN_FLIGHT = 2  # chunks queued per actor, so it never waits for the driver between chunks
CHUNK_ATTEMPTS = 2
# Threads per actor: one for a local corpus (an actor is one CPU in Ray's accounting, and decoding
# is CPU work); several for an object store, where each read waits on a range GET.
LOCAL_THREADS = 1
REMOTE_THREADS = 4


def index_source(config: BuildConfig, workers: int, ray_address: str | None = None,
                 chunk: int = CHUNK_KEYS, phases: dict[str, float] | None = None,
                 ) -> tuple[KeyIndex, pa.Table | None]:
    """List the source's keys here and fingerprint them on Ray (`workers` actors): (the index, its
    table to save; None for a generator source). Ray is started (`flows.ray_runtime.start_ray`,
    which keeps a Ray already running) only when there is something to fingerprint: a generator
    source, or one with nothing to dedup (an importer's sessions), is indexed here. `phases`, when
    given, receives the seconds of the three steps — `list_s` and `decide_s` on the driver,
    `fingerprint_s` on the workers — so a benchmark can tell what divides among workers."""
    from pipeline.unit import make_source

    source = make_source(config)
    if getattr(source, "generator", False) or not needs_fingerprints(source):
        keys = list_keys(source)
        if keys is None:
            return KeyIndex(keys=None), None
        return index_table(source.name, keys, [(None, None, None)] * len(keys))
    from flows.ray_runtime import start_ray

    start_ray(ray_address, workers)
    phases = {} if phases is None else phases
    actors = start_actors(config, workers)  # they start while the driver lists the keys
    try:
        started = time.perf_counter()
        keys = list_keys(source)
        if keys is None:  # a generator that does not say so
            return KeyIndex(keys=None), None
        phases["list_s"] = time.perf_counter() - started
        started = time.perf_counter()
        prints = fingerprint_on_ray(config, keys, workers, chunk, actors=actors)
    finally:
        _kill(actors)
    phases["fingerprint_s"] = seconds = time.perf_counter() - started
    log.info("fingerprinted %d keys on %d Ray workers in %.1f s (%.0f keys/s)", len(keys),
             workers, seconds, len(keys) / max(seconds, 1e-9))
    started = time.perf_counter()
    result = index_table(source.name, keys, prints)
    phases["decide_s"] = time.perf_counter() - started
    return result


def start_actors(config: BuildConfig, workers: int) -> list[Any]:
    """`workers` fingerprinting actors (not waited for)."""
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    return [_fingerprinter().remote(config) for _ in range(workers)]


def _kill(actors: list[Any]) -> None:
    import ray

    for actor in actors:
        ray.kill(actor)


def fingerprint_on_ray(config: BuildConfig, keys: list[str], workers: int,
                       chunk: int = CHUNK_KEYS, actors: list[Any] | None = None) -> list[Print]:
    """Every key's fingerprint, in key order, computed by `workers` actors chunk by chunk (of at
    most `chunk` keys; smaller for a corpus too small to give every worker four chunks)."""
    import ray

    if chunk < 1 or workers < 1:
        raise ValueError(f"chunk and workers must be at least 1, got {chunk} and {workers}")
    # a small corpus still reaches every worker: at least four chunks each when keys allow
    chunk = max(1, min(chunk, -(-len(keys) // (4 * workers))))
    chunks = [keys[i:i + chunk] for i in range(0, len(keys), chunk)]
    results: list[list[Print] | None] = [None] * len(chunks)
    attempts = [0] * len(chunks)
    todo = list(range(len(chunks)))[::-1]  # popped from the end: chunk order
    actor_class = _fingerprinter()
    started = time.perf_counter()
    # the caller's actors, else this call's own (a copy: a dead one is replaced in it; all are
    # killed at the end)
    actors = list(actors) if actors is not None else start_actors(config, workers)
    try:  # a worker that cannot build the source (a path its node lacks) fails the plan, loudly
        ray.get([actor.ready.remote() for actor in actors])
    except ray.exceptions.RayActorError as exc:
        _kill(actors)
        raise RuntimeError(f"an index worker could not open the source: {_cause(exc)}") from None
    log.info("%d index workers ready in %.1f s", len(actors), time.perf_counter() - started)
    pending: dict[Any, tuple[int, Any]] = {}  # object ref → (chunk, actor), in submission order

    def submit(actor: Any) -> None:
        number = todo.pop()
        attempts[number] += 1
        pending[actor.run.remote(chunks[number])] = (number, actor)

    try:
        for actor in actors:
            for _ in range(IN_FLIGHT):
                if todo:
                    submit(actor)
        while pending:
            [ref], _ = ray.wait(list(pending), num_returns=1)
            number, actor = pending[ref]
            try:
                results[number] = ray.get(ref)
                del pending[ref]
            except ray.exceptions.RayActorError as exc:  # the process died under a chunk
                # An actor runs its chunks in order: the first one still queued on it is the one
                # it died on; the others behind it are sent again without counting an attempt.
                lost = [(r, n) for r, (n, a) in pending.items() if a is actor]
                culprit = lost[0][1]
                for r, n in lost:
                    del pending[r]
                    if n != culprit:
                        attempts[n] -= 1
                        todo.append(n)
                reason = _first_line(exc)
                log.warning("an index worker died on keys %s..%s: %s", chunks[culprit][0],
                            chunks[culprit][-1], reason)
                if attempts[culprit] < CHUNK_ATTEMPTS:
                    todo.append(culprit)
                else:
                    results[culprit] = [(None, None, f"its index worker died: {reason}")] \
                        * len(chunks[culprit])
                actors[actors.index(actor)] = actor = actor_class.remote(config)
                for _ in range(IN_FLIGHT - 1):
                    if todo:
                        submit(actor)
            if todo:
                submit(actor)
    finally:
        _kill(actors)  # (killing an actor twice is harmless)
    return [p for part in results for p in part or []]


def _cause(exc: BaseException) -> str:
    """The last line of the error an actor's constructor raised (Ray wraps it in a traceback)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    found = [line for line in lines if "Error:" in line and not line.startswith("ray.")]
    return (found[-1] if found else _first_line(exc))[:300]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


_actor_class = None


def _fingerprinter() -> Any:
    """The Ray actor class (made on first use: importing this module does not import Ray)."""
    global _actor_class
    if _actor_class is None:
        import ray

        @ray.remote(num_cpus=1, max_restarts=0)
        class Fingerprinter:
            def __init__(self, config: BuildConfig):
                from pipeline.unit import make_source

                self.source = make_source(config)
                remote = is_url(str(config.source_options.get("path") or ""))
                self.threads = REMOTE_THREADS if remote else LOCAL_THREADS

            def ready(self) -> bool:
                return True

            def run(self, keys: list[str]) -> list[Print]:
                return fingerprint_keys(self.source, keys, threads=self.threads)

        _actor_class = Fingerprinter
    return _actor_class
