"""CIE-Bench: a held-apart benchmark of complex-instruction edits, and its `mcie` commands.

`mcie bench build --out BENCH [--count 400] [--resolution 512]` writes the benchmark;
`mcie eval --bench BENCH (--checkpoint CKPT | --predictions DIR) [--judge ...] [--out REPORT]`
scores an editor on it (metrics: `pipeline.ciebench.metrics`; report: `trainer.eval_report`).

Layout (one directory per case; every file written under a temporary name, then renamed):

    BENCH/bench.json                 the index: name, version, count, resolution, namespace seed,
                                     and per case {case_id, num_sub_edits, edit_types}, in order,
                                     plus the histograms of sub-edit counts and edit types
    BENCH/cases/{case_id}/case.json  the case: `EditSample.metadata()` (id = case_id, instruction,
                                     sub-edits with type/text/target/object_ids/params/box) +
                                     "bench": {namespace_seed, index, scene, target_scene}
    BENCH/cases/{case_id}/source.png        the image to edit (uint8 RGB)
    BENCH/cases/{case_id}/target.png        the exact reference target (defect_rate 0)
    BENCH/cases/{case_id}/edit_mask.png     union of the sub-edit regions, L 0/255
    BENCH/cases/{case_id}/mask_{i}.png      region of sub-edit i, L 0/255, in sub-edit order

The pixel members are byte-compatible with a build's sample dirs (`pipeline.dataset.shards`), so
`read_case` is `decode_sample` over them.

**Disjoint from every training build, by construction.**
- Ids: case ids are `cie-NNNN`; build ids are `s{seed}-{16 hex}` (`record.sample_id`).
- Randomness: every random choice of a sample (source scene, composer, editor) comes from
  `default_rng([seed, index, crc32(stage)])` (`stage.sample_rng`). A build's seed and index are
  stored in int64 manifest columns, so both are < 2**63: each is one 32-bit entropy word, or two
  whose second is < 2**31. Benchmark cases use `seed = BENCH_SEED = 2**64 + 2**63 + 0xC1E`, three
  words `[0xC1E, 2**31, 1]`: their entropy is five words long with word 1 equal to 2**31, which no
  build entropy ([s, i, c], [s, i_lo, i_hi, c], [s_lo, s_hi, i, c] or [s_lo, s_hi, i_lo, i_hi, c],
  every high word < 2**31) ever has. Different entropy, different streams: no build draws the
  scenes or instructions of a benchmark case. `tests/test_ciebench.py` checks the ids, the
  entropy words and the source images against builds of many seeds.

**Balanced.** The sub-edit counts 2..8 get count/7 cases each (the first count % 7 counts one
more), made round-robin over the counts. For each case the composer drafts `POOL_SIZE` candidate
cases with exactly n sub-edits (`Composer(n, n)`, which already puts n distinct types in a case);
the candidate whose edit types are rarest so far (least sum of squared type counts once taken) is
rendered and kept, the others are dropped. Scenes favour the edit types that need no existing
object (add, add_text, background); the choice pulls the type counts back together.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from pipeline import __version__
from pipeline.cli_args import positive_int, resolution
from pipeline.compose.procedural import Composer
from pipeline.editors.procedural import ProceduralEditor
from pipeline.record import EDIT_TYPES, MAX_SUB_EDITS, EditSample, check_edit_bounds, dumps
from pipeline.dataset.shards import decode_sample, encode_mask, encode_png, remove_path, temp_path
from pipeline.sources.procedural import ProceduralSource

log = logging.getLogger(__name__)

BENCH_NAME = "CIE-Bench"
BENCH_VERSION = "1"
BENCH_SEED = 2**64 + 2**63 + 0xC1E  # the benchmark's randomness namespace: see the docstring
CASE_PREFIX = "cie-"
MIN_SUB_EDITS = 2
INDEX_STRIDE = 1_000_000  # candidate index = n * INDEX_STRIDE + k: each count has its own stream
POOL_SIZE = 8  # composed candidates the balancing choice picks from, per case
MAX_CANDIDATES_PER_CASE = 200  # a count that cannot be filled in this many tries is an error
BENCH_FILE = "bench.json"
CASES_DIR = "cases"
CASE_JSON = "case.json"


class BenchError(ValueError):
    """A benchmark that cannot be built or read (bad parameters, missing or corrupt files)."""


@dataclass(frozen=True)
class BenchConfig:
    count: int = 400
    resolution: int = 512
    min_sub_edits: int = MIN_SUB_EDITS
    max_sub_edits: int = MAX_SUB_EDITS

    def __post_init__(self) -> None:
        if not isinstance(self.count, int) or self.count < 1:
            raise BenchError(f"count must be a positive integer, got {self.count!r}")
        if not 64 <= self.resolution <= 4096:
            raise BenchError(f"resolution must be within 64..4096 px, got {self.resolution}")
        try:
            check_edit_bounds(self.min_sub_edits, self.max_sub_edits)
        except ValueError as exc:
            raise BenchError(str(exc)) from None

    @property
    def sub_edit_counts(self) -> list[int]:
        return list(range(self.min_sub_edits, self.max_sub_edits + 1))

    def cases_per_count(self) -> dict[int, int]:
        counts = self.sub_edit_counts
        base, extra = divmod(self.count, len(counts))
        return {n: base + (1 if k < extra else 0) for k, n in enumerate(counts)}


def case_id(number: int) -> str:
    return f"{CASE_PREFIX}{number:04d}"


# ---- making cases -----------------------------------------------------------------------------

class CaseMaker:
    """Benchmark cases from the bench namespace: procedural source, composer, exact editor."""

    def __init__(self, resolution: int):
        self.source = ProceduralSource(resolution=resolution)
        self.editor = ProceduralEditor(defect_rate=0.0)
        self.composers: dict[int, Composer] = {}

    def compose(self, num_sub_edits: int, k: int) -> EditSample | None:
        """Candidate k of count n, composed but not edited (composing is cheap, rendering is
        not), or None when its scene cannot host n sub-edits."""
        index = num_sub_edits * INDEX_STRIDE + k
        sample = self.source.make(BENCH_SEED, index)
        composer = self.composers.setdefault(num_sub_edits, Composer(num_sub_edits, num_sub_edits))
        composer([sample])
        if sample.failed or len(sample.sub_edits) != num_sub_edits:
            log.debug("bench candidate %d: %s", index, sample.error)
            return None
        return sample

    def edit(self, sample: EditSample) -> bool:
        """Render the exact reference target; False when the editor refuses the candidate."""
        self.editor([sample])
        if sample.failed:
            log.debug("bench candidate %d: %s", sample.index, sample.error)
            return False
        if sample.defects:
            raise BenchError(f"bench candidate {sample.index}: the reference editor must be exact")
        sample.provenance.update({"bench": BENCH_NAME, "bench_version": BENCH_VERSION})
        return True


def _imbalance(types: list[str], used: Counter[str]) -> int:
    """Sum of squared type counts if this case were taken: smaller = rarer types."""
    after = used + Counter(types)
    return sum(after[t] ** 2 for t in EDIT_TYPES)


def generate_cases(config: BenchConfig) -> Iterator[EditSample]:
    """The benchmark's cases in order (ids assigned), balanced as the module docstring says."""
    maker = CaseMaker(config.resolution)
    used: Counter[str] = Counter()
    wanted = config.cases_per_count()
    next_k = {n: 0 for n in wanted}
    made = {n: 0 for n in wanted}
    number = 0
    # Round-robin over the counts, so the type balance is kept across all of them.
    while any(made[n] < wanted[n] for n in wanted):
        for n in wanted:
            if made[n] >= wanted[n]:
                continue
            # A fresh pool each time: passed-over candidates kept for later would be the
            # unbalancing ones, leaving the choice fewer good options (measured: wider spread).
            pool: list[EditSample] = []
            tries = 0
            chosen = None
            while chosen is None:
                while len(pool) < POOL_SIZE and tries < MAX_CANDIDATES_PER_CASE:
                    candidate = maker.compose(n, next_k[n])
                    next_k[n] += 1
                    tries += 1
                    if candidate is not None:
                        pool.append(candidate)
                if not pool:
                    raise BenchError(f"could not make a case with {n} sub-edits at "
                                     f"{config.resolution} px in {tries} candidates")
                # Stable: among equally balancing candidates the earliest wins (deterministic).
                best = min(pool, key=lambda c: _imbalance([e.type for e in c.sub_edits], used))
                pool.remove(best)
                if maker.edit(best):
                    chosen = best
            used.update(e.type for e in chosen.sub_edits)
            made[n] += 1
            chosen.id = case_id(number)
            number += 1
            yield chosen


# ---- files ------------------------------------------------------------------------------------

def case_members(sample: EditSample) -> dict[str, bytes]:
    meta = sample.metadata()
    # The scene graphs are procedural ground truth (private to the build's record); a benchmark
    # case keeps them, so references and metrics can re-render any sub-edit chain.
    meta["bench"] = {"name": BENCH_NAME, "version": BENCH_VERSION, "namespace_seed": BENCH_SEED,
                     "index": sample.index, "scene": sample.private.get("scene"),
                     "target_scene": sample.private.get("target_scene")}
    members = {
        CASE_JSON: dumps(meta),
        "source.png": encode_png(sample.source),
        "target.png": encode_png(sample.target),
        "edit_mask.png": encode_mask(~sample.background_mask),
    }
    for i, edit in enumerate(sample.sub_edits):
        members[f"mask_{i}.png"] = encode_mask(edit.mask)
    return members


def write_case(bench: Path, sample: EditSample) -> None:
    directory = Path(bench) / CASES_DIR / sample.id
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(directory)
    try:
        tmp.mkdir()
        for name, data in case_members(sample).items():
            (tmp / name).write_bytes(data)
        remove_path(directory)
        os.replace(tmp, directory)
    except BaseException:
        remove_path(tmp)
        raise


def build_bench(out: Path, config: BenchConfig) -> dict[str, Any]:
    """Write the benchmark into `out` (replacing a previous one there); returns the index."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if not (out / BENCH_FILE).exists() and any(out.iterdir()):
        raise BenchError(f"{out} is not empty and holds no benchmark: choose an empty or new directory")
    # Rebuilding a benchmark replaces it: drop the index first, so a killed rebuild leaves no
    # index that names cases which are gone.
    (out / BENCH_FILE).unlink(missing_ok=True)
    if (out / CASES_DIR).exists():
        shutil.rmtree(out / CASES_DIR)
    entries = []
    for sample in generate_cases(config):
        write_case(out, sample)
        entries.append({"case_id": sample.id, "num_sub_edits": len(sample.sub_edits),
                        "edit_types": [e.type for e in sample.sub_edits]})
    index = {
        "name": BENCH_NAME,
        "version": BENCH_VERSION,
        "code_version": __version__,
        "count": config.count,
        "resolution": config.resolution,
        "namespace_seed": BENCH_SEED,
        "sub_edit_counts": dict(sorted(Counter(str(e["num_sub_edits"]) for e in entries).items())),
        "edit_types": dict(sorted(Counter(t for e in entries for t in e["edit_types"]).items())),
        "cases": entries,
    }
    tmp = temp_path(out / BENCH_FILE)
    tmp.write_text(json.dumps(index, indent=1) + "\n")
    os.replace(tmp, out / BENCH_FILE)
    log.info("bench: %d cases in %.1fs", len(entries), time.perf_counter() - started)
    return index


def read_index(bench: Path) -> dict[str, Any]:
    path = Path(bench) / BENCH_FILE
    try:
        index = json.loads(path.read_text())
    except FileNotFoundError:
        raise BenchError(f"{bench} is not a benchmark (no {BENCH_FILE}; run `mcie bench build`)") from None
    except (OSError, ValueError) as exc:
        raise BenchError(f"cannot read {path}: {exc}") from None
    if index.get("name") != BENCH_NAME or not isinstance(index.get("cases"), list):
        raise BenchError(f"{path} is not a {BENCH_NAME} index")
    return index


def read_case(bench: Path, cid: str) -> EditSample:
    directory = Path(bench) / CASES_DIR / cid
    try:
        members = {"json" if p.name == CASE_JSON else p.name: p.read_bytes()
                   for p in sorted(directory.iterdir()) if p.is_file()}
    except OSError as exc:
        raise BenchError(f"cannot read case {cid}: {exc}") from None
    try:
        sample = decode_sample(members)
    except ValueError as exc:
        raise BenchError(f"case {cid} is corrupt: {exc}") from None
    bench_meta = json.loads(members["json"]).get("bench") or {}
    sample.private = {k: bench_meta[k] for k in ("scene", "target_scene") if bench_meta.get(k)}
    if sample.id != cid or sample.source is None or sample.target is None \
            or sample.background_mask is None or any(e.mask is None for e in sample.sub_edits):
        raise BenchError(f"case {cid} is incomplete (images, masks or id)")
    return sample


def case_ids(bench: Path, limit: int | None = None) -> list[str]:
    """The case ids in index order (the first `limit` if given)."""
    ids = [entry["case_id"] for entry in read_index(bench)["cases"]]
    return ids if limit is None else ids[:limit]


def iter_bench(bench: Path, limit: int | None = None) -> Iterator[EditSample]:
    """The cases one at a time (400 cases at 512 px hold ~1 GB of pixels and masks)."""
    for cid in case_ids(bench, limit):
        yield read_case(bench, cid)


def read_bench(bench: Path, limit: int | None = None) -> list[EditSample]:
    """Every case of the benchmark in memory, in index order (the first `limit` if given)."""
    return list(iter_bench(bench, limit))


# ---- the commands -------------------------------------------------------------------------------

def register(subparsers) -> None:
    """`mcie bench build ...` (`mcie eval`, which runs a checkpoint, lives in trainer.evaluate)."""
    bench = subparsers.add_parser("bench", help="the CIE-Bench held-apart benchmark")
    commands = bench.add_subparsers(dest="bench_command", required=True)
    build = commands.add_parser("build", help="write the benchmark (disjoint from every build)")
    build.add_argument("--out", required=True, help="benchmark directory")
    build.add_argument("--count", type=positive_int, default=400, help="number of cases")
    build.add_argument("--resolution", type=resolution, default=512, help="image side in px")
    build.set_defaults(func=run_bench_build)



def _fail(message: str) -> int:
    print(message, file=sys.stderr)
    return 2


def run_bench_build(args: argparse.Namespace) -> int:
    try:
        config = BenchConfig(count=args.count, resolution=args.resolution)
    except BenchError as exc:
        return _fail(f"mcie bench build: error: {exc}")
    try:
        index = build_bench(Path(args.out), config)
    except BenchError as exc:
        return _fail(f"mcie bench build: error: {exc}")
    except OSError as exc:
        return _fail(f"mcie bench build: error: cannot write {args.out}: {exc}")
    print(f"{args.out}: {len(index['cases'])} cases at {config.resolution} px; "
          f"sub-edit counts {index['sub_edit_counts']}; edit types {index['edit_types']}")
    return 0
