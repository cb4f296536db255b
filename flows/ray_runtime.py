"""Starting Ray: a local single-node Ray on loopback by default, an existing cluster by address.

A cluster is named by `--ray-address` or `RAY_ADDRESS` (`HOST:PORT` of the head's GCS, as printed
by `ray start --head`, or `ray://HOST:10001` for Ray Client). The stage code travels with the job
(`runtime_env.py_modules`), so a cluster whose nodes have the dependencies but not this checkout can
run it. Without an address a fresh local Ray is started (`address="local"`): it never attaches to a
cluster that happens to be running on the machine.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

# Project-local, and short: Ray puts unix sockets under it (path length is limited).
DEFAULT_TEMP_DIR = Path(__file__).resolve().parents[1] / ".ray"
ADDRESS_ENV = "RAY_ADDRESS"
LOCAL_NODE_IP = "127.0.0.2"


def cluster_address(address: str | None) -> str | None:
    """The cluster to use: the explicit address, else $RAY_ADDRESS, else None (local Ray)."""
    address = (address or os.environ.get(ADDRESS_ENV) or "").strip()
    return address or None


def code_runtime_env() -> dict:
    """Ship the stage code (the `pipeline` package) to the cluster's workers with the job."""
    import pipeline

    return {"py_modules": [str(Path(pipeline.__file__).parent)]}


def start_ray(address: str | None, workers: int) -> str:
    """Connect to `address` (or $RAY_ADDRESS), else start a local Ray with `workers` CPUs.
    Returns a short description of what it connected to."""
    import ray

    address = cluster_address(address)
    if ray.is_initialized():
        return "ray (already initialised)"
    if address:
        host = address.rsplit(":", 1)[0]
        # A cluster on this machine's loopback: the driver joins on the head's own address.
        node_ip = host if host.startswith("127.") else None  # (never for a ray:// client)
        ray.init(address=address, runtime_env=code_runtime_env(), log_to_driver=True,
                 logging_level=logging.WARNING, _node_ip_address=node_ip)
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        cpus = sum(n.get("Resources", {}).get("CPU", 0) for n in nodes)
        return f"ray cluster at {address} ({len(nodes)} nodes, {cpus:g} CPUs)"
    # The auth-token file would land in ~/.ray; a local, loopback-only Ray needs none.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    temp_dir = Path(os.environ.get("MCIE_RAY_TEMP_DIR", DEFAULT_TEMP_DIR))
    temp_dir.mkdir(parents=True, exist_ok=True)
    ray.init(
        address="local",  # never attach to a cluster found in the temp dir
        num_cpus=workers,
        include_dashboard=False,
        _temp_dir=str(temp_dir),
        # Ray rewrites 127.0.0.1 to the machine's external address; another loopback address
        # keeps all of a local Ray's traffic on loopback.
        _node_ip_address=LOCAL_NODE_IP,
        logging_level=logging.WARNING,
    )
    return f"local ray ({workers} CPUs)"


def stop_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
