"""`mcie verify` finds every kind of damage and names the sample it hurts."""

from __future__ import annotations

import argparse
import io
import json
import shutil
import tarfile

import pyarrow as pa
import pytest

from pipeline.dataset.output import finalize, read_manifest, write_manifest, write_unit
from pipeline.record import MANIFEST_SCHEMA
from pipeline.dataset.shards import write_tar
from pipeline.dataset.verify import register, verify
from shard_samples import finished_sample, unit_samples


@pytest.fixture
def build(tmp_path):
    out = tmp_path / "out"
    write_unit(out, 0, unit_samples(0))
    write_unit(out, 1, unit_samples(8))
    finalize(out)
    return out


def rows(out):
    return {r["id"]: r for r in read_manifest(out).to_pylist()}


def ids_in(out, shard):
    return [i for i, r in rows(out).items() if r["shard"] == shard]


def cli(argv):
    parser = argparse.ArgumentParser(prog="mcie")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def rewrite_tar(path, keep):
    """Rewrite a tar keeping members for which keep(name) is true (same headers)."""
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w") as tar:
        for info, data in members:
            if keep(info.name):
                tar.addfile(info, io.BytesIO(data))


def test_a_clean_build_verifies(build, capsys):
    assert verify(build) == []
    assert cli(["verify", str(build)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"OK {build}: 16 samples")
    assert "accept 6" in printed and "4 tar shards" in printed


def test_a_flipped_byte_in_a_tar_is_caught_and_named(build, capsys):
    victim = ids_in(build, "train-000001.tar")[1]
    path = build / "shards/train-000001.tar"
    with tarfile.open(path) as tar:
        member = tar.getmember(f"{victim}.target.png")
    data = bytearray(path.read_bytes())
    data[member.offset_data + member.size // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    problems = verify(build)
    assert f"{victim}: checksum mismatch in shards/train-000001.tar" in problems
    assert all(victim in p for p in problems)
    assert cli(["verify", str(build)]) == 1
    assert victim in capsys.readouterr().out


def test_a_deleted_member_is_caught_and_named(build):
    victim = ids_in(build, "negatives-000000.tar")[0]
    rewrite_tar(build / "shards/negatives-000000.tar", lambda name: name != f"{victim}.regions.png")
    problems = verify(build)
    assert f"{victim}: shards/negatives-000000.tar lacks members ['regions.png']" in problems
    assert f"{victim}: checksum mismatch in shards/negatives-000000.tar" in problems


def test_a_duplicated_sample_is_caught_and_named(build):
    victim = ids_in(build, "train-000000.tar")[0]
    sample = next(s for s in unit_samples(0) if s.id == victim)
    write_tar(build / "shards/train-000099.tar", [sample])
    problems = verify(build)
    assert f"{victim}: present 2 times across shards (train-000000.tar, train-000099.tar)" in problems


def test_a_sample_written_twice_into_its_own_tar_is_caught(build):
    victim = ids_in(build, "train-000000.tar")[0]
    path = build / "shards/train-000000.tar"
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w") as tar:
        for info, data in members + [(m, d) for m, d in members if m.name.startswith(victim)]:
            tar.addfile(info, io.BytesIO(data))
    assert f"{victim}: present 2 times across shards (train-000000.tar, train-000000.tar)" in verify(build)


def test_a_manifest_row_whose_shard_is_missing_is_caught_and_named(build):
    victims = ids_in(build, "negatives-000001.tar")
    (build / "shards/negatives-000001.tar").unlink()
    problems = verify(build)
    for victim in victims:
        assert (f"{victim}: not found in any shard; manifest says shards/negatives-000001.tar "
                "(that file is missing)") in problems
    assert len(problems) == len(victims)


def test_a_tar_sample_missing_from_the_manifest_is_caught(build):
    table = read_manifest(build)
    victim = ids_in(build, "train-000001.tar")[0]
    kept = [r for r in table.to_pylist() if r["id"] != victim]
    write_manifest(build, pa.Table.from_pylist(kept, schema=MANIFEST_SCHEMA))
    problems = verify(build)
    assert f"{victim}: in shards/train-000001.tar but not in the manifest" in problems
    assert f"{victim}: in parts/ but not in the manifest" in problems
    assert f"{victim}: in defects.jsonl but not in the manifest" in problems


def test_manifest_disagreements_are_caught(build):
    table = read_manifest(build).to_pylist()
    accepted = next(r for r in table if r["shard"] == "train-000000.tar")
    accepted["verdict"] = "reject"
    other = next(r for r in table if r["shard"] == "train-000001.tar")
    other["num_sub_edits"] += 1
    duplicate = dict(table[0])
    write_manifest(build, pa.Table.from_pylist(table + [duplicate], schema=MANIFEST_SCHEMA))
    problems = verify(build)
    assert (f"{accepted['id']}: json verdict 'accept' in shards/train-000000.tar, "
            "manifest says 'reject'") in problems
    assert f"{accepted['id']}: verdict 'reject' but stored in train-000000.tar" in problems
    assert (f"{other['id']}: json has {other['num_sub_edits'] - 1} sub-edits, "
            f"manifest says {other['num_sub_edits']}") in problems
    assert f"{duplicate['id']}: listed more than once in the manifest" in problems


def test_queue_and_quarantine_damage_is_caught(build):
    manifest = rows(build)
    review = next(i for i, r in manifest.items() if r["verdict"] == "borderline")
    rejudge = next(i for i, r in manifest.items() if r["verdict"] == "judge_error")
    bad = next(i for i, r in manifest.items() if r["verdict"] == "error")
    (build / "review" / review / "target.png").unlink()
    shutil.rmtree(build / "rejudge" / rejudge)
    (build / "quarantine" / f"{bad}.json").unlink()
    stray = finished_sample(99, "borderline")
    from pipeline.dataset.shards import write_sample_dir

    write_sample_dir(build / "review" / stray.id, stray)
    problems = verify(build)
    assert f"{review}: review/{review} lacks members ['target.png']" in problems
    assert f"{rejudge}: rejudge/{rejudge}/ is missing" in problems
    assert f"{bad}: quarantine/{bad}.json is missing" in problems
    assert f"{bad}: quarantine/{bad}.source.png is not in the manifest at that location" not in problems
    assert f"{stray.id}: review/{stray.id} is not in the manifest at that location" in problems


def test_temporaries_and_part_disagreements_are_caught(build):
    (build / "shards/.train-000002.tar.abc123.tmp").write_bytes(b"half")
    (build / "parts/unit-000001.parquet").unlink()
    problems = verify(build)
    assert "shards/.train-000002.tar.abc123.tmp: temporary file of an interrupted write" in problems
    for sample_id in [s.id for s in unit_samples(8)]:
        assert f"{sample_id}: in the manifest but in no unit part" in problems


def test_defect_log_must_have_every_sample(build):
    lines = (build / "defects.jsonl").read_text().splitlines()
    victim = json.loads(lines[3])["id"]
    (build / "defects.jsonl").write_text("\n".join(lines[:3] + lines[4:]) + "\n")
    assert verify(build) == [f"{victim}: no line in defects.jsonl"]


def test_cli_bad_arguments_exit_2(tmp_path, capsys):
    assert cli(["verify", str(tmp_path / "missing")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli(["verify", str(empty)]) == 2  # a directory that is no build: said so, exit 2
    assert capsys.readouterr().err.strip() == f"mcie verify: error: {empty} is not a build (no manifest.parquet, config.json or parts/)"


def test_moving_a_decided_review_sample_into_a_new_shard_keeps_the_build_valid(build):
    from pipeline.dataset.output import update_rows
    from pipeline.record import manifest_row
    from pipeline.dataset.shards import read_sample_dir, remove_path

    decided = []
    for sample_id in [i for i, r in rows(build).items() if r["verdict"] == "borderline"]:
        sample = read_sample_dir(build / "review" / sample_id)
        sample.verdict, sample.verdict_by = "accept", "human"
        decided.append(sample)
    sums = write_tar(build / "shards/train-review-000000.tar", decided)
    update_rows(build, [manifest_row(s, "train-review-000000.tar", sums[s.id]) for s in decided])
    for sample in decided:
        remove_path(build / "review" / sample.id)
    assert verify(build) == []
    finalize(build)  # e.g. `mcie build` run again: the move survives
    assert {rows(build)[s.id]["shard"] for s in decided} == {"train-review-000000.tar"}
    assert verify(build) == []
    with pytest.raises(KeyError, match="no unit part holds"):
        update_rows(build, [{**manifest_row(decided[0], "x.tar", "0"), "id": "s7-nosuchsample"}])
