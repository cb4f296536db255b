"""`mcie rejudge`: judge_error samples re-judged by the vLLM judge (against the local test server)
and moved into train / negatives shards or the review queue, the build staying verify-clean."""

from __future__ import annotations

import json

import pytest

from openai_server import OpenAIServer
from pipeline.dataset import output as output_module
from pipeline.config import BuildConfig, save_config
from pipeline.judges.base import make_judge
from pipeline.dataset.output import finalize, read_manifest, read_parts, write_unit
from pipeline.dataset.rejudge import rejudge
from pipeline.dataset.shards import iter_tar_groups, read_sample_dir
from pipeline.dataset.verify import verify
from shard_samples import SEED, finished_sample

MODEL = "qwen2.5-vl-test"
SHARD = 4
# index → verdict of the build: four judge errors spread over two units
VERDICTS = ["accept", "judge_error", "reject", "judge_error",
            "judge_error", "accept", "judge_error", "borderline"]


def answer(sub: int, n: int, background: int = 10, quality: int = 10) -> dict:
    return {"kind": "content", "content": {
        "sub_instructions": [{"reason": "seen", "score": sub}] * n,
        "background_consistency": background, "visual_quality": quality}}


def build(out, server_url: str) -> dict[int, str]:
    config = BuildConfig(count=len(VERDICTS), seed=SEED, resolution=64, shard_size=SHARD,
                         judge="vllm", judge_options={"url": server_url, "model": MODEL,
                                                      "backoff_s": 0.01, "backoff_max_s": 0.05})
    out.mkdir(exist_ok=True)
    save_config(out, config)
    samples = []
    for index, verdict in enumerate(VERDICTS):
        sample = finished_sample(index, verdict, edits=2)
        sample.instruction = f"sample-{index} : {sample.instruction}"
        samples.append(sample)
    for unit in range(2):
        write_unit(out, unit, samples[unit * SHARD:(unit + 1) * SHARD])
    finalize(out)
    assert verify(out) == []
    return {s.index: s.id for s in samples}


def script(server, **by_index) -> None:
    server.script(rules=[{"match": f"sample-{i} ", "then": [b]} for i, b in by_index.items()])


@pytest.fixture(scope="module")
def server():
    with OpenAIServer(model=MODEL) as srv:
        yield srv


def judge_for(server):
    return make_judge("vllm", url=server.url, model=MODEL, backoff_s=0.01, backoff_max_s=0.05)


def rows_by_index(out) -> dict[int, dict]:
    return {row["index"]: row for row in read_manifest(out).to_pylist()}


def test_rejudge_moves_each_sample_where_its_new_verdict_sends_it(tmp_path, server):
    out = tmp_path / "out"
    ids = build(out, server.url)
    script(server, **{"1": answer(10, 2), "3": answer(2, 2), "4": answer(7, 2), "6": "garbage"})
    with judge_for(server) as judge:
        stats = rejudge(out, judge)
    assert stats.to_dict() == {"candidates": 4, "accept": 1, "reject": 1, "borderline": 1,
                               "still_failing": 1, "unreadable": 0, "cleaned": 0}
    rows = rows_by_index(out)
    assert (rows[1]["verdict"], rows[1]["shard"]) == ("accept", "train-000000.tar")
    assert (rows[3]["verdict"], rows[3]["shard"]) == ("reject", "negatives-000000.tar")
    assert (rows[4]["verdict"], rows[4]["shard"]) == ("borderline", f"review/{ids[4]}")
    assert (rows[6]["verdict"], rows[6]["shard"]) == ("judge_error", f"rejudge/{ids[6]}")
    assert rows[1]["judge"] == f"vllm:{MODEL}@rubric-v1" and rows[1]["score_overall"] == 1.0
    # the unit's tar holds its old sample and the new one, in index order, with the new verdict
    groups = list(iter_tar_groups(out / "shards" / "train-000000.tar"))
    assert [key for key, _ in groups] == [ids[0], ids[1]]
    assert json.loads(groups[1][1]["json"])["verdict"] == "accept"
    assert sorted(p.name for p in (out / "rejudge").iterdir()) == [ids[6]]
    assert read_sample_dir(out / "review" / ids[4]).scores["sub_edits"] == [0.7, 0.7]
    assert verify(out) == []
    # parts carry the move too: merging them again changes nothing
    parts = {row["id"]: row for row in read_parts(out).to_pylist()}
    assert parts[ids[1]]["shard"] == "train-000000.tar"
    before = read_manifest(out)
    finalize(out)
    assert read_manifest(out).equals(before)

    # the next run re-judges exactly the one still waiting
    script(server, **{"6": answer(9, 2)})
    with judge_for(server) as judge:
        again = rejudge(out, judge)
    assert (again.candidates, again.accept) == (1, 1)
    assert server.stats()["requests"] == 1
    assert rows_by_index(out)[6]["shard"] == "train-000001.tar"
    assert not any((out / "rejudge").iterdir())
    assert verify(out) == []


def test_a_crash_mid_move_loses_nothing_and_a_rerun_completes(tmp_path, server, monkeypatch):
    out = tmp_path / "out"
    ids = build(out, server.url)
    script(server, **{"1": answer(10, 2), "3": answer(2, 2), "4": answer(7, 2), "6": answer(10, 2)})

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(output_module, "finalize", crash)  # the mover's manifest write
    with judge_for(server) as judge, pytest.raises(OSError, match="disk full"):
        rejudge(out, judge)
    monkeypatch.undo()
    # the manifest still says rejudge and every sample is still in its rejudge dir
    assert all(rows_by_index(out)[i]["verdict"] == "judge_error" for i in (1, 3, 4, 6))
    assert sorted(p.name for p in (out / "rejudge").iterdir()) == sorted(ids[i] for i in (1, 3, 4, 6))
    assert verify(out) != []  # copies already in tars / review: the rerun must clean them

    with judge_for(server) as judge:
        stats = rejudge(out, judge)
    assert (stats.accept, stats.reject, stats.borderline, stats.still_failing) == (2, 1, 1, 0)
    assert stats.cleaned >= 1
    assert verify(out) == []
    keys = [key for key, _ in iter_tar_groups(out / "shards" / "train-000000.tar")]
    assert keys == [ids[0], ids[1]]  # no duplicate from the crashed run


def test_judge_down_leaves_everything_in_rejudge(tmp_path):
    with OpenAIServer(model=MODEL) as srv:
        out = tmp_path / "out"
        build(out, srv.url)
        url = srv.url
    # the server is gone: every attempt is refused
    with make_judge("vllm", url=url, model=MODEL, max_retries=1, backoff_s=0.01,
                    backoff_max_s=0.02) as judge:
        before = read_manifest(out)
        stats = rejudge(out, judge)
    assert (stats.candidates, stats.still_failing) == (4, 4)
    assert read_manifest(out).equals(before)
    assert verify(out) == []


def test_cli_uses_the_builds_judge_and_rejects_bad_arguments(tmp_path, server, capsys):
    from flows.cli import main

    out = tmp_path / "out"
    build(out, server.url)  # config.json names the vllm judge and this server
    script(server)
    assert main(["rejudge", str(out)]) == 0
    assert "re-judged 4: 4 accepted" in capsys.readouterr().out
    assert verify(out) == []

    assert main(["rejudge", str(tmp_path / "missing")]) == 2
    assert main(["rejudge", str(out), "--judge", "vllm", "--judge-max-in-flight", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("mcie rejudge: error:") for line in err)
    assert "max_in_flight" in err[1]
