"""`mcie export --format hf` of a build with best-of-N negatives (OUT/preference/*.tar, written by
`output.write_unit` from what a generative editor keeps in `sample.private["preference"]`): one
preference row per rejected candidate of an exported sample, its images byte-equal, read back with
Hugging Face `datasets`."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.dataset.export import export
from pipeline.dataset.output import PREFERENCE, finalize, write_unit
from shard_samples import finished_sample

SHARD = 4


def _negative(rng, sample, sub_edit, candidate, chosen):
    h, w = sample.source.shape[:2]
    image = lambda: rng.integers(0, 256, (h, w, 3), dtype=np.uint8)  # noqa: E731
    return {"sub_edit": sub_edit, "candidate": candidate, "chosen_candidate": chosen, "seed": 100 + candidate,
            "scores": {"overall": 0.41}, "chosen_scores": {"overall": 0.93},
            "text": sample.sub_edits[sub_edit].text, "source": image(), "chosen": image(), "rejected": image()}


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """accept (2 negatives) · reject (1) · accept (none) · borderline (1) · accept (1, next unit)."""
    out = tmp_path_factory.mktemp("pref") / "out"
    out.mkdir()
    rng = np.random.default_rng(0)
    verdicts = ["accept", "reject", "accept", "borderline", "accept"]
    samples = [finished_sample(i, v) for i, v in enumerate(verdicts)]
    wanted = {0: [(0, 1, 0), (1, 0, 2)], 1: [(0, 2, 1)], 3: [(1, 1, 0)], 4: [(0, 0, 1)]}
    for index, negatives in wanted.items():
        samples[index].private["preference"] = [_negative(rng, samples[index], *n) for n in negatives]
    (out / "config.json").write_text(json.dumps({"count": len(samples), "shard_size": SHARD}))
    for unit in range(2):
        write_unit(out, unit, [s for s in samples if s.index // SHARD == unit])
    finalize(out)
    return out, samples


def _pairs(dest, tmp_path):
    import datasets

    files = sorted(str(p) for p in (dest / "preference").glob("*.parquet"))
    return datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=str(tmp_path / "cache"))


def test_preference_pairs_of_exported_samples(build, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    out, samples = build
    assert sorted(p.name for p in (out / PREFERENCE).iterdir()) == ["preference-00000.tar", "preference-00001.tar"]
    summary = export(out, tmp_path / "accepted", "hf", "accept")
    assert (summary["samples"], summary["preference_pairs"]) == (3, 3)  # samples 0 (two) and 4
    rows = _pairs(tmp_path / "accepted", tmp_path)
    by_key = {(r["id"], r["sub_edit"], r["candidate"]): r for r in rows}
    expected = {(samples[i].id, item["sub_edit"], item["candidate"]): item
                for i in (0, 4) for item in samples[i].private["preference"]}
    assert set(by_key) == set(expected)
    for key, item in expected.items():
        row = by_key[key]
        assert row["prompt"] == item["text"]
        for column, image in (("source_image", "source"), ("chosen_image", "chosen"), ("rejected_image", "rejected")):
            assert np.array_equal(np.asarray(row[column]), item[image])  # PIL images, byte-equal pixels
        meta = json.loads(row["meta"])
        assert meta["chosen_candidate"] == item["chosen_candidate"] and meta["seed"] == item["seed"]
        assert meta["scores"] == {"overall": 0.41} and meta["chosen_scores"] == {"overall": 0.93}
    card = (tmp_path / "accepted" / "README.md").read_text()
    assert "preference" in card


def test_preference_pairs_follow_the_verdict_filter(build, tmp_path):
    out, samples = build
    everything = export(out, tmp_path / "all", "hf", "all")
    assert everything["preference_pairs"] == 5  # + the rejected and the borderline sample's
    rejected = export(out, tmp_path / "rejected", "hf", "reject")
    assert rejected["preference_pairs"] == 1
    ids = {r["id"] for r in _pairs(tmp_path / "rejected", tmp_path)}
    assert ids == {samples[1].id}
