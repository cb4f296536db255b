"""Issue 17, item 7: a full disk or a read-only OUT ends a build with one line and exit 1, without
retrying units that cannot succeed, leaves nothing half-written, and the rerun completes."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flows.execute import fatal_io_error, one_line
from pipeline.dataset.shards import is_temp_name
from pipeline.dataset.verify import verify

ROOT = Path(__file__).resolve().parents[1]
FAULTS = ROOT / "tests" / "faults"  # its sitecustomize makes os.replace under a dir fail: ENOSPC


def ray_task_error(cause: BaseException):
    from ray.exceptions import RayTaskError

    try:
        raise cause
    except BaseException as exc:
        import traceback

        return RayTaskError("UnitWorker.run", traceback.format_exc(), exc).as_instanceof_cause()


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES, errno.EROFS, errno.EDQUOT])
def test_a_full_or_read_only_disk_is_fatal_and_said_in_one_line(code):
    exc = ray_task_error(OSError(code, os.strerror(code), "/out/shards/train-000001.tar"))
    assert fatal_io_error(exc).errno == code
    assert one_line(exc).endswith(f"Error: [Errno {code}] {os.strerror(code)}: '/out/shards/train-000001.tar'")


def test_other_failures_stay_retryable():
    assert fatal_io_error(ray_task_error(OSError(errno.ECONNRESET, "reset"))) is None
    assert fatal_io_error(ray_task_error(ValueError("bad\nsecond line"))) is None
    assert one_line(ray_task_error(ValueError("bad\nsecond line"))) == "ValueError: second line"


def mcie(*args: str, **env: str) -> subprocess.CompletedProcess:
    environ = {**os.environ, **env, "PYTHONPATH": os.pathsep.join([str(FAULTS), str(ROOT)])}
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=ROOT, env=environ,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_disk_full_mid_build_is_one_line_without_retries_and_the_rerun_completes(tmp_path):
    out = tmp_path / "out"
    args = ("build", "--out", str(out), "--count", "8", "--resolution", "64", "--shard-size", "4",
            "--workers", "1")
    full = mcie(*args, MCIE_FAULT_ENOSPC_UNDER=str(out / "shards"))
    assert full.returncode == 1, full.stderr
    lines = [line for line in full.stderr.splitlines() if not line.startswith(("INFO ", "See https"))]
    assert len(lines) == 1, full.stderr
    assert lines[0].startswith("mcie build: failed: cannot write") and "No space left on device" in lines[0]
    assert "retrying" not in full.stderr and "Traceback" not in full.stderr
    assert not [p for p in out.rglob("*") if is_temp_name(p.name)]  # nothing half-written
    assert not list((out / "parts").glob("unit-*.parquet"))
    again = mcie(*args)
    assert again.returncode == 0, again.stderr
    assert verify(out) == []
