"""The one door to a Label Studio server: `label-studio-sdk`, configured from the environment.

`LABEL_STUDIO_URL` and `LABEL_STUDIO_API_KEY` (a legacy token, or a personal access token, which
the SDK exchanges for a short-lived access token) are all the project needs to talk to a local or
remote server. Failures become `LabelStudioError`s whose message says what to do.

A server is not trusted to behave: every answer is read up to `max_answer_bytes` (declared or
streamed), and every request of one command shares one deadline (`deadline_s`, from `connect`),
so a misbehaving server costs a bounded amount of memory and time (`list_pages` bounds paging).
"""

from __future__ import annotations

import logging
import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator
from urllib.parse import urlsplit, urlunsplit

import httpx

log = logging.getLogger(__name__)

URL_ENV = "LABEL_STUDIO_URL"
KEY_ENV = "LABEL_STUDIO_API_KEY"
DEFAULT_URL = "http://127.0.0.1:8080"


class LabelStudioError(RuntimeError):
    """A Label Studio problem with a one-line, actionable message (the CLI prints it, exit 1)."""


class LabelStudioAuthError(LabelStudioError):
    pass


class LabelStudioUnavailable(LabelStudioError):
    pass


class LabelStudioMisbehaving(LabelStudioError):
    """An answer over the size cap, paging past the reported total, the deadline passed."""


def strip_credentials(url: str) -> str:
    """`url` without the `user:password@` of its authority (what may be stored or printed)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


MAX_ANSWER_BYTES = 64 * 1024 * 1024  # a page of 100 tasks with inline images is a few MB
DEADLINE_S = 900.0  # one review command, all its requests together
MAX_PAGES_UNKNOWN_TOTAL = 1000


@dataclass(frozen=True)
class Connection:
    url: str
    api_key: str = ""
    timeout_s: float = 60.0  # one request
    deadline_s: float = DEADLINE_S  # every request of one command (one `connect`)
    max_answer_bytes: int = MAX_ANSWER_BYTES

    def __post_init__(self) -> None:
        stripped = strip_credentials(self.url)
        if stripped != self.url:
            # Label Studio authenticates with the API key: a user:password in the URL would turn
            # into a basic-auth header replacing it, and must never reach a shard or a message.
            log.warning("the Label Studio URL carries credentials: they are ignored (the API key "
                        "in $%s authenticates)", KEY_ENV)
            object.__setattr__(self, "url", stripped)
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"Label Studio URL must start with http:// or https://, got {self.url!r}")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout must be positive, got {self.timeout_s}")
        if not self.deadline_s > 0:
            raise ValueError(f"deadline must be positive, got {self.deadline_s}")
        if self.max_answer_bytes < 1024:
            raise ValueError(f"answer cap must be at least 1024 bytes, got {self.max_answer_bytes}")

    @classmethod
    def from_env(cls, url: str | None = None, api_key: str | None = None,
                 deadline_s: float | None = None) -> "Connection":
        return cls(
            url=(url or os.environ.get(URL_ENV) or DEFAULT_URL).rstrip("/"),
            api_key=api_key if api_key is not None else os.environ.get(KEY_ENV, ""),
            deadline_s=DEADLINE_S if deadline_s is None else deadline_s,
        )


class _CappedStream(httpx.SyncByteStream):
    def __init__(self, inner: httpx.SyncByteStream, cap: int, url: str, guard: "GuardedTransport"):
        self.inner, self.cap, self.url, self.guard = inner, cap, url, guard

    def __iter__(self):
        seen = 0
        with self.guard.deadline_errors():
            yield from self._capped(seen)

    def _capped(self, seen: int):
        for chunk in self.inner:
            seen += len(chunk)
            if seen > self.cap:
                raise LabelStudioMisbehaving(
                    f"Label Studio's answer to {self.url} is over {self.cap:,} bytes: refused")
            yield chunk

    def close(self) -> None:
        self.inner.close()


class GuardedTransport(httpx.BaseTransport):
    """Every answer read up to `cap` bytes; no request starts, or waits, past the deadline."""

    def __init__(self, conn: Connection, inner: httpx.BaseTransport | None = None):
        self.inner = inner or httpx.HTTPTransport()
        self.cap = conn.max_answer_bytes
        self.deadline_s = conn.deadline_s
        self.deadline = time.monotonic() + conn.deadline_s
        self.base = conn.url

    def deadline_error(self) -> LabelStudioMisbehaving:
        return LabelStudioMisbehaving(
            f"Label Studio at {self.base}: the command's deadline of {self.deadline_s:g} s passed")

    @contextmanager
    def deadline_errors(self) -> Iterator[None]:
        """A timeout cut short by the deadline is the deadline's error."""
        try:
            yield
        except httpx.TimeoutException:
            if time.monotonic() >= self.deadline - 0.05:
                raise self.deadline_error() from None
            raise

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise self.deadline_error()
        timeout = dict(request.extensions.get("timeout") or {})
        request.extensions["timeout"] = {
            k: min(remaining, v if v is not None else math.inf) for k, v in
            {key: timeout.get(key) for key in ("connect", "read", "write", "pool")}.items()}
        with self.deadline_errors():
            response = self.inner.handle_request(request)
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.cap:
            response.close()
            raise LabelStudioMisbehaving(
                f"Label Studio's answer to {request.url.path} declares {int(declared):,} bytes, "
                f"over the cap of {self.cap:,}: refused")
        response.stream = _CappedStream(response.stream, self.cap, request.url.path, self)
        return response

    def close(self) -> None:
        self.inner.close()


def list_pages(first, what: str, page_size: int, server: str = "Label Studio") -> list:
    """Every item of an SDK pager, trusting the server's reported total over its pages: at most
    ceil(total / page_size) + 1 pages, items deduplicated by id, and an error (not a silently
    short list) when the pages do not add up to the total (a server that ignores ?page=)."""
    total = getattr(first.response, "total", None)
    if total is None:
        total = getattr(first.response, "count", None)
    max_pages = math.ceil(total / page_size) + 1 if isinstance(total, int) else MAX_PAGES_UNKNOWN_TOTAL
    items, seen, page, pages = [], set(), first, 0
    while page is not None:
        pages += 1
        for item in page.items or []:
            key = getattr(item, "id", None)
            if key is None or key not in seen:
                seen.add(key)
                items.append(item)
        if isinstance(total, int) and len(items) >= total:
            break
        if not page.items or not page.has_next or page.get_next is None:
            break
        if pages >= max_pages:
            raise LabelStudioMisbehaving(
                f"{server} reports {total} {what} but {pages} pages of "
                f"{page_size} held {len(items)} distinct ones: it does not page (?page= ignored?)")
        page = page.get_next()
    if isinstance(total, int) and len(items) < total:
        raise LabelStudioMisbehaving(
            f"{server} reports {total} {what} but listed {len(items)}")
    return items


def _auth_hint(conn: Connection) -> str:
    return (
        f"Label Studio at {conn.url} rejected the API key: set {KEY_ENV} to a valid legacy token "
        "or personal access token (Label Studio → Account & Settings; for `mcie labelstudio serve` "
        "it is the LABEL_STUDIO_USER_TOKEN it was started with)"
    )


@contextmanager
def translated_errors(conn: Connection) -> Iterator[None]:
    """Turn SDK/transport exceptions into LabelStudioErrors naming the fix."""
    from label_studio_sdk.core.api_error import ApiError

    try:
        yield
    except ApiError as exc:
        if exc.status_code in (401, 403):
            raise LabelStudioAuthError(_auth_hint(conn)) from None
        body = " ".join(str(exc.body).split())[:300]  # one line, whatever the server sent
        raise LabelStudioError(f"Label Studio at {conn.url} answered {exc.status_code}: {body}") from exc
    except httpx.TransportError as exc:
        raise LabelStudioUnavailable(
            f"cannot reach Label Studio at {conn.url} ({type(exc).__name__}: "
            f"{exc}); start it "
            f"with `mcie labelstudio serve` or set {URL_ENV} to a running server"
        ) from None


def connect(conn: Connection):
    """An SDK client, checked with one authenticated call so a bad key fails here, clearly."""
    from label_studio_sdk import LabelStudio

    if not conn.api_key:
        raise LabelStudioAuthError(
            f"no API key: set {KEY_ENV} (a legacy token or personal access token of {conn.url})"
        )
    with translated_errors(conn):
        try:
            http = httpx.Client(transport=GuardedTransport(conn), timeout=conn.timeout_s,
                                follow_redirects=True)
            client = LabelStudio(base_url=conn.url, api_key=conn.api_key, timeout=conn.timeout_s,
                                 httpx_client=http)
            user = client.users.whoami()
        except ValueError as exc:  # a malformed personal access token fails inside the SDK
            raise LabelStudioAuthError(f"{_auth_hint(conn)} ({exc})") from None
    log.debug("connected to %s as %s", conn.url, user.email)
    return client
