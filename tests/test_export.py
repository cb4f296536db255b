"""`mcie export`: parquet that `load_dataset` reads with images as PIL (the InstructPix2Pix example's
columns, or the full schema with RLE masks), the dataset card and stats.json of every build."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from flows.plan import prepare_build
from pipeline.config import BuildConfig
from pipeline.dataset.card import CARD, STATS, size_category
from pipeline.dataset.export import export, register
from pipeline.dataset.output import finalize, read_manifest
from pipeline.dataset.report import write_report
from pipeline.dataset.shards import read_shard
from pipeline.rle import decode as rle_decode
from pipeline.unit import UnitPipeline


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "out"
    config = BuildConfig(count=12, shard_size=6, resolution=64, seed=4, defect_rate=0.4)
    total = prepare_build(out, config)
    pipeline = UnitPipeline(config, out)
    for unit in range(config.num_units(total)):
        pipeline.run(unit)
    finalize(out)
    write_report(out)
    return out


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def cli(argv):
    parser = argparse.ArgumentParser(prog="mcie")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def samples_by_id(out, prefix):
    return {s.id: s for tar in sorted((out / "shards").glob(f"{prefix}-*.tar")) for s in read_shard(tar)}


def test_ip2p_export_loads_with_the_instruct_pix2pix_columns(build, tmp_path, capsys):
    import datasets

    dest = tmp_path / "ip2p"
    assert cli(["export", str(build), "--format", "ip2p", "--out", str(dest)]) == 0
    summary = json.loads(capsys.readouterr().out)
    accepted = samples_by_id(build, "train")
    assert summary["samples"] == len(accepted) > 0 and summary["skipped"] == 0
    files = sorted(str(p) for p in (dest / "data").glob("*.parquet"))
    for ds in (datasets.load_dataset("parquet", data_files={"train": files}, split="train",
                                     cache_dir=str(tmp_path / "c1")),
               datasets.load_dataset(str(dest), split="train", cache_dir=str(tmp_path / "c2"))):
        # what train_instruct_pix2pix.py reads with its default column arguments
        assert {"input_image", "edit_prompt", "edited_image"} <= set(ds.column_names)
        assert len(ds) == len(accepted)
        for row in ds:
            sample = accepted[row["id"]]
            assert row["edit_prompt"] == sample.instruction
            assert np.array_equal(np.asarray(row["input_image"].convert("RGB")), sample.source)
            assert np.array_equal(np.asarray(row["edited_image"].convert("RGB")), sample.target)
    card = (dest / "README.md").read_text()
    assert card.startswith("---\nlicense: ") and "data/train-*.parquet" in card
    # no best-of-N negatives in this build: no (empty) preference/ folder either
    assert summary["preference_pairs"] == 0 and sorted(p.name for p in dest.iterdir()) == ["README.md", "data"]


def test_hf_export_has_every_field_and_the_rle_masks(build, tmp_path):
    import datasets

    dest = tmp_path / "hf"
    summary = export(build, dest, "hf", "all")
    rows = read_manifest(build).to_pylist()
    wanted = [r for r in rows if r["verdict"] in ("accept", "reject", "borderline", "judge_error")]
    assert summary["samples"] == len(wanted)
    ds = datasets.load_dataset("parquet", data_files=sorted(str(p) for p in (dest / "data").glob("*.parquet")),
                               split="train", cache_dir=str(tmp_path / "c"))
    truth = {**samples_by_id(build, "train"), **samples_by_id(build, "negatives")}
    assert {r["verdict"] for r in ds} == {r["verdict"] for r in wanted}
    for row in ds:
        assert json.loads(row["record"])["id"] == row["id"]
        if row["id"] not in truth:
            continue
        sample = truth[row["id"]]
        bits = np.asarray(row["regions"])
        for i, (sub, edit) in enumerate(zip(row["sub_edits"], sample.sub_edits)):
            assert sub["text"] == edit.text and json.loads(sub["params"]) == json.loads(json.dumps(edit.params))
            assert np.array_equal(rle_decode(sub["mask_rle"]), edit.mask)
            assert np.array_equal((bits >> i) & 1 == 1, edit.mask)
        assert row["sub_edit_texts"] == [e.text for e in sample.sub_edits]


def test_export_verdict_filter_and_refusals(build, tmp_path, capsys):
    summary = export(build, tmp_path / "neg", "ip2p", "reject")
    assert summary["samples"] == len(samples_by_id(build, "negatives"))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert cli(["export", str(build), "--out", str(tmp_path / "full")]) == 2
    assert "exists and is not an empty directory" in capsys.readouterr().err
    assert cli(["export", str(tmp_path), "--out", str(tmp_path / "new")]) == 2
    assert not (tmp_path / "new").exists()


def test_every_build_writes_a_dataset_card_and_stats(build):
    card = (build / CARD).read_text()
    stats = json.loads((build / STATS).read_text())
    rows = read_manifest(build).to_pylist()
    header = card.split("---\n")[1]
    assert "license: " in header and "- image-to-image" in header
    assert f"- {size_category(len(rows))}" in header and '"shards/train-*.tar"' in header
    assert stats["samples"] == len(rows) and stats["format"] == 2
    assert sum(stats["verdicts"].values()) == len(rows)
    types = [t for r in rows if r["verdict"] != "error" for t in r["sub_edit_types"]]
    assert sum(v["sub_edits"] for v in stats["edit_types"].values()) == len(types)
    for kind, figures in stats["edit_types"].items():
        assert f"| {kind} | {figures['sub_edits']} |" in card
    assert stats["judge"]["name"] == "pixel" and "## Known limitations" in card


def test_manifest_schema_metadata_names_the_format_and_every_column(build):
    meta = pq.read_schema(build / "manifest.parquet").metadata
    assert meta[b"mcie.format"] == b"2"
    columns = json.loads(meta[b"mcie.columns"])
    assert set(columns) == set(pq.read_schema(build / "manifest.parquet").names)
    row = read_manifest(build).to_pylist()[0]
    assert len(row["source_sha256"]) == 64 and row["sub_edit_boxes"] and row["sub_edit_texts"]


def test_completion_is_a_fact_of_the_bytes_not_of_file_times(build, tmp_path):
    import os
    import shutil

    from flows.plan import is_complete
    copy = tmp_path / "copy"
    shutil.copytree(build, copy)
    config = BuildConfig.from_dict(json.loads((copy / "config.json").read_text()))
    assert is_complete(copy, config)
    future = 4_000_000_000
    for part in (copy / "parts").iterdir():  # what `cp -r` does: later times on the parts
        os.utime(part, (future, future))
    assert is_complete(copy, config)
    part = sorted((copy / "parts").glob("unit-*.defects.jsonl"))[0]
    part.write_bytes(part.read_bytes() + b"\n")  # a part changed after the merge: merge again
    assert not is_complete(copy, config)


def test_build_refuses_a_non_empty_directory_that_is_not_a_build_and_help_shows_defaults(tmp_path, capsys):
    from flows.cli import build_parser, main

    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("mine")
    assert main(["build", "--out", str(junk), "--count", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("is not empty and holds no build (no config.json): choose a new or empty directory")
    assert sorted(p.name for p in junk.iterdir()) == ["notes.txt"]  # nothing created
    parser = build_parser()
    help_text = parser._subparsers._group_actions[0].choices["export"].format_help()
    assert "(default: ip2p)" in help_text and "(default: accept)" in help_text
