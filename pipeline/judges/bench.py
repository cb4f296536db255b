"""Judge quality, measured: verdicts on fault-injected pairs against the editor's hidden defect log.

`judge_bench` makes its pairs with the build's own front half, from a `BuildConfig` made of its
arguments (`pipeline.unit.make_source` -> `source_index.make_index` -> `read_sample` ->
`front_stages`: grounder, composer, editor with the build's defect rate), one work unit at a time
as a build does, then judges and routes them (JudgeStage -> RouteStage) and compares each verdict
with `sample.defects`, which only this benchmark (never the judge) reads:

- defect_recall:      share of defective pairs NOT accepted (rejected or sent to a person);
- false_reject_rate:  share of clean pairs rejected;
- false_borderline_rate / borderline_rate: share of clean / all pairs sent to a person;
- the same per defect type and per edit type (the type of the spoiled sub-edit for sub-edit
  defects; every type of the sample for clean pairs and background defects);
- time per pair of each stage (read, ground, compose, edit, judge, route).

Procedural scenes are the default (`--count` needed); `--source folder --source-path DIR` measures
the judge on photos (every image × `--edits-per-image` unless `--count` says fewer).

`--real DIR` measures it on real pairs instead (`pipeline.judges.realbench`): the generic edit
datasets under DIR and realistic variants of exact pairs, per class, in a table.
"""

from __future__ import annotations

import argparse
import json
import sys
import logging
import time
from collections import defaultdict
from typing import Any

from pipeline.cli_args import (add_judge_arguments, add_seat_arguments, judge_options,
                               non_negative_int, positive_int, rate, resolution, seat_fields)
from pipeline.config import BuildConfig
from pipeline.dataset.source_index import make_index
from pipeline.judges.base import JudgeStage, make_judge
from pipeline.record import EditSample
from pipeline.routing import RouteStage, RoutingPolicy
from pipeline.unit import front_stages, make_source, read_sample

log = logging.getLogger(__name__)

BATCH = 64  # pairs per work unit, as a build's default shard size (a composer may lend
# donors within one)


class _Tally:
    """Verdict counts of one group of pairs (clean or defective)."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = defaultdict(int)

    def add(self, verdict: str) -> None:
        self.counts[verdict] += 1

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def share(self, *verdicts: str) -> float | None:
        return None if self.total == 0 else round(sum(self.counts[v] for v in verdicts) / self.total, 4)

    def summary(self, defective: bool) -> dict[str, Any]:
        out: dict[str, Any] = {"count": self.total, "verdicts": dict(sorted(self.counts.items()))}
        if defective:
            out["recall"] = None if self.total == 0 else round(1 - self.counts["accept"] / self.total, 4)
        else:
            out["false_reject_rate"] = self.share("reject")
            out["false_borderline_rate"] = self.share("borderline")
        return out


class VerdictScore:
    """Verdicts of judged and routed samples against their hidden defect logs, for any source and
    editor: `add(samples)` as they come, `report()` for the figures."""

    def __init__(self, keep_misses: int = 10):
        self.keep_misses = keep_misses
        self.clean, self.defective = _Tally(), _Tally()
        self.by_defect: dict[str, _Tally] = defaultdict(_Tally)
        self.by_edit_clean: dict[str, _Tally] = defaultdict(_Tally)
        self.by_edit_defective: dict[str, _Tally] = defaultdict(_Tally)
        self.errors: dict[str, int] = defaultdict(int)
        self.misses: list[dict[str, Any]] = []

    def add(self, samples: list[EditSample]) -> None:
        for sample in samples:
            if sample.verdict in ("error", "judge_error") or sample.verdict is None:
                self.errors[f"{sample.error_stage or 'unknown'}"] += 1
                continue
            types = [e.type for e in sample.sub_edits]
            if not sample.defects:
                self.clean.add(sample.verdict)
                for t in set(types):
                    self.by_edit_clean[t].add(sample.verdict)
                if sample.verdict == "reject" and len(self.misses) < self.keep_misses:
                    self.misses.append(_miss(sample, "clean rejected"))
                continue
            self.defective.add(sample.verdict)
            for defect in sample.defects:
                self.by_defect[defect["type"]].add(sample.verdict)
                i = defect.get("sub_edit")
                for t in ({types[i]} if i is not None else set(types)):
                    self.by_edit_defective[t].add(sample.verdict)
            if sample.verdict == "accept" and len(self.misses) < self.keep_misses:
                self.misses.append(_miss(sample, "defect accepted"))

    def report(self) -> dict[str, Any]:
        clean, defective = self.clean, self.defective
        total = clean.total + defective.total
        borderline = clean.counts["borderline"] + defective.counts["borderline"]
        return {
            "scored": total,
            "errors": dict(self.errors),
            "clean": clean.total,
            "defective": defective.total,
            "defect_recall": None if defective.total == 0 else round(1 - defective.counts["accept"] / defective.total, 4),
            "false_reject_rate": clean.share("reject"),
            "false_borderline_rate": clean.share("borderline"),
            "borderline_rate": None if total == 0 else round(borderline / total, 4),
            "verdicts": {
                "clean": dict(sorted(clean.counts.items())),
                "defective": dict(sorted(defective.counts.items())),
            },
            "per_defect_type": {k: v.summary(True) for k, v in sorted(self.by_defect.items())},
            "per_edit_type": {
                t: {"clean": self.by_edit_clean[t].summary(False),
                    "defective": self.by_edit_defective[t].summary(True)}
                for t in sorted(set(self.by_edit_clean) | set(self.by_edit_defective))
            },
            "misses": self.misses,
        }


def judge_bench(
    count: int | None,
    defect_rate: float,
    seed: int = 0,
    judge: str = "pixel",
    resolution: int = 512,
    policy: RoutingPolicy | None = None,
    judge_options: dict[str, Any] | None = None,
    keep_misses: int = 10,
    *,
    source: str = "procedural",
    source_options: dict[str, Any] | None = None,
    grounder: str = "",
    grounder_options: dict[str, Any] | None = None,
    editor: str = "",
    editor_options: dict[str, Any] | None = None,
    edits_per_image: int = 1,
    shard_size: int = BATCH,
) -> dict[str, Any]:
    """Build `count` fault-injected pairs (None: every image of a file source × `edits_per_image`)
    through the build's front half, judge and route them, and score the verdicts against the
    hidden defect log. `keep_misses` accepted defective / rejected clean pairs are listed (id,
    types, scores) so a miss can be looked at. A bad argument raises ValueError (ConfigError)."""
    config = BuildConfig(
        count=count, seed=seed, resolution=resolution, shard_size=shard_size,
        defect_rate=defect_rate, judge=judge, judge_options=dict(judge_options or {}),
        source=source, source_options=dict(source_options or {}), grounder=grounder,
        grounder_options=dict(grounder_options or {}), editor=editor,
        editor_options=dict(editor_options or {}), edits_per_image=edits_per_image,
    )
    judge_impl = make_judge(judge, **config.judge_options)
    policy = policy or RoutingPolicy.for_judge(judge_impl)
    reader = make_source(config)
    index, _ = make_index(reader)
    total = config.total_samples(index.size)
    stages = [*zip(("ground", "compose", "edit"), front_stages(config)),
              ("judge", JudgeStage(judge_impl)), ("route", RouteStage(policy))]

    score = VerdictScore(keep_misses)
    seconds: dict[str, float] = defaultdict(float)
    for unit in range(config.num_units(total)):
        t0 = time.perf_counter()
        batch = [read_sample(reader, config, index, n) for n in config.unit_indices(unit, total)]
        seconds["read"] += time.perf_counter() - t0
        for name, stage in stages:
            t0 = time.perf_counter()
            batch = stage(batch)
            seconds[name] += time.perf_counter() - t0
        score.add(batch)

    figures = score.report()
    misses = figures.pop("misses")
    judged = figures["scored"]
    per_pair = {name: round(1000 * seconds[name] / judged, 2) if judged else None
                for name in ("read", "ground", "compose", "edit", "judge", "route")}
    per_pair["total"] = round(1000 * sum(seconds.values()) / judged, 2) if judged else None
    return {
        "judge": judge,
        "count": total,
        "seed": seed,
        "resolution": resolution,
        "defect_rate": defect_rate,
        "source": config.source,
        "grounder": config.grounder,
        "composer": config.composer,
        "editor": config.editor,
        "edits_per_image": config.edits_per_image,
        "policy": policy.to_dict(),
        **figures,
        "judge_ms_per_pair": per_pair["judge"],
        "ms_per_pair": per_pair,
        "misses": misses,
    }


def _miss(sample: EditSample, what: str) -> dict[str, Any]:
    return {
        "what": what,
        "index": sample.index,
        "id": sample.id,
        "types": [e.type for e in sample.sub_edits],
        "defects": sample.defects,
        "sub_edits": sample.scores.get("sub_edits"),
        "background": sample.scores.get("background"),
        "quality": sample.scores.get("quality"),
        "reasons": sample.scores.get("sub_edit_reasons"),
    }


# ---- CLI ----------------------------------------------------------------------------------------

def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "judge-bench",
        help="measure a judge on fault-injected pairs (recall, false rejects, borderline rate)",
        description="Build fault-injected pairs in-process with the build's own source, grounder, "
                    "composer and editor, judge and route them, and compare the verdicts with "
                    "the editor's hidden defect log. Prints JSON. Examples: mcie judge-bench "
                    "--count 500 --defect-rate 0.25 (procedural scenes); mcie judge-bench "
                    "--source folder --source-path PHOTOS --edits-per-image 4 --defect-rate 0.25. "
                    "With --real DIR: real pairs instead (the generic jsonl datasets under DIR, "
                    "plus re-encoded, resampled, colour-shifted and background-changed variants "
                    "of exact photo pairs), a table of verdicts per class",
    )
    parser.add_argument("--count", type=positive_int, default=None,
                        help="pairs to build (needed for procedural; default: every image of the "
                             "source × --edits-per-image)")
    parser.add_argument("--defect-rate", type=rate, default=None,
                        help="share of spoiled pairs (needed unless --real)")
    parser.add_argument("--real", metavar="DIR", default=None,
                        help="judge real pairs: every generic .jsonl edit dataset under DIR (or "
                             "'-' for none), plus realistic variants of exact pairs")
    parser.add_argument("--no-variants", action="store_true",
                        help="with --real: leave out the variants of exact pairs (made by --editor, "
                             "default photo, on scikit-image's photographs)")
    parser.add_argument("--json", action="store_true", help="with --real: JSON instead of the table")
    parser.add_argument("--seed", type=non_negative_int, default=0,
                        help="seed of the scenes and edits the judge is measured on")
    parser.add_argument("--resolution", type=resolution, default=512,
                        help="short image side in px")
    add_seat_arguments(parser)
    add_judge_arguments(parser)
    parser.set_defaults(func=_run)
    return parser


def _run(args: argparse.Namespace) -> int:
    if args.real is not None:
        return _run_real(args)
    if args.defect_rate is None:
        print("mcie judge-bench: error: --defect-rate is required (or --real DIR)", file=sys.stderr)
        return 2
    try:
        report = judge_bench(
            args.count, args.defect_rate, seed=args.seed, judge=args.judge,
            resolution=args.resolution, judge_options=judge_options(args), **seat_fields(args))
    except (ValueError, TypeError, OSError) as exc:  # unknown backend, bad options, missing path
        message = " ".join(str(exc).split())
        print(f"mcie judge-bench: error: {message}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2, sort_keys=True))
    return 0


def _run_real(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pipeline.judges.realbench import real_bench, table

    real = None if args.real == "-" else Path(args.real)
    try:
        if real is not None and not real.exists():
            raise ValueError(f"--real path does not exist: {real}")
        if real is None and args.no_variants:
            raise ValueError("--real - with --no-variants leaves nothing to judge")
        report = real_bench(real, judge=args.judge, judge_options=judge_options(args),
                            resolution=args.resolution, seed=args.seed, perturb=not args.no_variants,
                            editor=args.editor or "photo", editor_options=dict(args.editor_option))
    except (ValueError, TypeError, OSError) as exc:
        print(f"mcie judge-bench: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2, sort_keys=True) if args.json else table(report))
    return 0
