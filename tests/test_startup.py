"""Issue 28 item 5: a small build's start-up runs Prefect's temporary server, Ray and the driver's
imports side by side (flows.cli), and the figures of bench/startup.py and bench/compare_commits.py
are read and added up correctly."""

from __future__ import annotations

import json
import sys
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import compare_commits  # noqa: E402
import startup  # noqa: E402


def test_old_and_new_stage_lines_are_read_with_a_comparable_compose_edit():
    old = "stages, ms per pair    source 3.7, compose + edit 14.7, pixel judge 5.7\n"
    new = ("stages, ms per pair    source 6.2, ground 1.1, compose 13.1, edit 15.3, judge 7.6 "
           "(0 of the pairs failed a stage)\n")
    assert compare_commits.parse_stages(old) == {"source": 3.7, "compose_edit": 14.7, "judge": 5.7}
    stages = compare_commits.parse_stages(new)
    assert stages == pytest.approx({"source": 6.2, "ground": 1.1, "compose": 13.1, "edit": 15.3,
                                    "judge": 7.6, "compose_edit": 1.1 + 13.1 + 15.3})
    with pytest.raises(ValueError):
        compare_commits.parse_stages("bare loop (1 process)  30.00 pairs/s")


def test_startup_phases_are_the_gaps_between_marks_in_time_order_and_add_up_to_the_total():
    # marks as a child writes them: not in time order ("actors" is computed after "processing"
    # is known), the flow's end counted with the artifacts, a span apart from the sum
    record = {"events": [["script", 10.5], ["imports", 11.0], ["validate", 12.0], ["plan", 12.25],
                         ["ray", 16.0], ["prefect", 18.0], ["processing", 21.0], ["actors", 19.5],
                         ["artifacts", 22.0], ["main", 22.5]],
              "spans": {"prefect_wait": [16.0, 17.0]}}
    phases = startup.breakdown(10.0, record, 24.0)
    assert phases == {"interpreter": 0.5, "imports": 0.5, "validate": 1.0, "plan": 0.25, "ray": 3.75,
                      "prefect": 2.0, "actors": 1.5, "processing": 1.5, "artifacts": 1.5,
                      "exit": 1.5, "total": 14.0, "prefect_wait": 1.0}
    assert sum(v for k, v in phases.items() if k not in ("total", "prefect_wait")) == phases["total"]


def test_the_cli_uses_no_server_of_its_own_when_prefect_api_url_names_one(monkeypatch):
    from flows.cli import TemporaryPrefectServer

    monkeypatch.setattr(TemporaryPrefectServer, "_instance", None)
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:4200/api")
    assert TemporaryPrefectServer.get() is None


@pytest.mark.slow  # starts Prefect's server / a local Ray
def test_the_temporary_prefect_server_answers_once_ready_is_one_per_process_and_stops(monkeypatch):
    from flows.cli import TemporaryPrefectServer

    monkeypatch.setattr(TemporaryPrefectServer, "_instance", None)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    server = TemporaryPrefectServer.get()
    try:
        assert TemporaryPrefectServer.get() is server  # a second build in this process reuses it
        url = server.wait_ready()
        with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
            assert response.status == 200
        with urllib.request.urlopen(f"{url}/admin/version", timeout=5) as response:
            import prefect

            assert json.loads(response.read()) == prefect.__version__  # Prefect's own API
        process = server.process
    finally:
        server.stop()
    assert process.poll() is not None and server.process is None
    assert TemporaryPrefectServer.get() is not server  # stopped: the next build starts one
    TemporaryPrefectServer._instance.stop()


@pytest.mark.slow  # starts Prefect's server / a local Ray
def test_a_flow_that_fails_before_its_units_stops_the_ray_the_cli_started(monkeypatch, tmp_path):
    """The CLI starts the local Ray before the flow (while Prefect's server starts); the flow's
    process task stops it, but a flow that fails earlier must not leave it running."""
    import ray

    import flows.build
    from flows import cli, ray_runtime
    from pipeline.config import BuildConfig

    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # no server started
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    seen = {}

    def failing_flow(**kwargs):
        seen["ray"] = ray.is_initialized()
        seen["target"] = ray_runtime.start_ray(None, 1)  # what the process task would get
        seen["seconds"] = ray_runtime.ray_start_seconds()
        raise RuntimeError("the flow failed before its units")

    monkeypatch.setattr(flows.build, "build_dataset", failing_flow)
    out = tmp_path / "out"
    config = BuildConfig(count=2, shard_size=2, resolution=64)
    code = cli.launch_build(str(out), config, workers=1, ray_address=None)
    assert code == 1
    assert seen["ray"] and seen["target"] == "local ray (1 CPUs)" and seen["seconds"] > 0
    assert not ray.is_initialized() and ray_runtime.ray_start_seconds() == 0.0


def test_parquet_files_are_read_as_read_table_reads_them_without_importing_pandas(tmp_path):
    """pq.read_table goes through pyarrow.dataset, which imports pandas (≈ 1 s of every build
    driver and worker); read_parquet gives the same table and schema metadata without it."""
    import subprocess

    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "part.parquet"
    table = pa.table({"key": ["a", "b", None], "n": [1, 2, 3]}).replace_schema_metadata({"mcie": "1"})
    pq.write_table(table, path)
    probe = ("import sys; from pipeline.dataset.output import read_parquet; "
             f"t = read_parquet({str(path)!r}); c = read_parquet({str(path)!r}, columns=['n']); "
             "print('pandas' in sys.modules, t.schema.metadata[b'mcie'].decode(), t.num_rows, "
             "c.column_names)")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["False", "1", "3", "['n']"]
    from pipeline.dataset.output import read_parquet

    assert read_parquet(path).equals(pq.read_table(path))
    assert read_parquet(path).schema.equals(pq.read_table(path).schema, check_metadata=True)
