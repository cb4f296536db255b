"""One writer per OUT: an exclusive `flock` on `OUT/.mcie.lock`.

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
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shlex
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

LOCK_NAME = ".mcie.lock"

_held: dict[str, list[int]] = {}  # resolved OUT → [fd, depth], for this process
_guard = threading.Lock()


class OutLocked(RuntimeError):
    """Another process writes into OUT (one-line message naming it)."""


def current_command() -> str:
    argv = list(sys.argv) or ["python"]
    argv[0] = Path(argv[0]).name
    return shlex.join(argv)[:300]


def holder(out: Path) -> str:
    """Who holds OUT's lock, as the holder wrote it ('' when unknown)."""
    try:
        info = json.loads((Path(out) / LOCK_NAME).read_text() or "{}")
        return f"pid {int(info['pid'])} ({info.get('command', '?')})"
    except (OSError, ValueError, KeyError, TypeError):
        return ""


def clear_stale(out: Path | str) -> bool:
    """Empty OUT's lock file when it names a holder that no longer holds the lock (a writer
    killed by `kill -9` leaves its pid). True when it was cleared. A lock held by anyone (this
    process included), a missing or unwritable file: left as it is."""
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


@contextmanager
def out_lock(out: Path | str, command: str | None = None) -> Iterator[None]:
    """Hold OUT's writer lock for the block; `OutLocked` at once if another process holds it.
    OUT must exist. An OSError (a read-only OUT) passes through."""
    out = Path(out)
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
