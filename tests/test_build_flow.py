"""End to end: `mcie build` through the real Prefect flow and local Ray, then `mcie verify`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[1]
MCIE = [sys.executable, "-m", "flows.cli"]


def mcie(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*MCIE, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


BUILD = ["--count", "30", "--resolution", "128", "--shard-size", "8", "--seed", "7",
         "--defect-rate", "0.3"]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("build") / "out"
    result = mcie("build", "--out", str(out), *BUILD, "--workers", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.mark.slow
def test_build_writes_every_sample_once_and_verifies(built: Path):
    table = pq.read_table(built / "manifest.parquet").to_pylist()
    assert [row["index"] for row in table] == list(range(30))
    assert len({row["id"] for row in table}) == 30
    verdicts = {row["verdict"] for row in table}
    assert verdicts <= {"accept", "reject", "borderline", "error", "judge_error"}
    assert "accept" in verdicts
    assert sorted(p.name for p in (built / "shards").glob("train-*.tar"))[0] == "train-000000.tar"
    for row in table:
        if row["verdict"] == "accept":
            assert row["shard"].startswith("train-")
        elif row["verdict"] == "reject":
            assert row["shard"].startswith("negatives-")
        elif row["verdict"] == "borderline":
            assert (built / row["shard"] / "sample.json").exists()
        assert 2 <= row["num_sub_edits"] <= 5
    config = json.loads((built / "config.json").read_text())
    assert config["count"] == 30 and config["seed"] == 7
    defects = [json.loads(line) for line in (built / "defects.jsonl").read_text().splitlines()]
    assert len(defects) == 30 and any(d["defects"] for d in defects)

    assert "<svg" in (built / "report.html").read_text()  # the build's report, beside the data

    verified = mcie("verify", str(built))
    assert verified.returncode == 0, verified.stdout + verified.stderr


def _which_members_differ(one: Path, other: Path, first: list[dict], second: list[dict]) -> str:
    """For a failed determinism check: which members of which samples differ, and whether their
    decoded pixels do (seen once in a full run, 2026-11-30, one sample of 30; not reproduced in
    six reruns — this says where to look next time)."""
    import io
    import tarfile

    import numpy as np
    from PIL import Image

    def pixels(data: bytes) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(data)))

    def members(root: Path, row: dict) -> dict[str, bytes]:
        if not row["shard"].endswith(".tar"):
            return {}
        with tarfile.open(root / "shards" / row["shard"]) as tar:
            return {m.name.split(".", 1)[1]: tar.extractfile(m).read() for m in tar.getmembers()
                    if m.name.startswith(row["id"] + ".")}

    lines = []
    for a, b in zip(first, second):
        if a != b:
            ours, theirs = members(one, a), members(other, b)
            for name in sorted(set(ours) | set(theirs)):
                if ours.get(name) != theirs.get(name):
                    if name.endswith(".png") and name in ours and name in theirs:
                        same = np.array_equal(pixels(ours[name]), pixels(theirs[name]))
                        lines.append(f"{a['id']} {name}: bytes differ, pixels {'equal' if same else 'differ'}")
                    else:
                        at = next((i for i, (x, y) in enumerate(zip(ours.get(name, b""), theirs.get(name, b"")))
                                   if x != y), None)
                        where = "" if at is None else f" from {ours[name][max(0, at - 60): at + 60]!r}"
                        lines.append(f"{a['id']} {name}: bytes differ{where}")
            lines.append(f"{a} != {b}")
    return "\n".join(lines)


@pytest.mark.slow
def test_same_seed_same_manifest_and_rerun_does_nothing(built: Path, tmp_path: Path):
    again = tmp_path / "again"
    result = mcie("build", "--out", str(again), *BUILD, "--workers", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    columns = ["id", "verdict", "shard", "checksum", "score_overall"]
    first = pq.read_table(built / "manifest.parquet", columns=columns).to_pylist()
    second = pq.read_table(again / "manifest.parquet", columns=columns).to_pylist()
    assert first == second, _which_members_differ(built, again, first, second)

    rerun = mcie("build", "--out", str(again), *BUILD, "--workers", "1")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "already complete" in rerun.stdout


@pytest.mark.slow
def test_resuming_with_other_parameters_is_refused(built: Path):
    result = mcie("build", "--out", str(built), "--count", "30", "--seed", "8")
    assert result.returncode == 2
    assert "different parameters" in result.stderr and "seed" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["build", "--out", "x", "--count", "-3"], "positive integer"),
        (["build", "--out", "x", "--count", "3", "--bogus"], "unrecognized arguments"),
        (["build", "--out", "/proc/mcie-not-writable", "--count", "3"], "cannot write"),
        (["build", "--out", "x", "--count", "3", "--defect-rate", "2"], "within 0..1"),
        (["build", "--out", "x", "--count", "3", "--min-edits", "6", "--max-edits", "9"],
         "max edits"),
        (["build", "--out", "x", "--count", "3", "--judge", "nope"], "unknown judge"),
        (["build", "--out", "x", "--count", "3", "--judge", "vllm"], "needs --judge-url"),
    ],
)
def test_bad_arguments_get_one_line_and_exit_2(tmp_path: Path, args, message):
    args = [str(tmp_path / a) if a == "x" else a for a in args]
    result = mcie(*args, timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not (tmp_path / "x").exists()  # a refused command leaves no OUT behind
