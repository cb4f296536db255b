"""Issue 17, items 6 and 9: the private local Ray requires a fresh token per run (kept in a 0600
file under the project's temp dir, never in the environment) and refuses a process without it;
old Ray sessions are cleaned. Issue 24: every server of the local Ray listens on 127.0.0.1 only,
and the driver re-prints worker lines without ANSI colour codes."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows.ray_runtime import DEFAULT_TEMP_DIR, clean_old_sessions, start_ray, stop_ray

PROBE = ("import logging, sys, ray; ray.init(address=sys.argv[1], _node_ip_address='127.0.0.1', "
         "logging_level=logging.ERROR); print('CONNECTED')")


def _listening(pids: set[int]) -> list[tuple[str, int, str]]:
    import psutil

    found = []
    for pid in pids:
        try:
            for conn in psutil.Process(pid).net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    found.append((conn.laddr.ip, conn.laddr.port, psutil.Process(pid).name()))
        except psutil.NoSuchProcess:
            continue
    return found


def _ray_pids() -> set[int]:
    import psutil

    me = psutil.Process()
    return {me.pid, *(p.pid for p in me.children(recursive=True))}


@pytest.mark.slow
def test_the_local_ray_refuses_a_connection_without_its_token(monkeypatch, capfd):
    import ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_COLOR_PREFIX", raising=False)
    names = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_TOKEN", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER",
             "RAY_COLOR_PREFIX")
    before = {k: os.environ.get(k) for k in names}
    start_ray(None, 1)
    try:
        token = Path(os.environ["RAY_AUTH_TOKEN_PATH"])
        temp_dir = Path(os.environ.get("MCIE_RAY_TEMP_DIR", DEFAULT_TEMP_DIR))
        assert token.parent == temp_dir / "auth" and os.environ["RAY_AUTH_MODE"] == "token"
        assert stat.S_IMODE(token.stat().st_mode) == 0o600 and len(token.read_text()) == 64
        assert "RAY_AUTH_TOKEN" not in os.environ  # the token itself is in no environment
        assert ray.get(ray.remote(lambda: 41 + 1).remote()) == 42  # workers have it
        assert ray.get(ray.remote(lambda: print("worker says hi")).remote()) is None
        # every server of the local Ray (gcs, raylet, workers, agents) listens on loopback only
        listening = _listening(_ray_pids())
        assert len(listening) >= 4, listening
        assert all(ip in ("127.0.0.1", "::ffff:127.0.0.1") for ip, _, _ in listening), listening
        seen = ""
        for _ in range(100):  # the driver re-prints the worker's line, uncoloured
            time.sleep(0.1)
            seen += capfd.readouterr().out
            if "worker says hi" in seen:
                break
        assert "(<lambda> pid=" in seen and "worker says hi" in seen and "\x1b[" not in seen, seen
        from ray._private.ray_logging import DedupState  # and its "[repeated 3x …]" note

        note = DedupState(timestamp=0, count=3, line="(A pid=1) hi", metadata={}, sources=set()).formatted()
        assert "[repeated 3x across cluster]" in note and "\x1b[" not in note
        gcs = ray.get_runtime_context().gcs_address
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))}
        refused = subprocess.run([sys.executable, "-c", PROBE, gcs], capture_output=True, text=True,
                                 timeout=300, env={**env, "RAY_AUTH_MODE": "disabled"})
        assert refused.returncode != 0 and "CONNECTED" not in refused.stdout
        assert token.read_text() not in refused.stdout + refused.stderr
    finally:
        stop_ray()
    assert not token.exists()  # one token per run
    assert {k: os.environ.get(k) for k in before} == before
    from ray._private import ray_constants

    from ray._private import ray_logging

    assert ray_constants.ENABLE_RAY_CLUSTER  # the switch is Ray's own again
    assert ray_logging._color("x") != "x"  # and so is its colouring


def test_old_ray_sessions_are_cleaned_and_live_ones_kept(tmp_path):
    old = time.time() - 3 * 24 * 3600
    for name in ("session_2025-01-01_00-00-00_1", "session_2025-01-02_00-00-00_2",
                 "session_2025-01-03_00-00-00_3"):
        (tmp_path / name / "logs").mkdir(parents=True)
        (tmp_path / name / "logs" / "raylet.out").write_text("x")
    fresh = tmp_path / "session_2025-01-02_00-00-00_2" / "logs" / "raylet.out"  # a live session
    (tmp_path / "session_latest").symlink_to(tmp_path / "session_2025-01-03_00-00-00_3")
    for path in tmp_path.rglob("*"):
        if path != fresh and not path.is_symlink():
            os.utime(path, (old, old))
    assert clean_old_sessions(tmp_path) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "session_2025-01-02_00-00-00_2", "session_2025-01-03_00-00-00_3", "session_latest"]
