"""Starting Ray: a local single-node Ray on loopback by default, an existing cluster by address.

A cluster is named by `--ray-address` or `RAY_ADDRESS` (`HOST:PORT` of the head's GCS, as printed
by `ray start --head`, or `ray://HOST:10001` for Ray Client). The stage code travels with the job
(`runtime_env.py_modules`), so a cluster whose nodes have the dependencies but not this checkout can
run it. Without an address a fresh local Ray is started (`address="local"`): it never attaches to a
cluster that happens to be running on the machine.

The local Ray is private: every one of its servers (GCS, raylet, object manager, workers, the
runtime-env agent, the autoscaler's metrics) listens on 127.0.0.1 only, and it requires Ray's token
authentication with a fresh random token per run, kept in a 0600 file under the project-local temp dir
(`RAY_AUTH_TOKEN_PATH`; the token itself is never in the environment or a log) and removed when
Ray stops; a process without it is refused. A cluster of one's own is the user's to secure (see
the README's reliability section): this module never changes its authentication settings.

Ray binds its gRPC servers to all interfaces unless the node's address *is* 127.0.0.1, and it
replaces 127.0.0.1 by the machine's external address unless "clusters" are off
(`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`, the switch Ray uses on laptops): the local Ray turns them
off for itself and its child processes, and restores the setting when it stops. Worker log lines
re-printed by the driver carry no ANSI colour codes (`RAY_COLOR_PREFIX=0`, unless set), so logs
and captured output stay plain text.
"""

from __future__ import annotations

import logging
import os
import sys
import secrets
import shutil
import time
from pathlib import Path

log = logging.getLogger(__name__)

# Project-local, and short: Ray puts unix sockets under it (path length is limited).
DEFAULT_TEMP_DIR = Path(__file__).resolve().parents[1] / ".ray"
ADDRESS_ENV = "RAY_ADDRESS"
LOCAL_NODE_IP = "127.0.0.1"
LOOPBACK_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": Ray keeps 127.0.0.1 as the node's address
COLOR_ENV = "RAY_COLOR_PREFIX"


def cluster_address(address: str | None) -> str | None:
    """The cluster to use: the explicit address, else $RAY_ADDRESS, else None (local Ray)."""
    address = (address or os.environ.get(ADDRESS_ENV) or "").strip()
    return address or None


# What a worker needs to reach object storage the way the driver does: `--storage-option`s
# (MCIE_STORAGE_OPTIONS) and what fsspec and botocore read from the environment.
STORAGE_ENV_PREFIXES = ("AWS_", "FSSPEC_")


def storage_env() -> dict[str, str]:
    """The driver's storage variables, for a cluster's workers (a local Ray's inherit them).
    They may hold secrets: passed through `runtime_env`, never printed or logged."""
    from pipeline.storage import STORAGE_ENV

    return {name: value for name, value in os.environ.items()
            if name == STORAGE_ENV or name.startswith(STORAGE_ENV_PREFIXES)}


def code_runtime_env() -> dict:
    """Ship the stage code (the `pipeline` package) to the cluster's workers with the job, and the
    storage settings, so workers on nodes without a shared disk write OUT where the driver does."""
    import pipeline

    env: dict = {"py_modules": [str(Path(pipeline.__file__).parent)]}
    variables = storage_env()
    if variables:
        env["env_vars"] = variables
    return env


def ray_running() -> bool:
    """Whether this process has a Ray session (without importing Ray when nothing started it)."""
    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


def start_ray(address: str | None, workers: int) -> str:
    """Connect to `address` (or $RAY_ADDRESS), else start a local Ray with `workers` CPUs.
    Returns a short description of what it connected to."""
    import ray

    address = cluster_address(address)
    if ray.is_initialized():  # by the CLI, which starts it while Prefect's server starts
        return _started["target"] if _started else "ray (already initialised)"
    started = time.perf_counter()
    target = _start_ray(address, workers)
    _started.update(target=target, seconds=time.perf_counter() - started)
    return target


def ray_start_seconds() -> float:
    """How long `start_ray` took to start or join the running Ray (0 if it did not start it)."""
    return _started.get("seconds", 0.0)


_started: dict = {}  # target and seconds of the Ray start_ray started, until stop_ray


def _start_ray(address: str | None, workers: int) -> str:
    import ray

    if os.environ.get(COLOR_ENV) is None:
        _set_env(COLOR_ENV, "0")  # the driver prints "(UnitWorker pid=…) …" without colour codes
    if os.environ.get(COLOR_ENV) == "0":
        _plain_dedup_notes()
    if address:
        host = address.rsplit(":", 1)[0]
        # A cluster on this machine's loopback: the driver joins on the head's own address.
        node_ip = host if host.startswith("127.") else None  # (never for a ray:// client)
        ray.init(address=address, runtime_env=code_runtime_env(), log_to_driver=True,
                 logging_level=logging.WARNING, _node_ip_address=node_ip)
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        cpus = sum(n.get("Resources", {}).get("CPU", 0) for n in nodes)
        return f"ray cluster at {address} ({len(nodes)} nodes, {cpus:g} CPUs)"
    temp_dir = Path(os.environ.get("MCIE_RAY_TEMP_DIR", DEFAULT_TEMP_DIR))
    temp_dir.mkdir(parents=True, exist_ok=True)
    clean_old_sessions(temp_dir)
    _enable_token_auth(temp_dir)
    _loopback_only()
    ray.init(
        address="local",  # never attach to a cluster found in the temp dir
        num_cpus=workers,
        include_dashboard=False,
        _temp_dir=str(temp_dir),
        _node_ip_address=LOCAL_NODE_IP,  # with _loopback_only: every server binds 127.0.0.1
        logging_level=logging.WARNING,
    )
    return f"local ray ({workers} CPUs)"


def _loopback_only() -> None:
    """Keep 127.0.0.1 as the local node's address, in this process (Ray read the switch when it
    was imported) and in every process Ray starts (they read the environment)."""
    global _saved_constant
    from ray._private import ray_constants

    _set_env(LOOPBACK_ONLY_ENV, "0")
    if _saved_constant is None:
        _saved_constant = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False


def _plain_dedup_notes() -> None:
    """Ray colours its " [repeated 6x across cluster]" note green whatever RAY_COLOR_PREFIX says."""
    global _saved_color
    try:
        from ray._private import ray_logging
    except ImportError as exc:  # another Ray version
        log.debug("cannot reach Ray's log deduplicator: %s", exc)
        return
    if _saved_color is None and hasattr(ray_logging, "_color"):
        _saved_color = ray_logging._color
        ray_logging._color = lambda message: message


_saved_env: dict[str, str | None] = {}  # what start_ray changed, to restore in stop_ray
_saved_constant: bool | None = None
_saved_color = None


def _set_env(name: str, value: str) -> None:
    _saved_env.setdefault(name, os.environ.get(name))
    os.environ[name] = value


def _restore_env() -> None:
    global _saved_constant, _saved_color
    for name, value in _saved_env.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    _saved_env.clear()
    if _saved_constant is not None:
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = _saved_constant
        _saved_constant = None
    if _saved_color is not None:
        from ray._private import ray_logging

        ray_logging._color = _saved_color
        _saved_color = None


AUTH_ENV = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_TOKEN")
_saved_auth_env: dict[str, str | None] | None = None
_token_file: Path | None = None


def _enable_token_auth(temp_dir: Path) -> None:
    """A fresh token for this local Ray, read by the driver, the raylet and every worker (they
    inherit the environment, which names only the file)."""
    global _saved_auth_env, _token_file
    auth_dir = temp_dir / "auth"
    auth_dir.mkdir(mode=0o700, exist_ok=True)
    path = auth_dir / f"token-{os.getpid()}-{secrets.token_hex(4)}"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, secrets.token_hex(32).encode())
    finally:
        os.close(fd)
    if _saved_auth_env is None:
        _saved_auth_env = {name: os.environ.get(name) for name in AUTH_ENV}
    os.environ.pop("RAY_AUTH_TOKEN", None)  # it would win over the file
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(path)
    _token_file = path
    _refresh_ray_auth()


def _refresh_ray_auth() -> None:
    """Ray caches its auth mode and token per process; make it read them again."""
    try:
        from ray._private.authentication.authentication_token_setup import Config
        from ray._raylet import AuthenticationTokenLoader

        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()
    except (ImportError, AttributeError) as exc:  # another Ray version: a fresh process reads env
        log.debug("could not refresh Ray's auth settings in-process: %s", exc)


def _restore_auth_env() -> None:
    global _saved_auth_env, _token_file
    if _token_file is not None:
        _token_file.unlink(missing_ok=True)
        _token_file = None
    if _saved_auth_env is not None:
        for name, value in _saved_auth_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        _saved_auth_env = None
        _refresh_ray_auth()


SESSION_MAX_AGE_S = 24 * 3600


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: alive, someone else's
        return True
    return True


def stale_token(path: Path, now: float, max_age_s: float) -> bool:
    """A token file whose writer is dead (`token-{pid}-…`: a driver killed by kill -9 could not
    remove it), or untouched for `max_age_s`."""
    parts = path.name.split("-")
    if len(parts) == 3 and parts[1].isdigit() and int(parts[1]) != os.getpid() and not _pid_alive(int(parts[1])):
        return True
    return now - path.stat().st_mtime > max_age_s


def clean_old_sessions(temp_dir: Path, max_age_s: float = SESSION_MAX_AGE_S) -> int:
    """Remove Ray session dirs untouched for `max_age_s` (a local Ray leaves ≈ 200 KB per run)
    and stale token files (their driver dead, or that old). A live session writes its logs, so
    it is never that old; the one `session_latest` points at is kept. Returns how many session
    dirs were removed."""
    now = time.time()
    latest = temp_dir / "session_latest"
    keep = latest.resolve() if latest.is_symlink() else None
    removed = 0
    for path in temp_dir.glob("session_2*"):
        if path.is_symlink() or not path.is_dir() or path.resolve() == keep:
            continue
        try:
            newest = max([path.stat().st_mtime, *(p.stat().st_mtime for p in path.glob("logs/*"))])
        except OSError:
            continue
        if now - newest > max_age_s:
            shutil.rmtree(path, ignore_errors=True)
            removed += 1
    for token in (temp_dir / "auth").glob("token-*"):
        try:
            if stale_token(token, now, max_age_s):
                token.unlink()
        except OSError:
            pass
    return removed


def stop_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
    _started.clear()
    _restore_auth_env()
    _restore_env()
