"""Resume: `kill -9` a real `mcie build` (its whole process group) at several moments, run the same
command again, and get exactly the bytes of an uninterrupted build with the same seed.

One OUT is killed three times (after the first unit completes, mid-way, one unit before the end),
each rerun with a fresh PREFECT_HOME (resume must not depend on Prefect's database); after every
kill no half-written file may be visible under a final name. The finished build must equal the
uninterrupted one file by file, pass `mcie verify`, and a further run must do nothing.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.dataset.shards import is_temp_name
from code_snapshot import env_with, snapshot

ROOT = Path(__file__).resolve().parents[1]
BUILD = ["--count", "48", "--resolution", "256", "--shard-size", "4", "--seed", "11",
         "--defect-rate", "0.4", "--workers", "2"]
UNITS = 12
NOT_COMPARED = {"report.html"}  # names OUT's own path


CODE: Path = ROOT  # replaced by a frozen copy of the code in the test


def env_for(prefect_home: Path) -> dict[str, str]:
    prefect_home.mkdir(parents=True, exist_ok=True)
    return env_with(CODE, PYTHONUNBUFFERED="1", PREFECT_HOME=str(prefect_home))


def mcie(args: list[str], prefect_home: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=CODE, capture_output=True,
                          text=True, timeout=timeout, env=env_for(prefect_home))


def session_processes(sid: int) -> list[int]:
    lines = subprocess.run(["ps", "-eo", "pid=,sid="], capture_output=True, text=True).stdout
    return [int(pid) for pid, s in (line.split() for line in lines.splitlines() if line.strip())
            if int(s) == sid]


def reap_session(sid: int, grace_s: float = 20.0) -> list[int]:
    """Wait for what the killed build left (Ray's raylet/workers die with their parent, a little
    later); SIGKILL, by pid, whatever outlives the grace period. Returns those pids."""
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if not session_processes(sid):
            return []
        time.sleep(0.2)
    left = session_processes(sid)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return left


def parts_done(out: Path) -> int:
    folder = out / "parts"
    return len(list(folder.glob("unit-*.parquet"))) if folder.is_dir() else 0


def build_killed_at(out: Path, prefect_home: Path, parts: int) -> int:
    """Start `mcie build`, SIGKILL its process group once `parts` unit parts exist. Returns the
    number of parts found at the kill (or -1 if the build finished first)."""
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "build", "--out", str(out), *BUILD],
                            cwd=CODE, env=env_for(prefect_home), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while proc.poll() is None and parts_done(out) < parts and time.monotonic() < deadline:
            time.sleep(0.005)
        found = parts_done(out) if proc.poll() is None else -1
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        found = -1
    finally:
        proc.wait()
        reap_session(proc.pid)
    return found


def assert_nothing_half_written(out: Path) -> None:
    """Final names hold only complete files: every tar reads to its end, every part parses.
    Temporaries (hidden `.NAME.<random>.tmp`) may exist; the rerun removes them."""
    for tar in (out / "shards").glob("*.tar"):
        with tarfile.open(tar) as handle:
            assert handle.getmembers(), f"{tar.name} is empty"
    for part in (out / "parts").glob("unit-*.parquet"):
        pq.read_table(part)
    for folder in ("review", "rejudge"):
        for sample_dir in (out / folder).glob("*") if (out / folder).is_dir() else []:
            if not is_temp_name(sample_dir.name):
                assert (sample_dir / "sample.json").is_file(), f"{sample_dir} is incomplete"


def member_differences(out: Path, reference: Path, rows: list[dict], ref_rows: list[dict]) -> str:
    """Which members of which samples differ, so a failure says where the bytes went apart
    (a CI run once saw one sample's checksum differ with equal pixel hashes)."""
    import json

    def members(root: Path, shard: str, key: str) -> dict[str, bytes]:
        with tarfile.open(root / "shards" / shard) as handle:
            return {m.name.split(".", 1)[1]: handle.extractfile(m).read()
                    for m in handle.getmembers() if m.name.split(".", 1)[0] == key}

    lines = []
    for row, ref in zip(rows, ref_rows):
        if row == ref or not str(row.get("shard", "")).endswith(".tar"):
            continue
        got, want = members(out, row["shard"], row["id"]), members(reference, ref["shard"], ref["id"])
        for name in sorted(set(got) | set(want)):
            if got.get(name) == want.get(name):
                continue
            detail = ""
            if name == "json" and got.get(name) and want.get(name):
                a, b = json.loads(got[name]), json.loads(want[name])
                a["record"], b["record"] = json.loads(a["record"]), json.loads(b["record"])
                detail = repr({k: (a["record"].get(k), b["record"].get(k)) for k in a["record"]
                               if a["record"].get(k) != b["record"].get(k)})[:3000]
            lines.append(f"{row['id']} {name} differs {detail}")
    return "\n".join(lines) or "rows differ outside the shards"


def tree(out: Path) -> dict[str, str]:
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file() and p.name not in NOT_COMPARED}


@pytest.mark.slow
def test_kill_9_at_several_points_then_rerun_gives_the_uninterrupted_build(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "CODE", snapshot(tmp_path / "code"))
    reference = tmp_path / "reference"
    first = mcie(["build", "--out", str(reference), *BUILD], tmp_path / "prefect-ref")
    assert first.returncode == 0, first.stderr[-3000:]

    out = tmp_path / "killed"
    kills = []
    for n, parts in enumerate((1, UNITS // 2, UNITS - 1)):
        found = build_killed_at(out, tmp_path / f"prefect-{n}", parts)
        kills.append(found)
        assert found != -1, f"the build finished before the kill at {parts} parts"
        assert not (out / "manifest.parquet").exists(), "a manifest appeared before the last unit"
        assert_nothing_half_written(out)
    assert kills[0] < UNITS and kills[-1] < UNITS

    resumed = mcie(["build", "--out", str(out), *BUILD], tmp_path / "prefect-last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "already complete" not in resumed.stdout

    ref_rows = pq.read_table(reference / "manifest.parquet").to_pylist()
    rows = pq.read_table(out / "manifest.parquet").to_pylist()
    assert [r["index"] for r in rows] == list(range(48))
    assert rows == ref_rows, member_differences(out, reference, rows, ref_rows)  # same ids, verdicts, scores, locations and checksums
    assert tree(out) == tree(reference)  # and the same bytes in every file

    verified = mcie(["verify", str(out)], tmp_path / "prefect-last", timeout=120)
    assert verified.returncode == 0, verified.stdout + verified.stderr

    again = mcie(["build", "--out", str(out), *BUILD], tmp_path / "prefect-again", timeout=120)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already complete, nothing to do" in again.stdout
    assert tree(out) == tree(reference)
