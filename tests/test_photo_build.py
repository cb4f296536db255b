"""Real photos in, end to end: a folder build of scikit-image's photographs through the real
Prefect flow and Ray (every file of a hostile folder accounted for), and the determinism and
resume of a folder build."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from flows.plan import prepare_build
from photo_fixtures import hostile_folder, photo_folder
from pipeline.config import BuildConfig
from pipeline.dataset.output import finalize
from pipeline.record import sample_id
from pipeline.unit import UnitPipeline

ROOT = Path(__file__).resolve().parents[1]


def mcie(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})


@pytest.mark.slow
def test_hostile_folder_builds_and_every_file_is_accounted_for(tmp_path):
    folder = tmp_path / "photos"
    expected = hostile_folder(folder)
    out = tmp_path / "out"
    args = ["build", "--out", str(out), "--source", "folder", "--source-path", str(folder),
            "--resolution", "256", "--edits-per-image", "2", "--shard-size", "6", "--seed", "3"]
    result = mcie(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = pq.read_table(out / "manifest.parquet").to_pylist()
    assert len(rows) == 2 * len(expected)  # every file, twice, has its row
    ids = {sample_id(3, key, edit): (key, outcome) for key, outcome in expected.items() for edit in (0, 1)}
    assert {row["id"] for row in rows} == set(ids)
    made = 0
    for row in rows:
        key, outcome = ids[row["id"]]
        if outcome == "quarantine":
            assert row["verdict"] == "error" and row["error_stage"] == "source", (key, row)
            assert row["error"] and "\n" not in row["error"]
        elif row["verdict"] != "error":
            made += 1
            assert row["width"] >= 256 and row["height"] >= 256
            assert row["width"] % 64 == 0 and row["height"] % 64 == 0
        else:  # a good photo with too few nameable things says so (never a made-up referent)
            assert (row["error_stage"], row["error"].split(": ")[-1].split(" ")[:2]) in (
                ("compose", ["could", "only"]), ("ground", ["classical", "grounding"])), row
    assert made >= 2 * sum(o == "ok" for o in expected.values()) // 3  # a third became pairs
    assert any(row["width"] != row["height"] for row in rows if row["verdict"] != "error")
    assert (out / "source_index.parquet").is_file()
    report = (out / "report.html").read_text()
    assert "data:image/png;base64" in report
    verified = mcie("verify", str(out))
    assert verified.returncode == 0, verified.stdout + verified.stderr
    again = mcie(*args)
    assert again.returncode == 0 and "already complete" in again.stdout


def _digest(out: Path) -> dict[str, str]:
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file() and p.name != "report.html"}


def _bare_build(out: Path, config: BuildConfig, order: list[int]) -> None:
    total = prepare_build(out, config)
    pipeline = UnitPipeline(config, out)
    for unit in order:
        pipeline.run(unit)
    assert sorted(set(order)) == list(range(config.num_units(total)))
    finalize(out)


def test_a_folder_build_is_deterministic_and_a_rerun_unit_writes_the_same_bytes(tmp_path):
    folder = photo_folder(tmp_path / "photos", ["astronaut", "chelsea", "coffee", "rocket"])
    config = BuildConfig(source="folder", source_options={"path": str(folder)}, resolution=192,
                         edits_per_image=3, shard_size=4, seed=5)
    first, second = tmp_path / "a", tmp_path / "b"
    _bare_build(first, config, [0, 1, 2])
    # Units in another order, one of them twice (a retried unit after a crash).
    _bare_build(second, config, [2, 0, 1, 0])
    assert _digest(first) == _digest(second)
    rows = pq.read_table(first / "manifest.parquet").to_pylist()
    assert len(rows) == 12
    assert {r["source_kind"] for r in rows} == {"folder"}
    # a file added to the folder later does not move the build's key list
    (folder / "zzz.png").write_bytes((folder / "chelsea.png").read_bytes())
    assert prepare_build(first, config) == 12


def test_a_kill_between_config_and_key_list_resumes(tmp_path):
    """config.json written but the source index not yet (a kill in between): the rerun makes the
    index and goes on, rather than taking the source for a generator."""
    folder = photo_folder(tmp_path / "photos", ["astronaut", "chelsea"])
    config = BuildConfig(source="folder", source_options={"path": str(folder)}, resolution=128,
                         edits_per_image=2, shard_size=4, seed=1)
    out = tmp_path / "out"
    assert prepare_build(out, config) == 4
    (out / "source_index.parquet").unlink()
    assert prepare_build(out, config) == 4 and (out / "source_index.parquet").is_file()
