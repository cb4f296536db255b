"""How a build's cost grows with its corpus (a benchmark that prints figures).

    .venv/bin/python bench/scale.py [--sizes 10000 100000 1000000] [--workers 1 2]
                                    [--only index|build|all] [--max-seconds 900 [...]]
                                    [--cache tmp/bench-cache/scale]

For each corpus size N, on this machine:

0. corpus: N small images (64-128 px a side, random sizes, blurred random colours, JPEG) as
   webdataset tar shards of `--per-shard` images, `KEY.jpg` + `KEY.json` as img2dataset writes
   them; the same bytes for the same `--seed`. Shards are made once under `--cache` (kept between
   runs) and a corpus of N is a folder of hard links to the first shards, so 10k is a prefix of 1M.
1. listing: `make_source(config).keys()` (every shard's headers) in a fresh process;
2. indexing: the build's key index (list + read + fingerprint every image) with each `--workers`
   count, in a fresh process: `flows.index.index_source` on Ray when it exists, else the
   driver-side `pipeline.dataset.source_index.make_index` with that many threads (the line
   `indexing path:` says which ran). keys/s per worker core = N / seconds / workers; Ray's start
   is timed apart;
   driver peak RSS: that process's own `ru_maxrss` (Ray's workers are not the driver);
3. time to the first finished unit: the real `mcie build` of all N samples (`--source webdataset`,
   and a procedural build of N at 64 px), stopped once `OUT/parts/` holds its first
   `unit-*.parquet`; the CLI's peak RSS until then, sampled every 0.1 s;
4. merge, verify, report of an OUT of N manifest rows: a real procedural build at 64 px of one
   unit (`--shard-size`) per worker (its pairs/s are printed), whose train and negatives tar
   samples are replicated under new unit numbers with new ids and indices (json and checksums
   rewritten, so `verify` passes); then `finalize` (manifest + defect log), `check_build`, and
   `write_report`, each in a fresh process.

Then one line per figure: the log-log slope over the sizes measured (t ∝ N^b; b ≈ 1 is linear)
and the cost per key at the largest and per further key (what start-ups do not blur).
`--max-seconds` bounds each size (one budget, or one per size): a step whose predicted time (from
the smaller sizes, never less than linear) does not fit what is left is not run, and a step that
runs over is stopped; a figure that was not measured is extrapolated only where two measured sizes give a slope,
and marked `~` in the table ("1M: listing measured, indexing extrapolated from slope ..."). A
corpus that cannot be made within the budget is kept as far as it got (the next run goes on).

Targets of issue 27: with 2 workers, index throughput ≥ 1.8× one worker; the driver's peak RSS
flat (≤ 1.2×) from 10k to 100k keys. On a shared machine the load average is printed before and
after: figures taken while other processes run are noisy.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_CACHE = ROOT / "tmp" / "bench-cache" / "scale"  # tmp/ is git-ignored
THIS_RUN = re.compile(r"this run\s+(\d+) samples in ([\d.]+) s = ([\d.]+) pairs/s")
TAR_MTIME = 1_700_000_000  # fixed, so shards are byte-identical across runs


# ---- the synthetic corpus ------------------------------------------------------------------------

def shard_bytes(seed: int, shard: int, per_shard: int) -> bytes:
    """Shard `shard` of the corpus: `per_shard` images, KEY.jpg + KEY.json, deterministic."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng([seed, shard])
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for i in range(per_shard):
            key = f"{shard * per_shard + i:09d}"  # img2dataset's keys: shard and position
            height, width = (int(v) for v in rng.integers(64, 129, 2))
            # a 4x4 colour grid blown up: smooth, small as a JPEG, and no two alike (pHash)
            small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
            image = Image.fromarray(small).resize((width, height), Image.Resampling.BILINEAR)
            jpeg = io.BytesIO()
            image.save(jpeg, "JPEG", quality=85)
            meta = json.dumps({"key": key, "status": "success", "caption": f"synthetic image {key}",
                               "url": f"https://example.invalid/{key}.jpg", "license": "cc0-1.0",
                               "width": width, "height": height}).encode()
            for name, data in ((f"{key}.jpg", jpeg.getvalue()), (f"{key}.json", meta)):
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(data), TAR_MTIME, 0o644
                tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def make_corpus(cache: Path, size: int, seed: int, per_shard: int,
                deadline: float = math.inf) -> tuple[Path, int]:
    """The folder of a corpus of `size` images (hard links into the shard pool under `cache`), and
    how many images it holds: `size`, or fewer when `deadline` (a perf_counter time) came first."""
    pool = cache / f"pool-seed{seed}-per{per_shard}"
    corpus = cache / f"webdataset-{size}-seed{seed}-per{per_shard}"
    pool.mkdir(parents=True, exist_ok=True)
    corpus.mkdir(parents=True, exist_ok=True)
    made = 0
    for shard in range(math.ceil(size / per_shard)):
        count = min(per_shard, size - shard * per_shard)
        name = f"{shard:05d}.tar"
        # a last, partial shard is its own file (the pool holds full shards only)
        source = pool / name if count == per_shard else corpus / f".{name}.partial"
        if not source.is_file():
            if time.perf_counter() > deadline:
                return corpus, made
            tmp = source.with_name(f".{source.name}.{os.getpid()}.tmp")
            tmp.write_bytes(_partial(shard_bytes(seed, shard, per_shard), count, per_shard))
            os.replace(tmp, source)
        target = corpus / name
        if not target.exists():
            os.link(source, target)
        made += count
    return corpus, made


def _partial(data: bytes, count: int, per_shard: int) -> bytes:
    """The shard's first `count` images (the whole shard when count == per_shard)."""
    if count == per_shard:
        return data
    out = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(data)) as src, \
            tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as dst:
        for member in src.getmembers()[: 2 * count]:
            dst.addfile(member, src.extractfile(member))
    return out.getvalue()


# ---- steps run in a fresh process (`--step`), one JSON line back ---------------------------------

def source_config(corpus: Path, resolution: int = 64):
    from pipeline.config import BuildConfig

    return BuildConfig(source="webdataset", source_options={"path": str(corpus)},
                       resolution=resolution)


def step_listing(args: argparse.Namespace) -> dict:
    from pipeline.unit import make_source

    config = source_config(Path(args.corpus))
    make_source(config)  # imports the backend: a constant, not part of listing
    started = time.perf_counter()
    keys = make_source(config).keys()
    return {"seconds": time.perf_counter() - started, "keys": len(keys)}


def workers_of(args: argparse.Namespace) -> int:
    return args.workers[0] if isinstance(args.workers, list) else args.workers


def step_index(args: argparse.Namespace) -> dict:
    config = source_config(Path(args.corpus))
    try:
        from flows.index import index_source  # indexing on Ray workers (issue 27)
    except ImportError:
        index_source = None
    if index_source is None:
        from pipeline.dataset.source_index import make_index
        from pipeline.unit import make_source

        make_source(config)  # imports the backend: a constant, not part of indexing
        started = time.perf_counter()
        index, _ = make_index(make_source(config), threads=workers_of(args))
        return {"seconds": time.perf_counter() - started, "keys": index.size, "ray_s": 0.0,
                "path": f"driver-side make_index, {workers_of(args)} threads (flows/index.py missing)"}
    from flows.ray_runtime import start_ray, stop_ray

    started = time.perf_counter()
    start_ray(None, workers_of(args))
    ray_s = time.perf_counter() - started
    phases: dict[str, float] = {}
    try:
        started = time.perf_counter()
        index, _ = index_source(config, workers_of(args), phases=phases)
        seconds = time.perf_counter() - started
    finally:
        stop_ray()
    return {"seconds": seconds, "keys": index.size, "ray_s": ray_s, **phases,
            "path": f"flows.index.index_source on Ray, {workers_of(args)} workers"}


def step_merge(args: argparse.Namespace) -> dict:
    from pipeline.dataset.output import finalize

    started = time.perf_counter()
    rows = finalize(Path(args.out)).num_rows
    return {"seconds": time.perf_counter() - started, "rows": rows}


def step_verify(args: argparse.Namespace) -> dict:
    from pipeline.dataset.verify import check_build

    started = time.perf_counter()
    report = check_build(Path(args.out))
    return {"seconds": time.perf_counter() - started, "rows": report.samples,
            "problems": len(report.problems), "first_problem": (report.problems or [""])[0][:300]}


def step_report(args: argparse.Namespace) -> dict:
    from pipeline.dataset.report import write_report

    started = time.perf_counter()
    write_report(Path(args.out))
    return {"seconds": time.perf_counter() - started}


STEPS = {"listing": step_listing, "index": step_index, "merge": step_merge,
         "verify": step_verify, "report": step_report}


def run_step(step: str, env: dict, timeout: float, **options) -> dict:
    """Run a step in a fresh process: its JSON (with `rss_mib`, the process's peak RSS), or
    {"stopped": why} when it ran past `timeout` or failed."""
    command = [sys.executable, str(Path(__file__).resolve()), "--step", step]
    for name, value in options.items():
        command += [f"--{name}", str(value)]
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=max(timeout, 0.01))
    except subprocess.TimeoutExpired:
        stop_session(proc)
        return {"stopped": f"stopped after {timeout:.1f} s (budget)"}
    if proc.returncode != 0:
        return {"stopped": f"failed ({proc.returncode}): {stderr.strip().splitlines()[-1:]}"}
    return json.loads(stdout.strip().splitlines()[-1])


def stop_session(proc: subprocess.Popen) -> None:
    """End a child started with start_new_session and everything it started (Ray, Prefect)."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue
    try:  # Ray's daemons may outlive the CLI in its session: end what is left of it
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


# ---- builds through the real CLI ------------------------------------------------------------------

def mcie_build(out: Path, build: list[str], workers: int, env: dict, timeout: float,
               first_unit_only: bool) -> dict:
    """Run `mcie build`; with `first_unit_only`, stop it once OUT/parts/ holds a unit part.
    Returns seconds to the first unit part, the CLI's peak RSS until then, and (for a whole
    build) its pairs/s."""
    import psutil

    command = [sys.executable, "-m", "flows.cli", "build", "--out", str(out), *build,
               "--workers", str(workers)]
    started = time.perf_counter()
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    output: dict[str, str] = {}
    readers = [threading.Thread(target=lambda s=s: output.__setitem__(s, getattr(proc, s).read()),
                                daemon=True) for s in ("stdout", "stderr")]
    for reader in readers:
        reader.start()
    driver, peak, first = psutil.Process(proc.pid), 0, None
    while proc.poll() is None and time.perf_counter() - started < timeout:
        try:
            peak = max(peak, driver.memory_info().rss)
        except psutil.Error:
            pass
        if first is None and any((out / "parts").glob("unit-*.parquet")):
            first = time.perf_counter() - started
            if first_unit_only:
                break
        time.sleep(0.1)
    stopped = proc.poll() is None
    if stopped:
        stop_session(proc)
    for reader in readers:
        reader.join()
    if first is None and any((out / "parts").glob("unit-*.parquet")):
        first = time.perf_counter() - started
    result = {"first_unit_s": first, "driver_rss_mib": peak / 2**20,
              "wall_s": time.perf_counter() - started}
    if first is None:
        why = "ran past the budget" if stopped else f"exited {proc.returncode}"
        result["stopped"] = f"no unit finished ({why}): {output.get('stderr', '').strip()[-300:]}"
    elif not stopped and proc.returncode == 0:
        run = THIS_RUN.search(output.get("stdout", ""))
        if run:
            result["pairs_per_s"] = float(run.group(3))
    elif not first_unit_only:
        result["stopped"] = f"build did not finish ({'budget' if stopped else proc.returncode})"
    return result


# ---- an OUT of N manifest rows from one built unit -----------------------------------------------

def replicate_out(template: Path, out: Path, rows: int, shard_size: int,
                  deadline: float = math.inf) -> int:
    """Write an OUT of `rows` manifest rows (units of `shard_size`) from the template build's tar
    samples: each copy gets a new id and index (json view and record rewritten, checksum
    recomputed), so `verify` checks it as a build. Returns the number of rows written: fewer
    than `rows` when `deadline` (a perf_counter time) came first."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.dataset.output import PARTS, SHARDS, read_manifest
    from pipeline.dataset.shards import checksum, iter_tar_groups, write_tar_members
    from pipeline.record import MANIFEST_SCHEMA, dumps

    by_id = {row["id"]: row for row in read_manifest(template).to_pylist()}
    samples = []  # (row, members) of the template's tar samples
    for tar in sorted((template / SHARDS).glob("*.tar")):
        for key, members in iter_tar_groups(tar):
            samples.append((by_id[key], {k: v for k, v in members.items() if not k.startswith("__")}))
    if not samples:
        raise RuntimeError(f"the template build {template} has no tar samples")
    if out.exists():
        shutil.rmtree(out)
    (out / SHARDS).mkdir(parents=True)
    (out / PARTS).mkdir()
    if (template / "config.json").is_file():  # the report shows the build's settings
        shutil.copy(template / "config.json", out / "config.json")
    for unit in range(math.ceil(rows / shard_size)):
        if time.perf_counter() > deadline:
            return unit * shard_size
        encoded: dict[str, list] = {"train": [], "negatives": []}
        new_rows, defects = [], []
        for j in range(min(shard_size, rows - unit * shard_size)):
            row, members = samples[j % len(samples)]
            index = unit * shard_size + j
            new_id = "s0-" + hashlib.sha256(f"scale:{index}".encode()).hexdigest()[:16]
            view = json.loads(members["json"])
            record = json.loads(view["record"])
            record.update(id=new_id, index=index)
            view.update(id=new_id, index=index, record=dumps(record).decode())
            copy = {**members, "json": dumps(view)}
            kind = row["shard"].split("-", 1)[0]
            shard = f"{kind}-{unit:06d}.tar"
            encoded[kind].append((new_id, copy))
            new_rows.append({**row, "id": new_id, "index": index, "shard": shard,
                             "checksum": checksum(copy)})
            defects.append(dumps({"id": new_id, "index": index, "defects": []}) + b"\n")
        for kind, items in encoded.items():
            if items:
                write_tar_members(out / SHARDS / f"{kind}-{unit:06d}.tar", items)
        (out / PARTS / f"unit-{unit:06d}.defects.jsonl").write_bytes(b"".join(defects))
        pq.write_table(pa.Table.from_pylist(new_rows, schema=MANIFEST_SCHEMA),
                       out / PARTS / f"unit-{unit:06d}.parquet")
    return rows


# ---- figures and slopes -----------------------------------------------------------------------------

class Figures:
    """{figure: {N: (value, how)}}, how = "measured" or "extrapolated"."""

    def __init__(self) -> None:
        self.values: dict[str, dict[int, tuple[float, str]]] = {}
        self.notes: dict[str, dict[int, str]] = {}

    def put(self, name: str, size: int, value: float) -> None:
        self.values.setdefault(name, {})[size] = (value, "measured")

    def note(self, name: str, size: int, text: str) -> None:
        self.notes.setdefault(name, {})[size] = text

    def measured(self, name: str) -> dict[int, float]:
        return {n: v for n, (v, how) in self.values.get(name, {}).items() if how == "measured"}

    def slope(self, name: str) -> tuple[float, float] | None:
        """(exponent b, coefficient a) of the log-log fit value = a·N^b over measured sizes."""
        points = sorted(self.measured(name).items())
        if len(points) < 2 or any(v <= 0 for _, v in points):
            return None
        xs = [math.log(n) for n, _ in points]
        ys = [math.log(v) for _, v in points]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
        return b, math.exp(my - b * mx)

    def predict(self, name: str, size: int) -> float | None:
        """What the measured sizes predict at `size` (the fit; from one point: linear)."""
        fit = self.slope(name)
        if fit is not None:
            return fit[1] * size ** fit[0]
        points = self.measured(name)
        if len(points) == 1:
            (n, v), = points.items()
            return v * size / n
        return None

    def budget_guess(self, name: str, size: int) -> float | None:
        """The time to reserve for a step: the fit, but never less than linear from the largest
        size measured (at small sizes start-ups flatten the fit, which would then promise too
        little)."""
        points = self.measured(name)
        if not points:
            return None
        largest = max(n for n in points if n <= size) if any(n <= size for n in points) else min(points)
        return max(self.predict(name, size), points[largest] * size / largest)

    def extrapolate(self, name: str, size: int) -> bool:
        """Fill a figure that was not measured, only where two measured sizes give a slope."""
        if self.slope(name) is None or size in self.measured(name):
            return False
        self.values.setdefault(name, {})[size] = (self.predict(name, size), "extrapolated")
        return True


def size_line(figures: Figures, size: int, skipped: list[str]) -> str:
    """What was measured at `size`, what is extrapolated (filled in now) and what did not run."""
    measured = [name for name in figures.values if size in figures.measured(name)]
    for name in figures.values:
        figures.extrapolate(name, size)
    filled = [name for name, values in figures.values.items()
              if values.get(size, (0, ""))[1] == "extrapolated"]
    line = f"{size_name(size)}: measured {', '.join(measured) or 'nothing'}"
    if filled:
        line += "; extrapolated from slope: " + ", ".join(
            f"{name} (b = {figures.slope(name)[0]:.2f} over "
            f"{', '.join(size_name(n) for n in sorted(figures.measured(name)))})" for name in filled)
    if skipped:
        line += f"; not run: {'; '.join(skipped)}"
    return line


def size_name(n: int) -> str:
    for unit, div in (("M", 1_000_000), ("k", 1000)):
        if n >= div and n % div == 0:
            return f"{n // div}{unit}"
    return str(n)


def cell(value: tuple[float, str] | None, unit: str) -> str:
    if value is None:
        return "-"
    number, how = value
    text = f"{number:.3g}" if number < 1000 else f"{number:.0f}"
    return ("~" if how == "extrapolated" else "") + text + unit


# ---- the run --------------------------------------------------------------------------------------

def child_env(work: Path) -> dict:
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "RAY_AUTH_MODE": "disabled",
           "PREFECT_HOME": str(work / "prefect"), "TQDM_DISABLE": "1", "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    (work / "prefect").mkdir(exist_ok=True)
    return env


def measure_size(size: int, args: argparse.Namespace, figures: Figures, env: dict, work: Path,
                 template: Path | None, budget: float) -> list[str]:
    """Every step for one corpus size, within `budget` seconds; returns what was not measured."""
    started = time.perf_counter()
    deadline = started + budget
    skipped: list[str] = []

    def left() -> float:
        return deadline - time.perf_counter()

    def fits(name: str) -> bool:
        guess = figures.budget_guess(name, size)
        if guess is not None and guess > left():
            skipped.append(f"{name} (predicted {guess:.0f} s, {max(left(), 0):.0f} s left)")
            return False
        if left() <= 0:
            skipped.append(f"{name} (budget used)")
            return False
        return True

    def record(name: str, result: dict, key: str = "seconds") -> bool:
        if "stopped" in result:
            skipped.append(f"{name} ({result['stopped']})")
            return False
        figures.put(name, size, result[key])
        return True

    corpus, made = make_corpus(Path(args.cache), size, args.seed, args.per_shard, deadline)
    if made < size:
        skipped.append(f"corpus (made {made} of {size} images in the budget; kept for the next run)")
        corpus = None
    if corpus is not None and args.only in ("index", "all"):
        if fits("listing_s"):
            result = run_step("listing", env, left(), corpus=corpus)
            if record("listing_s", result):
                figures.put("listing_rss_mib", size, result["rss_mib"])
        for workers in args.workers:
            name = f"index_s[{workers}]"
            if fits(name):
                result = run_step("index", env, left(), corpus=corpus, workers=workers)
                if record(name, result):
                    figures.put(f"index_rss_mib[{workers}]", size, result["rss_mib"])
                    figures.put(f"index_keys_per_s_core[{workers}]", size,
                                size / result["seconds"] / workers)
                    for phase in ("list_s", "fingerprint_s", "decide_s"):  # where it went
                        if phase in result:
                            figures.put(f"index_{phase}[{workers}]", size, result[phase])
                    figures.note("path", workers, result["path"])
                    figures.note("ray_s", size, f"{result['ray_s']:.1f}")  # the last count's
    if args.only in ("build", "all"):
        workers = max(args.workers)
        common = ["--resolution", "64", "--shard-size", str(args.shard_size), "--seed", str(args.seed)]
        builds = [("first_unit_proc_s", ["--count", str(size)])]
        if corpus is not None:
            builds.insert(0, ("first_unit_wds_s", ["--source", "webdataset", "--source-path", str(corpus)]))
        for name, extra in builds:
            if fits(name):
                out = work / f"first-{name}-{size}"
                result = mcie_build(out, extra + common, workers, env, left(), first_unit_only=True)
                if record(name, result, "first_unit_s"):
                    figures.put(name.replace("first_unit", "driver_rss").replace("_s", "_mib"),
                                size, result["driver_rss_mib"])
                shutil.rmtree(out, ignore_errors=True)
        if template is not None:
            out = work / f"out-{size}"
            if fits("replicate_s"):
                made = time.perf_counter()
                rows = replicate_out(template, out, size, args.shard_size, deadline)
                if rows < size:
                    skipped.append(f"replicate_s (made {rows} of {size} rows in the budget), so "
                                   "merge_s, verify_s, report_s")
                else:
                    figures.put("replicate_s", size, time.perf_counter() - made)
                for step in ("merge", "verify", "report"):
                    name = f"{step}_s"
                    if rows < size or not fits(name):
                        continue
                    result = run_step(step, env, left(), out=out)
                    if result.get("problems"):
                        result = {"stopped": f"verify found {result['problems']} problems: {result['first_problem']}"}
                    if record(name, result):
                        figures.put(f"{step}_rss_mib", size, result["rss_mib"])
            shutil.rmtree(out, ignore_errors=True)
    return skipped


def make_template(args: argparse.Namespace, env: dict, work: Path) -> tuple[Path | None, dict]:
    """A real procedural build at 64 px, one unit per worker (so its pairs/s use them all): the
    samples the big OUTs are made of."""
    out = work / "template"
    build = ["--count", str(args.shard_size * max(args.workers)), "--resolution", "64", "--shard-size",
             str(args.shard_size), "--seed", str(args.seed)]
    result = mcie_build(out, build, max(args.workers), env, max(args.max_seconds),
                        first_unit_only=False)
    return (None if "stopped" in result else out), result


def print_table(figures: Figures, sizes: list[int], workers: list[int]) -> None:
    rows = [("listing", "listing_s", " s"), ("  driver peak RSS", "listing_rss_mib", " MiB")]
    for w in workers:
        rows += [(f"indexing, {w} worker{'s' if w > 1 else ''}", f"index_s[{w}]", " s"),
                 ("  keys/s per worker core", f"index_keys_per_s_core[{w}]", ""),
                 ("  listing keys (driver)", f"index_list_s[{w}]", " s"),
                 ("  fingerprinting (workers)", f"index_fingerprint_s[{w}]", " s"),
                 ("  duplicates decided (driver)", f"index_decide_s[{w}]", " s"),
                 ("  driver peak RSS", f"index_rss_mib[{w}]", " MiB")]
    rows += [("first unit, webdataset build", "first_unit_wds_s", " s"),
             ("  CLI peak RSS until then", "driver_rss_wds_mib", " MiB"),
             ("first unit, procedural build", "first_unit_proc_s", " s"),
             ("  CLI peak RSS until then", "driver_rss_proc_mib", " MiB"),
             ("OUT of N rows made (bench set-up)", "replicate_s", " s"),
             ("manifest merge (finalize)", "merge_s", " s"),
             ("verify", "verify_s", " s"),
             ("report", "report_s", " s")]
    print(f"{'N':<34}" + "".join(f"{size_name(n):>12}" for n in sizes))
    for label, name, unit in rows:
        if name not in figures.values:
            continue
        print(f"{label:<34}" + "".join(f"{cell(figures.values[name].get(n), unit):>12}" for n in sizes))


def print_slopes(figures: Figures) -> None:
    print("slopes (log-log fit over the measured sizes: t ∝ N^b; cost per key at the largest):")
    for name in figures.values:
        measured = figures.measured(name)
        fit = figures.slope(name)
        if not measured:
            continue
        largest = max(measured)
        sizes = ", ".join(size_name(n) for n in sorted(measured))
        if fit is None:
            print(f"  {name:<28} no slope (measured at {sizes} only)")
            continue
        line = f"  {name:<28} b = {fit[0]:.2f} over {sizes}"
        kind = name.split("[")[0]
        if kind.endswith("_s"):  # the marginal cost leaves out what every size pays (start-ups)
            smallest = min(measured)
            marginal = (measured[largest] - measured[smallest]) / (largest - smallest) * 1e6
            line += (f"; {measured[largest] / largest * 1e6:.3g} µs/key at {size_name(largest)}, "
                     f"{marginal:.3g} µs per further key")
        elif kind.endswith("_mib"):  # memory: what each further key adds
            smallest = min(measured)
            extra = (measured[largest] - measured[smallest]) / (largest - smallest) * 1024
            line += f"; {extra:.3g} KiB per further key ({size_name(smallest)} to {size_name(largest)})"
        print(line)


def print_targets(figures: Figures, sizes: list[int], workers: list[int]) -> None:
    print("targets (issue 27):")
    if 1 in workers and 2 in workers:
        one, two = figures.measured("index_s[1]"), figures.measured("index_s[2]")
        both = sorted(set(one) & set(two))
        for n in both:
            ratio = one[n] / two[n]
            print(f"  index throughput 2 workers / 1 worker at {size_name(n)}: {ratio:.2f}"
                  f" (target >= 1.8: {'PASS' if ratio >= 1.8 else 'FAIL'})")
            # the part the workers do: the driver's listing and decision do not divide by workers
            part = [figures.measured(f"index_fingerprint_s[{w}]").get(n) for w in (1, 2)]
            if None not in part:
                print(f"    of which the workers' fingerprinting: {part[0] / part[1]:.2f}"
                      f" ({part[0]:.1f} s -> {part[1]:.1f} s)")
        if not both:
            print("  index throughput 2 workers / 1 worker: not measured at a common size")
    else:
        print("  index throughput 2 workers / 1 worker: needs --workers 1 2")
    w = max(workers)
    for name, what in ((f"index_rss_mib[{w}]", f"indexing, {w} workers"),
                       ("driver_rss_wds_mib", "webdataset build until its first unit")):
        rss = figures.measured(name)
        low, high = (10_000, 100_000) if {10_000, 100_000} <= set(rss) else (
            (min(rss), max(rss)) if len(rss) >= 2 else (None, None))
        if low is None:
            print(f"  driver peak RSS ({what}): needs two measured sizes")
            continue
        ratio = rss[high] / rss[low]
        print(f"  driver peak RSS ({what}) {size_name(high)} / {size_name(low)}: {ratio:.2f}"
              f" (target <= 1.2: {'PASS' if ratio <= 1.2 else 'FAIL'})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000],
                        help="corpus sizes N (images)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2],
                        help="worker counts of the indexing runs (the builds use the largest)")
    parser.add_argument("--only", choices=["index", "build", "all"], default="all",
                        help="index: corpus, listing and indexing; build: builds, merge, verify, report")
    parser.add_argument("--max-seconds", type=float, nargs="+", default=[900.0],
                        help="budget of each size: one for all, or one per size (in --sizes order)")
    parser.add_argument("--cache", default=str(DEFAULT_CACHE), help="where corpora are kept")
    parser.add_argument("--seed", type=int, default=0, help="of the corpus and the builds")
    parser.add_argument("--per-shard", type=int, default=1000, help="images per corpus shard")
    parser.add_argument("--shard-size", type=int, default=256, help="the builds' work-unit size")
    parser.add_argument("--step", choices=sorted(STEPS), help=argparse.SUPPRESS)
    parser.add_argument("--corpus", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.step:  # a child: one step, one JSON line
        result = STEPS[args.step](args)
        result["rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(result))
        return 0
    if min(args.sizes) < 1 or min(args.workers) < 1 or args.per_shard < 1 or args.shard_size < 1:
        parser.error("sizes, workers, --per-shard and --shard-size must be positive")
    if len(args.max_seconds) not in (1, len(args.sizes)):
        parser.error("--max-seconds takes one budget, or one per size")
    budgets = dict(zip(args.sizes, args.max_seconds * len(args.sizes) if len(args.max_seconds) == 1
                       else args.max_seconds))
    sizes = sorted(set(args.sizes))
    workers = sorted(set(args.workers))
    args.workers = workers

    print(f"machine: {os.cpu_count()} cores; load average before: "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"sizes {', '.join(size_name(n) for n in sizes)}; workers {workers}; budget "
          f"{', '.join(f'{budgets[n]:g}' for n in sizes)} s; corpus shards of {args.per_shard} "
          f"under {args.cache}")
    work = Path(tempfile.mkdtemp(prefix="mcie-scale-"))
    figures = Figures()
    try:
        env = child_env(work)
        template = None
        if args.only in ("build", "all"):
            template, built = make_template(args, env, work)
            if template is None:
                print(f"template build failed: {built.get('stopped')}")
            else:
                pairs = built.get("pairs_per_s", math.nan)
                print(f"template: procedural build of {args.shard_size * max(workers)} samples "
                      f"(units of {args.shard_size}) at 64 px, {max(workers)} workers: {pairs:.2f} "
                      f"pairs/s; a whole build of {size_name(max(sizes))} at that rate: "
                      f"{max(sizes) / pairs / 3600:.1f} h")
        for size in sizes:
            skipped = measure_size(size, args, figures, env, work, template, budgets[size])
            print(size_line(figures, size, skipped), flush=True)
        for path in sorted(set(figures.notes.get("path", {}).values())):
            print(f"indexing path: {path}")
        if "ray_s" in figures.notes:
            print("Ray start-up (not in the indexing figures): " + ", ".join(
                f"{size_name(n)} {s} s" for n, s in figures.notes["ray_s"].items()))
        print_table(figures, sizes, workers)
        print_slopes(figures)
        print_targets(figures, sizes, workers)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
