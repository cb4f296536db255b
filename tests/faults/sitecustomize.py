"""Fault injection at the OS boundary for end-to-end tests (on PYTHONPATH only in those tests):
with MCIE_FAULT_ENOSPC_UNDER=DIR, every `os.replace` onto a path under DIR fails with ENOSPC, in
the driver and in every Ray worker (they inherit the environment), as a full disk would."""

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
