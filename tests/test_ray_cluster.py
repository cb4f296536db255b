"""`mcie build --ray-address` against a real two-node Ray cluster started on this machine.

Head and worker node are two `ray start --block` processes on loopback, each with one CPU (the
worker node also with a resource of its own), in their own sessions so teardown stops exactly
them. Two build actors need two CPUs, so both nodes must work; the build names the node of every
unit and must equal a local build with the same parameters.

Each node runs in a working directory of its own and is started without the S3 server's
variables: the build from webdataset shards in a bucket into an OUT in a bucket gets its storage
settings to the workers through the job's runtime env and relies on no path the nodes share.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from code_snapshot import env_with, snapshot
from processes import free_port, stop_session

RAY = str(Path(sys.executable).with_name("ray"))
HEAD_IP, WORKER_IP = "127.0.0.2", "127.0.0.3"
BUILD = ["--count", "24", "--resolution", "128", "--shard-size", "3", "--seed", "5", "--workers", "2"]


def alive_nodes(address: str) -> int:
    code = ("import ray; ray.init(address=%r, logging_level='ERROR'); "
            "print(sum(n['Alive'] for n in ray.nodes()))" % address)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    return int(result.stdout.strip().splitlines()[-1]) if result.returncode == 0 else 0


@pytest.fixture(scope="module")
def cluster():
    # short: Ray puts unix sockets under the temp dir; not the project's .ray, so no local
    # `ray.init` of another test ever finds this cluster
    temp_dir = Path(tempfile.mkdtemp(prefix="mcie-rc-"))
    port = free_port()
    # Each node on its own loopback address (Ray rewrites 127.0.0.1 to the external one), so every
    # byte between the nodes stays on loopback.
    address = f"{HEAD_IP}:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "FSSPEC_", "MCIE_STORAGE"))}
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    common = ["--block", "--num-cpus", "1", "--disable-usage-stats"]
    logs = [open(temp_dir / f"node{i}.log", "w") for i in range(2)]
    homes = [temp_dir / f"node{i}-cwd" for i in range(2)]  # no working directory in common
    for home in homes:
        home.mkdir()
    head = subprocess.Popen(
        [RAY, "start", "--head", "--port", str(port), "--temp-dir", str(temp_dir),
         "--include-dashboard", "false", "--node-ip-address", HEAD_IP, *common],
        env=env, start_new_session=True, stdout=logs[0], stderr=subprocess.STDOUT, cwd=homes[0])
    nodes = [head]
    try:
        deadline = time.monotonic() + 90
        while alive_nodes(address) < 1:
            assert head.poll() is None and time.monotonic() < deadline, (temp_dir / "node0.log").read_text()
            time.sleep(1)
        worker = subprocess.Popen(
            [RAY, "start", "--address", address, "--resources", '{"second_node": 1}',
             "--node-ip-address", WORKER_IP, *common],
            env=env, start_new_session=True, stdout=logs[1], stderr=subprocess.STDOUT, cwd=homes[1])
        nodes.append(worker)
        while alive_nodes(address) < 2:
            assert worker.poll() is None and time.monotonic() < deadline, (temp_dir / "node1.log").read_text()
            time.sleep(1)
        yield address
    finally:
        for proc in reversed(nodes):
            stop_session(proc)
        for log in logs:
            log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def code(tmp_path_factory) -> Path:
    return snapshot(tmp_path_factory.mktemp("code"))


def mcie(code: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=code, capture_output=True,
                          text=True, timeout=300, env=env or env_with(code))


@pytest.mark.slow
def test_build_on_a_two_node_cluster_uses_both_nodes_and_equals_a_local_build(cluster, code, tmp_path: Path):
    out = tmp_path / "cluster"
    result = mcie(code, "build", "--out", str(out), *BUILD, "--ray-address", cluster)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"ray cluster at {cluster} (2 nodes" in result.stderr
    per_node = dict((node, int(n)) for n, node in
                    re.findall(r"^\s+(\d+)\s+(\S+/[0-9a-f]{8})$", result.stdout, re.M))
    assert len(per_node) == 2, result.stdout  # both nodes processed units
    assert sum(per_node.values()) == 8 and min(per_node.values()) >= 1

    verified = mcie(code, "verify", str(out))
    assert verified.returncode == 0, verified.stdout + verified.stderr

    # RAY_ADDRESS names the cluster just as well; a finished build is left alone
    again = mcie(code, "build", "--out", str(out), *BUILD, env=env_with(code, RAY_ADDRESS=cluster))
    assert again.returncode == 0 and "already complete" in again.stdout

    local = tmp_path / "local"
    env = {k: v for k, v in env_with(code).items() if k != "RAY_ADDRESS"}
    result = mcie(code, "build", "--out", str(local), *BUILD, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "local ray" in result.stderr
    assert pq.read_table(out / "manifest.parquet").to_pylist() == \
        pq.read_table(local / "manifest.parquet").to_pylist()


@pytest.mark.slow
def test_a_build_from_a_bucket_into_a_bucket_needs_no_shared_disk(cluster, code, s3, tmp_path: Path):
    from test_s3_out import put_shards, s3_tree

    bucket = s3.bucket()
    fs = s3.filesystem()
    put_shards(fs, f"{bucket}/shards")
    source = ["--source", "webdataset", "--source-path", f"s3://{bucket}/shards/", "--resolution", "128",
              "--shard-size", "2", "--workers", "2", "--seed", "5"]
    result = mcie(code, "build", "--out", f"s3://{bucket}/cluster", *source, "--ray-address", cluster,
                  env=env_with(code, **s3.env()))
    assert result.returncode == 0, result.stderr[-3000:]
    per_node = dict((node, int(n)) for n, node in
                    re.findall(r"^\s+(\d+)\s+(\S+/[0-9a-f]{8})$", result.stdout, re.M))
    assert len(per_node) == 2, result.stdout  # both nodes wrote units into the bucket
    assert not list((tmp_path).iterdir())  # nothing local: the OUT is the bucket

    env = {k: v for k, v in env_with(code, **s3.env()).items() if k != "RAY_ADDRESS"}
    local = mcie(code, "build", "--out", f"s3://{bucket}/local", *source, env=env)
    assert local.returncode == 0, local.stderr[-3000:]
    assert s3_tree(fs, f"{bucket}/cluster") == s3_tree(fs, f"{bucket}/local")
