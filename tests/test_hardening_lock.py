"""Issue 17, items 1 and 4: one writer per OUT (a real second process holds the lock), and no
path built from an id escapes OUT."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flows.cli import main
from pipeline.config import BuildConfig, save_config
from pipeline.dataset.lock import LOCK_NAME, OutLocked, out_lock
from pipeline.dataset.move import Move, move_samples
from pipeline.dataset.output import (
    finalize,
    part_path,
    read_manifest,
    train_shard_name,
    unit_done,
    write_unit,
)
from pipeline.dataset.rejudge import rejudge
from pipeline.dataset.shards import sample_members
from pipeline.dataset.verify import verify
from pipeline.record import MANIFEST_SCHEMA
from shard_samples import SEED, finished_sample

ROOT = Path(__file__).resolve().parents[1]
SHARD = 4

# A writer in its own process: takes OUT's lock like `mcie build` does, writes unit 0 and stops
# after the unit's shards, before its completion marker, until told to go on (a line on stdin).
WRITER = textwrap.dedent("""
    import sys
    from pathlib import Path
    sys.path[:0] = [{root!r}, {tests!r}]
    from pipeline.dataset import output
    from pipeline.dataset.lock import out_lock
    from shard_samples import finished_sample

    out = Path(sys.argv[1])
    real = output.write_tar_members
    def paused(*args, **kwargs):
        sums = real(*args, **kwargs)
        print("shards-written", flush=True)
        sys.stdin.readline()
        return sums
    output.write_tar_members = paused
    with out_lock(out, "mcie build --out " + str(out)):
        print("locked", flush=True)
        output.write_unit(out, 0, [finished_sample(i, "accept") for i in range({shard})])
    print("done", flush=True)
""").format(root=str(ROOT), tests=str(ROOT / "tests"), shard=SHARD)


def tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def start_writer(out: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(out)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def new_out(tmp_path: Path) -> Path:
    out = tmp_path / "out"
    out.mkdir()
    save_config(out, BuildConfig(count=SHARD, seed=SEED, resolution=64, shard_size=SHARD))
    return out


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


def test_forced_interleaving_a_second_build_is_refused_and_the_first_completes(tmp_path, capsys, monkeypatch):
    """The interleaving of the audit: one writer has written unit 0's shards and not yet its
    marker when a second build starts on the same OUT. The second is refused at once (exit 2, one
    line naming the holder) and touches nothing; the first completes with its shard in place."""
    out = new_out(tmp_path)
    writer = start_writer(out)
    try:
        assert writer.stdout.readline().strip() == "shards-written"
        before = tree(out)
        code = main(["build", "--out", str(out), "--count", str(SHARD), "--seed", str(SEED),
                     "--resolution", "64", "--shard-size", str(SHARD)])
        err = one_line(capsys.readouterr().err)
        assert code == 2
        assert f"pid {writer.pid} (mcie build --out {out})" in err and "in use" in err
        monkeypatch.setenv("LABEL_STUDIO_API_KEY", "k" * 20)  # (no key: a usage error first)
        for command in (["rejudge", str(out)],
                        ["review", "pull", str(out), "--url", "http://127.0.0.1:9"],
                        ["review", "push", str(out), "--url", "http://127.0.0.1:9"]):
            assert main(command) == 2, command
            assert f"pid {writer.pid}" in one_line(capsys.readouterr().err)
        with pytest.raises(OutLocked):
            finalize(out)
        assert tree(out) == before  # the refused writers wrote nothing, removed nothing
        writer.stdin.write("go\n")
        writer.stdin.flush()
        assert writer.stdout.readline().strip() == "done"
        assert writer.wait(30) == 0
    finally:
        writer.kill()
        writer.wait()
    assert unit_done(out, 0) and (out / "shards" / train_shard_name(0)).is_file()
    finalize(out)
    assert verify(out) == []
    assert (out / LOCK_NAME).read_bytes() == b""  # released: empty, the same bytes in every OUT


def test_kill_9_of_the_holder_never_leaves_a_stale_lock(tmp_path):
    out = new_out(tmp_path)
    writer = start_writer(out)
    assert writer.stdout.readline().strip() == "shards-written"
    with pytest.raises(OutLocked, match=f"pid {writer.pid}"):
        with out_lock(out):
            pass
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait()
    with out_lock(out, "second"):  # the kernel released it with the process
        assert b'"command": "second"' in (out / LOCK_NAME).read_bytes()
    assert not part_path(out, 0).exists()  # killed before its marker: the unit is not done


def test_the_lock_is_reentrant_within_a_process(tmp_path):
    with out_lock(tmp_path, "outer"):
        with out_lock(tmp_path, "inner"):
            assert b"outer" in (tmp_path / LOCK_NAME).read_bytes()
        assert b"outer" in (tmp_path / LOCK_NAME).read_bytes()
    assert (tmp_path / LOCK_NAME).read_bytes() == b""


# ---- item 4: ids are data, never paths ------------------------------------------------------------

def judge_error_build(out: Path) -> list:
    out.mkdir(parents=True)
    save_config(out, BuildConfig(count=SHARD, seed=SEED, resolution=64, shard_size=SHARD))
    samples = [finished_sample(i, v) for i, v in enumerate(["accept", "judge_error", "reject", "judge_error"])]
    write_unit(out, 0, samples)
    finalize(out)
    return samples


class RejectingJudge:
    """A judge that scores every pair as a clear reject: what makes rejudge move (and, before
    ids were checked, delete) the directory a manifest row names."""

    name, version = "rejecting", "1"

    def score_batch(self, views):
        return [{"overall": 0.0, "sub_edits": [0.0] * len(v.sub_edits), "background": 1.0,
                 "quality": 1.0} for v in views]


def test_rejudge_of_a_manifest_naming_a_path_deletes_nothing(tmp_path, caplog):
    out = tmp_path / "builds" / "out"
    samples = judge_error_build(out)
    victim = tmp_path / "builds" / "victim"  # OUT/rejudge/../../victim
    victim.mkdir()
    # a complete sample dir, so that only the id check stands between rejudge and the victim
    members = sample_members(samples[1])
    for name, data in members.items():
        (victim / ("sample.json" if name == "json" else name)).write_bytes(data)
    before = tree(victim)
    rows = read_manifest(out).to_pylist()
    rows[1]["id"], rows[1]["shard"] = "../../victim", "rejudge/../../victim"
    table = pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)
    pq.write_table(table, out / "manifest.parquet")
    pq.write_table(table, part_path(out, 0))
    stats = rejudge(out, RejectingJudge())
    assert (stats.candidates, stats.unreadable, stats.reject) == (2, 1, 1)
    assert "'../../victim', which the factory never writes" in caplog.text
    assert tree(victim) == before
    rows_after = {r["index"]: r for r in read_manifest(out).to_pylist()}
    assert rows_after[1]["id"] == "../../victim"  # left as it is, reported
    assert (rows_after[3]["verdict"], rows_after[3]["shard"]) == ("reject", "negatives-000000.tar")


def test_a_sample_whose_json_names_a_path_cannot_be_moved(tmp_path):
    out = tmp_path / "out"
    samples = judge_error_build(out)
    sample = samples[1]
    sample.id = "../../victim"
    with pytest.raises(ValueError, match="cannot be a shard key"):
        move_samples(out, [Move(sample, {}, came_from=out / "rejudge" / sample.id)], SHARD)
    good = samples[3]
    good.verdict = "accept"
    with pytest.raises(ValueError, match="cannot leave"):
        move_samples(out, [Move(good, sample_members(good), came_from=tmp_path)], SHARD)
    assert tmp_path.is_dir() and (out / "rejudge" / good.id).is_dir()
