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

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """One real S3-compatible server (SeaweedFS on loopback) for the test session."""
    from s3_server import S3Server

    server = S3Server.start(tmp_path_factory.mktemp("seaweedfs"))
    yield server
    server.stop()


@pytest.fixture
def s3(s3_server, monkeypatch):
    """The session's S3 server, this process's environment pointed at it; `s3.bucket()` makes a
    fresh bucket."""
    from s3_server import apply_env

    apply_env(s3_server, monkeypatch)
    return s3_server
