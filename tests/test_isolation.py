"""Issue 25, items 2 and 4: an item fails, the command goes on. A unit that fails three times (a
worker killed on one poisoned input) is isolated by item: the poisoned sample is quarantined with
a reason a person reads, every other sample of the unit is written. Quarantine reasons are
sentences; a lock file and Ray token files left by a `kill -9` are cleaned at the next start; a
Label Studio URL's credentials are never printed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flows.plan import pending_units, prepare_build
from pipeline.config import BuildConfig
from pipeline.dataset.output import finalize, read_manifest
from pipeline.unit import UnitPipeline

ROOT = Path(__file__).resolve().parents[1]
FAULTS = ROOT / "tests" / "faults"
SESSIONS = ("alpha", "bravo", "poison", "delta")


def generic_dataset(root: Path) -> Path:
    """A generic jsonl of one-turn sessions on small synthetic images (a box painted red)."""
    (root / "img").mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = []
    for k, sid in enumerate(SESSIONS):
        source = rng.integers(60, 200, (64, 64, 3), dtype=np.uint8)
        target = source.copy()
        target[8 + k:30 + k, 10:34] = (220, 30, 30)
        Image.fromarray(source).save(root / f"img/{sid}_in.png")
        Image.fromarray(target).save(root / f"img/{sid}_out.png")
        lines.append({"session": sid, "turn": 1, "instruction": "make the box red",
                      "source": f"img/{sid}_in.png", "target": f"img/{sid}_out.png", "license": "CC0-1.0"})
    path = root / "edits.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def import_config(path: Path) -> BuildConfig:
    return BuildConfig(resolution=64, shard_size=4, defect_rate=0.0, min_edits=1, max_edits=8,
                       judge="none", source="import", source_options={"format": "generic", "path": str(path)},
                       grounder="imported", composer="imported", editor="imported")


def test_a_unit_run_with_a_poisoned_item_quarantines_it_unread_and_writes_the_rest(tmp_path):
    """What the driver asks an actor once it found the poisoned item (no Ray here)."""
    config = import_config(generic_dataset(tmp_path / "g"))
    out = tmp_path / "out"
    prepare_build(out, config)
    pipeline = UnitPipeline(config, out)
    numbers = pipeline.items(0)
    assert len(numbers) == 4
    keys = [pipeline.index.key(config.key_of(n)[0]) for n in numbers]
    poisoned = numbers[next(i for i, k in enumerate(keys) if "poison" in k)]
    (tmp_path / "g/img/poison_in.png").unlink()  # never read: a missing file would be a source error
    pipeline.run(0, {poisoned: "processing this sample killed its worker twice"})
    rows = finalize(out).to_pylist()
    by_key = {r["source_key"]: r for r in rows}
    assert len(rows) == 4
    bad = [r for k, r in by_key.items() if "poison" in k]
    good = [r for k, r in by_key.items() if "poison" not in k]
    assert [r["verdict"] for r in bad] == ["error"] and bad[0]["error_stage"] == "isolation"
    assert bad[0]["error"] == "processing this sample killed its worker twice"
    assert all(r["verdict"] == "accept" for r in good), good


@pytest.mark.slow
def test_a_worker_killed_by_one_session_costs_that_session_only(tmp_path, monkeypatch):
    """The session "poison" kills any Ray worker that opens its image (as an OOM kill would):
    its unit fails three times, is isolated by item, and the three other sessions are written;
    the poisoned one is quarantined with the reason. A rerun (resume) has nothing left to do."""
    from flows.execute import run_units
    from flows.ray_runtime import start_ray, stop_ray

    config = import_config(generic_dataset(tmp_path / "g"))
    out = tmp_path / "out"
    prepare_build(out, config)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(FAULTS), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("MCIE_FAULT_DIE_READING", "poison_in.png")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    start_ray(None, 2)
    try:
        result = run_units(config, out, pending_units(out, config), workers=2)
    finally:
        stop_ray()
    assert list(result.isolated) == [0] and len(result.isolated[0]) == 1, result.isolated
    (reason,) = result.isolated[0].values()
    assert reason.startswith("processing this sample alone failed 2 times: its worker process died")
    assert reason.endswith("so that the other samples of unit 0 could be written"), reason
    finalize(out)
    rows = read_manifest(out).to_pylist()
    assert len(rows) == 4
    bad = [r for r in rows if "poison" in r["source_key"]]
    assert [r["verdict"] for r in bad] == ["error"] and bad[0]["error_stage"] == "isolation"
    assert bad[0]["error"] == reason
    assert sorted(r["verdict"] for r in rows if r is not bad[0]) == ["accept"] * 3
    assert pending_units(out, config) == []  # resume: the unit is done, the input never met again


# ---- quarantine reasons, stale lock and token files, credentials ---------------------------------

@pytest.mark.parametrize("exc, expected", [
    (ZeroDivisionError(), "ZeroDivisionError: second argument to a division or modulo operation was zero"),
    (OverflowError(), "OverflowError: result too large to be represented"),
    (ValueError("bad\nvalue"), "ValueError: bad value"),
])
def test_a_quarantine_reason_is_a_sentence_never_a_bare_exception_name(exc, expected):
    from pipeline.record import EditSample

    sample = EditSample(id="s0-x", index=0, seed=0)
    sample.fail("judge", exc)
    assert sample.error == expected


def test_one_line_of_a_message_less_exception_says_what_happened():
    from flows.execute import one_line

    assert one_line(MemoryError()) == "MemoryError: out of memory"


def test_a_lock_file_left_by_kill_9_is_emptied_at_the_next_command(tmp_path):
    from pipeline.dataset.lock import LOCK_NAME, clear_stale, out_lock

    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]);"
         "from pipeline.dataset.lock import out_lock\n"
         "with out_lock(sys.argv[2], 'mcie build'):\n print('locked', flush=True); time.sleep(60)",
         str(ROOT), str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert not clear_stale(tmp_path)  # a live holder's pid is true: kept
        assert f'"pid": {holder.pid}' in (tmp_path / LOCK_NAME).read_text()
    finally:
        holder.kill()  # kill -9
        holder.wait()
    assert f'"pid": {holder.pid}' in (tmp_path / LOCK_NAME).read_text()  # the dead holder's pid
    assert clear_stale(tmp_path)
    assert (tmp_path / LOCK_NAME).read_bytes() == b""
    with out_lock(tmp_path):
        assert not clear_stale(tmp_path)  # held by this process: left alone
        assert (tmp_path / LOCK_NAME).read_bytes() != b""


def test_a_command_on_out_clears_a_dead_holders_pid(tmp_path):
    """`mcie`'s entry point clears it for any command naming OUT (here a usage error after it)."""
    from flows.cli import main
    from pipeline.dataset.lock import LOCK_NAME

    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": 999999, "command": "mcie build"}) + "\n")
    main(["review", "status", str(tmp_path), "--url", "ftp://nowhere"])
    assert (tmp_path / LOCK_NAME).read_bytes() == b""


def test_ray_token_files_of_a_dead_driver_are_removed_at_the_next_start(tmp_path):
    from flows.ray_runtime import clean_old_sessions

    auth = tmp_path / "auth"
    auth.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = auth / f"token-{dead.pid}-deadbeef"
    live = auth / f"token-{os.getppid()}-cafef00d"  # a live process's (another local Ray's)
    own = auth / f"token-{os.getpid()}-0badc0de"
    for path in (stale, live, own):
        path.write_text("x" * 64)
    clean_old_sessions(tmp_path)
    assert not stale.exists() and live.exists() and own.exists()


def test_label_studio_credentials_are_never_printed(capsys):
    from annotation.client import Connection, LabelStudioError, connect, strip_credentials

    assert strip_credentials("http://user:s3cret@host:8080/ls") == "http://host:8080/ls"
    assert strip_credentials("https://host") == "https://host"
    conn = Connection(url="http://user:s3cret@127.0.0.1:9", api_key="k", deadline_s=5)
    assert conn.url == "http://127.0.0.1:9"  # stripped on construction: stored and printed as is
    with pytest.raises(LabelStudioError) as caught:
        connect(conn)  # nothing listens on port 9
    assert "s3cret" not in str(caught.value) and "127.0.0.1:9" in str(caught.value)
    with pytest.raises(ValueError) as bad:
        Connection(url="ftp://user:s3cret@host")
    assert "s3cret" not in str(bad.value)
