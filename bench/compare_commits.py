"""The CPU path of two commits, measured on this machine in one run (a benchmark that prints figures).

    .venv/bin/python bench/compare_commits.py [--old REV] [--new REV] [--rounds 2] [--count 96] [--clock cpu|wall]

Each commit is checked out into a temporary `git worktree` (the main checkout's state is not
touched; `--new worktree` takes this checkout's files as they are, uncommitted changes included)
and runs its *own* `bench/build.py --skip flow rss` with this interpreter: per-stage ms per pair
(after a warm-up) and the bare loop's pairs/s (`UnitPipeline.run` in one process). With `--clock
cpu` (the default) the bench's clock is swapped for its process's CPU time (`time.process_time`,
all threads): on a shared, loaded machine wall time mostly counts the other processes' turns.
Runs alternate (old, new, old, new, ...) so that a drift of the machine falls on both. Default: the
last commit on or before 2026-11-30 against HEAD.

Prints one JSON line per run, then one per commit with the median of its runs: stage → ms per pair
(`compose_edit` is the sum the older bench measured as one, and ground + compose + edit in a tree
that grounds procedural scenes on their own), `pairs_per_s` of the bare loop, and `cpu_s`: CPU
seconds of the whole bench process (steadier than wall time on a loaded machine). The load average
before and after is printed on stderr: figures are comparable only when it stayed low.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OLD_UNTIL = "2026-11-30"
WORKTREE = "worktree"  # --new worktree: this checkout as it is

STAGES = re.compile(r"^stages, ms per pair\s+(.*?)(?: \(\d+ of the pairs failed a stage\))?$", re.M)
RENAMED = {"pixel_judge": "judge"}  # the older bench's names
BARE = re.compile(r"^bare loop \(1 process\)\s+([\d.]+) pairs/s", re.M)


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True,
                          text=True).stdout.strip()


def resolve(rev: str) -> str:
    return git("rev-parse", "--verify", f"{rev}^{{commit}}")


def parse_stages(text: str) -> dict[str, float]:
    """`source 3.7, compose + edit 14.7, judge 5.7` → {"source": 3.7, "compose_edit": 14.7, ...};
    `compose_edit` is added where the bench printed ground, compose and edit apart."""
    match = STAGES.search(text)
    if not match:
        raise ValueError("no 'stages, ms per pair' line in the bench's output")
    stages = {}
    for part in match.group(1).split(", "):
        name, value = part.rsplit(" ", 1)
        name = name.replace(" + ", "_").replace(" ", "_")
        stages[RENAMED.get(name, name)] = float(value)
    if "compose_edit" not in stages and {"compose", "edit"} <= stages.keys():
        stages["compose_edit"] = stages.get("ground", 0.0) + stages["compose"] + stages["edit"]
    return stages


# Runs a tree's bench/build.py with its clock swapped for this process's CPU time (all threads):
# on a loaded machine wall time counts the other processes' turns, CPU time far less.
CPU_CLOCK = ("import runpy, sys, time; time.perf_counter = time.process_time; "
             "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")


def bench_once(tree: Path, count: int, clock: str) -> dict:
    """One run of `tree`'s bench/build.py (stages and bare loop), its figures and CPU seconds."""
    script = [str(tree / "bench" / "build.py"), "--skip", "flow", "rss", "--count", str(count)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, *(["-c", CPU_CLOCK] if clock == "cpu" else []), *script],
        cwd=tree, env={**os.environ, "PYTHONPATH": str(tree), "TQDM_DISABLE": "1"},
        capture_output=True, text=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"{tree}/bench/build.py failed ({proc.returncode}): {proc.stderr[-2000:]}")
    bare = BARE.search(proc.stdout)
    return {**parse_stages(proc.stdout), "pairs_per_s": float(bare.group(1)) if bare else None,
            "cpu_s": round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 2),
            "wall_s": round(wall, 2)}


def medians(runs: list[dict]) -> dict:
    keys = [k for k in runs[0] if all(r.get(k) is not None for r in runs)]
    return {k: round(statistics.median(r[k] for r in runs), 2) for k in keys}


class OneLineErrors(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def main() -> int:
    parser = OneLineErrors(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old", default=None,
                        help=f"the older commit (default: the last on or before {DEFAULT_OLD_UNTIL})")
    parser.add_argument("--new", default="HEAD", help=f"the newer commit, or '{WORKTREE}'")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each commit, alternating")
    parser.add_argument("--count", type=int, default=96, help="samples of the bare loop")
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                        help="what the benches' ms and pairs/s count: this process's CPU time "
                             "(steady on a shared machine) or wall time")
    args = parser.parse_args()
    try:
        old = resolve(args.old) if args.old else git("log", f"--until={DEFAULT_OLD_UNTIL}", "-1",
                                                     "--format=%H")
        new = WORKTREE if args.new == WORKTREE else resolve(args.new)
    except subprocess.CalledProcessError as exc:
        print(f"compare_commits: error: unknown revision: {exc.stderr.strip()}", file=sys.stderr)
        return 2
    if not old or args.rounds < 1 or args.count < 1:
        print("compare_commits: error: no old commit, or --rounds / --count below 1", file=sys.stderr)
        return 2

    work = Path(tempfile.mkdtemp(prefix="mcie-compare-"))
    trees: dict[str, Path] = {}
    print(f"machine: {os.cpu_count()} cores; load average before: "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}", file=sys.stderr)
    try:
        for name, rev in (("old", old), ("new", new)):
            if rev == WORKTREE:
                trees[name] = ROOT
                continue
            trees[name] = work / name
            git("worktree", "add", "--detach", str(trees[name]), rev)
        runs: dict[str, list[dict]] = {"old": [], "new": []}
        for round_ in range(args.rounds):
            for name in ("old", "new"):
                figures = bench_once(trees[name], args.count, args.clock)
                runs[name].append(figures)
                print(json.dumps({"commit": name, "round": round_, "clock": args.clock, **figures}),
                      flush=True)
        for name, rev in (("old", old), ("new", new)):
            print(json.dumps({"commit": name, "rev": rev[:12], "clock": args.clock, "runs": len(runs[name]),
                              "median": medians(runs[name])}), flush=True)
    finally:
        for name, tree in trees.items():
            if tree != ROOT:
                subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT,
                               capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
        print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
