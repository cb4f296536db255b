"""Model stages as their own Ray actors (`pipeline.model_actors`, `flows.execute`): the same bytes
as the in-process path whatever the number of CPU workers, after a model actor's death and after
`kill -9` of the build; the device kept busier than with the model inside the unit worker
(measured with the simulated device, as counted quantities and shares, never absolute speed)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from model_fixtures import tiny_inpaint
from photo_fixtures import photo_folder
from pipeline.config import BuildConfig
from pipeline.editors.inpaint import ModelUnavailable
from pipeline.model_actors import (ModelClient, ModelServer, SimulatedDevice, attach,
                                   device_figures, device_log, model_key, open_model,
                                   replicas_for)

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ["rocket", "motorcycle_left", "coffee"]  # things the classical grounder names at 64 px


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    return photo_folder(tmp_path_factory.mktemp("photos"), PHOTOS)


def config(photos: Path, model: Path, count: int = 6, unit: int = 2, **options) -> BuildConfig:
    return BuildConfig(count=count, seed=5, resolution=64, shard_size=unit, source="folder",
                       source_options={"path": str(photos)}, editor="inpaint",
                       editor_options={"path": str(model), "steps": 1, "max_side": 64, **options},
                       edits_per_image=-(-count // len(PHOTOS)), min_edits=2, max_edits=3,
                       defect_rate=0.0)


def tree(out: Path) -> dict[str, str]:
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file() and p.name != "report.html"}


def in_process(cfg: BuildConfig, out: Path) -> dict[str, str]:
    """The reference: the units in a bare loop, the model in this process."""
    from flows.plan import prepare_build
    from pipeline.dataset.output import finalize
    from pipeline.unit import UnitPipeline

    prepare_build(out, cfg)
    pipeline = UnitPipeline(cfg, out)
    for unit in range(cfg.num_units(pipeline.total)):
        pipeline.run(unit)
    finalize(out)
    return tree(out)


def on_ray(cfg: BuildConfig, out: Path, workers: int, model_actors: bool = True):
    from flows.execute import run_units
    from flows.plan import prepare_build
    from pipeline.dataset.output import finalize

    total = prepare_build(out, cfg)
    result = run_units(cfg, out, list(range(cfg.num_units(total))), workers,
                       model_actors=model_actors)
    finalize(out)
    return result, tree(out)


@pytest.fixture(scope="module")
def ray_local():
    from flows.ray_runtime import start_ray, stop_ray

    start_ray(None, 2)
    yield
    stop_ray()


# -- no Ray: the seam ---------------------------------------------------------------------------------

def test_the_simulated_device_serves_one_batch_at_a_time_with_seeded_frames(tmp_path):
    from PIL import Image

    device = SimulatedDevice(SimulatedDevice.save(tmp_path / "dev", 40))
    image = Image.fromarray(np.full((16, 24, 3), 100, np.uint8))
    mask = np.zeros((16, 24), np.uint8)
    mask[4:8, 4:12] = 255
    kwargs = {"image": [image, image], "mask_image": [Image.fromarray(mask)] * 2}
    threads = [threading.Thread(target=device.generate, args=([1, 2],), kwargs=kwargs)
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rows = device_log(tmp_path / "dev")
    assert len(rows) == 3 and all(r[3] == 2 for r in rows)
    spans = sorted((start, end) for _, start, end, _, _ in rows)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))  # never two batches at once
    figures = device_figures(rows, min(r[0] for r in rows), max(r[2] for r in rows))
    assert figures["queue_depth_max"] >= 2 and figures["busy_share"] > 0.5
    a, b = device.generate([1, 2], **kwargs)
    assert np.array_equal(a, device.generate([1], **kwargs)[0])  # an item's frame: its own seed
    assert not np.array_equal(a, b)
    assert np.array_equal(a[0, 0], np.full(3, 100 / 255, np.float32))  # outside the mask: as given
    assert not np.array_equal(a[5, 5], a[0, 0])


def test_open_model_is_the_actors_client_only_where_one_was_attached(tmp_path):
    path = SimulatedDevice.save(tmp_path / "dev", 0)
    assert isinstance(open_model(str(path)), SimulatedDevice)
    attach({model_key(str(path), "cpu", "float32"): object()})
    try:
        client = open_model(str(path))
        assert isinstance(client, ModelClient)
        assert client.describe() == SimulatedDevice(path).describe()  # the same provenance
        assert isinstance(open_model(str(path), dtype="float16"), SimulatedDevice)  # another model
    finally:
        attach({})
    assert isinstance(open_model(str(path)), SimulatedDevice)


def test_the_server_counts_queue_depth_and_busy_time(tmp_path):
    server = ModelServer(str(SimulatedDevice.save(tmp_path / "dev", 50)), "cpu", "float32")
    from PIL import Image

    kwargs = {"image": [Image.fromarray(np.zeros((8, 8, 3), np.uint8))]}
    threads = [threading.Thread(target=server.generate, args=([k], kwargs)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stats = server.stats()
    assert stats["calls"] == 3 and stats["frames"] == 3
    assert stats["queue_depth_max"] == 3 or stats["queue_depth_mean"] > 1  # they queued
    assert stats["queue_depth_max"] <= 3  # never more than the callers
    assert 0.15 <= stats["busy_seconds"] < 1.0  # three batches of 50 ms, one at a time


def test_an_editor_names_the_models_a_build_serves(tmp_path):
    from pipeline.editors.base import EDITORS

    a, b = SimulatedDevice.save(tmp_path / "a", 0), SimulatedDevice.save(tmp_path / "b", 0)
    assert [m.path for m in EDITORS.make("inpaint", path=str(a)).models()] == [a]
    routes = {"default": {"backend": "inpaint", "path": str(a)},
              "types": {"add_text": {"backend": "photo"},
                        "remove": {"backend": "inpaint", "path": str(a), "steps": 3},
                        "background": {"backend": "instruct", "path": str(b)}}}
    models = EDITORS.make("routed", routes=routes).models()
    # two backends on model a (other steps), one on b: two models to serve, no photo step
    assert sorted({model_key(str(m.path), m.device, m.dtype) for m in models}) == sorted(
        model_key(str(p), "cpu", "float32") for p in (a, b))


def test_one_model_actor_per_gpu_share_never_more_than_the_workers():
    assert replicas_for(workers=4, num_gpus=0, cluster_gpus=0) == 1  # CPU: one
    assert replicas_for(workers=4, num_gpus=1, cluster_gpus=2) == 2
    assert replicas_for(workers=4, num_gpus=0.5, cluster_gpus=1) == 2
    assert replicas_for(workers=2, num_gpus=0.25, cluster_gpus=8) == 2  # the workers bound it
    assert replicas_for(workers=2, num_gpus=2, cluster_gpus=1) == 1  # Ray then waits for a GPU


def test_a_dead_model_actor_fails_the_unit_not_its_samples(photos, tmp_path):
    """Item by item after a death would change the batches, hence the bytes: the unit must fail
    whole (and be retried by flows.execute)."""
    from flows.plan import prepare_build
    from pipeline.dataset.source_index import read_index
    from pipeline.unit import front_stages, make_source, read_sample

    cfg = config(photos, SimulatedDevice.save(tmp_path / "dev", 0), count=4)
    prepare_build(tmp_path / "out", cfg)
    source, index = make_source(cfg), read_index(tmp_path / "out")
    samples = [read_sample(source, cfg, index, n) for n in range(4)]
    grounder, composer, editor = front_stages(cfg)
    samples = [s for s in composer(grounder(samples)) if not s.failed]
    assert len(samples) >= 2  # a batch of several

    class Dead:
        calls = 0

        def generate(self, seeds, **kwargs):
            Dead.calls += 1
            raise ModelUnavailable("the model actor died")

    editor.model = Dead()
    with pytest.raises(ModelUnavailable):
        editor(samples)
    assert Dead.calls == 1 and not any(s.failed for s in samples)


# -- on Ray -----------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_generative_build_is_the_same_bytes_with_1_and_2_workers_and_in_process(
        photos, tmp_path, ray_local):
    import torch

    model = tiny_inpaint(tmp_path / "m" / "sd-inpaint-tiny")
    cfg = config(photos, model)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as a Ray actor runs it
    try:
        reference = in_process(cfg, tmp_path / "in-process")
    finally:
        torch.set_num_threads(threads)
    assert any(name.startswith("shards/") for name in reference)
    for workers in (1, 2):
        result, files = on_ray(cfg, tmp_path / f"workers-{workers}", workers)
        assert files == reference, workers
        (served,) = result.models  # one model actor served every unit's batches
        assert served["calls"] >= cfg.num_units(cfg.count) and served["frames"] >= served["calls"]
        assert 1 <= served["queue_depth_max"] <= workers  # each worker: one request in flight


def test_a_killed_model_actor_is_replaced_and_the_build_completes(photos, tmp_path, ray_local):
    device = SimulatedDevice.save(tmp_path / "dev", 0)
    cfg = config(photos, device)
    reference = in_process(cfg, tmp_path / "reference")
    (device / "device.log").unlink()
    SimulatedDevice.save(device, 300)
    killed = []

    def kill_the_server():  # the serving process, read from the device's log, once it served
        deadline = time.monotonic() + 120
        while not device_log(device) and time.monotonic() < deadline:
            time.sleep(0.05)
        pid = device_log(device)[0][4]
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    killer = threading.Thread(target=kill_the_server)
    killer.start()
    result, files = on_ray(cfg, tmp_path / "out", 2)
    killer.join()
    assert killed and killed[0] != os.getpid()
    servers = {r[4] for r in device_log(device)}
    assert len(servers) >= 2 and killed[0] in servers  # a new actor served after the kill
    assert result.retries >= 1  # the unit whose batch died was retried whole
    assert files == reference


def test_the_model_actor_keeps_the_device_busier(photos, tmp_path, ray_local):
    """Device time about the CPU stages' per batch: with the model in the only unit worker (one
    GPU, --num-gpus 1) no batch ever waits for the device — it idles while that worker runs its
    CPU stages; with a model actor fed by two CPU workers, batches arrive while the device is
    busy (one worker's CPU stages ran ahead while the other's batch was served), from both
    workers. Counted, not timed: the busy shares themselves are the benchmark's
    (`bench/editors.py --simulate`, docs/stages.md), printed here only on failure."""
    shares, depths = {}, {}
    for design, workers, actors in (("in-actor", 1, False), ("model-actor", 2, True)):
        device = SimulatedDevice.save(tmp_path / design / "dev", 200)
        result, _ = on_ray(config(photos, device, count=24, unit=3), tmp_path / design / "out",
                           workers, actors)
        rows = device_log(device)
        figures = device_figures(rows, rows[0][0], max(r[2] for r in rows))
        shares[design], depths[design] = figures["busy_share"], figures["queue_depth_max"]
        assert figures["batches"] >= 8 and result.stats.samples == 24
        assert len({pid for *_, pid in rows}) == 1  # one model, served by one process
        if actors:  # both workers sent batches to the one model actor, at most one each queued
            assert result.models[0]["callers"] == 2
            # the actor serialises before the device logs an arrival: its own count of waiting batches
            depths[design] = result.models[0]["queue_depth_max"]
    assert depths == {"in-actor": 1, "model-actor": 2}, (depths, shares)


# -- the build command: kill -9 and resume, the Prefect artifact --------------------------------------

def mcie_env(prefect_home: Path) -> dict[str, str]:
    prefect_home.mkdir(parents=True, exist_ok=True)
    return {**os.environ, "PYTHONUNBUFFERED": "1", "PREFECT_HOME": str(prefect_home)}


def build_args(out: Path, photos: Path, device: Path) -> list[str]:
    return [sys.executable, "-m", "flows.cli", "build", "--out", str(out), "--count", "12",
            "--resolution", "64", "--shard-size", "2", "--seed", "3", "--defect-rate", "0",
            "--source", "folder", "--source-path", str(photos), "--edits-per-image", "4",
            "--editor", "inpaint", "--editor-path", str(device), "--editor-steps", "1",
            "--editor-option", "max_side=64", "--workers", "2"]


def parts_done(out: Path) -> int:
    return len(list((out / "parts").glob("unit-*.parquet"))) if (out / "parts").is_dir() else 0


@pytest.mark.slow
def test_kill_9_mid_build_then_resume_gives_the_same_bytes_and_the_models_artifact(
        photos, tmp_path):
    from processes import session_processes

    device = SimulatedDevice.save(tmp_path / "dev", 150)
    whole, home = tmp_path / "whole", tmp_path / "prefect-whole"
    done = subprocess.run(build_args(whole, photos, device), cwd=ROOT, capture_output=True,
                          text=True, timeout=400, env=mcie_env(home))
    assert done.returncode == 0, done.stderr[-3000:]
    listed = subprocess.run([sys.executable, "-m", "prefect", "artifact", "ls", "--output", "json"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env=mcie_env(home))
    assert listed.returncode == 0, listed.stderr[-2000:]
    by_key = {a["key"]: a for a in json.loads(listed.stdout)}
    assert "build-models" in by_key, sorted(by_key)
    (row,) = json.loads(by_key["build-models"]["data"])
    assert row["model"] == f"{SimulatedDevice.CLASS}:dev" and row["batches"] >= 6
    assert 1 <= row["queue depth max"] <= 2 and 0 < row["busy share"] <= 1

    killed = tmp_path / "killed"
    proc = subprocess.Popen(build_args(killed, photos, device), cwd=ROOT,
                            env=mcie_env(tmp_path / "prefect-killed"), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while proc.poll() is None and parts_done(killed) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proc.poll() is None, "the build finished before the kill"
        os.killpg(proc.pid, signal.SIGKILL)  # the driver, its Ray, its model actor: all at once
    finally:
        proc.wait()
        deadline = time.monotonic() + 20
        while session_processes(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in session_processes(proc.pid):
            os.kill(pid, signal.SIGKILL)
    assert 2 <= parts_done(killed) < 6
    resumed = subprocess.run(build_args(killed, photos, device), cwd=ROOT, capture_output=True,
                             text=True, timeout=400, env=mcie_env(tmp_path / "prefect-resumed"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert tree(killed) == tree(whole)
