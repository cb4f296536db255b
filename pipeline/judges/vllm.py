"""The production judge: a multimodal LLM (e.g. Qwen2.5-VL) behind vLLM's OpenAI-compatible server.

Per pair, one chat-completions request carries the source and target images (PNG/JPEG data URLs,
resized to `max_side`), the complex instruction with its numbered sub-instructions and their regions
(boxes as fractions of width/height), and a rubric. The answer is constrained by a JSON schema
(`response_format` json_schema, vLLM structured outputs) and validated again on arrival: a judge
answer is data from outside and never trusted. Decoding is greedy (temperature 0) with a fixed seed
(a retry after a bad answer samples at `retry_temperature`, seed + try, so it can differ);
the model and the prompt version are the judge's `name`/`version`, hence the sample's provenance.

Throughput: the judge lives in a long-lived worker (a Ray actor) and `score_batch` is called once per
work unit, so it owns one event loop thread and one `aiohttp.ClientSession` (one keep-alive connection
pool) for its whole life, and keeps at most `max_in_flight` requests open at once. Images are
encoded only once a request slot is free, so memory stays bounded by the window, not the batch.

Faults: timeouts, connection errors, 429 and 5xx are retried with jittered exponential back-off up
to `max_retries`; an answer that fails the schema gets `bad_answer_retries` (one) more try; whatever
still fails becomes that sample's `JudgeError` (verdict `judge_error`, kept for `mcie rejudge`).
Other 4xx (a malformed request, a wrong model name, a refused key) are not retried. The API key
comes from the environment variable named by `api_key_env` and is never logged or stored.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import math
import os
import random
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from pipeline.judges.base import JudgeError, register_judge
from pipeline.record import JudgeView

log = logging.getLogger(__name__)

# Bump whenever the rubric, the prompt layout or the answer schema changes: it is the judge's
# `version`, recorded in every sample's provenance, so scores from different prompts never mix.
PROMPT_VERSION = "rubric-v1"
DEFAULT_API_KEY_ENV = "MCIE_JUDGE_API_KEY"
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


class BadAnswer(ValueError):
    """The server answered 200 but the answer is not a valid judgement (retried once)."""


class TruncatedAnswer(BadAnswer):
    """The answer hit max_tokens (finish_reason "length"): the retry gets twice the room."""


# ---- options --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class VllmJudgeConfig:
    """The options of `make_judge("vllm", **options)`; validated at construction.

    max_in_flight: concurrent requests per judge (per worker). vLLM batches whatever is in flight,
    so the sum over the workers sharing a server should reach its `--max-num-seqs` (256 by
    default): the default fills it from one worker; with W workers per server use ~256/W.
    """

    url: str
    model: str
    max_in_flight: int = 256
    timeout_s: float = 120.0  # per request, including time queued in vLLM
    connect_timeout_s: float = 10.0
    max_retries: int = 5  # transport errors, 429 and 5xx
    bad_answer_retries: int = 1  # answers that fail the schema
    retry_temperature: float = 0.4  # a bad answer's retry samples (seed + try): greedy would repeat it
    backoff_s: float = 0.5  # first back-off; doubles per retry, jittered
    backoff_max_s: float = 30.0
    max_side: int = 768  # images are downscaled so that max(width, height) <= max_side
    image_format: str = "png"  # png (lossless) or jpeg
    seed: int = 0
    max_tokens: int = 0  # 0: sized from the number of sub-instructions
    api_key_env: str = DEFAULT_API_KEY_ENV  # the NAME of the variable holding the key, never the key

    def __post_init__(self) -> None:
        _require(isinstance(self.url, str) and self.url, "url is required, e.g. http://HOST:8000/v1")
        parts = urlsplit(self.url)
        _require(parts.scheme in ("http", "https") and bool(parts.hostname),
                 f"url must be http(s)://HOST[:PORT]/v1, got {self.url!r}")
        _require(parts.username is None and parts.password is None,
                 f"url must not carry credentials; put the key in ${self.api_key_env}")
        _require(not parts.query and not parts.fragment, "url must not have a query or fragment")
        _require(isinstance(self.model, str) and bool(self.model.strip()), "model is required")
        _int_in(self, "max_in_flight", 1, 4096)
        _int_in(self, "max_retries", 0, 50)
        _int_in(self, "bad_answer_retries", 0, 5)
        _int_in(self, "max_side", 64, 8192)
        _int_in(self, "seed", 0, 2**63 - 1)
        _int_in(self, "max_tokens", 0, 1_000_000)
        for name in ("timeout_s", "connect_timeout_s", "backoff_s", "backoff_max_s"):
            value = getattr(self, name)
            _require(isinstance(value, (int, float)) and not isinstance(value, bool)
                     and math.isfinite(value) and value > 0,
                     f"{name} must be a positive number of seconds, got {value!r}")
        _require(self.backoff_max_s >= self.backoff_s, "backoff_max_s must be >= backoff_s")
        temperature = self.retry_temperature
        _require(isinstance(temperature, (int, float)) and not isinstance(temperature, bool)
                 and 0 <= temperature <= 2,
                 f"retry_temperature must be within 0..2, got {self.retry_temperature!r}")
        _require(self.image_format in ("png", "jpeg"),
                 f"image_format must be png or jpeg, got {self.image_format!r}")
        _require(isinstance(self.api_key_env, str) and self.api_key_env.isidentifier(),
                 f"api_key_env must be an environment variable name, got {self.api_key_env!r}")

    @classmethod
    def from_options(cls, **options: Any) -> "VllmJudgeConfig":
        """Build from loose options (CLI / flow parameters): numbers may come as strings."""
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ValueError(f"unknown vllm judge options {unknown}; known: {sorted(known)}")
        for required in ("url", "model"):
            if options.get(required) in (None, ""):
                raise ValueError(f"vllm judge: {required} is required")
        coerced = {}
        for name, value in options.items():
            kind = known[name].type
            if isinstance(value, str) and kind in ("int", "float"):
                try:
                    value = int(value) if kind == "int" else float(value)
                except ValueError:
                    raise ValueError(f"vllm judge: {name} must be a number, got {value!r}") from None
            coerced[name] = value
        return cls(**coerced)

    @property
    def endpoint(self) -> str:
        return self.url.rstrip("/") + "/chat/completions"


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(f"vllm judge: {message}")


def _int_in(config: VllmJudgeConfig, name: str, low: int, high: int) -> None:
    value = getattr(config, name)
    _require(isinstance(value, int) and not isinstance(value, bool) and low <= value <= high,
             f"{name} must be an integer within {low}..{high}, got {value!r}")


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
    from PIL import Image

    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 HxWx3 image, got {image.dtype} {image.shape}")
    pil = Image.fromarray(image, "RGB")
    height, width = image.shape[:2]
    if max(width, height) > max_side:
        scale = max_side / max(width, height)
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        pil = pil.resize(size, Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    if image_format == "png":
        pil.save(buffer, format="PNG", compress_level=1)  # lossless; level 1 is ~5x faster than 6
        mime = "image/png"
    else:
        pil.save(buffer, format="JPEG", quality=95)
        mime = "image/jpeg"
    return f"data:{mime};base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


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

_VALIDATORS: dict[int, Any] = {}


def _validator(num_sub_edits: int):
    if num_sub_edits not in _VALIDATORS:
        from jsonschema import Draft202012Validator

        _VALIDATORS[num_sub_edits] = Draft202012Validator(answer_schema(num_sub_edits))
    return _VALIDATORS[num_sub_edits]


def parse_answer(body: Any, num_sub_edits: int) -> dict[str, Any]:
    """Scores in [0, 1] from a chat.completion body, or BadAnswer saying what is wrong."""
    try:
        choice = body["choices"][0]
        content = choice["message"]["content"]
        finish = choice.get("finish_reason")
    except (KeyError, IndexError, TypeError):
        raise BadAnswer("response is not a chat.completion with a message") from None
    if finish == "length":
        raise TruncatedAnswer("answer truncated (finish_reason=length)")
    if not isinstance(content, str) or not content.strip():
        raise BadAnswer("empty answer")
    try:
        answer = json.loads(_strip_fence(content))
    except json.JSONDecodeError as exc:
        raise BadAnswer(f"answer is not JSON ({exc.msg}): {content[:80]!r}") from None
    error = next(iter(_validator(num_sub_edits).iter_errors(answer)), None)
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "answer"
        raise BadAnswer(f"answer fails the schema at {where}: {error.message[:160]}")
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


def _strip_fence(content: str) -> str:
    text = content.strip()
    if text.startswith("```"):
        text = text.split("\n", 1)[1] if "\n" in text else ""
        text = text.rsplit("```", 1)[0]
    return text


def _one_line(text: str) -> str:
    line = " ".join(text.split())
    return line[:REASON_MAX_CHARS]


# ---- the client -----------------------------------------------------------------------------------

@dataclass
class VllmJudgeStats:
    """Cumulative counters of one judge (mergeable with +)."""

    requests: int = 0  # HTTP attempts sent
    scored: int = 0
    judge_errors: int = 0
    retries: int = 0  # transport / 429 / 5xx retries
    bad_answers: int = 0
    encode_cpu_s: float = 0.0  # CPU time spent encoding images (and the request JSON)
    client_cpu_s: float = 0.0  # CPU time of the event loop thread: HTTP, parsing, validation
    peak_in_flight: int = 0  # most samples in progress at once (never above max_in_flight)
    by_status: dict[str, int] = field(default_factory=dict)

    def __add__(self, other: "VllmJudgeStats") -> "VllmJudgeStats":
        merged = {k: self.by_status.get(k, 0) + other.by_status.get(k, 0)
                  for k in set(self.by_status) | set(other.by_status)}
        return VllmJudgeStats(
            self.requests + other.requests, self.scored + other.scored,
            self.judge_errors + other.judge_errors, self.retries + other.retries,
            self.bad_answers + other.bad_answers, self.encode_cpu_s + other.encode_cpu_s,
            self.client_cpu_s + other.client_cpu_s,
            max(self.peak_in_flight, other.peak_in_flight), merged)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Retryable(Exception):
    def __init__(self, reason: str, retry_after: float | None = None):
        super().__init__(reason)
        self.retry_after = retry_after


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
        self.stats = VllmJudgeStats()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._session = None  # aiohttp.ClientSession, made on the loop thread at first use
        self._window: asyncio.Semaphore | None = None
        self._in_flight = 0
        self._random = random.Random()

    def __repr__(self) -> str:  # no key here: the config holds only the variable's name
        return f"VllmJudge(url={self.config.url!r}, model={self.config.model!r})"

    def __reduce__(self):
        return (self.__class__, (self.config,))

    # -- public -------------------------------------------------------------------------------------

    def score_batch(self, views: list[JudgeView]) -> list[dict[str, Any] | JudgeError]:
        if not views:
            return []
        loop = self._ensure_loop()
        future = asyncio.run_coroutine_threadsafe(self._score_all(views), loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()  # an interrupted caller must not leave requests running
            raise

    def close(self) -> None:
        with self._lock:
            loop, thread, session = self._loop, self._thread, self._session
            self._loop = self._thread = self._session = self._window = None
        if loop is None:
            return
        if session is not None:
            asyncio.run_coroutine_threadsafe(session.close(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()

    def __enter__(self) -> "VllmJudge":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- plumbing -----------------------------------------------------------------------------------

    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=loop.run_forever, name="vllm-judge-loop",
                                          daemon=True)
                thread.start()
                self._loop, self._thread = loop, thread
            return self._loop

    def _client(self):
        """The one session (one keep-alive pool of at most max_in_flight connections) and the
        in-flight window, made on the loop thread the first time and kept for the judge's life.
        aiohttp rather than httpx: httpcore's pool does work quadratic in its size on every
        request (measured here: ~9 ms CPU per request at 64 connections), aiohttp ~0.2 ms."""
        if self._session is None:
            import aiohttp

            c = self.config
            headers = {"content-type": "application/json", "accept": "application/json"}
            key = os.environ.get(c.api_key_env)
            if key:
                headers["authorization"] = f"Bearer {key}"
            self._session = aiohttp.ClientSession(
                headers=headers,
                connector=aiohttp.TCPConnector(limit=c.max_in_flight, keepalive_timeout=60),
                timeout=aiohttp.ClientTimeout(total=c.timeout_s,
                                              sock_connect=min(c.connect_timeout_s, c.timeout_s)),
                trust_env=False,  # a proxy variable must not silently reroute judge traffic
                raise_for_status=False,
            )
            self._window = asyncio.Semaphore(c.max_in_flight)
        return self._session, self._window

    async def _score_all(self, views: list[JudgeView]) -> list[dict[str, Any] | JudgeError]:
        started = time.thread_time()  # this loop thread runs nothing but the judge's requests
        try:
            return await asyncio.gather(*(self._score_one(view) for view in views))
        finally:
            self.stats.client_cpu_s += time.thread_time() - started

    async def _score_one(self, view: JudgeView):
        session, window = self._client()
        async with window:  # the in-flight bound: a sample holds its place until done
            self._in_flight += 1
            self.stats.peak_in_flight = max(self.stats.peak_in_flight, self._in_flight)
            try:
                result = await self._judge(view, session)
            except Exception as exc:  # one bad view must not cost the batch: it becomes its error
                log.warning("vllm judge: sample %s failed: %s: %s", view.id, type(exc).__name__, exc)
                result = JudgeError(f"{type(exc).__name__}: {exc}")
            finally:
                self._in_flight -= 1
        if isinstance(result, JudgeError):
            self.stats.judge_errors += 1
        else:
            self.stats.scored += 1
        return result

    async def _judge(self, view: JudgeView, session) -> dict[str, Any] | JudgeError:
        n = len(view.sub_edits)
        request, body, encode_s = await asyncio.to_thread(self._encode, view)
        self.stats.encode_cpu_s += encode_s
        failures = 0
        bad = 0
        while True:
            try:
                return await self._ask(session, body, n)
            except BadAnswer as exc:
                bad += 1
                self.stats.bad_answers += 1
                if bad > self.config.bad_answer_retries:
                    log.warning("vllm judge: sample %s: bad answer, giving up: %s", view.id, exc)
                    return JudgeError(f"bad answer after {bad} tries: {exc}")
                log.info("vllm judge: sample %s: bad answer, asking again: %s", view.id, exc)
                tokens = request["max_tokens"] * (2 if isinstance(exc, TruncatedAnswer) else 1)
                # only the sampling changes: the encoded images are reused, not encoded again
                request = {**request, **sampling(self.config, n, tokens, attempt=bad)}
                body = json.dumps(request).encode()
            except _Retryable as exc:
                failures += 1
                if failures > self.config.max_retries:
                    log.warning("vllm judge: sample %s: giving up after %d attempts: %s",
                                view.id, failures, exc)
                    return JudgeError(f"judge unreachable after {failures} attempts: {exc}")
                self.stats.retries += 1
                delay = self._backoff(failures, exc.retry_after)
                log.debug("vllm judge: sample %s: %s; retry %d in %.2fs", view.id, exc, failures,
                          delay)
                await asyncio.sleep(delay)
            except _Fatal as exc:
                log.warning("vllm judge: sample %s: %s", view.id, exc)
                return JudgeError(str(exc))

    def _encode(self, view: JudgeView) -> tuple[dict, bytes, float]:
        started = time.thread_time()
        request = build_request(view, self.config)
        body = json.dumps(request).encode()
        return request, body, time.thread_time() - started

    async def _ask(self, session, body: bytes, num_sub_edits: int) -> dict[str, Any]:
        import aiohttp

        self.stats.requests += 1
        try:
            async with session.post(self.config.endpoint, data=body) as response:
                status = response.status
                payload = await response.read()
                retry_after = _retry_after(response.headers.get("retry-after"))
        except asyncio.TimeoutError:
            self._count("timeout")
            raise _Retryable(f"timeout after {self.config.timeout_s:g}s") from None
        except aiohttp.ClientError as exc:  # refused/reset connections, server gone mid-answer
            self._count("transport")
            raise _Retryable(f"{type(exc).__name__}: {str(exc)[:160]}") from None
        self._count(str(status))
        if status == 200:
            try:
                answer = json.loads(payload)
            except ValueError:
                raise BadAnswer("response body is not JSON") from None
            return parse_answer(answer, num_sub_edits)
        message = _error_message(payload, status)
        if status == 429 or status >= 500:
            raise _Retryable(f"HTTP {status}: {message}", retry_after)
        hint = f" (is ${self.config.api_key_env} set?)" if status in (401, 403) else ""
        raise _Fatal(f"HTTP {status} from the judge server: {message}{hint}")

    def _count(self, key: str) -> None:
        self.stats.by_status[key] = self.stats.by_status.get(key, 0) + 1

    def _backoff(self, failures: int, retry_after: float | None) -> float:
        """Equal jitter: half the exponential step for sure, half at random, so retries of many
        requests spread out but still grow. A server's Retry-After is honoured up to the cap."""
        c = self.config
        step = min(c.backoff_max_s, c.backoff_s * 2 ** (failures - 1))
        delay = step / 2 + self._random.uniform(0, step / 2)
        if retry_after is not None:
            delay = max(delay, min(retry_after, c.backoff_max_s))
        return delay


class _Fatal(Exception):
    """A refusal that retrying cannot fix (400, 401, 404, ...)."""


def _error_message(payload: bytes, status: int) -> str:
    """The server's error message (vLLM: {"error": {"message": ...}}), capped."""
    try:
        data = json.loads(payload)
    except ValueError:
        return payload[:200].decode("utf-8", "replace") or f"status {status}"
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict):
        return str(error.get("message", ""))[:200]
    if isinstance(error, str):
        return error[:200]
    if isinstance(data, dict) and "message" in data:  # older vLLM: flat {"message": ..., "code": ..}
        return str(data["message"])[:200]
    return f"status {status}"


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:  # an HTTP date: fall back to our own back-off
        return None


@register_judge("vllm")
def make_vllm_judge(**options: Any) -> VllmJudge:
    """`make_judge("vllm", url=..., model=..., [max_in_flight, timeout_s, connect_timeout_s,
    max_retries, bad_answer_retries, backoff_s, backoff_max_s, max_side, image_format, seed,
    max_tokens, api_key_env])`. Cheap: nothing connects until the first `score_batch`."""
    return VllmJudge(VllmJudgeConfig.from_options(**options))
