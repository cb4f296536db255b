"""Starting Ray: a local single-node Ray on loopback by default, an existing cluster by address."""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

# Project-local, and short: Ray puts unix sockets under it (path length is limited).
DEFAULT_TEMP_DIR = Path(__file__).resolve().parents[1] / ".ray"


def start_ray(address: str | None, workers: int) -> str:
    """Connect to `address` (or $RAY_ADDRESS), else start a local Ray with `workers` CPUs.
    Returns a short description of what it connected to."""
    import ray

    address = address or os.environ.get("RAY_ADDRESS") or None
    if ray.is_initialized():
        return "ray (already initialised)"
    if address:
        ray.init(address=address, log_to_driver=True, logging_level=logging.WARNING)
        return f"ray cluster at {address}"
    # The auth-token file would land in ~/.ray; a local, loopback-only Ray needs none.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    temp_dir = Path(os.environ.get("MCIE_RAY_TEMP_DIR", DEFAULT_TEMP_DIR))
    temp_dir.mkdir(parents=True, exist_ok=True)
    ray.init(
        num_cpus=workers,
        include_dashboard=False,
        _temp_dir=str(temp_dir),
        _node_ip_address="127.0.0.1",
        logging_level=logging.WARNING,
    )
    return f"local ray ({workers} CPUs)"


def stop_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
