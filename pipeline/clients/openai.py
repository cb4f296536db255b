"""One OpenAI-compatible chat-completions client (vLLM's server) for every model-backed stage.

The judge, the MLLM grounder and the instruction rewriter each describe their calls as `Call`s
(a request body built lazily, a JSON schema, a parser) and hand a batch to `OpenAIClient.run`,
which returns one result or one `CallFailed` per call, in order. The client owns what they share:

- one event-loop thread and one `aiohttp.ClientSession` (one keep-alive connection pool) for the
  client's life; at most `max_in_flight` calls open at once, and a call's body (the images) is
  built only once its slot is free, so memory follows the window, not the batch;
- structured outputs: `response_format` json_schema on the request, and the answer validated
  against the same schema on arrival (an answer is data from outside, never trusted), then by the
  caller's own `parse` (which may raise `BadAnswer` for what a schema cannot say);
- retries: timeouts, connection errors, 429 and 5xx with jittered exponential back-off (a
  server's Retry-After honoured up to the cap) up to `max_retries`; a bad answer gets
  `bad_answer_retries` more tries, sampled at `retry_temperature` with seed + try (greedy would
  repeat it), a truncated one twice the tokens; other 4xx are not retried;
- an answer-size cap: a body larger than `max_answer_bytes` is not read past the cap and fails
  that call with a reason (a misbehaving server cannot exhaust memory, 256 calls in flight or not);
- a circuit breaker: after `breaker_failures` consecutive failed attempts (transport errors,
  timeouts, 5xx; a 429 is a live server pushing back and does not count) the rest of the batch
  fails at once with one reason, logged once, instead of each call waiting out its own timeouts
  and retries. Each `run` (one work unit) starts with the breaker closed: the next unit probes
  the server again.

The API key comes from the environment variable named by `api_key_env`: never logged, never
pickled (only the config travels; the loop and pool are rebuilt on first use after unpickling).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import random
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

DEFAULT_API_KEY_ENV = "MCIE_JUDGE_API_KEY"
MAX_ANSWER_BYTES = 8 * 2**20  # a judgement is a few KB; 8 MiB x 256 in flight stays bounded


# ---- options --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ClientConfig:
    """Connection options shared by every stage that talks to the server; validated at
    construction. Subclasses add their own options and set `WHAT` (the prefix of their errors)."""

    WHAT = "openai client"

    url: str
    model: str
    max_in_flight: int = 256  # vLLM batches what is in flight: sum over workers ~ --max-num-seqs
    timeout_s: float = 120.0  # per request, including time queued in vLLM
    connect_timeout_s: float = 10.0
    max_retries: int = 5  # transport errors, 429 and 5xx
    bad_answer_retries: int = 1  # answers that fail the schema
    retry_temperature: float = 0.4  # a bad answer's retry samples (seed + try)
    backoff_s: float = 0.5  # first back-off; doubles per retry, jittered
    backoff_max_s: float = 30.0
    seed: int = 0
    api_key_env: str = DEFAULT_API_KEY_ENV  # the NAME of the variable holding the key, never the key
    max_answer_bytes: int = MAX_ANSWER_BYTES
    breaker_failures: int = 0  # consecutive failed attempts that open the breaker; 0 = never

    def __post_init__(self) -> None:
        require = self._require
        require(isinstance(self.url, str) and bool(self.url),
                "url is required, e.g. http://HOST:8000/v1")
        parts = urlsplit(self.url)
        require(parts.scheme in ("http", "https") and bool(parts.hostname),
                f"url must be http(s)://HOST[:PORT]/v1, got {self.url!r}")
        require(parts.username is None and parts.password is None,
                f"url must not carry credentials; put the key in ${self.api_key_env}")
        require(not parts.query and not parts.fragment, "url must not have a query or fragment")
        require(isinstance(self.model, str) and bool(self.model.strip()), "model is required")
        self._int_in("max_in_flight", 1, 4096)
        self._int_in("max_retries", 0, 50)
        self._int_in("bad_answer_retries", 0, 5)
        self._int_in("seed", 0, 2**63 - 1)
        self._int_in("max_answer_bytes", 1024, 2**31)
        self._int_in("breaker_failures", 0, 100_000)
        for name in ("timeout_s", "connect_timeout_s", "backoff_s", "backoff_max_s"):
            value = getattr(self, name)
            require(isinstance(value, (int, float)) and not isinstance(value, bool)
                    and math.isfinite(value) and value > 0,
                    f"{name} must be a positive number of seconds, got {value!r}")
        require(self.backoff_max_s >= self.backoff_s, "backoff_max_s must be >= backoff_s")
        temperature = self.retry_temperature
        require(isinstance(temperature, (int, float)) and not isinstance(temperature, bool)
                and 0 <= temperature <= 2,
                f"retry_temperature must be within 0..2, got {self.retry_temperature!r}")
        require(isinstance(self.api_key_env, str) and self.api_key_env.isidentifier(),
                f"api_key_env must be an environment variable name, got {self.api_key_env!r}")

    def _require(self, ok: bool, message: str) -> None:
        if not ok:
            raise ValueError(f"{self.WHAT}: {message}")

    def _int_in(self, name: str, low: int, high: int) -> None:
        value = getattr(self, name)
        self._require(isinstance(value, int) and not isinstance(value, bool) and low <= value <= high,
                      f"{name} must be an integer within {low}..{high}, got {value!r}")

    @classmethod
    def from_options(cls, **options: Any):
        """Build from loose options (CLI / flow parameters): numbers may come as strings."""
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ValueError(f"unknown {cls.WHAT} options {unknown}; known: {sorted(known)}")
        for required in ("url", "model"):
            if options.get(required) in (None, ""):
                raise ValueError(f"{cls.WHAT}: {required} is required")
        coerced = {}
        for name, value in options.items():
            kind = known[name].type
            if isinstance(value, str) and kind in ("int", "float"):
                try:
                    value = int(value) if kind == "int" else float(value)
                except ValueError:
                    raise ValueError(f"{cls.WHAT}: {name} must be a number, got {value!r}") from None
            coerced[name] = value
        return cls(**coerced)

    @property
    def endpoint(self) -> str:
        return self.url.rstrip("/") + "/chat/completions"

    def client_config(self) -> "ClientConfig":
        """The connection part alone (what `OpenAIClient` needs)."""
        names = {f.name for f in fields(ClientConfig)}
        return ClientConfig(**{k: v for k, v in asdict(self).items() if k in names})


# ---- calls and their failures ---------------------------------------------------------------------

class BadAnswer(ValueError):
    """The server answered 200 but the answer is not valid (retried `bad_answer_retries` times)."""


class TruncatedAnswer(BadAnswer):
    """The answer hit max_tokens (finish_reason "length"): the retry gets twice the room."""


class CallFailed(RuntimeError):
    """A call that did not produce a result; its message is the reason (stored with the sample)."""


@dataclass
class Call:
    """One chat completion. `build()` returns the body without `response_format` and sampling
    (run in a worker thread once a slot is free, once per call: retries reuse it); `parse` turns
    the schema-valid answer into the caller's result and may raise BadAnswer."""

    key: str  # for logs (a sample id)
    build: Callable[[], dict[str, Any]]
    schema: dict[str, Any]
    schema_name: str
    max_tokens: int
    parse: Callable[[Any], Any] = lambda answer: answer
    first_sampling: dict[str, Any] = field(default_factory=dict)  # e.g. a sampled first try


@dataclass
class ClientStats:
    """Cumulative counters of one client (mergeable with +)."""

    requests: int = 0  # HTTP attempts sent
    scored: int = 0  # calls that produced a result
    judge_errors: int = 0  # calls that failed (the name the judge's stats always had)
    retries: int = 0  # transport / 429 / 5xx retries
    bad_answers: int = 0
    encode_cpu_s: float = 0.0  # CPU time spent building bodies (images, JSON)
    client_cpu_s: float = 0.0  # CPU time of the event loop thread: HTTP, parsing, validation
    peak_in_flight: int = 0  # most calls in progress at once (never above max_in_flight)
    breaker_trips: int = 0
    by_status: dict[str, int] = field(default_factory=dict)

    def __add__(self, other: "ClientStats") -> "ClientStats":
        data = {}
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if f.name == "by_status":
                data[f.name] = {k: a.get(k, 0) + b.get(k, 0) for k in set(a) | set(b)}
            elif f.name == "peak_in_flight":
                data[f.name] = max(a, b)
            else:
                data[f.name] = a + b
        return ClientStats(**data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Retryable(Exception):
    def __init__(self, reason: str, retry_after: float | None = None, counts: bool = True):
        super().__init__(reason)
        self.retry_after = retry_after
        self.counts = counts  # towards the circuit breaker


class _Fatal(Exception):
    """A refusal retrying cannot fix (400, 401, 404, an answer over the cap, ...)."""


class _Open(Exception):
    """The circuit breaker is open."""


# ---- validation -----------------------------------------------------------------------------------

_VALIDATORS: dict[str, Any] = {}


def validate(answer: Any, schema: dict[str, Any]) -> None:
    """BadAnswer naming where `answer` breaks `schema` (validators cached per schema)."""
    key = json.dumps(schema, sort_keys=True)
    validator = _VALIDATORS.get(key)
    if validator is None:
        from jsonschema import Draft202012Validator

        validator = _VALIDATORS[key] = Draft202012Validator(schema)
    error = next(iter(validator.iter_errors(answer)), None)
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "answer"
        raise BadAnswer(f"answer fails the schema at {where}: {error.message[:160]}")


def answer_json(body: Any) -> Any:
    """The JSON value of a chat.completion body's first message, or BadAnswer."""
    try:
        choice = body["choices"][0]
        content = choice["message"]["content"]
        finish = choice.get("finish_reason")
    except (KeyError, IndexError, TypeError, AttributeError):
        raise BadAnswer("response is not a chat.completion with a message") from None
    if finish == "length":
        raise TruncatedAnswer("answer truncated (finish_reason=length)")
    if not isinstance(content, str) or not content.strip():
        raise BadAnswer("empty answer")
    try:
        return json.loads(strip_fence(content))
    except json.JSONDecodeError as exc:
        raise BadAnswer(f"answer is not JSON ({exc.msg}): {content[:80]!r}") from None


def strip_fence(content: str) -> str:
    text = content.strip()
    if text.startswith("```"):
        text = text.split("\n", 1)[1] if "\n" in text else ""
        text = text.rsplit("```", 1)[0]
    return text


def data_url(image, max_side: int, image_format: str = "png") -> tuple[str, tuple[int, int]]:
    """A data URL of a uint8 HxWx3 image downscaled to fit `max_side` (aspect kept), and the
    (width, height) the model sees."""
    import base64
    import io

    import numpy as np
    from PIL import Image

    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 HxWx3 image, got {image.dtype} {image.shape}")
    pil = Image.fromarray(image, "RGB")
    height, width = image.shape[:2]
    if max(width, height) > max_side:
        scale = max_side / max(width, height)
        pil = pil.resize((max(1, round(width * scale)), max(1, round(height * scale))),
                         Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    if image_format == "png":
        pil.save(buffer, format="PNG", compress_level=1)  # lossless; level 1 is ~5x faster than 6
        mime = "image/png"
    else:
        pil.save(buffer, format="JPEG", quality=95)
        mime = "image/jpeg"
    return f"data:{mime};base64," + base64.b64encode(buffer.getvalue()).decode("ascii"), pil.size


# ---- the client -----------------------------------------------------------------------------------

class OpenAIClient:
    """Runs batches of `Call`s against one server. Thread-safe `run`; picklable."""

    def __init__(self, config: ClientConfig):
        self.config = config
        self.stats = ClientStats()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._session = None  # aiohttp.ClientSession, made on the loop thread at first use
        self._window: asyncio.Semaphore | None = None
        self._in_flight = 0
        self._random = random.Random()
        self._failures = 0  # consecutive failed attempts (the breaker's count)
        self._open: str | None = None  # why the breaker is open; None while closed
        self._tripped: asyncio.Event | None = None

    def __repr__(self) -> str:  # no key here: the config holds only the variable's name
        return f"OpenAIClient(url={self.config.url!r}, model={self.config.model!r})"

    def __reduce__(self):
        return (self.__class__, (self.config,))

    # -- public -------------------------------------------------------------------------------------

    def run(self, calls: list[Call]) -> list[Any]:
        """One result per call, in order: the `parse`d answer or a `CallFailed` with the reason."""
        if not calls:
            return []
        loop = self._ensure_loop()
        future = asyncio.run_coroutine_threadsafe(self._run_all(calls), loop)
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

    # -- plumbing -----------------------------------------------------------------------------------

    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=loop.run_forever, name="openai-client-loop",
                                          daemon=True)
                thread.start()
                self._loop, self._thread = loop, thread
            return self._loop

    def _client(self):
        """The one session (a keep-alive pool of at most max_in_flight connections) and the
        in-flight window, made on the loop thread the first time and kept for the client's life.
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
                trust_env=False,  # a proxy variable must not silently reroute model traffic
                raise_for_status=False,
            )
            self._window = asyncio.Semaphore(c.max_in_flight)
        return self._session, self._window

    async def _run_all(self, calls: list[Call]) -> list[Any]:
        started = time.thread_time()  # this loop thread runs nothing but the client's requests
        self._failures, self._open = 0, None  # a new unit probes the server again
        self._tripped = asyncio.Event()
        try:
            return await asyncio.gather(*(self._one(call) for call in calls))
        finally:
            self.stats.client_cpu_s += time.thread_time() - started

    async def _one(self, call: Call) -> Any:
        session, window = self._client()
        async with window:  # the in-flight bound: a call holds its place until done
            self._in_flight += 1
            self.stats.peak_in_flight = max(self.stats.peak_in_flight, self._in_flight)
            try:
                result = await self._call(call, session)
            except Exception as exc:  # one bad call must not cost the batch: it becomes its error
                log.warning("%s: %s failed: %s: %s", self.config.model, call.key,
                            type(exc).__name__, exc)
                result = CallFailed(f"{type(exc).__name__}: {exc}")
            finally:
                self._in_flight -= 1
        if isinstance(result, CallFailed):
            self.stats.judge_errors += 1
        else:
            self.stats.scored += 1
        return result

    async def _call(self, call: Call, session) -> Any:
        if self._open is not None:  # fail at once: do not even encode the images
            return CallFailed(self._open)
        request, body, encode_s = await asyncio.to_thread(self._encode, call)
        self.stats.encode_cpu_s += encode_s
        failures = bad = 0
        while True:
            try:
                if self._open is not None:
                    raise _Open(self._open)
                answer = await self._guarded(self._ask(session, body))
                validate(answer, call.schema)
                return call.parse(answer)
            except BadAnswer as exc:
                bad += 1
                self.stats.bad_answers += 1
                if bad > self.config.bad_answer_retries:
                    log.warning("%s: bad answer, giving up: %s", call.key, exc)
                    return CallFailed(f"bad answer after {bad} tries: {exc}")
                log.info("%s: bad answer, asking again: %s", call.key, exc)
                tokens = request["max_tokens"] * (2 if isinstance(exc, TruncatedAnswer) else 1)
                # only the sampling changes: the encoded images are reused, not encoded again
                request = {**request, **self.sampling(tokens, attempt=bad)}
                body = json.dumps(request).encode()
            except _Retryable as exc:
                failures += 1
                if exc.counts:
                    self._count_failure(str(exc))
                if failures > self.config.max_retries:
                    log.warning("%s: giving up after %d attempts: %s", call.key, failures, exc)
                    return CallFailed(f"server unreachable after {failures} attempts: {exc}")
                self.stats.retries += 1
                delay = self._backoff(failures, exc.retry_after)
                log.debug("%s: %s; retry %d in %.2fs", call.key, exc, failures, delay)
                try:
                    await self._guarded(asyncio.sleep(delay))
                except _Open as opened:
                    return CallFailed(str(opened))
            except _Open as exc:
                return CallFailed(str(exc))
            except _Fatal as exc:
                log.warning("%s: %s", call.key, exc)
                return CallFailed(str(exc))

    def sampling(self, max_tokens: int, attempt: int = 0) -> dict[str, Any]:
        """The request fields a retry changes. Attempt 0 is greedy; a retry after a bad answer
        samples at `retry_temperature` with seed + attempt (reproducible, yet it can differ)."""
        return {
            "temperature": 0.0 if attempt == 0 else self.config.retry_temperature,
            "seed": (self.config.seed + attempt) % 2**63,
            "max_tokens": max_tokens,
        }

    def request_of(self, call: Call) -> dict[str, Any]:
        """The whole chat-completions body of a call's first attempt."""
        return {
            "model": self.config.model,
            **call.build(),
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": call.schema_name, "schema": call.schema, "strict": True},
            },
            **self.sampling(call.max_tokens),
            **call.first_sampling,
        }

    def _encode(self, call: Call) -> tuple[dict, bytes, float]:
        started = time.thread_time()
        request = self.request_of(call)
        body = json.dumps(request).encode()
        return request, body, time.thread_time() - started

    async def _guarded(self, awaitable):
        """Await, but give up at once when the breaker opens meanwhile."""
        if not self.config.breaker_failures:
            return await awaitable
        task = asyncio.ensure_future(awaitable)
        tripped = asyncio.ensure_future(self._tripped.wait())
        try:
            await asyncio.wait({task, tripped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            tripped.cancel()
        if task.done():
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        raise _Open(self._open or "circuit breaker open")

    def _count_failure(self, reason: str) -> None:
        limit = self.config.breaker_failures
        self._failures += 1
        if limit and self._failures >= limit and self._open is None:
            self._open = (f"circuit breaker open after {self._failures} consecutive failed "
                          f"requests to {self.config.url} (last: {reason[:160]}); not asked, "
                          "left for a later retry")
            self.stats.breaker_trips += 1
            log.warning("%s", self._open)  # the one line saying why the rest fail at once
            self._tripped.set()

    async def _ask(self, session, body: bytes) -> Any:
        """The parsed JSON answer of one attempt (schema not yet checked)."""
        import aiohttp

        self.stats.requests += 1
        cap = self.config.max_answer_bytes
        try:
            async with session.post(self.config.endpoint, data=body) as response:
                status = response.status
                retry_after = _retry_after(response.headers.get("retry-after"))
                payload = await _read_capped(response, cap)
        except asyncio.TimeoutError:
            self._count("timeout")
            raise _Retryable(f"timeout after {self.config.timeout_s:g}s") from None
        except aiohttp.ClientError as exc:  # refused/reset connections, server gone mid-answer
            self._count("transport")
            raise _Retryable(f"{type(exc).__name__}: {str(exc)[:160]}") from None
        self._count(str(status))
        if payload is None:
            raise _Fatal(f"HTTP {status}: answer larger than the {cap}-byte cap, not read")
        if status < 500 and status != 429:
            self._failures = 0  # the server answered: the breaker's count starts again
        if status == 200:
            try:
                answer = json.loads(payload)
            except ValueError:
                raise BadAnswer("response body is not JSON") from None
            return answer_json(answer)
        message = _error_message(payload, status)
        if status == 429 or status >= 500:
            raise _Retryable(f"HTTP {status}: {message}", retry_after, counts=status != 429)
        hint = f" (is ${self.config.api_key_env} set?)" if status in (401, 403) else ""
        raise _Fatal(f"HTTP {status} from the model server: {message}{hint}")

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


async def _read_capped(response, cap: int) -> bytes | None:
    """The body, or None when it is (or declares itself) larger than `cap` bytes: reading stops
    at the cap, so a huge answer costs at most `cap` bytes of memory."""
    declared = response.content_length
    if declared is not None and declared > cap:
        return None
    chunks, size = [], 0
    async for chunk in response.content.iter_chunked(65536):
        size += len(chunk)
        if size > cap:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


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


def options_signature(config_cls: type[ClientConfig]):
    """The keyword signature of `config_cls`'s options, for a registry factory: the build checks
    option names against it before anything is built (url and model required)."""
    import inspect

    parameters = []
    for f in fields(config_cls):
        default = inspect.Parameter.empty if f.name in ("url", "model") else f.default
        parameters.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default))
    return inspect.Signature(parameters)
