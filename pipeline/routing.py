"""Routing: turn a judge's scores into a verdict (accept / borderline / reject).

The policy is three pairs of thresholds over the judge's scores (see `pipeline.judges.base`):

- a sub-edit counts as carried out when its score is >= `sub_edit_pass`; a score of None
  ("unknown": the judge could not verify it) never counts as carried out, so such a pair is at
  best borderline (a person decides), never accepted unchecked;
- reject when the background score is < `background_reject`, or the overall score is
  < `overall_reject`;
- accept when every sub-edit passed, the background score is >= `background_accept` and the
  overall score is >= `overall_accept`;
- anything else is borderline (a person decides).

Reject is checked first, so a sample is never both. A judge that measured nothing and defers to
the dataset's own curation (judge `none`: scores with `verdict_by = "dataset"`) gives the verdict
itself; routing records it as the dataset's. With accept == reject thresholds there is no
borderline band on that score.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from pipeline.record import EditSample
from pipeline.stage import RecordStage

ROUTES = ("accept", "borderline", "reject")


@dataclass(frozen=True)
class RoutingPolicy:
    sub_edit_pass: float = 0.92
    background_accept: float = 0.9
    background_reject: float = 0.5
    overall_accept: float = 0.92
    overall_reject: float = 0.7

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
                raise ValueError(f"routing threshold {f.name} must be a number, got {value!r}")
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"routing threshold {f.name} must be within 0..1, got {value}")
        for score in ("background", "overall"):
            accept, reject = getattr(self, f"{score}_accept"), getattr(self, f"{score}_reject")
            if accept < reject:
                raise ValueError(
                    f"{score}_accept ({accept}) is below {score}_reject ({reject}): a score "
                    f"between them would be both accepted and rejected; need accept >= reject")

    @classmethod
    def for_judge(cls, judge: Any, overrides: dict[str, float] | None = None) -> "RoutingPolicy":
        """The judge's own calibrated thresholds (a judge may declare `routing_defaults`: an
        MLLM's 0-10 scores sit on another scale than the pixel judge's), then `overrides`."""
        return cls(**{**getattr(judge, "routing_defaults", {}), **(overrides or {})})

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    def sub_edit_pass_flags(self, scores: dict[str, Any]) -> list[bool]:
        return [s is not None and float(s) >= self.sub_edit_pass for s in scores.get("sub_edits", [])]

    def route(self, scores: dict[str, Any]) -> str:
        """"accept", "borderline" or "reject" for one sample's judge scores."""
        if "overall" not in scores or "sub_edits" not in scores:
            raise ValueError(f"scores lack 'overall' or 'sub_edits': got keys {sorted(scores)}")
        overall = float(scores["overall"])
        background = scores.get("background")
        background = 1.0 if background is None else float(background)
        if math.isnan(overall) or math.isnan(background):
            raise ValueError("scores hold NaN")
        if background < self.background_reject or overall < self.overall_reject:
            return "reject"
        passed = self.sub_edit_pass_flags(scores)
        if (passed and all(passed) and background >= self.background_accept
                and overall >= self.overall_accept):
            return "accept"
        return "borderline"


class RouteStage(RecordStage):
    """Writes `scores["sub_edit_pass"]`, `verdict` and `verdict_by = "judge"` from the scores.

    Samples the judge could not score (verdict `judge_error`, which also sets `error`) and failed
    samples are skipped by `RecordStage` and keep their verdict."""

    name = "route"

    def __init__(self, policy: RoutingPolicy | None = None):
        self.policy = policy or RoutingPolicy()

    def process(self, sample: EditSample) -> None:
        if sample.verdict == "judge_error":  # belt and braces: it is kept for a re-judge
            return
        if not sample.scores:
            raise ValueError("no judge scores to route (run the judge stage first)")
        if sample.scores.get("verdict_by") == "dataset":  # judge "none": nothing measured, the
            # dataset's curation decides (its scores are all unknown)
            sample.scores["sub_edit_pass"] = [True] * len(sample.scores.get("sub_edits", []))
            if sample.scores.get("verdict") not in ROUTES:
                raise ValueError(f"the dataset's verdict {sample.scores.get('verdict')!r} is not a route")
            sample.verdict, sample.verdict_by = sample.scores["verdict"], "dataset"
            return
        verdict = self.policy.route(sample.scores)
        sample.scores["sub_edit_pass"] = self.policy.sub_edit_pass_flags(sample.scores)
        sample.verdict = verdict
        sample.verdict_by = "judge"
