"""One writer per OUT on an object store (pipeline/dataset/lock.py) against a real S3 server
(SeaweedFS): a lock object made with If-None-Match, a live holder refused, a dead holder on this
host taken over, a holder on another host refused until `unlock`, a store that ignores
If-None-Match detected, and `--no-lock` (MCIE_NO_LOCK) skipping it all."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipeline import storage
from pipeline.dataset import lock
from pipeline.dataset.lock import LOCK_NAME, LockUnsupported, OutLocked, clear_stale, out_lock, unlock

ROOT = Path(__file__).resolve().parents[1]

# A holder in its own process: takes the lock, says so, waits for a line on stdin.
HOLDER = textwrap.dedent("""
    import sys
    sys.path[:0] = [{root!r}]
    from pipeline.dataset.lock import out_lock
    with out_lock(sys.argv[1], "mcie build --out " + sys.argv[1]):
        print("locked", flush=True)
        sys.stdin.readline()
    print("released", flush=True)
""").format(root=str(ROOT))


def objects(out) -> list[str]:
    # (SeaweedFS lists a prefix whose objects were all deleted as an empty folder: not an object)
    return [p for p in out.fs.find(out.path) if p.rstrip("/") != out.path]


def lock_info(out) -> dict:
    return json.loads((out / LOCK_NAME).read_bytes())


@pytest.fixture
def out(s3):
    return storage.location(f"s3://{s3.bucket()}/o")


def start_holder(url: str, env: dict) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, url], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env={**os.environ, **env})
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_lock_object_names_its_holder_is_reentrant_and_is_removed_on_release(out):
    with out_lock(out, "outer"):
        info = lock_info(out)
        assert info["host"] == socket.gethostname() and info["pid"] == os.getpid()
        assert info["command"] == "outer" and info["start"] is not None and info["started"]
        with out_lock(str(out), "inner"):  # same OUT given as text: the same lock, re-entered
            assert lock_info(out)["command"] == "outer"
        assert (out / LOCK_NAME).is_file()
    assert objects(out) == []  # released: neither the lock nor a probe is left in OUT


def test_a_live_holder_in_another_process_is_refused_then_released(out, s3):
    holder = start_holder(str(out), s3.env())
    try:
        with pytest.raises(OutLocked) as err:
            with out_lock(out):
                pass
        message = str(err.value)
        assert len(message.splitlines()) == 1
        assert f"pid {holder.pid}" in message and "mcie build --out" in message and "in use" in message
        assert "mcie unlock" not in message  # alive on this host: no unlock advice
        assert clear_stale(out) is False  # a live holder's lock stays
        with pytest.raises(OutLocked):
            unlock(out)
        assert lock_info(out)["pid"] == holder.pid
        holder.stdin.write("go\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == "released"
    finally:
        holder.kill()
        holder.wait()
    with out_lock(out, "next"):
        assert lock_info(out)["command"] == "next"


def test_a_holder_killed_by_kill_9_is_stale_and_taken_over(out, s3):
    holder = start_holder(str(out), s3.env())
    holder.kill()  # SIGKILL: the lock object stays behind
    holder.wait()
    assert lock_info(out)["pid"] == holder.pid
    with out_lock(out, "rerun"):
        assert lock_info(out)["command"] == "rerun"
    assert not (out / LOCK_NAME).exists()


def test_a_reused_pid_is_stale(out):
    # this very process, but "started" at another time: the pid was reused by someone else
    info = {"host": socket.gethostname(), "pid": os.getpid(), "start": 1.0, "command": "old",
            "started": "2020-01-01T00:00:00Z"}
    storage.write_atomic(out / LOCK_NAME, json.dumps(info).encode())
    assert clear_stale(str(out)) is True
    assert not (out / LOCK_NAME).exists()


def test_a_holder_on_another_host_is_refused_until_unlock(out):
    info = {"host": "elsewhere-7", "pid": 4242, "start": 1.0, "command": "mcie build --out x",
            "started": "2026-01-01T00:00:00Z"}
    storage.write_atomic(out / LOCK_NAME, json.dumps(info).encode())
    with pytest.raises(OutLocked) as err:
        with out_lock(out):
            pass
    message = str(err.value)
    assert len(message.splitlines()) == 1
    assert "host elsewhere-7 pid 4242" in message and f"mcie unlock {out}" in message
    assert clear_stale(out) is False  # cannot be checked from here: left alone
    assert "elsewhere-7" in unlock(out)
    assert not (out / LOCK_NAME).exists()
    assert unlock(out) == ""  # nothing to unlock
    with out_lock(out):
        pass


def test_an_unreadable_lock_object_is_refused_not_overwritten(out):
    storage.write_atomic(out / LOCK_NAME, b"garbage")
    with pytest.raises(OutLocked, match="unknown holder"):
        with out_lock(out):
            pass
    assert (out / LOCK_NAME).read_bytes() == b"garbage"


def test_an_empty_lock_object_is_nobody_s_lock(out):
    # a local OUT copied into a bucket carries its idle (empty) lock file
    storage.write_atomic(out / LOCK_NAME, b"")
    with out_lock(out):
        assert lock_info(out)["pid"] == os.getpid()
    assert not (out / LOCK_NAME).exists()


def test_a_store_that_ignores_if_none_match_cannot_lock(out, monkeypatch):
    real = storage.create_exclusive

    def ignores(path, data):  # what a store without conditional writes does: every PUT wins
        real(path, data)
        return True

    monkeypatch.setattr(storage, "create_exclusive", ignores)
    with pytest.raises(LockUnsupported, match="--no-lock"):
        with out_lock(out):
            pass
    monkeypatch.setattr(storage, "create_exclusive", real)
    assert objects(out) == []  # the probe was deleted, no lock was left


def test_no_lock_skips_the_lock(out, monkeypatch, caplog):
    monkeypatch.setenv(lock.NO_LOCK_ENV, "1")
    storage.write_atomic(out / LOCK_NAME, json.dumps({"host": "elsewhere", "pid": 1}).encode())
    with caplog.at_level("WARNING"):
        with out_lock(out):
            pass
    assert "--no-lock" in caplog.text


def test_the_lock_never_holds_storage_option_values(out, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["/bin/mcie", "build", "--out", str(out), "--storage-option",
                                      "secret=hunter2", "--storage-option=key=AKIA123"])
    with out_lock(out):
        raw = (out / LOCK_NAME).read_bytes()
    assert b"hunter2" not in raw and b"AKIA123" not in raw
    assert "--storage-option 'secret=***'" in json.loads(raw)["command"]
