"""The one door to a Label Studio server: `label-studio-sdk`, configured from the environment.

`LABEL_STUDIO_URL` and `LABEL_STUDIO_API_KEY` (a legacy token, or a personal access token, which
the SDK exchanges for a short-lived access token) are all the project needs to talk to a local or
remote server. Failures become `LabelStudioError`s whose message says what to do.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

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


@dataclass(frozen=True)
class Connection:
    url: str
    api_key: str = ""
    timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"Label Studio URL must start with http:// or https://, got {self.url!r}")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout must be positive, got {self.timeout_s}")

    @classmethod
    def from_env(cls, url: str | None = None, api_key: str | None = None) -> "Connection":
        return cls(
            url=(url or os.environ.get(URL_ENV) or DEFAULT_URL).rstrip("/"),
            api_key=api_key if api_key is not None else os.environ.get(KEY_ENV, ""),
        )


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
        body = str(exc.body)[:300]
        raise LabelStudioError(f"Label Studio at {conn.url} answered {exc.status_code}: {body}") from exc
    except httpx.TransportError as exc:
        raise LabelStudioUnavailable(
            f"cannot reach Label Studio at {conn.url} ({type(exc).__name__}: {exc}); start it "
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
            client = LabelStudio(base_url=conn.url, api_key=conn.api_key, timeout=conn.timeout_s)
            user = client.users.whoami()
        except ValueError as exc:  # a malformed personal access token fails inside the SDK
            raise LabelStudioAuthError(f"{_auth_hint(conn)} ({exc})") from None
    log.debug("connected to %s as %s", conn.url, user.email)
    return client
