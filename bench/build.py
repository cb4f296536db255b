"""Build throughput and memory, on this machine, in one run (a benchmark that prints figures).

    .venv/bin/python bench/build.py [--count 192] [--rss-count 64] [--resolution 512] [--photos]

`--photos` measures the real-photo path instead of procedural scenes: scikit-image's bundled
photographs through the list source (decode + resize), the classical grounder, the inventory
composer, the photo editor and the pixel judge (`--edits-per-image` as needed to reach the count).

0. stages: ms per pair of each stage (source, ground, compose, edit, judge), in this process after
   a warm-up (the figures the README's per-stage breakdown quotes), wall and CPU;
1. bare loop: `UnitPipeline.run` over the units in this process (one core), after one warm-up
   unit: the stage code's own speed, pairs/s (= pairs/s per core), and pairs per CPU-second of
   this process (process time: the steadier figure on a loaded, shared machine, where wall time
   also counts the other processes' turns; OpenCV may add a second thread, so on an idle
   machine it can read below the wall figure);
2. `mcie build --workers 1` and `--workers 2`: pairs/s of the processing (first unit start to last
   unit end), steady-state pairs/s (after each worker's first unit), and start-up (Prefect + Ray +
   actors) apart;
3. peak RSS of a whole `mcie build` (driver, Prefect's API, Ray's processes and workers, summed
   over its session, sampled every 0.1 s) for N and for 10·N samples.
Targets: flow 1 worker ≥ 0.9× bare loop; 2 workers ≥ 1.8× 1 worker; RSS(10·N) ≤ 1.2× RSS(N).
The load average before and after is printed: on a shared machine, figures are only comparable
when it is low.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STEADY = re.compile(r"steady state\s+([\d.]+) pairs/s")
THIS_RUN = re.compile(r"this run\s+(\d+) samples in ([\d.]+) s = ([\d.]+) pairs/s \(\+ ([\d.]+) s Ray")


# The colour photographs of scikit-image's wheel (one of the motorcycle stereo pair: the other is
# its near-duplicate).
PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
          "hubble_deep_field.jpg", "retina.jpg", "ihc.png")


def photo_list(work: Path) -> Path:
    import importlib.resources

    data = importlib.resources.files("skimage") / "data"
    path = work / "photos.txt"
    path.write_text("".join(f"{data / name}\n" for name in PHOTOS))
    return path


def build_args(args: argparse.Namespace, count: int, work: Path) -> list[str]:
    """`mcie build` arguments of a benchmark build of `count` samples."""
    common = ["--count", str(count), "--resolution", str(args.resolution), "--shard-size",
              str(args.shard_size), "--seed", str(args.seed)]
    if not args.photos:
        return common
    per_image = -(-count // len(PHOTOS))
    return common + ["--source", "list", "--source-path", str(photo_list(work)),
                     "--allow-outside-root",  # the list names skimage's installed photos
                     "--edits-per-image", str(per_image)]


def config_of(build: list[str]):
    """The BuildConfig `mcie build` makes of these arguments."""
    from flows.cli import build_parser
    from pipeline.cli_args import seat_fields
    from pipeline.config import BuildConfig

    ns = build_parser().parse_args(["build", "--out", "unused", *build])
    return BuildConfig(count=ns.count, seed=ns.seed, resolution=ns.resolution,
                       shard_size=ns.shard_size, **seat_fields(ns))


def bare_loop(build: list[str], out: Path) -> dict:
    from flows.plan import prepare_build
    from pipeline.unit import UnitPipeline

    config = config_of(build)
    started = time.perf_counter()
    total = prepare_build(out, config)
    pipeline = UnitPipeline(config, out)
    pipeline.run(0)  # warm-up: imports, caches, first allocations
    warm, cpu = time.perf_counter(), time.process_time()
    samples = 0
    for unit in range(1, config.num_units(total)):
        samples += pipeline.run(unit).samples
    seconds, cpu_seconds = time.perf_counter() - warm, time.process_time() - cpu
    return {"pairs_per_s": samples / seconds, "samples": samples, "seconds": seconds,
            "cpu_pairs_per_s": samples / cpu_seconds, "startup_s": warm - started}


def stage_times(build: list[str], count: int) -> dict:
    """ms per pair of each stage, over the build's first `count` samples after a warm-up."""
    from pipeline.dataset.source_index import make_index
    from pipeline.judges.base import make_judge
    from pipeline.unit import front_stages, make_source, read_sample

    config = config_of(build)
    source = make_source(config)
    index, _ = make_index(source)
    grounder, composer, editor = front_stages(config)
    judge = make_judge("pixel")

    def one_round(numbers: range) -> dict:
        times, cpu = [time.perf_counter()], [time.process_time()]
        samples = [read_sample(source, config, index, n) for n in numbers]
        times.append(time.perf_counter())
        cpu.append(time.process_time())
        for stage in (grounder, composer, editor):
            stage(samples)
            times.append(time.perf_counter())
            cpu.append(time.process_time())
        judge.score_batch([s.judge_view() for s in samples if not s.failed])
        times.append(time.perf_counter())
        cpu.append(time.process_time())
        n = len(samples)
        names = ("source", "ground", "compose", "edit", "judge")
        return ({f"{name}_ms": (b - a) / n * 1e3 for name, a, b in zip(names, times, times[1:])}
                | {f"{name}_cpu": (b - a) / n * 1e3 for name, a, b in zip(names, cpu, cpu[1:])}
                | {"failed": sum(s.failed for s in samples)})

    one_round(range(min(4, count)))  # warm-up: imports and shape caches
    return one_round(range(count))


def session_rss(sid: int) -> int:
    import psutil

    total = 0
    for proc in psutil.process_iter(["pid"]):
        try:
            if os.getsid(proc.pid) == sid:
                total += proc.memory_info().rss
        except (psutil.Error, ProcessLookupError, PermissionError):
            continue
    return total


def mcie_build(out: Path, build: list[str], workers: int, env: dict) -> dict:
    args = [sys.executable, "-m", "flows.cli", "build", "--out", str(out), *build,
            "--workers", str(workers)]
    started = time.perf_counter()
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, session_rss(proc.pid))
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = proc.communicate()
    stop.set()
    sampler.join()
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"mcie build failed ({proc.returncode}): {stderr[-2000:]}")
    run = THIS_RUN.search(stdout)
    steady = STEADY.search(stdout)
    samples, seconds, pairs = int(run.group(1)), float(run.group(2)), float(run.group(3))
    return {"pairs_per_s": pairs, "steady_pairs_per_s": float(steady.group(1)) if steady else None,
            "processing_s": seconds, "wall_s": wall, "startup_s": wall - seconds,
            "ray_start_s": float(run.group(4)), "peak_rss_mib": peak / 2**20, "samples": samples}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=192, help="samples per throughput run")
    parser.add_argument("--rss-count", type=int, default=64, help="N of the RSS runs (and 10·N)")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--shard-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--photos", action="store_true", help="the real-photo path (see above)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["stages", "bare", "flow", "rss"])
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="mcie-bench-"))
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "RAY_AUTH_MODE": "disabled",
           "PREFECT_HOME": str(work / "prefect"), "TQDM_DISABLE": "1"}
    env.pop("RAY_ADDRESS", None)
    (work / "prefect").mkdir()
    print(f"machine: {os.cpu_count()} cores; load average before: "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"{args.count} {'photo' if args.photos else 'procedural'} samples at {args.resolution} px,"
          f" shard size {args.shard_size}")
    build = build_args(args, args.count, work)
    results = {}
    try:
        if "stages" not in args.skip:
            stages = stage_times(build, min(args.count, 48))
            print("stages, ms per pair    " + ", ".join(
                f"{name[:-3]} {value:.1f}" for name, value in stages.items() if name.endswith("_ms"))
                + f" ({stages['failed']} of the pairs failed a stage)")
            print("  CPU ms per pair      " + ", ".join(
                f"{name[:-4]} {value:.1f}" for name, value in stages.items() if name.endswith("_cpu")))
        if "bare" not in args.skip:
            bare = results["bare"] = bare_loop(build, work / "bare")
            print(f"bare loop (1 process)  {bare['pairs_per_s']:7.2f} pairs/s  (= per core; "
                  f"{bare['samples']} samples in {bare['seconds']:.1f} s after {bare['startup_s']:.1f} s warm-up;"
                  f" {bare['cpu_pairs_per_s']:.2f} pairs per CPU-second)")
        if "flow" not in args.skip:
            for workers in (1, 2):
                run = results[f"flow{workers}"] = mcie_build(work / f"flow{workers}", build, workers, env)
                steady = run["steady_pairs_per_s"]
                print(f"mcie build, {workers} worker{'s' if workers > 1 else ' '} {run['pairs_per_s']:7.2f} pairs/s"
                      f"  steady {steady if steady is None else f'{steady:.2f}'} pairs/s;"
                      f" start-up {run['startup_s']:.1f} s (Ray {run['ray_start_s']:.1f} s), wall {run['wall_s']:.1f} s,"
                      f" peak RSS {run['peak_rss_mib']:.0f} MiB")
        if "rss" not in args.skip:
            for n in (args.rss_count, 10 * args.rss_count):
                run = results[f"rss{n}"] = mcie_build(work / f"rss{n}", build_args(args, n, work), 2, env)
                print(f"peak RSS, {n:5d} samples  {run['peak_rss_mib']:7.0f} MiB (whole build, 2 workers;"
                      f" {run['pairs_per_s']:.2f} pairs/s)")
        print("ratios:")
        if "bare" in results and "flow1" in results:
            f1 = results["flow1"]
            print(f"  flow 1 worker / bare loop   {f1['pairs_per_s'] / results['bare']['pairs_per_s']:.2f}"
                  f" (steady {(f1['steady_pairs_per_s'] or 0) / results['bare']['pairs_per_s']:.2f}; target >= 0.9)")
        if "flow1" in results and "flow2" in results:
            f1, f2 = results["flow1"], results["flow2"]
            print(f"  flow 2 workers / 1 worker   {f2['pairs_per_s'] / f1['pairs_per_s']:.2f}"
                  f" (steady {(f2['steady_pairs_per_s'] or 0) / (f1['steady_pairs_per_s'] or 1):.2f}; target >= 1.8)")
        n = args.rss_count
        if f"rss{n}" in results:
            print(f"  peak RSS 10·N / N           "
                  f"{results[f'rss{10 * n}']['peak_rss_mib'] / results[f'rss{n}']['peak_rss_mib']:.2f} (target <= 1.2)")
    finally:
        print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
