"""Judge quality, measured: verdicts on fault-injected pairs against the editor's hidden defect log.

`judge_bench` runs the real stages in-process (ProceduralSource -> Composer ->
ProceduralEditor(defect_rate) -> JudgeStage -> RouteStage) and compares each verdict with
`sample.defects`, which only this benchmark (never the judge) reads:

- defect_recall:      share of defective pairs NOT accepted (rejected or sent to a person);
- false_reject_rate:  share of clean pairs rejected;
- false_borderline_rate / borderline_rate: share of clean / all pairs sent to a person;
- the same per defect type and per edit type (the type of the spoiled sub-edit for sub-edit
  defects; every type of the sample for clean pairs and background defects);
- the judge's time per pair.
"""

from __future__ import annotations

import argparse
import json
import sys
import logging
import time
from collections import defaultdict
from typing import Any

from pipeline.cli_args import add_judge_arguments, judge_options, non_negative_int, positive_int, rate, resolution
from pipeline.compose.procedural import Composer
from pipeline.editors.procedural import ProceduralEditor
from pipeline.judges.base import JudgeStage, make_judge
from pipeline.record import EditSample
from pipeline.routing import RouteStage, RoutingPolicy
from pipeline.sources.procedural import ProceduralSource

log = logging.getLogger(__name__)

BATCH = 16


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


def _make_samples(source: ProceduralSource, seed: int, start: int, stop: int) -> list[EditSample]:
    return [source.make(seed, index) for index in range(start, stop)]


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
    count: int,
    defect_rate: float,
    seed: int = 0,
    judge: str = "pixel",
    resolution: int = 512,
    policy: RoutingPolicy | None = None,
    judge_options: dict[str, Any] | None = None,
    keep_misses: int = 10,
) -> dict[str, Any]:
    """Build `count` fault-injected pairs, judge and route them, and score the verdicts against
    the hidden defect log. `keep_misses` accepted defective / rejected clean pairs are listed
    (id, types, scores) so a miss can be looked at."""
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    if not 0.0 <= defect_rate <= 1.0:
        raise ValueError(f"defect rate must be within 0..1, got {defect_rate}")
    source = ProceduralSource(resolution=resolution)
    composer = Composer()
    editor = ProceduralEditor(defect_rate=defect_rate)
    judge_impl = make_judge(judge, **(judge_options or {}))
    policy = policy or RoutingPolicy.for_judge(judge_impl)
    judging = JudgeStage(judge_impl)
    routing = RouteStage(policy)

    score = VerdictScore(keep_misses)
    judge_seconds = 0.0
    judged = 0
    for start in range(0, count, BATCH):
        batch = _make_samples(source, seed, start, min(count, start + BATCH))
        batch = editor(composer(batch))
        ready = [s for s in batch if not s.failed]
        t0 = time.perf_counter()
        judging(ready)
        judge_seconds += time.perf_counter() - t0
        judged += len(ready)
        routing(ready)
        score.add(batch)

    figures = score.report()
    misses = figures.pop("misses")
    return {
        "judge": judge,
        "count": count,
        "seed": seed,
        "resolution": resolution,
        "defect_rate": defect_rate,
        "policy": policy.to_dict(),
        **figures,
        "judge_ms_per_pair": None if judged == 0 else round(1000 * judge_seconds / judged, 2),
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
        description="Build fault-injected pairs in-process, judge and route them, and compare the "
                    "verdicts with the editor's hidden defect log. Prints JSON.",
    )
    parser.add_argument("--count", type=positive_int, required=True, help="pairs to build")
    parser.add_argument("--defect-rate", type=rate, required=True, help="share of spoiled pairs")
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument("--resolution", type=resolution, default=512)
    add_judge_arguments(parser)
    parser.set_defaults(func=_run)
    return parser


def _run(args: argparse.Namespace) -> int:
    try:
        report = judge_bench(args.count, args.defect_rate, seed=args.seed, judge=args.judge,
                             resolution=args.resolution, judge_options=judge_options(args))
    except ValueError as exc:  # an unknown judge, bad judge options
        print(f"judge-bench: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2, sort_keys=True))
    return 0
