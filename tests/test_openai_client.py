"""The shared OpenAI-compatible client: the answer-size cap and the circuit breaker, against the
protocol-faithful local server (and against a port nobody listens on)."""

from __future__ import annotations

import logging
import socket

import pytest

from openai_server import OpenAIServer
from pipeline.clients.openai import Call, CallFailed, ClientConfig, OpenAIClient
from pipeline.judges.base import JudgeStage, make_judge
from pipeline.record import EditSample
from test_vllm_judge import view

MODEL = "test-llm"
FAST = {"backoff_s": 0.01, "backoff_max_s": 0.05}
SCHEMA = {"type": "object", "properties": {"word": {"type": "string"}}, "required": ["word"],
          "additionalProperties": False}


def call(i: int, parse=lambda answer: answer["word"]) -> Call:
    return Call(key=f"c{i}", schema=SCHEMA, schema_name="word", max_tokens=16, parse=parse,
                build=lambda: {"messages": [{"role": "user", "content": f"item-{i} : say a word"}]})


def dead_url() -> str:
    with socket.socket() as sock:  # a port that was free a moment ago: connections are refused
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


@pytest.fixture(scope="module")
def server():
    with OpenAIServer(model=MODEL) as srv:
        yield srv


def test_answers_are_validated_and_parsed(server):
    server.script(rules=[{"match": "item-1 ", "then": [{"kind": "content", "content": {"word": 3}}]}])
    with_client = OpenAIClient(ClientConfig(url=server.url, model=MODEL, **FAST))
    try:
        ok, bad = with_client.run([call(0), call(1)])
    finally:
        with_client.close()
    assert ok == "looks as asked"  # the server's schema-following answer
    assert isinstance(bad, CallFailed) and "fails the schema at word" in str(bad)


def test_an_answer_over_the_cap_fails_that_call_alone(server):
    huge = {"kind": "content", "content": {"word": "x" * 50_000}}
    server.script(rules=[{"match": "item-0 ", "then": [huge]}])
    client = OpenAIClient(ClientConfig(url=server.url, model=MODEL, max_answer_bytes=4096, **FAST))
    try:
        big, fine = client.run([call(0), call(1)])
    finally:
        client.close()
    assert isinstance(big, CallFailed) and "larger than the 4096-byte cap" in str(big)
    assert fine == "looks as asked"
    assert server.stats()["requests"] == 2  # over the cap is not retried


def test_the_judge_takes_the_cap_too(server):
    server.script(rules=[{"match": "sample-0 ", "then": [{"kind": "content", "content": "x" * 9000}]}])
    with make_judge("vllm", url=server.url, model=MODEL, max_answer_bytes=4096, **FAST) as judge:
        big, fine = judge.score_batch([view(0), view(1)])
    assert "cap" in str(big) and isinstance(fine, dict)


def test_breaker_fails_the_rest_of_the_batch_at_once_with_one_line(caplog):
    caplog.set_level(logging.WARNING, logger="pipeline.clients.openai")
    client = OpenAIClient(ClientConfig(url=dead_url(), model=MODEL, max_in_flight=2,
                                       max_retries=5, breaker_failures=3, **FAST))
    try:
        results = client.run([call(i) for i in range(40)])
    finally:
        client.close()
    assert all(isinstance(r, CallFailed) for r in results)
    opened = [r for r in results if "circuit breaker open after 3 consecutive" in str(r)]
    assert len(opened) >= 38  # at most the calls in flight when it opened ended otherwise
    assert client.stats.requests <= 3 + 2  # not 40 x 6 attempts
    assert client.stats.breaker_trips == 1
    lines = [r for r in caplog.records if "circuit breaker open" in r.getMessage()]
    assert len(lines) == 1


def test_breaker_cuts_hung_requests_short_and_the_next_unit_probes_again(server):
    server.script(rules=[{"match": "item-", "then": ["hang"]}])
    client = OpenAIClient(ClientConfig(url=server.url, model=MODEL, max_in_flight=4, timeout_s=1.0,
                                       max_retries=5, breaker_failures=4, **FAST))
    try:
        first = client.run([call(i) for i in range(12)])
        assert all(isinstance(r, CallFailed) and "circuit breaker open" in str(r) for r in first)
        # bounded by work, not the clock: without the breaker 12 calls x 6 attempts would hang;
        # with it, the 4 failures that open it plus at most the 4 then in flight were sent
        assert client.stats.requests <= 4 + 4
        server.script()  # the server is back: a new batch (unit) asks again
        assert client.run([call(0)]) == ["looks as asked"]
    finally:
        client.close()


def test_judge_breaker_makes_judge_errors_for_rejudge():
    with make_judge("vllm", url=dead_url(), model=MODEL, breaker_failures=2, max_retries=3,
                    max_in_flight=1, **FAST) as judge:
        samples = []
        for i in range(6):
            v = view(i)
            samples.append(EditSample(id=v.id, index=i, seed=0, source=v.source, target=v.target,
                                      instruction=v.instruction, sub_edits=v.sub_edits,
                                      background_mask=v.background_mask))
        JudgeStage(judge)(samples)
    assert [s.verdict for s in samples] == ["judge_error"] * 6
    assert sum("circuit breaker open" in s.error for s in samples) >= 5
    assert judge.stats.requests == 2


def test_client_options_are_checked():
    with pytest.raises(ValueError, match="breaker_failures"):
        ClientConfig(url="http://h/v1", model="m", breaker_failures=-1)
    with pytest.raises(ValueError, match="max_answer_bytes"):
        ClientConfig(url="http://h/v1", model="m", max_answer_bytes=10)
    config = ClientConfig.from_options(url="http://h/v1", model="m", breaker_failures="7")
    assert config.breaker_failures == 7
