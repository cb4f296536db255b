"""Helpers for tests that start servers: a free loopback port, and stopping a whole process session."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def session_processes(sid: int) -> list[int]:
    lines = subprocess.run(["ps", "-eo", "pid=,sid="], capture_output=True, text=True).stdout
    return [int(pid) for pid, s in (line.split() for line in lines.splitlines() if line.strip())
            if int(s) == sid]


def stop_session(proc: subprocess.Popen, grace_s: float = 15.0) -> None:
    """SIGTERM the session leader `proc` (started with `start_new_session=True`), give its session
    `grace_s` to wind down (a `ray start --block` stops its node), then SIGKILL what is left."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    deadline = time.monotonic() + grace_s
    while session_processes(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in session_processes(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if proc.poll() is None:
        proc.kill()
        proc.wait()
