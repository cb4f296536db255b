"""Where a small build's wall time goes, from the shell to the exit (a benchmark that prints figures).

    .venv/bin/python bench/startup.py [--count 16] [--workers 2] [--repeat 1]

Runs `mcie build --out TMP --count 16 --workers 2` (procedural, embedded defaults) in a fresh
process, as a user would, and prints one JSON line per run: phase → seconds, and `total`, the wall
time seen by the parent (spawn to exit). The child is the real CLI (`flows.cli.main`) with marks
taken at the first call of the functions that end each phase (nothing else is changed). A phase is
the time from the previous mark to its own, in the order the marks came:

  interpreter  spawn → this script runs (Python start-up)
  imports      flows.cli and what it imports (flows.build, with Prefect, comes later, where the
               CLI imports it: counted in `ray` or `prefect`)
  validate     `run_build` up to `launch_build` (judge, config, source, stages checked)
  plan         `prepare_build` (config.json, the source's key list)
  ray          → `start_ray` returned (the CLI starts a local Ray while Prefect's server starts)
  prefect      → the flow's plan task starts: waiting for Prefect's temporary API server, the
               flow run's creation
  plan_task    the flow's plan task (OUT already planned: reads it back)
  actors       → the first unit starts on an actor (actor processes spawn, build their stages)
  processing   first unit start → last unit done
  ray_stop     → `finalize` called (stop_ray, the task's end)
  merge        `finalize` (manifest, defect log)
  report       `write_report` (card, stats.json, contact sheets, report.html)
  artifacts    `publish_build_artifacts`, and the flow's end
  exit         `main` returned → the process exited (Prefect's server stopped at exit)

`prefect_wait` (not part of the sum) is how long the driver waited for Prefect's server to answer;
`cpu_s` the CPU seconds of the whole build (the CLI and every process it started and reaped: Prefect's
server, Ray's daemons and workers): on 2 idle cores the wall time cannot go below half of it, and on
a loaded machine it is the steadier figure.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
T0_ENV = "MCIE_STARTUP_T0"  # the parent's time.time() at spawn
EVENTS_ENV = "MCIE_STARTUP_EVENTS"  # where the child writes its timestamps


def child(argv: list[str]) -> int:
    """The CLI with marks (`mark`) at the functions that end each phase."""
    events: list[tuple[str, float]] = [("script", time.time())]
    spans: dict[str, list[float]] = {}  # overlapping measures: name → [start, end]

    def mark(name: str) -> None:
        if name not in dict(events):  # the first time only
            events.append((name, time.time()))

    def around(owner, name: str, before: str | None, after: str | None, span: str | None = None,
               first=None):
        """Mark `before` / `after` a call of owner.name, time its first call as `span`, and run
        `first()` before its first call."""
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            if first and "first" not in spans.setdefault(f"_{name}", []):
                spans[f"_{name}"].append("first")
                first()
            if before:
                mark(before)
            started = time.time()
            try:
                return original(*args, **kwargs)
            finally:
                if span and span not in spans:
                    spans[span] = [started, time.time()]
                if after:
                    mark(after)

        setattr(owner, name, wrapper)

    sys.path.insert(0, str(ROOT))
    import flows.cli as cli

    cli.configure_environment()  # as main() does, before Prefect is imported (it reads it once)
    import flows.plan as plan
    import flows.ray_runtime as ray_runtime

    def patch_flow() -> None:
        """The marks inside the flow (flows.build imports Prefect: where the CLI imports it)."""
        import flows.build as build

        around(build, "start_ray", None, "ray")
        around(build, "prepare_build", "prefect", "plan_task")
        around(build, "finalize", "ray_stop", "merge")
        around(build, "write_report", None, "report")
        around(build, "publish_build_artifacts", None, "artifacts")
        run_units = build.run_units

        def timed_run_units(config, out, units, workers, on_unit_done=lambda *a: None, num_gpus=0):
            done: list[tuple[float, float]] = []  # (when, worker seconds) per unit

            def unit_done(unit, stats, node):
                done.append((time.time(), stats.seconds))
                on_unit_done(unit, stats, node)

            try:
                return run_units(config, out, units, workers, on_unit_done=unit_done, num_gpus=num_gpus)
            finally:
                if done:
                    events.append(("actors", min(when - seconds for when, seconds in done)))
                    events.append(("processing", max(when for when, _ in done)))

        build.run_units = timed_run_units

    mark("imports")
    around(cli, "launch_build", "validate", None)
    around(plan, "prepare_build", None, "plan")
    around(ray_runtime, "start_ray", None, "ray")
    if hasattr(cli, "TemporaryPrefectServer"):  # the CLI starts Prefect's server itself
        around(cli.TemporaryPrefectServer, "wait_ready", None, None, span="prefect_wait",
               first=patch_flow)
    else:  # Prefect starts it when the flow starts
        patch_flow()
        from prefect.server.api import server as prefect_server

        around(prefect_server.SubprocessASGIServer, "start", None, None, span="prefect_wait")
    try:
        code = cli.main(argv)
    finally:
        mark("main")
        spans = {k: v for k, v in spans.items() if not k.startswith("_")}
        Path(os.environ[EVENTS_ENV]).write_text(json.dumps({"events": events, "spans": spans}))
    return code


NAMES = {"script": "interpreter", "main": "artifacts"}  # the flow's end is counted with artifacts


def breakdown(t0: float, record: dict, end: float) -> dict[str, float]:
    """Phase → seconds: the time from the previous mark to each mark (in the order they came),
    `exit` from the last mark to the process's end, and the spans (Prefect's server start, which
    overlaps other phases) apart."""
    phases: dict[str, float] = {}
    previous = t0
    for name, at in sorted(record["events"], key=lambda event: event[1]):
        label = NAMES.get(name, name)
        phases[label] = phases.get(label, 0.0) + at - previous
        previous = at
    phases["exit"] = end - previous
    phases["total"] = end - t0
    for name, (start, stop) in record["spans"].items():
        phases[name] = stop - start
    return {k: round(v, 3) for k, v in phases.items()}


def run_once(count: int, workers: int, out: Path, env: dict) -> dict:
    events_path = out.parent / f"{out.name}.events.json"
    env = {**env, EVENTS_ENV: str(events_path)}
    argv = ["build", "--out", str(out), "--count", str(count), "--workers", str(workers)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.time()
    env[T0_ENV] = repr(t0)
    proc = subprocess.run([sys.executable, __file__, "--child", *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    end = time.time()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"mcie build failed ({proc.returncode}): {proc.stderr[-2000:]}")
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return {**breakdown(t0, json.loads(events_path.read_text()), end), "cpu_s": round(cpu, 2)}


class OneLineErrors(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        return child(sys.argv[2:])
    parser = OneLineErrors(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=1, help="runs, each into a fresh OUT")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mcie-startup-"))
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_HOME": os.environ.get("PREFECT_HOME", str(work / "prefect")), "TQDM_DISABLE": "1"}
    env.pop("RAY_ADDRESS", None)
    env.pop("PREFECT_API_URL", None)  # the temporary server, as a user without one gets
    print(f"machine: {os.cpu_count()} cores; load average before: "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}", file=sys.stderr)
    try:
        for run in range(args.repeat):
            phases = run_once(args.count, args.workers, work / f"out{run}", env)
            print(json.dumps({"count": args.count, "workers": args.workers, **phases}), flush=True)
    finally:
        print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", file=sys.stderr)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
