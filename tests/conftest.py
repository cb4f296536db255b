"""Test-wide environment: Prefect, Ray and Label Studio state stay inside the project."""

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

os.environ.setdefault("PREFECT_HOME", str(ROOT / ".prefect" / "tests"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
from flows.cli import PREFECT_DEFAULTS  # noqa: E402  (start-up timeout, database vacuum)

for _name, _value in PREFECT_DEFAULTS.items():
    os.environ.setdefault(_name, _value)
os.environ.setdefault("MCIE_RAY_TEMP_DIR", str(ROOT / ".ray"))
# The local Ray of a build turns token authentication on by itself (flows.ray_runtime).
Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)  # Prefect makes one level only
