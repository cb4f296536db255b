"""One writer per OUT: an exclusive `flock` on `OUT/.mcie.lock` (local OUT), or a lock object
`OUT/.mcie.lock` made only if absent (object-store OUT).

Build, rejudge, review push/pull and finalize all write into OUT; two of them at once can undo
each other (one run's clean-up of a unit after the other wrote its shards leaves a completion
marker without its shard). Each takes this lock first; a second writer is refused at once
(`OutLocked`, one line naming the holder's pid and command; the CLI exits 2).

`flock` belongs to the open file, so the kernel releases it when the holder dies, even by
`kill -9`: a lock is never stale. The file stays in OUT, empty while nobody holds it (its content,
the holder's pid and command, is written after the lock is taken and cleared on release), so two
finished builds hold the same bytes. A holder killed by `kill -9` cannot clear it: the next
command on OUT does (`clear_stale`, from `mcie`'s entry point; a writer overwrites it anyway). Within one process the lock is re-entrant (the CLI takes it
before planning, the flow again, finalize again), counted per OUT.

On an object store there is no flock: the lock is an object created with `If-None-Match: *`
(`storage.create_exclusive`), holding {host, pid, pid start time, command, started}, and removed on
release, so a finished OUT holds no lock object. Nothing releases it when the holder dies, so a
holder is checked: on this host, a pid that is gone (or now belongs to a process started at
another time: pid reuse) is stale and the next writer takes the lock over without a manual step;
a holder on another host cannot be checked, so the writer is refused with a line naming
`mcie unlock OUT`. Some stores ignore If-None-Match: each acquisition first creates a probe
object twice, and a store that lets both succeed cannot lock (`LockUnsupported`). `--no-lock`
(env `MCIE_NO_LOCK=1`, so Prefect and Ray processes of the same run see it) skips the lock, with a
warning, on any OUT.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import secrets
import shlex
import socket
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from pipeline import storage

log = logging.getLogger(__name__)

LOCK_NAME = ".mcie.lock"
PROBE_PREFIX = ".mcie.lock-probe-"
NO_LOCK_ENV = "MCIE_NO_LOCK"

_held: dict[str, list] = {}  # resolved OUT (a URL on a store) → [fd or lock bytes, depth]
_guard = threading.Lock()
_warned: set[str] = set()  # OUTs written without the lock (--no-lock): warned once each


class OutLocked(RuntimeError):
    """Another process writes into OUT (one-line message naming it)."""


class LockUnsupported(OutLocked):
    """The object store ignores If-None-Match: it cannot give one writer per OUT (an `OutLocked`,
    so every command that reports a refused lock in one line reports this too)."""


def lock_disabled() -> bool:
    return os.environ.get(NO_LOCK_ENV, "").strip().lower() in ("1", "true", "yes")


SECRET_OPTIONS = ("--storage-option",)  # their values may be credentials: never in a lock


def current_command() -> str:
    """This process's command line for the lock, `--storage-option` values masked."""
    argv = list(sys.argv) or ["python"]
    argv[0] = Path(argv[0]).name
    shown, mask_next = [], False
    for arg in argv:
        if mask_next:
            arg, mask_next = arg.partition("=")[0] + "=***", False
        elif arg in SECRET_OPTIONS:
            mask_next = True
        elif arg.startswith(tuple(f"{o}=" for o in SECRET_OPTIONS)):
            option, _, value = arg.partition("=")
            arg = f"{option}={value.partition('=')[0]}=***"
        shown.append(arg)
    return shlex.join(shown)[:300]


def holder(out: Path) -> str:
    """Who holds OUT's lock, as the holder wrote it ('' when unknown)."""
    try:
        info = json.loads((storage.location(out) / LOCK_NAME).read_text() or "{}")
        where = f"host {info['host']} " if "host" in info else ""
        return f"{where}pid {int(info['pid'])} ({info.get('command', '?')})"
    except (OSError, ValueError, KeyError, TypeError):
        return ""


# ---- object-store lock ----------------------------------------------------------------------------

def _start_time(pid: int) -> float | None:
    """When process `pid` started, None when there is no such live process (a zombie is dead)."""
    import psutil

    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return None
        return process.create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return None


def _my_info(command: str | None) -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "start": _start_time(os.getpid()),
            "command": command or current_command(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _read_info(path) -> tuple[bytes, dict[str, Any] | None] | None:
    """(raw bytes, parsed holder or None when unreadable) of a lock object; None when absent."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        info = json.loads(raw)
        return raw, info if isinstance(info, dict) and isinstance(info.get("pid"), int) else None
    except ValueError:
        return raw, None


def _describe(info: dict[str, Any] | None) -> str:
    if info is None:
        return "an unknown holder (unreadable lock object)"
    return (f"host {info.get('host', '?')} pid {info['pid']} ({str(info.get('command', '?'))[:200]}, "
            f"since {info.get('started', '?')})")


def _alive(info: dict[str, Any]) -> bool | None:
    """True/False for a holder on this host (False: its pid is gone or was reused), None when it
    is on another host (it cannot be checked from here)."""
    if info.get("host") != socket.gethostname():
        return None
    started = _start_time(int(info["pid"]))
    if started is None:
        return False
    recorded = info.get("start")
    return recorded is None or abs(float(recorded) - started) < 1.0


def _check_store_locks(out) -> None:
    """Create a probe object twice: a store that accepts both ignores If-None-Match."""
    probe = out / f"{PROBE_PREFIX}{secrets.token_hex(6)}"
    try:
        first = storage.create_exclusive(probe, b"")
        second = storage.create_exclusive(probe, b"")
    finally:
        storage.remove_tree(probe)
    if first and second:
        raise LockUnsupported(f"{storage.show(out)}: this object store ignores If-None-Match, so it cannot "
                              "keep one writer per OUT; rerun with --no-lock if you are sure no other "
                              "writer runs")


def _take_object_lock(out, command: str | None) -> bytes:
    """Create OUT's lock object (taking over a stale one on this host); its bytes."""
    _check_store_locks(out)
    path = out / LOCK_NAME
    mine = (json.dumps(_my_info(command), sort_keys=True) + "\n").encode()
    for _ in range(3):
        if storage.create_exclusive(path, mine):
            return mine
        found = _read_info(path)
        if found is None:  # released between the two calls: try again
            continue
        raw, info = found
        if not raw.strip():  # an empty lock: a local OUT's idle lock file, copied into the bucket
            if _read_info(path) == found:
                storage.remove_tree(path)
            continue
        alive = None if info is None else _alive(info)
        if alive is False:
            log.warning("%s: taking over the lock of %s: that process is gone", storage.show(out), _describe(info))
            if _read_info(path) == found:  # not retaken meanwhile
                storage.remove_tree(path)
            continue
        hint = "" if alive else f"; if it is gone, run `mcie unlock {storage.show(out)}`"
        raise OutLocked(f"{storage.show(out)} is in use by {_describe(info)}: one writer per build output; "
                        f"wait for it to finish or stop it{hint}")
    raise OutLocked(f"{storage.show(out)}: the lock changed hands while it was taken; try again")


def _release_object_lock(out, mine: bytes) -> None:
    path = out / LOCK_NAME
    try:
        if path.read_bytes() != mine:  # unlocked and retaken by someone else: theirs now
            log.warning("%s: the lock is no longer this process's; left as it is", storage.show(out))
            return
    except FileNotFoundError:
        return
    storage.remove_tree(path)


def unlock(out: Path | str) -> str:
    """Remove OUT's lock (`mcie unlock`): returns who held it ('' when nobody did). Refused
    (`OutLocked`) while the holder is alive on this host, or (local OUT) holds the flock."""
    loc = storage.location(out)
    if storage.is_local(loc):
        who = holder(loc)
        path = Path(loc) / LOCK_NAME
        if not path.is_file() or path.stat().st_size == 0:
            return ""
        if not clear_stale(loc):
            raise OutLocked(f"{loc} is in use by {who or 'a live process'}: not unlocked")
        return who
    found = _read_info(loc / LOCK_NAME)
    if found is None:
        return ""
    raw, info = found
    if info is not None and _alive(info):
        raise OutLocked(f"{storage.show(loc)} is in use by {_describe(info)}, alive on this host: not unlocked")
    storage.remove_tree(loc / LOCK_NAME)
    return _describe(info)


def clear_stale(out: Path | str) -> bool:
    """Empty OUT's lock file when it names a holder that no longer holds the lock (a writer
    killed by `kill -9` leaves its pid). True when it was cleared. A lock held by anyone (this
    process included), a missing or unwritable file: left as it is. On an object store: removes a
    lock object whose holder was on this host and is gone."""
    loc = storage.location(out)
    if not storage.is_local(loc):
        return _clear_stale_object(loc)
    path = Path(out) / LOCK_NAME
    with _guard:
        if str(Path(out).resolve()) in _held:
            return False
        try:
            if path.stat().st_size == 0:
                return False
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)  # never created here
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held by a live writer: its pid is true
            os.ftruncate(fd, 0)
            return True
        except OSError:
            return False
        finally:
            os.close(fd)  # releases the flock, if taken


def _clear_stale_object(out) -> bool:
    with _guard:
        if str(out) in _held:
            return False
    try:
        found = _read_info(out / LOCK_NAME)
    except OSError:
        return False
    if found is None or found[1] is None or _alive(found[1]) is not False:
        return False
    if _read_info(out / LOCK_NAME) != found:
        return False
    storage.remove_tree(out / LOCK_NAME)
    log.info("%s: removed the stale lock of %s", storage.show(out), _describe(found[1]))
    return True


@contextmanager
def out_lock(out: Path | str, command: str | None = None) -> Iterator[None]:
    """Hold OUT's writer lock for the block; `OutLocked` at once if another process holds it.
    A local OUT must exist. An OSError (a read-only OUT) passes through. Skipped, with a
    warning, when `MCIE_NO_LOCK` is set (`--no-lock`)."""
    loc = storage.location(out)
    if lock_disabled():
        if str(loc) not in _warned:
            _warned.add(str(loc))
            log.warning("%s: writing without the one-writer lock (--no-lock)", storage.show(loc))
        yield
        return
    if not storage.is_local(loc):
        with _object_lock(loc, command):
            yield
        return
    out = Path(loc)
    key = str(out.resolve())
    with _guard:
        entry = _held.get(key)
        if entry is not None:
            entry[1] += 1
        else:
            fd = os.open(out / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
                who = holder(out) or "another process (pid not written yet)"
                raise OutLocked(f"{out} is in use by {who}: one writer per build output; "
                                "wait for it to finish or stop it") from None
            info = json.dumps({"pid": os.getpid(), "command": command or current_command()})
            os.ftruncate(fd, 0)
            os.pwrite(fd, info.encode() + b"\n", 0)
            _held[key] = [fd, 1]
    try:
        yield
    finally:
        with _guard:
            entry = _held[key]
            entry[1] -= 1
            if entry[1] == 0:
                del _held[key]
                try:
                    os.ftruncate(entry[0], 0)  # empty again: nobody holds it
                except OSError:
                    pass
                os.close(entry[0])  # releases the flock


@contextmanager
def _object_lock(out, command: str | None) -> Iterator[None]:
    key = str(out)
    with _guard:
        entry = _held.get(key)
        if entry is not None:
            entry[1] += 1
        else:
            _held[key] = entry = [_take_object_lock(out, command), 1]
    try:
        yield
    finally:
        with _guard:
            entry[1] -= 1
            if entry[1] == 0:
                del _held[key]
                _release_object_lock(out, entry[0])
