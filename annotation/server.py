"""A local Label Studio server in its own venv (`.ls-venv/` at the repo root).

Label Studio 1.23.2 pins packages that clash with Prefect's stack (pytz<2023, redis<5.3,
pyarrow<25), so it cannot live in the project's venv: `ensure_ls_venv()` creates `.ls-venv` on
demand (`python -m venv .ls-venv && .ls-venv/bin/pip install label-studio==1.23.2`, ≈ 1 min).
The project itself only ever talks to a server through the SDK (`annotation.client`).

`LabelStudioServer` starts it bound to 127.0.0.1 with an admin user and a legacy API token from
the environment (see `server_env`), and waits for `/health`.

Safe defaults: its database (with the admin's token) and the folder it serves as local files live
outside the repository, under `$XDG_DATA_HOME/mcie/labelstudio/` (`data/`, and `files/`, a
dedicated document root: outputs built under it are served from disk); and the server gets only the
environment it needs (`SERVER_ENV_PASSTHROUGH`, its own settings), never the project's secrets
such as MCIE_JUDGE_API_KEY.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

log = logging.getLogger(__name__)

LABEL_STUDIO_VERSION = "1.23.2"
# What label-studio 1.23.2 leaves unpinned and later releases broke: sentry-sdk 3.0 (2026-12)
# refuses the `send_default_pii` option its settings pass, and the server exits at start.
SERVER_CONSTRAINTS = ("sentry-sdk<3",)
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_VENV = REPO_ROOT / ".ls-venv"

DEFAULT_HOME = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "mcie" / "labelstudio"
DEFAULT_DATA_DIR = DEFAULT_HOME / "data"
DEFAULT_DOCUMENT_ROOT = DEFAULT_HOME / "files"
# What the server process may see of our environment (plus its own LABEL_STUDIO_* settings and
# a Postgres it is pointed at): enough to run Python and reach TLS, nothing else.
SERVER_ENV_PASSTHROUGH = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "LC_CTYPE", "TZ",
                          "TMPDIR", "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE",
                          "DJANGO_DB")
SERVER_ENV_PREFIXES = ("LABEL_STUDIO_", "POSTGRE_")
CLIENT_ONLY_ENV = ("LABEL_STUDIO_API_KEY", "LABEL_STUDIO_URL")

# The environment `mcie labelstudio serve` reads (documented in the README's "Human review").
ADMIN_USER_ENV = "LABEL_STUDIO_USERNAME"
ADMIN_PASSWORD_ENV = "LABEL_STUDIO_PASSWORD"
TOKEN_ENV = "LABEL_STUDIO_USER_TOKEN"


class ServerError(RuntimeError):
    """The server could not be installed or started (one-line message)."""


def ls_executable(venv: Path = DEFAULT_VENV) -> Path:
    return Path(venv) / "bin" / "label-studio"


def ensure_ls_venv(venv: Path = DEFAULT_VENV, python: str | None = None) -> Path:
    """Create the server's venv if it lacks a working `label-studio`; return the executable."""
    venv = Path(venv)
    exe = ls_executable(venv)
    if exe.exists() and _installed_version(venv) == LABEL_STUDIO_VERSION and _constraints_hold(venv):
        return exe
    started = time.perf_counter()
    log.info("installing label-studio %s into %s (about a minute)", LABEL_STUDIO_VERSION, venv)
    base = python or getattr(sys, "_base_executable", None) or sys.executable
    steps = [
        [base, "-m", "venv", str(venv)],
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", f"label-studio=={LABEL_STUDIO_VERSION}",
         *SERVER_CONSTRAINTS],
    ]
    for cmd in steps:
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            tail = "\n".join(
                line for line in (done.stderr or done.stdout).splitlines() if "is ignored" not in line
            )[-800:]
            raise ServerError(f"`{' '.join(cmd)}` failed ({done.returncode}): {tail}")
    if not exe.exists():
        raise ServerError(f"label-studio installed but {exe} is missing")
    log.info("label-studio venv ready in %.0fs", time.perf_counter() - started)
    return exe


def _installed_version(venv: Path) -> str | None:
    done = subprocess.run(
        [str(venv / "bin" / "python"), "-c",
         "import importlib.metadata as m; print(m.version('label-studio'))"],
        capture_output=True, text=True,
    )
    return done.stdout.strip() if done.returncode == 0 else None


def _constraints_hold(venv: Path) -> bool:
    """Whether the venv's packages meet SERVER_CONSTRAINTS (a venv made before a pin is redone)."""
    done = subprocess.run(
        [str(venv / "bin" / "python"), "-c",
         "import sys; from importlib.metadata import version; from packaging.requirements import Requirement; "
         "sys.exit(any(not Requirement(r).specifier.contains(version(Requirement(r).name)) for r in sys.argv[1:]))",
         *SERVER_CONSTRAINTS],
        capture_output=True, text=True,
    )
    return done.returncode == 0


@dataclass(frozen=True)
class ServerConfig:
    port: int = 8080
    data_dir: Path = DEFAULT_DATA_DIR
    username: str = "admin@localhost"
    password: str = ""
    token: str = ""
    document_root: Path | None = None  # local-files serving root (a folder above build outputs)

    def __post_init__(self) -> None:
        if not 1 <= self.port <= 65535:
            raise ValueError(f"port must be within 1..65535, got {self.port}")
        if "@" not in self.username:
            raise ValueError(f"{ADMIN_USER_ENV} must be an e-mail address, got {self.username!r}")
        if len(self.password) < 8:
            raise ValueError(f"{ADMIN_PASSWORD_ENV} must be set, at least 8 characters")
        if len(self.token) < 16:
            raise ValueError(f"{TOKEN_ENV} must be set (the admin's legacy API token, 16+ characters)")

    @classmethod
    def from_env(cls, port: int = 8080, data_dir: Path | None = None,
                 document_root: Path | None = None) -> "ServerConfig":
        return cls(
            port=port,
            data_dir=Path(data_dir) if data_dir else DEFAULT_DATA_DIR,
            username=os.environ.get(ADMIN_USER_ENV, "admin@localhost"),
            password=os.environ.get(ADMIN_PASSWORD_ENV, ""),
            token=os.environ.get(TOKEN_ENV, ""),
            document_root=Path(document_root) if document_root else None,
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def server_env(config: ServerConfig, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a non-interactive start: only what `SERVER_ENV_PASSTHROUGH` and
    `SERVER_ENV_PREFIXES` let through of `base` (default os.environ), then the server's settings.
    Label Studio also reads the unprefixed USERNAME/PASSWORD, so those are set explicitly too."""
    source = os.environ if base is None else base
    env = {k: v for k, v in source.items()
           if (k in SERVER_ENV_PASSTHROUGH or k.startswith(SERVER_ENV_PREFIXES))
           and k not in CLIENT_ONLY_ENV}
    env.update({
        "LABEL_STUDIO_BASE_DATA_DIR": str(Path(config.data_dir).resolve()),
        ADMIN_USER_ENV: config.username, "USERNAME": config.username,
        ADMIN_PASSWORD_ENV: config.password, "PASSWORD": config.password,
        TOKEN_ENV: config.token,
        "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
        "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true",
        "LABEL_STUDIO_HOST": config.url,
    })
    if config.document_root is not None:
        env["LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED"] = "true"
        env["LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT"] = str(Path(config.document_root).resolve())
    return env


class LabelStudioServer:
    """A Label Studio process on 127.0.0.1 that this object started (and alone stops)."""

    def __init__(self, config: ServerConfig, venv: Path = DEFAULT_VENV, log_path: Path | None = None):
        self.config = config
        self.venv = Path(venv)
        self.log_path = Path(log_path) if log_path else Path(config.data_dir) / "server.log"
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return self.config.url

    def start(self, timeout_s: float = 180.0) -> None:
        exe = ls_executable(self.venv)
        if not exe.exists():
            raise ServerError(f"{exe} not found: run ensure_ls_venv() first")
        Path(self.config.data_dir).mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        cmd = [str(exe), "start", "--no-browser", "--port", str(self.config.port),
               "--internal-host", "127.0.0.1"]
        with open(self.log_path, "ab") as log_file:
            self.process = subprocess.Popen(
                cmd, env=server_env(self.config), stdout=log_file, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )
        self.wait_healthy(timeout_s)

    def wait_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise ServerError(
                    f"label-studio exited with {self.process.returncode} during start; see {self.log_path}"
                )
            try:
                if httpx.get(f"{self.url}/health", timeout=2.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        self.stop()
        raise ServerError(f"label-studio not healthy after {timeout_s:.0f}s; see {self.log_path}")

    def kill(self) -> None:
        """SIGKILL the server's process group (a crash, as tests need it)."""
        self._signal(signal.SIGKILL)

    def stop(self, timeout_s: float = 20.0) -> None:
        if self.process is None:
            return
        self._signal(signal.SIGTERM)
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGKILL)
            self.process.wait(10)
        self.process = None

    def _signal(self, sig: int) -> None:
        if self.process is None or self.process.poll() is not None:
            if self.process is not None and sig == signal.SIGKILL:
                self.process = None
            return
        try:
            os.killpg(self.process.pid, sig)  # the group this object started (start_new_session)
        except ProcessLookupError:
            pass
        if sig == signal.SIGKILL:
            self.process.wait(10)
            self.process = None
