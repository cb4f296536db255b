"""prefect.yaml for real: a local Prefect server, `prefect deploy --all`, a process worker, and a
deployment run of the build that must produce the same dataset as `mcie build`.

Server and worker are started by the test on 127.0.0.1 with a PREFECT_HOME of their own, each in
its own session so teardown stops exactly them.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from code_snapshot import env_with, snapshot
from processes import free_port, stop_session

PREFECT = str(Path(sys.executable).with_name("prefect"))
PARAMS = {"count": 20, "resolution": 128, "shard_size": 4, "seed": 21, "workers": 2}
DEPLOYMENTS = {"build-dataset/build-dataset", "review-sync/review-sync", "train/train"}


def tree(out: Path) -> dict[str, str]:
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file() and p.name != "report.html"}


@pytest.fixture(scope="module")
def code(tmp_path_factory) -> Path:
    """Deploy from a frozen copy of the code: the worker's run and `mcie build` use the same."""
    return snapshot(tmp_path_factory.mktemp("code"))


@pytest.fixture(scope="module")
def server(tmp_path_factory, code):
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = env_with(code, PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
                   PREFECT_API_URL=api, PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)
    log = open(home / "server.log", "w")
    proc = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            env={k: v for k, v in env.items() if k != "PREFECT_API_URL"},
                            start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{api}/health", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, (home / "server.log").read_text()[-3000:]
            time.sleep(0.5)
        yield env
    finally:
        stop_session(proc)
        log.close()


def prefect(env: dict, *args: str, timeout: int = 180) -> subprocess.CompletedProcess:
    cwd = env["PYTHONPATH"].split(os.pathsep)[0]  # the code snapshot, holding prefect.yaml
    return subprocess.run([PREFECT, "--no-prompt", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
def test_deploy_all_and_a_worker_run_builds_the_same_dataset_as_mcie_build(server, code, tmp_path: Path):
    env = server
    created = prefect(env, "work-pool", "create", "mcie-process", "--type", "process")
    assert created.returncode == 0, created.stdout + created.stderr

    deployed = prefect(env, "deploy", "--all")
    assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]
    listed = prefect(env, "deployment", "ls")
    for name in DEPLOYMENTS:
        assert name in listed.stdout, listed.stdout

    # parameters are checked against the flow signature before anything runs
    bad = prefect(env, "deployment", "run", "build-dataset/build-dataset", "--param", "count=many")
    assert bad.returncode != 0, bad.stdout + bad.stderr

    out = tmp_path / "deployed"
    worker_log = open(tmp_path / "worker.log", "w")
    worker = subprocess.Popen([PREFECT, "worker", "start", "--pool", "mcie-process", "--limit", "1"],
                              cwd=tmp_path, env=env, start_new_session=True, stdout=worker_log,
                              stderr=subprocess.STDOUT)
    try:
        params = [arg for key, value in {**PARAMS, "out": str(out)}.items()
                  for arg in ("--param", f"{key}={value}")]
        run = prefect(env, "deployment", "run", "build-dataset/build-dataset", *params, "--watch",
                      "--watch-timeout", "400", timeout=450)
        assert run.returncode == 0, run.stdout[-3000:] + (tmp_path / "worker.log").read_text()[-4000:]
        assert "Completed" in run.stdout, run.stdout[-3000:]
    finally:
        stop_session(worker)
        worker_log.close()

    # the run published its numbers: summary, tables and the report's path
    artifacts = prefect(env, "artifact", "ls", "--output", "json")
    assert artifacts.returncode == 0, artifacts.stderr
    by_key = {a["key"]: a for a in json.loads(artifacts.stdout)}
    for key in ("build-summary", "build-verdicts", "build-edit-types", "build-quarantine",
                "build-throughput", "build-report"):
        assert key in by_key, sorted(by_key)
    assert str((out / "report.html").resolve()) in by_key["build-report"]["data"]
    verdicts = {row["verdict"]: row["samples"] for row in json.loads(by_key["build-verdicts"]["data"])}
    assert verdicts["total"] == PARAMS["count"]

    reference = tmp_path / "cli"
    cli_home = tmp_path / "cli-prefect-home"  # its own ephemeral API and database
    cli_home.mkdir()
    cli_env = {**{k: v for k, v in env.items() if k != "PREFECT_API_URL"}, "PREFECT_HOME": str(cli_home)}
    built = subprocess.run(
        [sys.executable, "-m", "flows.cli", "build", "--out", str(reference),
         "--count", str(PARAMS["count"]), "--resolution", str(PARAMS["resolution"]),
         "--shard-size", str(PARAMS["shard_size"]), "--seed", str(PARAMS["seed"]),
         "--workers", str(PARAMS["workers"])],
        cwd=code, env=cli_env, capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]

    assert json.loads((out / "config.json").read_text()) == json.loads((reference / "config.json").read_text())
    assert pq.read_table(out / "manifest.parquet").to_pylist() == \
        pq.read_table(reference / "manifest.parquet").to_pylist()
    assert tree(out) == tree(reference)
    assert (out / "report.html").is_file()



class _Failed:
    """A finished task state whose result raises, as Prefect hands it to `retry_condition_fn`."""

    def __init__(self, exc: BaseException):
        self.exc = exc

    def result(self):
        raise self.exc


def test_review_sync_retries_only_when_label_studio_is_unreachable():
    from annotation.client import LabelStudioAuthError, LabelStudioError, LabelStudioUnavailable
    from flows.review import pull_verdicts, push_queue, retry_if_unavailable

    assert retry_if_unavailable(None, None, _Failed(LabelStudioUnavailable("connection refused")))
    assert not retry_if_unavailable(None, None, _Failed(LabelStudioAuthError("bad key")))
    assert not retry_if_unavailable(None, None, _Failed(LabelStudioError("400: bad request")))
    assert not retry_if_unavailable(None, None, _Failed(ValueError("bad review dir")))
    for task in (push_queue, pull_verdicts):
        assert task.retries >= 1 and task.retry_condition_fn is retry_if_unavailable
