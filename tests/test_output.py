"""The OUT layout of one work unit, its completion marker, reruns, crashes, and the final merge."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.dataset import output
from pipeline.dataset.output import (
    finalize,
    read_manifest,
    read_quarantine,
    unit_done,
    write_manifest,
    write_unit,
)
from pipeline.record import MANIFEST_SCHEMA
from pipeline.dataset.shards import is_temp_name, read_sample_dir, read_shard
from pipeline.dataset.stats import BuildStats, stats_from_manifest
from pipeline.dataset.verify import verify
from shard_samples import failed_sample, finished_sample, unit_samples


def tree(root: Path) -> dict[str, str]:
    """Every file under root → sha256 of its bytes."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_write_unit_routes_each_verdict_to_its_place(tmp_path):
    samples = unit_samples()
    stats = write_unit(tmp_path, 3, samples)
    by_verdict = {v: [s.id for s in samples if s.verdict == v] for v in
                  ("accept", "reject", "borderline", "judge_error", "error")}
    assert [s.id for s in read_shard(tmp_path / "shards/train-000003.tar")] == by_verdict["accept"]
    assert [s.id for s in read_shard(tmp_path / "shards/negatives-000003.tar")] == by_verdict["reject"]
    (review,) = by_verdict["borderline"]
    assert read_sample_dir(tmp_path / "review" / review).verdict == "borderline"
    (rejudge,) = by_verdict["judge_error"]
    assert read_sample_dir(tmp_path / "rejudge" / rejudge).error == "JudgeError: timed out"
    (bad,) = by_verdict["error"]
    assert (tmp_path / "quarantine" / f"{bad}.source.png").is_file()
    record = json.loads((tmp_path / "quarantine" / f"{bad}.json").read_bytes())
    assert (record["error_stage"], record["error"]) == ("edit", "ValueError: no room for object 7")
    assert read_quarantine(tmp_path, bad).source.shape == (64, 64, 3)

    table = pq.read_table(tmp_path / "parts/unit-000003.parquet")
    assert table.schema == MANIFEST_SCHEMA
    rows = {r["id"]: r for r in table.to_pylist()}
    assert rows[review]["shard"] == f"review/{review}"
    assert rows[rejudge]["shard"] == f"rejudge/{rejudge}"
    assert rows[bad]["shard"] == f"quarantine/{bad}.json"
    assert {rows[i]["shard"] for i in by_verdict["accept"]} == {"train-000003.tar"}
    assert all(len(r["checksum"]) == 64 for r in rows.values())
    assert unit_done(tmp_path, 3) and not unit_done(tmp_path, 2)

    defects = [json.loads(line) for line in (tmp_path / "parts/unit-000003.defects.jsonl").read_text().splitlines()]
    assert [d["id"] for d in defects] == [s.id for s in samples]
    assert defects[0]["defects"] == [{"kind": "skip", "sub_edit": 0}] and defects[1]["defects"] == []
    assert stats.samples == 8 and stats.verdicts["accept"] == 3 and stats.verdicts["error"] == 1


def test_a_unit_without_rejects_writes_no_negatives_shard(tmp_path):
    write_unit(tmp_path, 0, [finished_sample(i, "accept") for i in range(2)])
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == ["train-000000.tar"]


def test_same_unit_gives_identical_bytes_and_a_rerun_overwrites_identically(tmp_path):
    write_unit(tmp_path / "a", 0, unit_samples())
    write_unit(tmp_path / "b", 0, list(reversed(unit_samples())))
    first = tree(tmp_path / "a")
    assert first == tree(tmp_path / "b")
    write_unit(tmp_path / "a", 0, unit_samples())
    assert tree(tmp_path / "a") == first


def test_rerun_removes_stale_temporaries_and_old_entries_of_the_units_ids(tmp_path):
    samples = unit_samples()
    borderline = next(s for s in samples if s.verdict == "borderline")
    write_unit(tmp_path, 0, samples)
    # leftovers of a killed attempt, and a verdict that changed since
    (tmp_path / "shards/.train-000000.tar.1a2b3c.tmp").write_bytes(b"half")
    (tmp_path / "parts/.unit-000000.parquet.99.tmp").write_bytes(b"half")
    (tmp_path / f"review/.{borderline.id}.77.tmp").mkdir()
    (tmp_path / f"quarantine/.{samples[0].id}.json.5.tmp").write_bytes(b"half")
    other_unit = tmp_path / "shards/.train-000001.tar.1.tmp"
    other_unit.write_bytes(b"not ours")
    samples = unit_samples()
    next(s for s in samples if s.id == borderline.id).verdict = "accept"
    write_unit(tmp_path, 0, samples)
    assert not (tmp_path / "review" / borderline.id).exists()
    assert borderline.id in [s.id for s in read_shard(tmp_path / "shards/train-000000.tar")]
    leftovers = [p for p in tmp_path.rglob("*") if is_temp_name(p.name)]
    assert leftovers == [other_unit]  # another unit's temporaries are not this writer's business


def test_crash_mid_unit_leaves_the_unit_not_done_and_a_rerun_completes_it(tmp_path, monkeypatch):
    write_unit(tmp_path / "clean", 0, unit_samples())

    def crash(*args, **kwargs):
        raise OSError("killed")

    out = tmp_path / "crashed"
    monkeypatch.setattr(output, "write_members_dir", crash)  # after the tars, before the marker
    with pytest.raises(OSError, match="killed"):
        write_unit(out, 0, unit_samples())
    assert (out / "shards/train-000000.tar").is_file()
    assert not unit_done(out, 0)
    monkeypatch.undo()

    monkeypatch.setattr(pq, "write_table", crash)  # while writing the marker itself
    with pytest.raises(OSError, match="killed"):
        write_unit(out, 0, unit_samples())
    assert not unit_done(out, 0)
    assert not [p for p in out.rglob("*") if is_temp_name(p.name)]
    monkeypatch.undo()

    write_unit(out, 0, unit_samples())
    assert tree(out) == tree(tmp_path / "clean")


def test_rerunning_a_done_unit_first_withdraws_its_marker(tmp_path, monkeypatch):
    write_unit(tmp_path, 0, unit_samples())
    monkeypatch.setattr(output, "write_tar_members", lambda *a: (_ for _ in ()).throw(OSError("killed")))
    with pytest.raises(OSError):
        write_unit(tmp_path, 0, unit_samples())
    assert not unit_done(tmp_path, 0)  # a resume will redo it, not trust half-replaced outputs


def test_samples_that_cannot_go_where_their_verdict_says_are_quarantined(tmp_path):
    no_target = finished_sample(0, "accept")
    no_target.target = None
    no_verdict = finished_sample(1, "accept")
    no_verdict.verdict = None
    no_source = failed_sample(2, stage="source", with_source=False)
    stats = write_unit(tmp_path, 0, [no_target, no_verdict, no_source])
    rows = {r["id"]: r for r in pq.read_table(tmp_path / "parts/unit-000000.parquet").to_pylist()}
    assert rows[no_target.id]["verdict"] == "error" and rows[no_target.id]["error_stage"] == "write"
    assert "no target" in rows[no_target.id]["error"]
    assert "verdict None" in rows[no_verdict.id]["error"]
    assert sorted(p.name for p in (tmp_path / "quarantine").iterdir() if p.name.startswith(no_source.id)) == [
        f"{no_source.id}.json"
    ]
    assert not (tmp_path / "shards/train-000000.tar").exists()
    assert stats.verdicts["error"] == 3
    assert (tmp_path / "quarantine" / f"{no_target.id}.regions.png").is_file()  # pixels kept


def test_finalize_merges_parts_by_index_with_one_defect_line_per_sample(tmp_path):
    write_unit(tmp_path, 1, unit_samples(start=8))
    write_unit(tmp_path, 0, unit_samples(start=0))
    table = finalize(tmp_path)
    assert table.column("index").to_pylist() == list(range(16))
    assert read_manifest(tmp_path).equals(table)
    lines = [json.loads(x) for x in (tmp_path / "defects.jsonl").read_text().splitlines()]
    assert [d["index"] for d in lines] == list(range(16))
    # clean samples are listed too: only 0, 3, 6, 9, 12 carry a defect (15 failed before editing)
    assert [d["index"] for d in lines if d["defects"]] == [0, 3, 6, 9, 12]
    assert verify(tmp_path) == []


def test_write_manifest_is_atomic_sorted_and_schema_checked(tmp_path):
    write_unit(tmp_path, 0, unit_samples())
    table = finalize(tmp_path)
    reversed_rows = pa.Table.from_pylist(list(reversed(table.to_pylist())), schema=MANIFEST_SCHEMA)
    assert write_manifest(tmp_path, reversed_rows).equals(table)
    with pytest.raises(ValueError, match="missing \\['checksum'\\]"):
        write_manifest(tmp_path, table.drop_columns(["checksum"]))
    assert read_manifest(tmp_path).equals(table)  # the failed write left the old one whole
    assert [p.name for p in tmp_path.iterdir() if is_temp_name(p.name)] == []


def test_stats_merge_and_recount_from_the_manifest(tmp_path):
    first, second = unit_samples(0), unit_samples(8)
    a = write_unit(tmp_path, 0, first)
    b = write_unit(tmp_path, 1, second)
    total = a + b
    assert total == sum([a, b]) == BuildStats.from_samples(first + second)
    assert total.samples == 16 and total.accept_rate == pytest.approx(6 / 16)
    assert BuildStats.from_dict(json.loads(json.dumps(total.to_dict()))) == total
    assert stats_from_manifest(finalize(tmp_path)) == total
    judged = [s for s in first + second if "sub_edit_pass" in s.scores]
    recolors = [p for s in judged for e, p in zip(s.sub_edits, s.scores["sub_edit_pass"]) if e.type == "recolor"]
    assert total.sub_edits["recolor"] == len(recolors)
    assert total.sub_edit_passes["recolor"] == sum(recolors)
    assert total.quarantine_reasons == {"edit: ValueError: no room for object 7": 1,
                                        "edit: ValueError: no room for object 15": 1}
    timed = total + BuildStats(seconds=4.0)
    text = timed.summary_table()
    assert "accept rate" in text and "37.5%" in text
    assert "4.00 samples/s" in text  # 16 samples over 4 worker-seconds
    assert "recolor" in text and "quarantine reasons" in text
    assert "8.00 samples/s" in timed.summary_table(seconds=2.0)
