"""Fault injection at the OS boundary for end-to-end tests (on PYTHONPATH only in those tests):
with MCIE_FAULT_ENOSPC_UNDER=DIR, every `os.replace` onto a path under DIR fails with ENOSPC, in
the driver and in every Ray worker (they inherit the environment), as a full disk would; with
MCIE_FAULT_DIE_READING=TEXT, see below."""

import errno
import os

_UNDER = os.environ.get("MCIE_FAULT_ENOSPC_UNDER")
if _UNDER:
    _replace = os.replace

    def _full_disk_replace(src, dst, *args, **kwargs):
        if os.fspath(dst).startswith(_UNDER):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(dst))
        return _replace(src, dst, *args, **kwargs)

    os.replace = _full_disk_replace

# With MCIE_FAULT_DIE_READING=TEXT, a Ray worker that opens a file whose path contains TEXT dies
# at once (exit 137, as the kernel's OOM killer ends a process): a poisoned input. The driver and
# other processes read it normally.
_DIE_READING = os.environ.get("MCIE_FAULT_DIE_READING")
if _DIE_READING:
    import builtins
    import io
    import sys

    _open, _os_open = builtins.open, os.open

    def _die_on(file) -> None:
        if (isinstance(file, (str, bytes, os.PathLike)) and _DIE_READING in os.fsdecode(file)
                and sys.argv and sys.argv[0].endswith("default_worker.py")):
            os._exit(137)

    def _open_or_die(file, *args, **kwargs):
        _die_on(file)
        return _open(file, *args, **kwargs)

    def _os_open_or_die(path, *args, **kwargs):
        _die_on(path)
        return _os_open(path, *args, **kwargs)

    builtins.open = io.open = _open_or_die
    os.open = _os_open_or_die
