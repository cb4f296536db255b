"""A local OpenAI-compatible chat-completions server that behaves like vLLM's, for tests and bench.

It speaks the protocol faithfully: it checks the request the way vLLM does (model served, messages
with text and image_url parts, images as decodable data URLs, `response_format` json_schema with a
valid schema, sampling parameters) and answers 400 `{"error": {...}}` on a malformed request, 404 on
an unknown model, 401 `{"error": "Unauthorized"}` without the right Bearer key, and otherwise a
`chat.completion` body shaped like vLLM's. A well-behaved answer is generated from the request's
own JSON schema, the way a structured-outputs engine would.

What it answers is scripted (POST /_test/script): per request the first rule whose `match` string
occurs in the user text picks the behaviour, the k-th matching request taking the k-th entry of
`then` (the last one repeats). Behaviours:
    "good" | {"kind": "good", "score": 7}      schema-conformant answer, every integer = score
    {"kind": "content", "content": X}           X verbatim (an object is sent as JSON text)
    "garbage"                                   prose, not JSON
    "violate"                                   JSON that breaks the schema (scores out of range)
    "truncated"                                 half an answer, finish_reason "length"
    {"kind": "status", "status": 429|500|503, "retry_after": s}   a vLLM-shaped error
    "hang"                                      never answers (until the client goes away)
and any behaviour may carry "delay_s" on top of the script's "service_time_s".
GET /_test/stats reports requests, statuses, current and maximum concurrency, image sizes and the
last request's parameters; POST /_test/reset clears counters and script.

Run: `python tests/openai_server.py --model NAME [--port 0] [--api-key-env VAR] [--reuse-port]`;
it prints `LISTENING <port> <admin port>` once bound to 127.0.0.1. `OpenAIServer` below starts and
drives it; several processes may share one port (--reuse-port) to serve faster than one can.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

DATA_URL = re.compile(r"^data:(image/(?:png|jpeg|jpg|webp|gif));base64,(.*)$", re.S)
ROLES = {"system", "user", "assistant", "tool", "developer"}


class BadRequest(Exception):
    pass


# ---- the server -----------------------------------------------------------------------------------

class State:
    def __init__(self, model: str, api_key: str | None):
        self.model = model
        self.api_key = api_key
        self.reset()

    def reset(self) -> None:
        self.script: dict[str, Any] = {"default": "good", "rules": [], "service_time_s": 0.0}
        self.rule_hits: Counter = Counter()
        self.requests = 0
        self.in_flight = 0
        self.max_concurrency = 0
        self.statuses: Counter = Counter()
        self.behaviours: Counter = Counter()
        self.image_sizes: list[list[int]] = []
        self.authorization_seen: Counter = Counter()  # "bearer-ok" / "missing" / "wrong"
        self.last_request: dict[str, Any] | None = None
        self.peers: set[tuple[str, int]] = set()  # distinct client connections (host, port)
        self.schema_cache: dict[str, Any] = {}


def error_body(message: str, kind: str, status: int) -> dict:
    return {"error": {"message": message, "type": kind, "param": None, "code": status}}


def validate_request(body: Any, state: State) -> tuple[str, dict | None, int]:
    """vLLM-like checks. Returns (user text, json schema or None, number of images)."""
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    if not isinstance(body.get("model"), str):
        raise BadRequest("model: field required (string)")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages: a non-empty list is required")
    texts, images = [], 0
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise BadRequest(f"messages[{i}]: role must be one of {sorted(ROLES)}")
        content = message.get("content")
        if isinstance(content, str):
            if message["role"] == "user":
                texts.append(content)
            continue
        if not isinstance(content, list):
            raise BadRequest(f"messages[{i}].content must be a string or a list of parts")
        for j, part in enumerate(content):
            where = f"messages[{i}].content[{j}]"
            if not isinstance(part, dict):
                raise BadRequest(f"{where}: a content part must be an object")
            if part.get("type") == "text":
                if not isinstance(part.get("text"), str):
                    raise BadRequest(f"{where}.text must be a string")
                if message["role"] == "user":
                    texts.append(part["text"])
            elif part.get("type") == "image_url":
                url = part.get("image_url", {}).get("url") if isinstance(part.get("image_url"), dict) else None
                if not isinstance(url, str):
                    raise BadRequest(f"{where}.image_url.url must be a string")
                state.image_sizes.append(list(decode_image(url, where)))
                images += 1
            else:
                raise BadRequest(f"{where}: unsupported content part type {part.get('type')!r}")
    for name, low, high in (("temperature", 0.0, 2.0), ("top_p", 0.0, 1.0)):
        value = body.get(name)
        if value is not None and (not isinstance(value, (int, float)) or not low <= value <= high):
            raise BadRequest(f"{name} must be a number within {low}..{high}, got {value!r}")
    for name in ("seed", "max_tokens", "max_completion_tokens"):
        value = body.get(name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            raise BadRequest(f"{name} must be an integer, got {value!r}")
    if isinstance(body.get("max_tokens"), int) and body["max_tokens"] < 1:
        raise BadRequest("max_tokens must be at least 1")
    schema = None
    fmt = body.get("response_format")
    if fmt is not None:
        if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
            raise BadRequest("response_format.type must be text, json_object or json_schema")
        if fmt["type"] == "json_schema":
            spec = fmt.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
                raise BadRequest("response_format.json_schema needs a name and a schema")
            schema = spec.get("schema")
            if not isinstance(schema, dict):
                raise BadRequest("response_format.json_schema.schema must be an object")
            check_schema(schema, state)
    return "\n".join(texts), schema, images


def decode_image(url: str, where: str) -> tuple[int, int]:
    from PIL import Image

    match = DATA_URL.match(url)
    if not match:
        raise BadRequest(f"{where}: expected a base64 image data URL (data:image/...;base64,...)")
    try:
        raw = base64.b64decode(match.group(2), validate=True)
        with Image.open(io.BytesIO(raw)) as image:  # reads the header only
            return image.size
    except (binascii.Error, ValueError, OSError) as exc:
        raise BadRequest(f"{where}: cannot load the image: {exc}") from None


def check_schema(schema: dict, state: State) -> None:
    key = json.dumps(schema, sort_keys=True)
    if key not in state.schema_cache:
        from jsonschema import Draft202012Validator
        from jsonschema.exceptions import SchemaError

        try:
            Draft202012Validator.check_schema(schema)
        except SchemaError as exc:
            raise BadRequest(f"invalid JSON schema: {exc.message}") from None
        state.schema_cache[key] = True


def instance(schema: dict, score: int, clamp: bool = True) -> Any:
    """A value of `schema` (the subset judges use), every integer set to `score`."""
    kind = schema.get("type")
    if "enum" in schema:
        return schema["enum"][0]
    if kind == "object":
        return {k: instance(v, score, clamp) for k, v in schema.get("properties", {}).items()}
    if kind == "array":
        return [instance(schema.get("items", {}), score, clamp)
                for _ in range(max(1, schema.get("minItems", 1)))]
    if kind in ("integer", "number"):
        if clamp:
            score = max(schema.get("minimum", score), min(schema.get("maximum", score), score))
        return score
    if kind == "boolean":
        return True
    return "looks as asked"


def pick_behaviour(state: State, text: str) -> dict[str, Any]:
    script = state.script
    chosen = script.get("default", "good")
    for index, rule in enumerate(script.get("rules", [])):
        if rule["match"] in text:
            steps = rule["then"]
            chosen = steps[min(state.rule_hits[index], len(steps) - 1)]
            state.rule_hits[index] += 1
            break
    return {"kind": chosen} if isinstance(chosen, str) else dict(chosen)


def completion(state: State, content: str, finish: str, prompt_tokens: int) -> dict:
    completion_tokens = max(1, len(content) // 4)
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": state.model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": content, "refusal": None,
                        "annotations": None, "audio": None, "function_call": None,
                        "tool_calls": [], "reasoning_content": None},
            "logprobs": None,
            "finish_reason": finish,
            "stop_reason": None,
        }],
        "service_tier": None,
        "system_fingerprint": None,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + completion_tokens,
                  "completion_tokens": completion_tokens, "prompt_tokens_details": None},
        "prompt_logprobs": None,
        "kv_transfer_params": None,
    }


def make_app(state: State):
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def chat_completions(request: Request):
        state.requests += 1
        state.in_flight += 1
        state.max_concurrency = max(state.max_concurrency, state.in_flight)
        if request.client is not None:
            state.peers.add((request.client.host, request.client.port))
        try:
            response = await answer(request)
        finally:
            state.in_flight -= 1
        state.statuses[str(response.status_code)] += 1
        return response

    async def answer(request: Request):
        auth = request.headers.get("authorization")
        if state.api_key is not None:
            if auth != f"Bearer {state.api_key}":
                state.authorization_seen["missing" if auth is None else "wrong"] += 1
                return JSONResponse({"error": "Unauthorized"}, status_code=401)
            state.authorization_seen["bearer-ok"] += 1
        raw = await request.body()
        try:
            body = json.loads(raw)
        except ValueError as exc:
            return JSONResponse(error_body(f"invalid JSON body: {exc}", "BadRequestError", 400), 400)
        try:
            text, schema, images = validate_request(body, state)
        except BadRequest as exc:
            return JSONResponse(error_body(str(exc), "BadRequestError", 400), 400)
        if body["model"] != state.model:
            return JSONResponse(error_body(f"The model `{body['model']}` does not exist.",
                                           "NotFoundError", 404), 404)
        state.last_request = {k: v for k, v in body.items() if k != "messages"}
        state.last_request["user_text"] = text
        state.last_request["images"] = images
        behaviour = pick_behaviour(state, text)
        kind = behaviour["kind"]
        state.behaviours[kind] += 1
        delay = float(state.script.get("service_time_s", 0.0)) + float(behaviour.get("delay_s", 0.0))
        if kind == "hang":
            await wait_or_disconnect(request, float(behaviour.get("hang_s", 600.0)))
            return JSONResponse(error_body("hung request ended", "InternalServerError", 500), 500)
        if delay > 0:
            await asyncio.sleep(delay)
        if kind == "status":
            status = int(behaviour["status"])
            headers = {}
            if behaviour.get("retry_after") is not None:
                headers["retry-after"] = str(behaviour["retry_after"])
            names = {429: "TooManyRequests", 500: "InternalServerError", 503: "ServiceUnavailable"}
            return JSONResponse(error_body(f"scripted {status}", names.get(status, "Error"), status),
                                status, headers=headers)
        prompt_tokens = len(text) // 4 + 300 * images
        target = schema or {"type": "object", "properties": {}}
        if kind == "good":
            content = json.dumps(instance(target, int(behaviour.get("score", 9))))
            return JSONResponse(completion(state, content, "stop", prompt_tokens))
        if kind == "content":
            value = behaviour["content"]
            content = value if isinstance(value, str) else json.dumps(value)
            return JSONResponse(completion(state, content, "stop", prompt_tokens))
        if kind == "garbage":
            return JSONResponse(completion(state, "The edit looks great to me!", "stop", prompt_tokens))
        if kind == "violate":
            content = json.dumps(instance(target, 42, clamp=False))
            return JSONResponse(completion(state, content, "stop", prompt_tokens))
        if kind == "truncated":
            full = json.dumps(instance(target, 9))
            return JSONResponse(completion(state, full[: len(full) // 2], "length", prompt_tokens))
        return JSONResponse(error_body(f"unknown scripted behaviour {kind!r}", "InternalServerError",
                                       500), 500)

    async def wait_or_disconnect(request: Request, seconds: float) -> None:
        # vLLM aborts a request whose client went away; so does this server
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if await request.is_disconnected():
                return
            await asyncio.sleep(0.02)

    async def models(request: Request):
        return JSONResponse({"object": "list", "data": [
            {"id": state.model, "object": "model", "created": int(time.time()), "owned_by": "vllm",
             "root": state.model, "parent": None, "max_model_len": 32768}]})

    async def health(request: Request):
        return JSONResponse({})

    async def set_script(request: Request):
        script = await request.json()
        state.script = {"default": "good", "rules": [], "service_time_s": 0.0, **script}
        state.rule_hits.clear()
        return JSONResponse({"ok": True})

    async def reset(request: Request):
        state.reset()
        return JSONResponse({"ok": True})

    async def stats(request: Request):
        return JSONResponse({
            "requests": state.requests, "in_flight": state.in_flight,
            "max_concurrency": state.max_concurrency, "statuses": dict(state.statuses),
            "behaviours": dict(state.behaviours), "image_sizes": state.image_sizes[-1000:],
            "authorization": dict(state.authorization_seen), "last_request": state.last_request,
            "connections": len(state.peers),
        })

    return Starlette(routes=[
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/_test/script", set_script, methods=["POST"]),
        Route("/_test/reset", reset, methods=["POST"]),
        Route("/_test/stats", stats, methods=["GET"]),
    ])


def listen(port: int, reuse_port: bool) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:  # several server processes share the port; the kernel spreads connections
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(2048)
    return sock


def serve(model: str, port: int, api_key: str | None, reuse_port: bool = False,
          service_time_s: float = 0.0) -> None:
    """Serve on `port` (0: any) and on a private port of this process for /_test admin calls
    (with several processes on one port, each is scripted and read through its own)."""
    import uvicorn

    public, private = listen(port, reuse_port), listen(0, False)
    state = State(model, api_key)
    state.script["service_time_s"] = service_time_s
    config = uvicorn.Config(make_app(state), log_level="warning", access_log=False,
                            backlog=2048, timeout_keep_alive=60, lifespan="off")
    server = uvicorn.Server(config)
    print(f"LISTENING {public.getsockname()[1]} {private.getsockname()[1]}", flush=True)
    server.run(sockets=[public, private])


# ---- the controller tests and benchmarks use ------------------------------------------------------

class OpenAIServer:
    """Starts the server above in its own process (so a test can kill it) and drives it."""

    def __init__(self, model: str = "test-vlm", api_key_env: str | None = None,
                 env: dict[str, str] | None = None, port: int = 0, reuse_port: bool = False,
                 service_time_s: float = 0.0):
        self.model = model
        command = [sys.executable, str(Path(__file__).resolve()), "--model", model, "--port", str(port),
                   "--service-time-s", str(service_time_s)]
        if api_key_env:
            command += ["--api-key-env", api_key_env]
        if reuse_port:
            command.append("--reuse-port")
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, env={**os.environ, **(env or {})},
                                        text=True)
        line = self.process.stdout.readline()
        if not line.startswith("LISTENING "):
            self.process.kill()
            raise RuntimeError(f"test server did not start: {line!r}")
        self.port, admin_port = (int(word) for word in line.split()[1:3])
        self.base = f"http://127.0.0.1:{admin_port}"  # this process's own port
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self._wait_ready()

    def _wait_ready(self, timeout: float = 20.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.base}/health", timeout=1.0).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.05)
        raise RuntimeError("test server never became healthy")

    def script(self, **script: Any) -> None:
        import httpx

        httpx.post(f"{self.base}/_test/reset", timeout=5).raise_for_status()
        httpx.post(f"{self.base}/_test/script", json=script, timeout=5).raise_for_status()

    def stats(self) -> dict[str, Any]:
        import httpx

        return httpx.get(f"{self.base}/_test/stats", timeout=5).json()

    def kill(self) -> None:
        """Dies at once, mid-request, like a crashed server (SIGKILL)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
        if self.process.stdout:
            self.process.stdout.close()

    def __enter__(self) -> "OpenAIServer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--api-key-env", help="require Bearer $VAR (like vllm serve --api-key)")
    parser.add_argument("--reuse-port", action="store_true", help="share --port with other processes")
    parser.add_argument("--service-time-s", type=float, default=0.0, help="initial service time")
    args = parser.parse_args()
    key = os.environ.get(args.api_key_env) if args.api_key_env else None
    if args.api_key_env and not key:
        parser.error(f"${args.api_key_env} is not set")
    serve(args.model, args.port, key, args.reuse_port, args.service_time_s)


if __name__ == "__main__":
    main()
