"""Model stages as their own Ray actors: one long-lived model actor per model and per GPU share
(`replicas_for`) loads the diffusers pipeline once and serves generation batches to the CPU unit
workers (worker i to replica i mod replicas). A build whose editor calls several models (routed:
inpaint + instruct) starts actors for each: give each a share (`--num-gpus 0.5` on one GPU).

The seam is one call, `model.generate(seeds, **pipeline_kwargs) -> frames` (float [0, 1] HxWx3,
one per seed; the generators are made from the seeds on the serving side). Three things
implement it:

- `DiffusersModel` (`pipeline.editors.inpaint`): in-process, the pipeline loaded on first use;
  what tests, benches and a bare `UnitPipeline` use, and what a model actor holds;
- `SimulatedDevice`: a stand-in for a GPU whose service time is fixed (`ms_per_batch`, slept)
  and which serves one batch at a time across processes (an `fcntl` lock on a file in its
  directory), returning deterministic frames (a seeded colour inside the mask). It is chosen by
  its directory's `model_index.json` (`SimulatedDevice.save`), so a build, a Ray worker or a model
  actor opens it like any model. `bench/editors.py --simulate` measures with it;
- `ModelClient`: forwards to a `ModelServer` actor, blocking on its own request only.

`open_model(path, device, dtype)` (what the editors call) returns the client when this process was
given a model actor for that model (`attach`, done by `flows.execute`'s unit workers), else the
in-process model.

Batches: a batch is what one unit's lock-step step forms (`GenerativeEditor._step`), sent whole
and served whole, never merged with other units' batches, so a unit's bytes do not depend on what
else is in flight (kernels round by batch shape and row: see `pipeline.editors.inpaint`); the
result equals the in-process path's. Queue bound: a unit worker's client waits for its answer
before it sends another, so at most `workers` requests are queued per model actor and memory
stays flat while the CPU stages run ahead.

Failures: a model actor is restarted by Ray (`max_restarts=-1`, the model reloaded); the request
it was serving fails with `ModelUnavailable`, which fails the whole unit (not its samples), and
`flows.execute` retries the unit, whose batches are then the same again.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.editors.inpaint import DiffusersModel, ModelUnavailable

_ATTACHED: dict[str, Any] = {}  # model key → the model actor serving it in this process


def model_key(path: str, device: str, dtype: str) -> str:
    return json.dumps([str(Path(path).resolve()), device, dtype])


def load_local(path: str, device: str = "cpu", dtype: str = "float32"):
    """The in-process model of directory `path`: a simulated device or a diffusers pipeline."""
    index = Path(path) / "model_index.json"
    if index.is_file() and json.loads(index.read_text()).get("_class_name") == SimulatedDevice.CLASS:
        return SimulatedDevice(path, device, dtype)
    return DiffusersModel(path, device, dtype)


def open_model(path: str, device: str = "cpu", dtype: str = "float32"):
    """What an editor backend calls: the model actor's client when this process was given one for
    this model (`attach`), else the in-process model."""
    local = load_local(path, device, dtype)  # checks the directory; loads nothing yet
    server = _ATTACHED.get(model_key(path, device, dtype))
    return local if server is None else ModelClient(local, server)


def attach(servers: dict[str, Any] | None) -> None:
    """Route this process's editors to the given model actors ({model key: actor handle})."""
    _ATTACHED.clear()
    _ATTACHED.update(servers or {})


class ModelClient:
    """A model actor seen as a model: same description (so the same provenance) and `generate`."""

    def __init__(self, local, server):
        self.local, self.server = local, server
        self.path, self.dtype, self.class_name = local.path, local.dtype, local.class_name

    def describe(self) -> str:
        return self.local.describe()

    def generate(self, seeds: list[int], **pipeline_kwargs) -> list[np.ndarray]:
        import ray
        from ray.exceptions import RayActorError

        try:
            return ray.get(self.server.generate.remote(list(seeds), pipeline_kwargs,
                                                       os.getpid()))
        except RayActorError as exc:  # died (Ray restarts it): the unit is retried whole
            raise ModelUnavailable(f"the model actor of {self.describe()} died: "
                                   f"{str(exc).strip().splitlines()[0][:200]}") from None


class ModelServer:
    """The body of a model actor: one model, one batch on the device at a time, and the figures
    the build publishes (busy seconds, queue depth seen by each arriving request)."""

    def __init__(self, path: str, device: str, dtype: str):
        self.model = load_local(path, device, dtype)
        self.device_lock = threading.Lock()  # one batch at a time on the device
        self.count_lock = threading.Lock()
        self.started = time.perf_counter()
        self.pending = 0
        self.calls = self.frames = self.depth_sum = self.depth_max = 0
        self.busy_seconds = 0.0
        self.first_call: dict[int, float] = {}  # caller's pid → wall-clock time of its first call

    def generate(self, seeds: list[int], pipeline_kwargs: dict[str, Any],
                 caller: int = 0) -> list[np.ndarray]:
        with self.count_lock:
            self.first_call.setdefault(caller, time.time())
            self.pending += 1
            self.calls += 1
            self.depth_sum += self.pending  # itself and those waiting or served before it
            self.depth_max = max(self.depth_max, self.pending)
        try:
            with self.device_lock:
                started = time.perf_counter()
                frames = self.model.generate(seeds, **pipeline_kwargs)
                self.busy_seconds += time.perf_counter() - started
                self.frames += len(seeds)
            return frames
        finally:
            with self.count_lock:
                self.pending -= 1

    def stats(self) -> dict[str, Any]:
        """Since this actor (re)started: calls, frames, busy seconds and share, queue depth."""
        up = time.perf_counter() - self.started
        return {"model": self.model.describe(), "calls": self.calls, "frames": self.frames,
                "busy_seconds": round(self.busy_seconds, 3), "up_seconds": round(up, 3),
                "busy_share": round(self.busy_seconds / up, 4) if up > 0 else 0.0,
                "queue_depth_mean": round(self.depth_sum / self.calls, 3) if self.calls else 0.0,
                "queue_depth_max": self.depth_max, "callers": len(self.first_call),
                "all_callers_since": max(self.first_call.values(), default=0.0)}

    def pid(self) -> int:
        import os

        return os.getpid()


def replicas_for(workers: int, num_gpus: float, cluster_gpus: float) -> int:
    """Model actors per model: one per `num_gpus` share of the cluster's GPUs (one without GPUs),
    never more than the unit workers that feed them."""
    if not num_gpus:
        return 1
    return max(1, min(workers, int(cluster_gpus // num_gpus)))


def start_servers(editor, workers: int, num_gpus: float = 0) -> dict[str, list]:
    """The model actors of each model `editor` calls ({model key: [handle per replica]}; {} for
    an editor with no model; see `replicas_for`). Each asks Ray for `num_gpus` (the unit workers
    then ask for none) and no CPU; threads enough for every worker's one request plus `stats`."""
    import ray

    actor = ray.remote(ModelServer).options(
        num_cpus=0, num_gpus=num_gpus, max_restarts=-1, max_task_retries=0,
        max_concurrency=workers + 1)
    models = editor.models() if hasattr(editor, "models") else []
    keys = {model_key(str(m.path), m.device, m.dtype): m for m in models}
    if not keys:
        return {}
    per_model = replicas_for(workers, num_gpus, ray.cluster_resources().get("GPU", 0) / len(keys))
    return {key: [actor.remote(str(m.path), m.device, m.dtype) for _ in range(per_model)]
            for key, m in keys.items()}


def server_stats(servers: dict[str, list]) -> list[dict[str, Any]]:
    """Each model actor's `stats` (those of a dead one are gone: skipped)."""
    import ray

    rows = []
    for server in (s for replicas in servers.values() for s in replicas):
        try:
            rows.append(ray.get(server.stats.remote(), timeout=30))
        except Exception:  # noqa: BLE001 - figures only; the build's result does not depend on them
            continue
    return rows


class SimulatedDevice:
    """A simulated GPU (see the module docstring): `generate` waits for the device (an exclusive
    `fcntl` lock on `device.lock` in its directory, shared by every process), sleeps
    `ms_per_batch`, and logs `arrive start end frames pid` (wall-clock seconds; the serving
    process) to `device.log`."""

    CLASS = "SimulatedDevicePipeline"

    def __init__(self, path: str, device: str = "cpu", dtype: str = "float32"):
        self.path, self.device, self.dtype, self.class_name = Path(path), device, dtype, self.CLASS
        self.ms_per_batch = float(json.loads((self.path / "model_index.json").read_text())
                                  ["ms_per_batch"])

    @classmethod
    def save(cls, path: Path, ms_per_batch: float) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / "model_index.json").write_text(json.dumps({"_class_name": cls.CLASS,
                                                           "ms_per_batch": ms_per_batch}))
        return path

    def describe(self) -> str:
        return f"{self.CLASS}:{self.path.name}"

    def generate(self, seeds: list[int], **pipeline_kwargs) -> list[np.ndarray]:
        import fcntl
        import os

        arrive = time.time()
        with open(self.path / "device.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            start = time.time()
            time.sleep(self.ms_per_batch / 1000)
            end = time.time()
            fcntl.flock(lock, fcntl.LOCK_UN)
        with open(self.path / "device.log", "a") as log:  # one short append: atomic
            log.write(f"{arrive:.6f} {start:.6f} {end:.6f} {len(seeds)} {os.getpid()}\n")
        masks = pipeline_kwargs.get("mask_image") or [None] * len(seeds)
        return [self._frame(seed, image, mask)
                for seed, image, mask in zip(seeds, pipeline_kwargs["image"], masks)]

    @staticmethod
    def _frame(seed: int, image, mask) -> np.ndarray:
        """The image with a seeded colour where the mask is set (everywhere without one)."""
        frame = np.asarray(image, dtype=np.float32) / 255.0
        colour = np.random.default_rng(seed).random(3, dtype=np.float32)
        where = np.ones(frame.shape[:2], bool) if mask is None else np.asarray(mask) > 127
        frame[where] = 0.5 * frame[where] + 0.5 * colour
        return frame


def device_log(path: Path) -> list[tuple[float, float, float, int, int]]:
    """The simulated device's (arrive, start, end, frames, pid) rows, by arrival."""
    log = Path(path) / "device.log"
    rows = [line.split() for line in log.read_text().splitlines()] if log.is_file() else []
    return sorted((float(a), float(s), float(e), int(n), int(p)) for a, s, e, n, p in rows)


def device_figures(rows, since: float, until: float) -> dict[str, float]:
    """From `device_log` rows within [since, until]: the busy share of that wall time, and the
    queue depth each batch found on arrival (itself, those waiting and the one being served)."""
    rows = [r for r in rows if since <= r[0] and r[2] <= until]
    busy = sum(end - start for _, start, end, _, _ in rows)
    depths = [sum(1 for a, _, e, _, _ in rows if a <= arrive < e) for arrive, *_ in rows]
    return {"batches": len(rows), "frames": sum(r[3] for r in rows),
            "busy_share": busy / (until - since) if until > since else 0.0,
            "queue_depth_mean": sum(depths) / len(depths) if depths else 0.0,
            "queue_depth_max": max(depths, default=0)}
