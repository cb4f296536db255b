"""The production judge: a multimodal LLM (e.g. Qwen2.5-VL) behind vLLM's OpenAI-compatible server.

Per pair, one chat-completions request carries the source and target images (PNG/JPEG data URLs,
resized to `max_side`), the complex instruction with its numbered sub-instructions and their regions
(boxes as fractions of width/height), and a rubric. The answer is constrained by a JSON schema
(`response_format` json_schema, vLLM structured outputs) and validated again on arrival: a judge
answer is data from outside and never trusted. Decoding is greedy (temperature 0) with a fixed seed
(a retry after a bad answer samples at `retry_temperature`, seed + try, so it can differ);
the model and the prompt version are the judge's `name`/`version`, hence the sample's provenance.

Transport is `pipeline.clients.openai.OpenAIClient`, shared with the MLLM grounder and the
rewriter: one event-loop thread and one keep-alive pool per judge (a judge lives in a Ray actor and
`score_batch` is called once per work unit), at most `max_in_flight` requests open, images encoded
only once a slot is free; timeouts, connection errors, 429 and 5xx retried with jittered back-off
up to `max_retries`; an answer that fails the schema gets `bad_answer_retries` (one) more try; an
answer over `max_answer_bytes` is not read; after `breaker_failures` consecutive failed requests
(0: never) the rest of the unit's pairs fail at once. Whatever still fails becomes that sample's
`JudgeError` (verdict `judge_error`, kept for `mcie rejudge`). Other 4xx (a malformed request, a
wrong model name, a refused key) are not retried. The API key comes from the environment
variable named by `api_key_env` and is never logged or stored.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.clients.openai import (
    Call,
    CallFailed,
    ClientConfig,
    ClientStats,
    OpenAIClient,
    answer_json,
    data_url,
    validate,
)
from pipeline.judges.base import JudgeError, register_judge
from pipeline.record import JudgeView

log = logging.getLogger(__name__)

# Bump whenever the rubric, the prompt layout or the answer schema changes: it is the judge's
# `version`, recorded in every sample's provenance, so scores from different prompts never mix.
PROMPT_VERSION = "rubric-v1"
SCORE_MAX = 10
REASON_MAX_CHARS = 200

SYSTEM_PROMPT = (
    "You are a strict quality judge for an image-editing training dataset. You see a SOURCE image "
    "(before the edit) and a TARGET image (after the edit), the complex editing instruction, and "
    "its numbered sub-instructions, each with the region it may change as a box "
    "[x0, y0, x1, y1] in fractions of the image width and height (origin top-left). "
    "Judge only what you see in the two images. Be strict: a sub-instruction that is only partly "
    "done, done to the wrong object, in the wrong place or with the wrong colour, size or text "
    "scores low. Answer with JSON only."
)

RUBRIC = (
    "Rate the edit:\n"
    '- "sub_instructions": one entry per sub-instruction, in the order given. "reason": one short '
    'line on what you see. "score": 0-10, 10 = carried out fully and correctly inside its region, '
    "5 = partly or doubtfully done, 0 = not done or wrong.\n"
    '- "background_consistency": 0-10, 10 = nothing outside the regions changed; lower for every '
    "change outside them (shifted, recoloured, removed or added content, a different crop).\n"
    '- "visual_quality": 0-10, 10 = a clean, natural image; lower for artifacts, seams, blur, '
    "distortions or unreadable text."
)


# ---- options --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class VllmJudgeConfig(ClientConfig):
    """The options of `make_judge("vllm", **options)`: the client's (url, model, max_in_flight,
    timeouts, retries, back-off, seed, api_key_env, max_answer_bytes, breaker_failures; see
    `pipeline.clients.openai.ClientConfig`) and the judge's own; validated at construction.

    max_in_flight: concurrent requests per judge (per worker). vLLM batches whatever is in flight,
    so the sum over the workers sharing a server should reach its `--max-num-seqs` (256 by
    default): the default fills it from one worker; with W workers per server use ~256/W.
    """

    WHAT = "vllm judge"

    max_side: int = 768  # images are downscaled so that max(width, height) <= max_side
    image_format: str = "png"  # png (lossless) or jpeg
    max_tokens: int = 0  # 0: sized from the number of sub-instructions

    def __post_init__(self) -> None:
        super().__post_init__()
        self._int_in("max_side", 64, 8192)
        self._int_in("max_tokens", 0, 1_000_000)
        self._require(self.image_format in ("png", "jpeg"),
                      f"image_format must be png or jpeg, got {self.image_format!r}")


# ---- the request ----------------------------------------------------------------------------------

def answer_schema(num_sub_edits: int) -> dict[str, Any]:
    """The JSON schema the answer must follow (sent to vLLM and checked on arrival). `reason`
    comes before `score` so the model states what it sees before it rates it."""
    score = {"type": "integer", "minimum": 0, "maximum": SCORE_MAX}
    return {
        "type": "object",
        "properties": {
            "sub_instructions": {
                "type": "array",
                "minItems": num_sub_edits,
                "maxItems": num_sub_edits,
                "items": {
                    "type": "object",
                    "properties": {"reason": {"type": "string"}, "score": score},
                    "required": ["reason", "score"],
                    "additionalProperties": False,
                },
            },
            "background_consistency": score,
            "visual_quality": score,
        },
        "required": ["sub_instructions", "background_consistency", "visual_quality"],
        "additionalProperties": False,
    }


def encode_image(image: np.ndarray, max_side: int, image_format: str) -> str:
    """A data URL of the image, downscaled to fit `max_side` (aspect kept)."""
    return data_url(image, max_side, image_format)[0]


def instruction_text(view: JudgeView) -> str:
    height, width = view.source.shape[:2]
    lines = [f'Complex instruction: "{view.instruction}"', "", "Sub-instructions:"]
    for number, sub in enumerate(view.sub_edits, start=1):
        if sub.box is not None:
            x0, y0, x1, y1 = sub.box
            region = f"[{x0 / width:.3f}, {y0 / height:.3f}, {x1 / width:.3f}, {y1 / height:.3f}]"
        else:
            region = "not given"
        target = f"; acts on: {sub.target}" if sub.target else ""
        lines.append(f"{number}. {sub.text} (type: {sub.type}{target}; region: {region})")
    lines += ["", RUBRIC]
    return "\n".join(lines)


def build_request(view: JudgeView, config: VllmJudgeConfig, max_tokens: int | None = None,
                  attempt: int = 0) -> dict:
    """The chat-completions body. Attempt 0 is greedy; a retry after a bad answer samples at
    `retry_temperature` with seed + attempt, so it can answer differently and is still reproducible."""
    if not view.sub_edits:
        raise ValueError(f"sample {view.id} has no sub-instructions to judge")
    n = len(view.sub_edits)
    image_format = config.image_format
    return {
        "model": config.model,
        "messages": [
            {"role": "system", "content": SYSTEM_PROMPT},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Image 1, SOURCE (before the edit):"},
                    {"type": "image_url",
                     "image_url": {"url": encode_image(view.source, config.max_side, image_format)}},
                    {"type": "text", "text": "Image 2, TARGET (after the edit):"},
                    {"type": "image_url",
                     "image_url": {"url": encode_image(view.target, config.max_side, image_format)}},
                    {"type": "text", "text": instruction_text(view)},
                ],
            },
        ],
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "edit_judgement", "schema": answer_schema(n), "strict": True},
        },
        **sampling(config, n, max_tokens, attempt),
    }


def sampling(config: VllmJudgeConfig, num_sub_edits: int, max_tokens: int | None = None,
             attempt: int = 0) -> dict:
    """The request fields a retry changes; the rest of the body (the images) stays as encoded."""
    return {
        "temperature": 0.0 if attempt == 0 else config.retry_temperature,
        "seed": (config.seed + attempt) % 2**63,
        "max_tokens": max_tokens or config.max_tokens or default_max_tokens(num_sub_edits),
    }


def default_max_tokens(num_sub_edits: int) -> int:
    # ~60 tokens per sub-instruction (a one-line reason) plus the frame: generous, but bounded so a
    # model that rambles inside a string cannot hold a batch slot for thousands of tokens.
    return 96 + 96 * num_sub_edits


# ---- the answer -----------------------------------------------------------------------------------

def parse_answer(body: Any, num_sub_edits: int) -> dict[str, Any]:
    """Scores in [0, 1] from a chat.completion body, or BadAnswer saying what is wrong."""
    answer = answer_json(body)
    validate(answer, answer_schema(num_sub_edits))
    return scores_of(answer)


def scores_of(answer: dict[str, Any]) -> dict[str, Any]:
    """The judge's scores of a schema-valid answer."""
    items = answer["sub_instructions"]
    sub_scores = [item["score"] / SCORE_MAX for item in items]
    background = answer["background_consistency"] / SCORE_MAX
    quality = answer["visual_quality"] / SCORE_MAX
    return {
        "sub_edits": sub_scores,
        "sub_edit_reasons": [_one_line(item["reason"]) for item in items],
        "background": background,
        "quality": quality,
        # the weakest link: a pair is only as good as its worst sub-edit, background or quality
        "overall": min(min(sub_scores), background, quality),
    }


def _one_line(text: str) -> str:
    line = " ".join(text.split())
    return line[:REASON_MAX_CHARS]


# ---- the judge ------------------------------------------------------------------------------------

VllmJudgeStats = ClientStats  # the judge's counters are its client's


class VllmJudge:
    """A `Judge` that asks a vLLM OpenAI-compatible server. Thread-safe `score_batch`; picklable
    (only the config travels; the loop and connection pool are rebuilt on first use)."""

    # An MLLM answers in whole points out of 10: "8/10 carried out" already means done, where the
    # pixel judge's exact checks need 0.92. Build `routing` parameters override these.
    routing_defaults = {"sub_edit_pass": 0.8, "background_accept": 0.8, "background_reject": 0.5,
                        "overall_accept": 0.8, "overall_reject": 0.4}

    def __init__(self, config: VllmJudgeConfig):
        self.config = config
        self.name = f"vllm:{config.model}"
        self.version = PROMPT_VERSION
        self.client = OpenAIClient(config.client_config())

    @property
    def stats(self) -> ClientStats:
        return self.client.stats

    def __repr__(self) -> str:  # no key here: the config holds only the variable's name
        return f"VllmJudge(url={self.config.url!r}, model={self.config.model!r})"

    def __reduce__(self):
        return (self.__class__, (self.config,))

    def score_batch(self, views: list[JudgeView]) -> list[dict[str, Any] | JudgeError]:
        results = self.client.run([self._call(view) for view in views])
        return [JudgeError(str(r)) if isinstance(r, CallFailed) else r for r in results]

    def _call(self, view: JudgeView) -> Call:
        n = len(view.sub_edits)

        def build() -> dict[str, Any]:
            body = build_request(view, self.config)
            return {"messages": body["messages"]}

        return Call(key=f"judge {view.id}", build=build, schema=answer_schema(n),
                    schema_name="edit_judgement",
                    max_tokens=self.config.max_tokens or default_max_tokens(n), parse=scores_of)

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> "VllmJudge":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


@register_judge("vllm")
def make_vllm_judge(**options: Any) -> VllmJudge:
    """`make_judge("vllm", url=..., model=..., [max_in_flight, timeout_s, connect_timeout_s,
    max_retries, bad_answer_retries, retry_temperature, backoff_s, backoff_max_s, max_side,
    image_format, seed, max_tokens, api_key_env, max_answer_bytes, breaker_failures])`.
    Cheap: nothing connects until the first `score_batch`."""
    return VllmJudge(VllmJudgeConfig.from_options(**options))
