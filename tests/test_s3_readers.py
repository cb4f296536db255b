"""Every reader and editor of a finished OUT on an object-store OUT (a real S3 server, SeaweedFS):
verify, the report, export to a bucket read back by `datasets` streaming, rejudge, the review
queue's moves, and the trainer's loader — each compared with the same build on local disk.

One small build is made locally (hand-made samples through the real unit writer), then copied
object by object into a fresh bucket per test."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline import storage
from pipeline.config import BuildConfig, save_config
from pipeline.dataset.output import finalize, read_manifest, write_unit
from pipeline.dataset.report import write_report
from pipeline.dataset.shards import iter_tar_groups
from pipeline.dataset.verify import verify
from shard_samples import SEED, finished_sample

ROOT = Path(__file__).resolve().parents[1]
SHARD = 4
# index → verdict: every location kind (train, negatives, review, rejudge, quarantine)
VERDICTS = ["accept", "judge_error", "reject", "borderline",
            "accept", "accept", "judge_error", "borderline",
            "accept", "reject", "accept", "error"]
MODEL = "qwen2.5-vl-test"


def make_build(out: Path) -> dict[int, str]:
    config = BuildConfig(count=len(VERDICTS), seed=SEED, resolution=64, shard_size=SHARD)
    out.mkdir(parents=True)
    save_config(out, config)
    samples = []
    for index, verdict in enumerate(VERDICTS):
        sample = finished_sample(index, "accept" if verdict == "error" else verdict, edits=2 + index % 2)
        sample.instruction = f"sample-{index} : {sample.instruction}"
        if verdict == "error":
            sample.fail("edit", "the editor ran out of patience")
        samples.append(sample)
    for unit in range(len(VERDICTS) // SHARD):
        write_unit(out, unit, samples[unit * SHARD:(unit + 1) * SHARD])
    finalize(out)
    write_report(out)
    return {s.index: s.id for s in samples}


@pytest.fixture(scope="module")
def local_build(tmp_path_factory):
    out = tmp_path_factory.mktemp("s3readers") / "out"
    ids = make_build(out)
    assert verify(out) == []
    return out, ids


def upload(s3, local: Path) -> str:
    """A copy of the local OUT in a fresh bucket, object by object; returns its URL. The local
    writer lock file stays behind: it is the local OUT's, not part of the build."""
    bucket = s3.bucket()
    fs = s3.filesystem()
    for path in sorted(local.rglob("*")):
        if path.is_file() and path.name != ".mcie.lock":
            fs.put_file(str(path), f"{bucket}/out/{path.relative_to(local).as_posix()}")
    return f"s3://{bucket}/out"


def tree(root) -> dict[str, bytes]:
    """Relative name → bytes of every file under a local folder or a URL prefix."""
    where = storage.location(root)
    fs, base = storage.fs_path(where)
    base = base.rstrip("/")
    return {name[len(base) + 1:]: fs.cat_file(name) for name in fs.find(base)
            if not name.rsplit("/", 1)[-1].startswith(".mcie.lock")}


def cli(register, argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mcie")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


# ---- verify -----------------------------------------------------------------------------------------

def test_verify_passes_on_a_bucket_and_names_the_sample_of_a_damaged_shard(s3, local_build, capsys):
    from pipeline.dataset.verify import register

    local, ids = local_build
    url = upload(s3, local)
    assert verify(url) == []
    assert cli(register, ["verify", url]) == 0
    assert capsys.readouterr().out.startswith(f"OK {url}: 12 samples")

    # one shard object overwritten with damaged bytes: a byte inside the first sample's target.png
    shard = f"{url}/shards/train-000001.tar"
    data = bytearray(storage.location(shard).read_bytes())
    groups = list(iter_tar_groups(storage.location(shard)))
    first = groups[0][0]
    at = bytes(data).index(groups[0][1]["target.png"]) + 200
    data[at] ^= 0xFF
    storage.write_atomic(storage.location(shard), bytes(data))
    problems = verify(url)
    assert problems and all(first in p for p in problems), problems
    assert any("checksum mismatch in shards/train-000001.tar" in p for p in problems)
    assert cli(register, ["verify", url]) == 1
    assert first in capsys.readouterr().out

    # a prefix that holds no build: one line, exit 2
    assert cli(register, ["verify", f"s3://{s3.bucket()}/nothing"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_mcie_verify_of_a_bucket_through_the_command_line(s3, local_build):
    import os

    local, ids = local_build
    url = upload(s3, local)
    done = subprocess.run([sys.executable, "-m", "flows.cli", "verify", url], cwd=ROOT,
                          env={**os.environ, **s3.env()}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith(f"OK {url}: 12 samples")


def test_verify_finds_a_temporary_copied_into_the_bucket_and_an_unlisted_review_dir(s3, local_build):
    local, ids = local_build
    url = upload(s3, local)
    storage.write_atomic(storage.location(f"{url}/shards/.train-000000.tar.abc123.tmp"), b"half")
    storage.write_atomic(storage.location(f"{url}/review/stray-1/sample.json"), b"{}")
    problems = verify(url)
    assert "shards/.train-000000.tar.abc123.tmp: temporary file of an interrupted write" in problems
    assert any(p.startswith("stray-1: review/stray-1 is not in the manifest") for p in problems)


# ---- report -----------------------------------------------------------------------------------------

def test_the_report_of_a_bucket_equals_the_local_one(s3, local_build):
    local, ids = local_build
    url = upload(s3, local)
    for name in ("report.html", "contact_sheet.jpg", "contact_sheet_others.jpg", "stats.json", "README.md"):
        storage.remove_tree(storage.location(f"{url}/{name}"))
    storage.remove_tree(storage.location(f"{url}/report"))
    # a stale image of an earlier page is removed from the bucket
    storage.write_atomic(storage.location(f"{url}/report/0000stale.png"), b"old")
    path = write_report(url)
    assert storage.show(path) == f"{url}/report.html"
    here, there = tree(local), tree(url)
    assert sorted(here) == sorted(there)
    page = there.pop("report.html").decode()
    assert f"<code>{url}</code>" in page
    assert page.replace(url, str(local)) == here.pop("report.html").decode()
    differs = [name for name in here if here[name] != there[name]]
    assert differs == [], differs


# ---- export -----------------------------------------------------------------------------------------

def _rows(dataset) -> dict[str, dict]:
    rows = {}
    for row in dataset:
        rows[row["id"]] = {key: (np.asarray(value.convert("RGB")).tobytes() if hasattr(value, "convert") else value)
                           for key, value in row.items()}
    return rows


def test_hf_export_into_a_bucket_streams_back_the_rows_of_the_local_export(s3, local_build, tmp_path, capsys):
    import datasets

    from pipeline.dataset.export import register

    local, ids = local_build
    url = upload(s3, local)
    dest = f"s3://{s3.bucket()}/hf"
    assert cli(register, ["export", url, "--format", "hf", "--verdict", "all", "--out", dest]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert cli(register, ["export", str(local), "--format", "hf", "--verdict", "all",
                          "--out", str(tmp_path / "hf")]) == 0
    assert json.loads(capsys.readouterr().out) == summary
    assert summary["samples"] == len(VERDICTS) - 1  # quarantine is never exported

    fs = s3.filesystem()
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.find(dest.removeprefix("s3://")))
    assert names == sorted(p.name for p in (tmp_path / "hf").rglob("*") if p.is_file())
    assert not [p for p in fs.find(dest.removeprefix("s3://").split("/")[0]) if ".export-" in p]  # no work prefix

    options = {"client_kwargs": {"endpoint_url": s3.endpoint}, "key": "mcie-test", "secret": "mcie-test-secret"}
    streamed = datasets.load_dataset("parquet", data_files={"train": f"{dest}/data/*.parquet"}, split="train",
                                     streaming=True, storage_options=options)
    files = sorted(str(p) for p in (tmp_path / "hf" / "data").glob("*.parquet"))
    here = datasets.load_dataset("parquet", data_files={"train": files}, split="train",
                                 cache_dir=str(tmp_path / "cache"))
    remote, mine = _rows(streamed), _rows(here)
    assert sorted(remote) == sorted(mine) == sorted(ids[i] for i, v in enumerate(VERDICTS) if v != "error")
    assert remote == mine

    # refused with one line: a DIR inside the build, and a DIR that is not empty
    assert cli(register, ["export", url, "--out", f"{url}/export"]) == 2
    assert "inside the build" in capsys.readouterr().err
    assert cli(register, ["export", url, "--out", dest]) == 2
    assert "not an empty directory" in capsys.readouterr().err


def test_export_from_a_bucket_to_disk_equals_the_local_export_and_a_failure_leaves_nothing(
        s3, local_build, tmp_path, monkeypatch):
    from pipeline.dataset import card
    from pipeline.dataset.export import export

    local, ids = local_build
    url = upload(s3, local)
    export(url, tmp_path / "from-bucket", "ip2p")
    export(local, tmp_path / "from-disk", "ip2p")
    assert tree(tmp_path / "from-bucket") == tree(tmp_path / "from-disk")

    def broken(*args, **kwargs):
        raise OSError("the card could not be written")

    monkeypatch.setattr(card, "export_card", broken)
    dest = f"s3://{s3.bucket()}/ip2p"
    with pytest.raises(OSError, match="card"):
        export(url, dest, "ip2p")
    bucket = dest.removeprefix("s3://").split("/")[0]
    assert s3.filesystem().find(bucket) == []  # neither DIR nor the work prefix holds an object


# ---- rejudge ----------------------------------------------------------------------------------------

def test_rejudge_on_a_bucket_moves_the_samples_as_on_disk(s3, local_build):
    from openai_server import OpenAIServer
    from pipeline.dataset.rejudge import rejudge
    from pipeline.judges.base import make_judge

    local, ids = local_build
    url = upload(s3, local)
    edits = 2 + 1 % 2  # sample 1 has 2 + index % 2 sub-edits (make_build)
    answer = {"kind": "content", "content": {"sub_instructions": [{"reason": "seen", "score": 10}] * edits,
                                             "background_consistency": 10, "visual_quality": 10}}
    with OpenAIServer(model=MODEL) as server:
        server.script(rules=[{"match": "sample-1 ", "then": [answer]}, {"match": "sample-6 ", "then": ["garbage"]}])
        with make_judge("vllm", url=server.url, model=MODEL, backoff_s=0.01, backoff_max_s=0.05) as judge:
            stats = rejudge(url, judge)
    assert (stats.candidates, stats.accept, stats.still_failing) == (2, 1, 1)
    rows = {row["index"]: row for row in read_manifest(storage.location(url)).to_pylist()}
    assert (rows[1]["verdict"], rows[1]["shard"]) == ("accept", "train-000000.tar")
    assert rows[6]["shard"] == f"rejudge/{ids[6]}"
    keys = [key for key, _ in iter_tar_groups(storage.location(f"{url}/shards/train-000000.tar"))]
    assert keys == [ids[0], ids[1]]
    assert storage.child_names(storage.location(f"{url}/rejudge")) == [ids[6]]  # objects, not prefixes
    assert verify(url) == []


def test_mcie_rejudge_of_a_bucket_with_the_builds_own_judge(s3, local_build, capsys):
    from pipeline.dataset.rejudge import register

    local, ids = local_build
    url = upload(s3, local)
    # the pixel judge of config.json (no server needed) cannot score these hand-made edits: both
    # samples are read from the bucket, judged again, and stay where they wait
    assert cli(register, ["rejudge", url]) == 0
    assert capsys.readouterr().out.strip() == "re-judged 2: 0 accepted, 0 rejected, 0 to review, 2 still failing"
    assert storage.child_names(storage.location(f"{url}/rejudge")) == sorted([ids[1], ids[6]])
    assert not storage.location(f"{url}/.mcie.lock").exists()  # the writer lock is released
    assert verify(url) == []
    assert cli(register, ["rejudge", f"s3://{s3.bucket()}/nothing"]) == 2  # not a build: one line


# ---- review queue -----------------------------------------------------------------------------------

def test_a_human_decision_moves_a_review_sample_of_a_bucket_into_its_shard(s3, local_build):
    from annotation import queue
    from annotation.client import Connection, LabelStudioError
    from annotation.sync import ReviewSettings, _image_refs, human_decisions, resolve_image_mode

    local, ids = local_build
    url = upload(s3, local)
    assert queue.review_ids(url) == [ids[3], ids[7]]
    # Label Studio cannot read a bucket as local files: images go inline
    settings = ReviewSettings(document_root=local.parent)
    conn = Connection(url="http://127.0.0.1:8080", api_key="k")
    assert resolve_image_mode(url, conn, settings) == "inline"
    assert settings.title(url) == "mcie review out"
    with pytest.raises(LabelStudioError, match="object store"):
        _image_refs(url, settings, "local-files")
    # what push imports for a queued sample: its images read from the bucket, inline
    from annotation.tasks import build_task

    task = build_task(queue.read_review(url, ids[7]).meta, queue.read_review(url, ids[7]).members,
                      _image_refs(url, settings, "inline")(ids[7]), 0.5)
    assert task["data"]["sample_id"] == ids[7]
    assert task["data"]["source_image"].startswith("data:image/png;base64,")

    item = queue.read_review(url, ids[3])
    human = {"verdict": "reject", "annotations": [{"annotator": "a@b", "verdict": "reject"}]}
    assert queue.commit_decision(url, item, "reject", "human", human) == "negatives-000000.tar"
    assert queue.review_ids(url) == [ids[7]]
    keys = [key for key, _ in iter_tar_groups(storage.location(f"{url}/shards/negatives-000000.tar"))]
    assert keys == [ids[2], ids[3]]
    assert human_decisions(url) == [("accept", "reject")]
    assert verify(url) == []


# ---- trainer ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("workers", [0, 2])  # 2: forked loader workers open the bucket themselves
def test_the_loader_gives_the_same_first_batch_from_a_bucket(s3, local_build, workers):
    import torch

    from trainer.config import preset, with_train
    from trainer.data import find_shards, make_loader

    local, ids = local_build
    url = upload(s3, local)
    assert [p.name for p in find_shards(url)] == [p.name for p in find_shards(local)]
    config = with_train(preset("tiny"), batch_size=2, num_workers=workers)
    batches = []
    for data in (local, url):
        loader, _ = make_loader(data, config.train, config.model)
        batches.append(next(iter(loader)))
    here, there = batches
    assert here["key"] == there["key"] and here["instruction"] == there["instruction"]
    for key, value in here.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, there[key]), key


@pytest.mark.slow
def test_mcie_train_reads_a_bucket(s3, local_build, tmp_path):
    import os

    local, ids = local_build
    url = upload(s3, local)
    env = {**os.environ, **s3.env(), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "flows.cli", "train", "--data", url, "--config", "tiny",
                           "--steps", "2", "--batch-size", "2", "--num-workers", "0",
                           "--out", str(tmp_path / "ckpt")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["step"] == 2
