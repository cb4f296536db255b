"""The vLLM judge, the real client against a protocol-faithful local OpenAI-compatible server."""

from __future__ import annotations

import logging
import pickle
import threading
import time

import httpx
import numpy as np
import pytest

from openai_server import OpenAIServer
from pipeline.judges import vllm as vllm_judge
from pipeline.judges.base import JudgeError, JudgeStage, make_judge
from pipeline.record import EditSample, JudgeView, SubEdit
from pipeline.judges.vllm import PROMPT_VERSION, VllmJudge, answer_schema, parse_answer

MODEL = "qwen2.5-vl-test"
FAST = {"backoff_s": 0.01, "backoff_max_s": 0.05}  # keep retry tests quick


def view(i: int, n: int = 2, height: int = 120, width: int = 160) -> JudgeView:
    rng = np.random.default_rng(i)
    source = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    target = source.copy()
    target[10:40, 20:60] = (200, 30, 30)
    subs = [SubEdit("recolor", f"make the cup number {k} red", target=f"cup {k}",
                    box=[20, 10, 60, 40]) for k in range(n)]
    background = np.ones((height, width), bool)
    background[10:40, 20:60] = False
    # a trailing space keeps "sample-1 " from matching "sample-12 " in the server's script rules
    return JudgeView(id=f"s-{i}", source=source, target=target,
                     instruction=f"sample-{i} : make the cups red", sub_edits=subs,
                     background_mask=background)


def answer(sub: list[int], background: int, quality: int) -> dict:
    return {"kind": "content", "content": {
        "sub_instructions": [{"reason": f"cup {k}\nlooks red", "score": s} for k, s in enumerate(sub)],
        "background_consistency": background, "visual_quality": quality}}


def rule(i: int, *then) -> dict:
    return {"match": f"sample-{i} ", "then": list(then)}


@pytest.fixture(scope="module")
def server():
    with OpenAIServer(model=MODEL) as srv:
        yield srv


@pytest.fixture
def judge(server):
    with make_judge("vllm", url=server.url, model=MODEL, max_in_flight=8, **FAST) as j:
        yield j


# ---- good answers ---------------------------------------------------------------------------------

def test_good_answers_become_scores_in_unit_range(server, judge):
    server.script(rules=[rule(0, answer([10, 3], 9, 8)), rule(1, answer([7, 6, 0], 10, 10))])
    results = judge.score_batch([view(0), view(1, n=3), view(2)])
    assert results[0] == {
        "sub_edits": [1.0, 0.3], "sub_edit_reasons": ["cup 0 looks red", "cup 1 looks red"],
        "background": 0.9, "quality": 0.8, "overall": 0.3}
    assert results[1]["sub_edits"] == [0.7, 0.6, 0.0] and results[1]["overall"] == 0.0
    assert results[2]["sub_edits"] == [0.9, 0.9]  # the server's default schema-following answer
    assert judge.name == f"vllm:{MODEL}" and judge.version == PROMPT_VERSION


def test_request_carries_images_instruction_regions_and_schema(server):
    server.script()
    with make_judge("vllm", url=server.url, model=MODEL, max_side=64, seed=7) as judge:
        assert isinstance(judge.score_batch([view(3, n=2, height=120, width=160)])[0], dict)
    stats = server.stats()
    request = stats["last_request"]
    assert request["model"] == MODEL and request["temperature"] == 0 and request["seed"] == 7
    assert request["response_format"]["type"] == "json_schema"
    assert request["response_format"]["json_schema"]["schema"] == answer_schema(2)
    assert request["images"] == 2 and stats["image_sizes"] == [[64, 48], [64, 48]]  # resized
    text = request["user_text"]
    assert "sample-3 : make the cups red" in text
    assert "1. make the cup number 0 red" in text and "2. make the cup number 1 red" in text
    assert "[0.125, 0.083, 0.375, 0.333]" in text  # box [20,10,60,40] over 160x120


def test_judge_stage_records_provenance_and_routes_errors(server, judge):
    server.script(rules=[rule(5, "garbage")])
    samples = []
    for i in (4, 5):
        v = view(i)
        s = EditSample(id=v.id, index=i, seed=0, source=v.source, target=v.target,
                       instruction=v.instruction, sub_edits=v.sub_edits,
                       background_mask=v.background_mask)
        samples.append(s)
    JudgeStage(judge)(samples)
    good, bad = samples
    assert good.scores["overall"] == 0.9 and good.verdict is None
    assert good.provenance["judge"] == f"vllm:{MODEL}@{PROMPT_VERSION}"
    assert bad.verdict == "judge_error" and bad.scores == {} and "bad answer" in bad.error


def test_verdicts_from_the_judges_scores_never_accept_a_bad_answer(server, judge):
    from pipeline.routing import RouteStage, RoutingPolicy

    server.script(rules=[rule(10, answer([10, 9], 10, 9)), rule(11, answer([10, 2], 10, 10)),
                         rule(12, answer([10, 7], 10, 10)), rule(13, answer([10, 10], 3, 10)),
                         rule(14, "violate"), rule(15, "garbage")])
    samples = []
    for i in range(10, 16):
        v = view(i)
        samples.append(EditSample(id=v.id, index=i, seed=0, source=v.source, target=v.target,
                                  instruction=v.instruction, sub_edits=v.sub_edits,
                                  background_mask=v.background_mask))
    RouteStage(RoutingPolicy.for_judge(judge))(JudgeStage(judge)(samples))
    assert [s.verdict for s in samples] == [
        "accept", "reject", "borderline", "reject", "judge_error", "judge_error"]
    assert samples[2].scores["sub_edit_pass"] == [True, False]
    assert all(s.verdict_by == "judge" for s in samples)


# ---- bad answers and faults -----------------------------------------------------------------------

@pytest.mark.parametrize("bad", ["garbage", "violate", "truncated",
                                 {"kind": "content", "content": {"sub_instructions": []}}])
def test_bad_answer_gets_one_retry_then_judge_error(server, judge, bad):
    server.script(rules=[rule(0, bad), rule(1, bad, "good")])
    first, second = judge.score_batch([view(0), view(1)])
    assert isinstance(first, JudgeError) and "bad answer after 2 tries" in str(first)
    assert isinstance(second, dict)  # the one retry rescued it
    assert server.stats()["requests"] == 4
    retry = server.stats()["last_request"]  # greedy would repeat the bad answer: the retry samples
    assert (retry["temperature"], retry["seed"]) == (0.4, 1)


def test_truncated_answer_retry_gets_more_tokens(server, judge, monkeypatch):
    encoded = []
    real_encode = vllm_judge.encode_image
    monkeypatch.setattr(vllm_judge, "encode_image", lambda *a: encoded.append(1) or real_encode(*a))
    server.script(rules=[rule(0, "truncated", "good")])
    assert isinstance(judge.score_batch([view(0)])[0], dict)
    last = server.stats()["last_request"]
    assert last["max_tokens"] == 2 * (96 + 96 * 2) and last["images"] == 2
    assert server.stats()["requests"] == 2 and len(encoded) == 2  # the retry reuses the images


def test_429_and_5xx_are_retried_with_backoff(server, judge):
    server.script(rules=[
        rule(0, {"kind": "status", "status": 429}, {"kind": "status", "status": 500},
             {"kind": "status", "status": 503}, "good"),
        rule(1, {"kind": "status", "status": 500}),
    ])
    with make_judge("vllm", url=server.url, model=MODEL, max_retries=3, **FAST) as judge:
        ok, failed = judge.score_batch([view(0), view(1)])
    assert isinstance(ok, dict)
    assert isinstance(failed, JudgeError) and "after 4 attempts" in str(failed)
    assert server.stats()["statuses"] == {"429": 1, "500": 5, "503": 1, "200": 1}


def test_retry_after_is_honoured(server):
    server.script(rules=[rule(0, {"kind": "status", "status": 429, "retry_after": 0.4}, "good")])
    with make_judge("vllm", url=server.url, model=MODEL, backoff_s=0.01, backoff_max_s=1) as judge:
        started = time.perf_counter()
        assert isinstance(judge.score_batch([view(0)])[0], dict)
        assert time.perf_counter() - started >= 0.4


def test_refusals_are_not_retried(server):
    server.script()
    with make_judge("vllm", url=server.url, model="no-such-model", **FAST) as judge:
        (result,) = judge.score_batch([view(0)])
    assert isinstance(result, JudgeError) and "HTTP 404" in str(result)
    assert server.stats()["requests"] == 1


def test_timeout_retried_then_judge_error(server):
    server.script(rules=[rule(0, "hang")])
    with make_judge("vllm", url=server.url, model=MODEL, timeout_s=1.0, max_retries=1, **FAST) as judge:
        started = time.perf_counter()
        hung, fine = judge.score_batch([view(0), view(1)])
        elapsed = time.perf_counter() - started
    assert isinstance(hung, JudgeError) and "timeout after 1s" in str(hung)
    assert isinstance(fine, dict)
    assert elapsed < 60  # the hang lasts 600 s: the client gave up on its own timeout
    assert server.stats()["behaviours"]["hang"] == 2


def test_unjudgeable_view_fails_alone(judge, server):
    server.script()
    broken = view(1)
    broken.target = broken.target.astype(np.float32)
    empty = view(2, n=0)
    ok, bad_image, no_subs = judge.score_batch([view(0), broken, empty])
    assert isinstance(ok, dict)
    assert isinstance(bad_image, JudgeError) and "uint8" in str(bad_image)
    assert isinstance(no_subs, JudgeError) and "no sub-instructions" in str(no_subs)


# ---- throughput: bounded in flight, reused connections ---------------------------------------------

@pytest.mark.parametrize("bound", [3, 8])
def test_in_flight_bound_holds_and_is_reached(server, bound):
    # 0.5 s of service: long enough for a busy client to fill the window before the first answer.
    server.script(service_time_s=0.5)
    with make_judge("vllm", url=server.url, model=MODEL, max_in_flight=bound) as judge:
        results = judge.score_batch([view(i) for i in range(3 * bound)])
    assert all(isinstance(r, dict) for r in results)
    # Reached (the requests overlap, not one after another) and held; throughput is bench/judge.py's.
    assert server.stats()["max_concurrency"] == bound


def test_connection_pool_is_kept_across_batches(server):
    server.script()
    with make_judge("vllm", url=server.url, model=MODEL, max_in_flight=4) as judge:
        for _ in range(3):
            assert all(isinstance(r, dict) for r in judge.score_batch([view(i) for i in range(12)]))
        assert server.stats()["connections"] <= 4  # 36 requests over at most 4 connections


def test_judge_pickles_for_ray_and_works_after(server, judge):
    server.script()
    assert isinstance(judge.score_batch([view(0)])[0], dict)  # loop and pool are live now
    clone = pickle.loads(pickle.dumps(judge))
    try:
        assert isinstance(clone, VllmJudge) and clone.config == judge.config
        assert isinstance(clone.score_batch([view(1)])[0], dict)
    finally:
        clone.close()


def test_server_killed_mid_batch_loses_nothing():
    views = [view(i) for i in range(24)]
    with OpenAIServer(model=MODEL) as srv:
        srv.script(service_time_s=0.2)
        judge = make_judge("vllm", url=srv.url, model=MODEL, max_in_flight=4, max_retries=2,
                           timeout_s=5, **FAST)
        results: list = []
        worker = threading.Thread(target=lambda: results.extend(judge.score_batch(views)))
        worker.start()
        deadline = time.monotonic() + 10
        while srv.stats()["statuses"].get("200", 0) < 8 and time.monotonic() < deadline:
            time.sleep(0.02)
        srv.kill()
        worker.join(timeout=20)
        assert not worker.is_alive()
    judge.close()
    assert len(results) == len(views)
    scored = [r for r in results if isinstance(r, dict)]
    errors = [r for r in results if isinstance(r, JudgeError)]
    assert len(scored) + len(errors) == len(views)
    assert len(scored) >= 8 and len(errors) >= 4  # the in-flight ones and the rest are kept
    assert all("unreachable after 3 attempts" in str(e) for e in errors)


# ---- the API key ----------------------------------------------------------------------------------

SECRET = "sk-test-9f8e7d6c5b4a-do-not-log"


def test_api_key_sent_as_bearer_and_never_logged(monkeypatch, caplog):
    monkeypatch.setenv("MCIE_JUDGE_API_KEY", SECRET)
    caplog.set_level(logging.DEBUG)  # httpx and httpcore log at DEBUG too
    with OpenAIServer(model=MODEL, api_key_env="MCIE_JUDGE_API_KEY") as srv:
        srv.script(rules=[rule(1, {"kind": "status", "status": 500}, "garbage", "garbage")])
        with make_judge("vllm", url=srv.url, model=MODEL, **FAST) as judge:
            results = judge.score_batch([view(0), view(1)])
            assert isinstance(results[0], dict) and isinstance(results[1], JudgeError)
            assert SECRET not in repr(judge) and SECRET.encode() not in pickle.dumps(judge)
        assert srv.stats()["authorization"] == {"bearer-ok": 4}
        # a judge without the key is refused, once, and says where the key should come from
        monkeypatch.delenv("MCIE_JUDGE_API_KEY")
        with make_judge("vllm", url=srv.url, model=MODEL, **FAST) as judge:
            (refused,) = judge.score_batch([view(2)])
        assert isinstance(refused, JudgeError) and "401" in str(refused)
        assert "MCIE_JUDGE_API_KEY" in str(refused)
        assert srv.stats()["authorization"] == {"bearer-ok": 4, "missing": 1}
    assert caplog.records, "logging was captured"
    logged = "\n".join(f"{r.getMessage()} {r.args}" for r in caplog.records)
    assert SECRET not in logged and SECRET not in str(results[1])


# ---- options ----------------------------------------------------------------------------------------

def test_options_are_validated():
    url = "http://127.0.0.1:8000/v1"
    judge = make_judge("vllm", url=url, model="m", max_in_flight="16", timeout_s="2.5")
    assert judge.config.max_in_flight == 16 and judge.config.timeout_s == 2.5
    bad = [
        ({"model": "m"}, "url is required"),
        ({"url": url}, "model is required"),
        ({"url": "ftp://host/v1", "model": "m"}, "http"),
        ({"url": "http://user:pw@host/v1", "model": "m"}, "credentials"),
        ({"url": url, "model": "m", "max_in_flight": 0}, "max_in_flight"),
        ({"url": url, "model": "m", "max_in_flight": "many"}, "must be a number"),
        ({"url": url, "model": "m", "timeout_s": -1}, "timeout_s"),
        ({"url": url, "model": "m", "image_format": "gif"}, "image_format"),
        ({"url": url, "model": "m", "retry_temperature": "3"}, "retry_temperature"),
        ({"url": url, "model": "m", "api_key": "sk-x"}, "unknown vllm judge options ['api_key']"),
    ]
    for options, message in bad:
        with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
            make_judge("vllm", **options)


def test_parse_answer_rejects_what_the_schema_rejects():
    def body(content, finish="stop"):
        return {"choices": [{"message": {"content": content}, "finish_reason": finish}]}

    good = '{"sub_instructions":[{"reason":"ok","score":10}],"background_consistency":5,"visual_quality":0}'
    assert parse_answer(body(good), 1)["background"] == 0.5
    assert parse_answer(body(f"```json\n{good}\n```"), 1)["quality"] == 0.0
    for content in ["", "not json", good.replace("10", "11"), good.replace('"ok"', "3"),
                    good.replace(',"visual_quality":0', "")]:
        with pytest.raises(ValueError):
            parse_answer(body(content), 1)
    with pytest.raises(ValueError):
        parse_answer(body(good), 2)  # one entry, two sub-instructions
    with pytest.raises(ValueError, match="truncated"):
        parse_answer(body(good, finish="length"), 1)


# ---- the test server is faithful: it refuses what vLLM refuses ---------------------------------------

def test_server_refuses_malformed_requests_like_vllm(server):
    server.script()
    endpoint = f"{server.url}/chat/completions"
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    cases = [
        {"messages": [{"role": "user", "content": "hi"}]},  # no model
        {"model": MODEL, "messages": []},
        {"model": MODEL, "messages": [{"role": "robot", "content": "hi"}]},
        {"model": MODEL, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://example.com/a.png"}}]}]},
        {"model": MODEL, "messages": [{"role": "user", "content": [image]}]},  # truncated PNG
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
         "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 3}}}},
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": -1},
    ]
    for case in cases:
        response = httpx.post(endpoint, json=case)
        assert response.status_code == 400, case
        error = response.json()["error"]
        assert error["type"] == "BadRequestError" and error["code"] == 400 and error["message"]
    assert httpx.post(endpoint, content=b"{not json").status_code == 400
    unknown = httpx.post(endpoint, json={"model": "other", "messages": [{"role": "user", "content": "hi"}]})
    assert unknown.status_code == 404 and unknown.json()["error"]["type"] == "NotFoundError"
    ok = httpx.post(endpoint, json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
    assert ok.status_code == 200 and ok.json()["object"] == "chat.completion"
    assert ok.json()["choices"][0]["message"]["role"] == "assistant"
