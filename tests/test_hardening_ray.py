"""Issue 17, items 6 and 9: the private local Ray requires a fresh token per run (kept in a 0600
file under the project's temp dir, never in the environment) and refuses a process without it;
old Ray sessions are cleaned."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows.ray_runtime import DEFAULT_TEMP_DIR, clean_old_sessions, start_ray, stop_ray

PROBE = ("import logging, sys, ray; ray.init(address=sys.argv[1], _node_ip_address='127.0.0.2', "
         "logging_level=logging.ERROR); print('CONNECTED')")


@pytest.mark.slow
def test_the_local_ray_refuses_a_connection_without_its_token(monkeypatch):
    import ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    before = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_TOKEN")}
    start_ray(None, 1)
    try:
        token = Path(os.environ["RAY_AUTH_TOKEN_PATH"])
        temp_dir = Path(os.environ.get("MCIE_RAY_TEMP_DIR", DEFAULT_TEMP_DIR))
        assert token.parent == temp_dir / "auth" and os.environ["RAY_AUTH_MODE"] == "token"
        assert stat.S_IMODE(token.stat().st_mode) == 0o600 and len(token.read_text()) == 64
        assert "RAY_AUTH_TOKEN" not in os.environ  # the token itself is in no environment
        assert ray.get(ray.remote(lambda: 41 + 1).remote()) == 42  # workers have it
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
