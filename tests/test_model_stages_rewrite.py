"""Instruction rewriting (`--rewriter vllm`) against the protocol-faithful OpenAI test server:
an accepted rewrite replaces the grammar text (both kept); one that loses a target or attribute,
or a server that cannot answer, leaves the grammar text."""

from __future__ import annotations

import pytest

from openai_server import OpenAIServer
from pipeline.compose.rewrite import REWRITERS, answer_schema, check_rewrite, required_terms
from pipeline.record import EditSample, SubEdit

MODEL = "qwen2.5-test"
FAST = {"backoff_s": 0.01, "backoff_max_s": 0.05}


@pytest.fixture(scope="module")
def server():
    with OpenAIServer(model=MODEL) as srv:
        yield srv


def sample(i: int) -> EditSample:
    subs = [SubEdit("recolor", "make the small dark-red cup on the left blue",
                    target="the small dark-red cup on the left",
                    params={"domain": "photo", "to_color": "blue"}),
            SubEdit("add_text", 'write "HELLO" in yellow at the top', target="",
                    params={"domain": "photo", "text": "HELLO", "color": "yellow"})]
    return EditSample(id=f"s-{i}", index=i, seed=0, sub_edits=subs,
                      instruction=f'Make the small dark-red cup on the left blue and then write '
                                  f'"HELLO" in yellow at the top{" " * i}')


GOOD = {"instruction": 'Turn the small dark red cup on the left blue, then put the word HELLO in '
                       'yellow across the top.',
        "parts": ["Turn the small dark red cup on the left blue",
                  "put the word HELLO in yellow across the top"]}


def rule(s: EditSample, *then) -> dict:
    return {"match": f'"{s.instruction}"', "then": list(then)}


def rewriter(server, **options):
    return REWRITERS.make("vllm", context={"seed": 3}, url=server.url, model=MODEL, **FAST, **options)


def test_required_terms_name_targets_and_attributes():
    s = sample(0)
    assert required_terms(s.sub_edits[0]) == ["small", "dark", "red", "cup", "left", "blue"]
    assert required_terms(s.sub_edits[1]) == ["hello", "yellow"]


def test_an_accepted_rewrite_keeps_both_texts(server):
    s = sample(0)
    grammar = s.instruction
    server.script(rules=[rule(s, {"kind": "content", "content": GOOD})])
    stage = rewriter(server)
    stage([s])
    stage.close()
    assert s.instruction == GOOD["instruction"]
    assert s.provenance["rewrite"] == {"grammar": grammar, "status": "accepted",
                                       "by": f"vllm:{MODEL}@rewrite-v1"}
    request = server.stats()["last_request"]
    assert request["response_format"]["json_schema"]["schema"] == answer_schema(2)
    assert request["temperature"] == 0.7 and "keep: small, dark, red, cup, left, blue" in request["user_text"]


@pytest.mark.parametrize("bad, reason", [
    ({**GOOD, "instruction": GOOD["instruction"].replace("blue", "green"),
      "parts": [GOOD["parts"][0].replace("blue", "green"), GOOD["parts"][1]]}, "lost 'blue'"),
    ({**GOOD, "instruction": "Turn the small dark red cup on the left blue.",
      "parts": [GOOD["parts"][0], GOOD["parts"][1]]}, "not in the rewrite"),
    ({"instruction": "Make a cup on the left blue and write HELLO in yellow", "parts":
      ["Make a cup on the left blue", "write HELLO in yellow"]}, "lost 'small'"),
    ({"instruction": "x", "parts": ["x"]}, "fails the schema"),
    ("garbage", "not JSON"),
])
def test_a_rewrite_that_loses_something_is_refused_and_the_grammar_text_kept(server, bad, reason):
    s = sample(1)
    grammar = s.instruction
    content = bad if isinstance(bad, str) else {"kind": "content", "content": bad}
    server.script(rules=[rule(s, content)])
    stage = rewriter(server)
    stage([s])
    stage.close()
    assert s.instruction == grammar and not s.failed  # never a reason to lose the sample
    record = s.provenance["rewrite"]
    assert record["status"] == "refused" and reason in record["reason"]
    assert server.stats()["requests"] == 2  # asked once more, sampled


def test_an_unreachable_server_keeps_the_grammar_text(server):
    s = sample(2)
    server.script(rules=[rule(s, {"kind": "status", "status": 500})])
    stage = rewriter(server, max_retries=1)
    stage([s])
    stage.close()
    assert s.provenance["rewrite"]["status"] == "refused" and "unreachable" in s.provenance["rewrite"]["reason"]


def test_check_rewrite_accepts_reordered_wording_only_in_order():
    s = sample(0)
    assert check_rewrite(GOOD, s.sub_edits) == GOOD["instruction"]
    swapped = {"instruction": GOOD["parts"][1] + " and " + GOOD["parts"][0],
               "parts": GOOD["parts"]}
    with pytest.raises(ValueError, match="in order"):
        check_rewrite(swapped, s.sub_edits)


def test_the_build_takes_a_rewriter_and_config_json_stays_as_before():
    from pipeline.config import BuildConfig, ConfigError

    plain = BuildConfig(count=2)
    assert "rewriter" not in plain.public_dict()  # OUTs made before the rewriter still resume
    with pytest.raises(ConfigError, match="rewriter 'vllm' needs option 'url'"):
        BuildConfig(count=2, rewriter="vllm")
    config = BuildConfig(count=2, rewriter="vllm", rewriter_options={"url": "http://h/v1", "model": "m"})
    assert config.public_dict()["rewriter"] == "vllm"
    from pipeline.unit import front_stages

    assert [type(s).__name__ for s in front_stages(config)][2] == "VllmRewriter"
