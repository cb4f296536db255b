"""A build whose OUT is on object storage (`mcie build --out s3://BUCKET/prefix`) against a real S3
server (SeaweedFS): the same bytes as the same build into a local folder, an idempotent rerun, resume
after `kill -9` of the whole process group with the same bytes as an uninterrupted build (from
webdataset shards in a bucket into an OUT in a bucket), and one writer per OUT through a lock object.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from code_snapshot import env_with, snapshot
from test_resume import reap_session

# The builds (Prefect and Ray in subprocesses) are slow; the in-process tests only start SeaweedFS.

ROOT = Path(__file__).resolve().parents[1]
PROCEDURAL = ["--count", "24", "--resolution", "128", "--shard-size", "4", "--workers", "2", "--seed", "3"]
NOT_COMPARED = {"report.html", ".mcie.lock"}  # the report names OUT itself; the lock is local only


def mcie(args: list[str], code: Path, home: Path, timeout: int = 400) -> subprocess.CompletedProcess:
    home.mkdir(parents=True, exist_ok=True)
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=code, capture_output=True,
                          text=True, timeout=timeout,
                          env=env_with(code, PYTHONUNBUFFERED="1", PREFECT_HOME=str(home)))


def local_tree(out: Path) -> dict[str, str]:
    return {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file() and p.name not in NOT_COMPARED}


def s3_objects(fs, root: str) -> list[str]:
    """Every object under `root` (SeaweedFS may list an emptied prefix as a folder: not an object)."""
    found = fs.find(root, detail=True)
    return sorted(name for name, info in found.items()
                  if info.get("type") == "file" and name.rstrip("/") != root and not name.endswith("/"))


def s3_tree(fs, root: str) -> dict[str, str]:
    return {name[len(root) + 1:]: hashlib.sha256(fs.cat_file(name)).hexdigest()
            for name in s3_objects(fs, root) if name.rsplit("/", 1)[-1] not in NOT_COMPARED}


# ---- in process: one unit, the merge ---------------------------------------------------------------

def test_write_unit_and_finalize_into_a_bucket_equal_the_local_ones(s3, tmp_path):
    from pipeline import storage
    from pipeline.dataset.output import finalize, read_manifest, read_quarantine, unit_done, write_unit
    from shard_samples import unit_samples

    fs = s3.filesystem()
    bucket = s3.bucket()
    out = storage.location(f"s3://{bucket}/o")
    for where in (tmp_path / "local", out):
        assert not unit_done(where, 0)
        written = unit_samples()
        write_unit(where, 0, written)
        write_unit(where, 1, unit_samples(start=8))
        assert unit_done(where, 0) and unit_done(where, 1)
        finalize(where)
    expected = local_tree(tmp_path / "local")
    assert {k.split("/")[0] for k in expected} >= {"shards", "parts", "review", "rejudge", "quarantine"}
    assert s3_tree(fs, f"{bucket}/o") == expected
    assert read_manifest(out).equals(read_manifest(tmp_path / "local"))
    failed = written[-1]  # unit_samples() ends with a sample that failed: quarantined
    assert read_quarantine(out, failed.id).error == failed.error


def test_a_rerun_of_a_unit_in_a_bucket_withdraws_its_marker_and_old_outputs(s3, monkeypatch):
    from pipeline import storage
    from pipeline.dataset import output
    from pipeline.dataset.output import unit_done, write_unit
    from shard_samples import unit_samples

    fs = s3.filesystem()
    bucket = s3.bucket()
    out = storage.location(f"s3://{bucket}/o")
    samples = unit_samples()
    write_unit(out, 0, samples)
    clean = s3_tree(fs, f"{bucket}/o")
    borderline = next(s for s in samples if s.verdict == "borderline")
    assert f"review/{borderline.id}/sample.json" in clean

    monkeypatch.setattr(output, "write_members_dir",  # killed after the tars, before the marker
                        lambda *a: (_ for _ in ()).throw(OSError("killed")))
    with pytest.raises(OSError, match="killed"):
        write_unit(out, 0, unit_samples())
    assert not unit_done(out, 0)  # the marker went first
    monkeypatch.undo()

    samples = unit_samples()
    next(s for s in samples if s.id == borderline.id).verdict = "accept"  # its verdict changed
    write_unit(out, 0, samples)
    now = s3_tree(fs, f"{bucket}/o")
    assert not [k for k in now if k.startswith(f"review/{borderline.id}/")]  # the old place is gone
    assert unit_done(out, 0) and now != clean
    samples = unit_samples()
    samples[0].fail("edit", ValueError("failed this time"))
    write_unit(out, 0, samples)
    assert f"quarantine/{samples[0].id}.json" in s3_tree(fs, f"{bucket}/o")
    write_unit(out, 0, unit_samples())
    assert s3_tree(fs, f"{bucket}/o") == clean  # the same unit again: the same bytes


@pytest.fixture
def code(tmp_path):
    """A frozen copy of the code: other work on the checkout cannot change a build mid-test."""
    return snapshot(tmp_path / "code")


@pytest.mark.slow
def test_procedural_build_into_a_bucket_equals_the_local_build(s3, code, tmp_path):
    bucket = s3.bucket()
    fs = s3.filesystem()
    local = tmp_path / "local"
    built = mcie(["build", "--out", str(local), *PROCEDURAL], code, tmp_path / "p1")
    assert built.returncode == 0, built.stderr[-3000:]
    remote = mcie(["build", "--out", f"s3://{bucket}/o", *PROCEDURAL], code, tmp_path / "p2")
    assert remote.returncode == 0, remote.stderr[-3000:]
    assert f"report: s3://{bucket}/o/report.html" in remote.stdout

    expected = local_tree(local)
    assert "manifest.parquet" in expected and any(k.startswith("shards/train-") for k in expected)
    assert s3_tree(fs, f"{bucket}/o") == expected  # every object, byte for byte
    assert not fs.exists(f"{bucket}/o/.mcie.lock")  # released: removed
    assert fs.exists(f"{bucket}/o/report.html")
    assert not [n for n in s3_objects(fs, f"{bucket}/o") if "probe" in n]

    again = mcie(["build", "--out", f"s3://{bucket}/o", *PROCEDURAL], code, tmp_path / "p3")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already complete, nothing to do" in again.stdout
    assert s3_tree(fs, f"{bucket}/o") == expected

    verified = mcie(["verify", f"s3://{bucket}/o"], code, tmp_path / "p3")  # (helper B's reader)
    assert verified.returncode == 0 and "OK" in verified.stdout, verified.stdout + verified.stderr


# ---- kill -9, then resume -------------------------------------------------------------------------

PHOTOS = 12  # images in the bucket's webdataset shards


def photo(number: int) -> bytes:
    """A small photo-like JPEG (smooth gradients and a few blocks: something to ground and edit)."""
    import numpy as np

    rng = np.random.default_rng(number)
    y, x = np.mgrid[0:160, 0:200]
    image = np.stack([(x + 40 * number) % 256, (y * 1.5) % 256, (x + y) % 256], -1).astype(np.uint8)
    for _ in range(3):
        top, left = rng.integers(10, 100), rng.integers(10, 130)
        image[top:top + 40, left:left + 50] = rng.integers(0, 255, 3)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def put_shards(fs, root: str) -> None:
    for shard in range(3):
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for number in range(shard * 4, shard * 4 + 4):
                for name, data in ((f"img{number:03d}.jpg", photo(number)),
                                   (f"img{number:03d}.txt", f"photo {number}".encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        fs.pipe_file(f"{root}/{shard:05d}.tar", buffer.getvalue())


def parts_done(fs, out: str) -> int:
    try:
        return len([n for n in fs.ls(f"{out}/parts", detail=False) if n.endswith(".parquet")])
    except FileNotFoundError:
        return 0


def build_killed_at(args: list[str], out: str, fs, code: Path, home: Path, parts: int) -> tuple[int, int]:
    """Start `mcie build`, SIGKILL its whole process group once `parts` unit parts are in the
    bucket. (parts found at the kill or -1 when the build finished first, the build's pid)."""
    home.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "build", *args], cwd=code,
                            env=env_with(code, PYTHONUNBUFFERED="1", PREFECT_HOME=str(home)),
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while proc.poll() is None and parts_done(fs, out) < parts and time.monotonic() < deadline:
            time.sleep(0.05)
        found = parts_done(fs, out) if proc.poll() is None else -1
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        found = -1
    finally:
        proc.wait()
        reap_session(proc.pid)
    return found, proc.pid


def assert_nothing_half_written(fs, out: str) -> None:
    """Every object under a final name is whole: tars read to their end, parts parse, and every
    location a finished unit's part names is there."""
    for name in s3_objects(fs, out):
        if name.endswith(".tar"):
            with tarfile.open(fileobj=io.BytesIO(fs.cat_file(name))) as tar:
                assert tar.getmembers(), name
    for name in s3_objects(fs, f"{out}/parts"):
        if name.endswith(".parquet"):
            for row in pq.read_table(io.BytesIO(fs.cat_file(name))).to_pylist():
                shard = row["shard"] if "/" in row["shard"] else f"shards/{row['shard']}"
                target = f"{out}/{shard}"
                assert fs.exists(target if not shard.startswith(("review/", "rejudge/"))
                                 else f"{target}/sample.json"), (name, shard)


@pytest.mark.slow
def test_webdataset_in_a_bucket_into_a_bucket_kill_9_and_resume_is_byte_identical(s3, code, tmp_path):
    bucket = s3.bucket()
    fs = s3.filesystem()
    put_shards(fs, f"{bucket}/shards")
    source = ["--source", "webdataset", "--source-path", f"s3://{bucket}/shards/", "--resolution", "128",
              "--shard-size", "2", "--workers", "2", "--seed", "5"]
    units = PHOTOS // 2

    reference = mcie(["build", "--out", f"s3://{bucket}/ref", *source], code, tmp_path / "ref")
    assert reference.returncode == 0, reference.stderr[-3000:]
    expected = s3_tree(fs, f"{bucket}/ref")
    assert len([k for k in expected if k.startswith("parts/unit-") and k.endswith(".parquet")]) == units

    out = f"{bucket}/o"
    found, pid = build_killed_at(["--out", f"s3://{out}", *source], out, fs, code, tmp_path / "k1", 2)
    assert found != -1 and found < units, "the build finished before the kill"
    assert not fs.exists(f"{out}/manifest.parquet")
    assert_nothing_half_written(fs, out)
    lock = json.loads(fs.cat_file(f"{out}/.mcie.lock"))  # left by the killed build: stale
    assert lock["host"] == socket.gethostname() and lock["pid"] != os.getpid()

    resumed = mcie(["build", "--out", f"s3://{out}", *source], code, tmp_path / "k2")
    assert resumed.returncode == 0, resumed.stderr[-3000:]  # the stale lock was taken over
    assert "already complete" not in resumed.stdout
    assert s3_tree(fs, out) == expected
    assert not fs.exists(f"{out}/.mcie.lock")

    again = mcie(["build", "--out", f"s3://{out}", *source], code, tmp_path / "k3")
    assert again.returncode == 0 and "already complete, nothing to do" in again.stdout


@pytest.mark.slow
def test_procedural_kill_9_and_resume_in_a_bucket_is_byte_identical(s3, code, tmp_path):
    bucket = s3.bucket()
    fs = s3.filesystem()
    reference = mcie(["build", "--out", f"s3://{bucket}/ref", *PROCEDURAL], code, tmp_path / "ref")
    assert reference.returncode == 0, reference.stderr[-3000:]
    out = f"{bucket}/o"
    found, _ = build_killed_at(["--out", f"s3://{out}", *PROCEDURAL], out, fs, code, tmp_path / "k1", 2)
    assert found != -1 and found < 6, "the build finished before the kill"
    assert_nothing_half_written(fs, out)
    assert fs.exists(f"{out}/.mcie.lock")
    resumed = mcie(["build", "--out", f"s3://{out}", *PROCEDURAL], code, tmp_path / "k2")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert s3_tree(fs, out) == s3_tree(fs, f"{bucket}/ref")


# ---- one writer per OUT ---------------------------------------------------------------------------

HOLDER = textwrap.dedent("""
    import sys
    from pipeline.dataset.lock import out_lock
    with out_lock(sys.argv[1], "mcie build --out " + sys.argv[1]):
        print("locked", flush=True)
        sys.stdin.readline()
""")


def one_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    assert len(lines) == 1, text
    return lines[0]


@pytest.mark.slow
def test_a_second_writer_is_refused_and_a_lock_of_another_host_needs_unlock(s3, code, tmp_path):
    bucket = s3.bucket()
    fs = s3.filesystem()
    url = f"s3://{bucket}/o"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, url], cwd=code, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=env_with(code))
    try:
        assert holder.stdout.readline().strip() == "locked"
        refused = mcie(["build", "--out", url, *PROCEDURAL], code, tmp_path / "p")
        assert refused.returncode == 2
        line = one_line(refused.stderr)
        assert f"pid {holder.pid}" in line and "in use" in line and "mcie build --out" in line
        assert s3_objects(fs, f"{bucket}/o") == [f"{bucket}/o/.mcie.lock"]  # nothing written
        unlocked = mcie(["unlock", url], code, tmp_path / "p")
        assert unlocked.returncode == 2 and "alive" in one_line(unlocked.stderr)
    finally:
        holder.kill()
        holder.wait()

    fs.pipe_file(f"{bucket}/o/.mcie.lock", json.dumps(
        {"host": "node-elsewhere", "pid": 77, "start": 1.0, "command": "mcie build --out " + url,
         "started": "2026-01-01T00:00:00Z"}).encode())
    refused = mcie(["build", "--out", url, *PROCEDURAL], code, tmp_path / "p")
    assert refused.returncode == 2
    line = one_line(refused.stderr)
    assert "host node-elsewhere pid 77" in line and f"mcie unlock {url}" in line
    unlocked = mcie(["unlock", url], code, tmp_path / "p")
    assert unlocked.returncode == 0 and "node-elsewhere" in unlocked.stdout
    assert not fs.exists(f"{bucket}/o/.mcie.lock")


@pytest.mark.slow
def test_a_missing_bucket_is_one_line_and_exit_2(s3, code, tmp_path):
    result = mcie(["build", "--out", "s3://no-such-bucket-mcie/o", *PROCEDURAL], code, tmp_path / "p")
    assert result.returncode == 2
    assert "no-such-bucket-mcie" in one_line(result.stderr)


@pytest.mark.parametrize("command", [["build", "--out", "s3://some-bucket/o", "--count", "4"],
                                     ["verify", "s3://some-bucket/o"]])
def test_no_credentials_is_one_line_and_exit_2(command, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MCIE_STORAGE"))}
    env.update(AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_CONFIG_FILE=str(tmp_path / "none"),
               AWS_EC2_METADATA_DISABLED="true", AWS_ENDPOINT_URL="http://127.0.0.1:9")
    result = subprocess.run([sys.executable, "-m", "flows.cli", *command], cwd=Path(__file__).parents[1],
                            capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "credentials" in one_line(result.stderr) and "Traceback" not in result.stderr


# ---- the CLI's storage options and a cluster's workers ------------------------------------------

def test_storage_options_and_no_lock_reach_the_environment_and_cluster_workers(monkeypatch):
    from flows.cli import apply_storage_arguments, build_parser
    from flows.ray_runtime import code_runtime_env
    from pipeline import storage
    from pipeline.dataset.lock import NO_LOCK_ENV, lock_disabled

    for name in [*os.environ, storage.STORAGE_ENV, NO_LOCK_ENV]:
        if name.startswith(("AWS_", "FSSPEC_")) or name in (storage.STORAGE_ENV, NO_LOCK_ENV):
            monkeypatch.setenv(name, "")  # (so that what the CLI sets is undone after the test)
            monkeypatch.delenv(name)
    assert "env_vars" not in code_runtime_env()
    args = build_parser().parse_args(["build", "--out", "s3://bucket/o/", "--no-lock",
                                      "--storage-option", "endpoint_url=http://127.0.0.1:9",
                                      "--storage-option", "anon=true"])
    assert args.out == "s3://bucket/o"
    apply_storage_arguments(args)
    assert lock_disabled()
    assert storage.storage_options("s3") == {"endpoint_url": "http://127.0.0.1:9", "anon": True,
                                             "use_listings_cache": False}
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t")
    env = code_runtime_env()["env_vars"]  # what a remote cluster's workers get
    assert env["AWS_SECRET_ACCESS_KEY"] == "s3cr3t" and storage.STORAGE_ENV in env
    assert "PATH" not in env
    with pytest.raises(Exception, match="--no-lock"):  # only the commands that write take it
        build_parser().parse_args(["verify", "s3://bucket/o", "--no-lock"])
