"""A frozen copy of the project's code for end-to-end tests that compare several builds.

Other engineers edit stages while tests run; builds compared byte for byte must all run the same
code, so such a test copies the packages once and runs every command from the copy (first on
PYTHONPATH, also for local Ray workers and, through `runtime_env.py_modules`, cluster workers).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "flows", "annotation", "trainer")
FILES = ("prefect.yaml",)


def snapshot(into: Path) -> Path:
    into.mkdir(parents=True, exist_ok=True)
    for name in PACKAGES:
        shutil.copytree(ROOT / name, into / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in FILES:
        shutil.copy2(ROOT / name, into / name)
    return into


def env_with(code: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, **extra}
    env["PYTHONPATH"] = os.pathsep.join([str(code), *filter(None, [env.get("PYTHONPATH")])])
    return env
