"""Judge `none`: no judging — the verdict is the dataset's own curation.

For importing an edit dataset whose pairs were already curated (MagicBrush's human annotators,
a dataset's own filters). Nothing is measured, so nothing is made up: every score is None
(unknown) and the scores carry `verdict: "accept"` and `verdict_by: "dataset"`, which routing
honours as given (`pipeline.routing.RouteStage`). The manifest then says `verdict_by = dataset`
and `judge = none@1`, never that a judge checked the pair.
"""

from __future__ import annotations

from typing import Any

from pipeline.judges.base import JudgeError, register_judge
from pipeline.record import JudgeView


@register_judge("none")
class NoJudge:
    name = "none"
    version = "1"

    def score_batch(self, views: list[JudgeView]) -> list[dict[str, Any] | JudgeError]:
        return [self.score(view) for view in views]

    @staticmethod
    def score(view: JudgeView) -> dict[str, Any]:
        n = len(view.sub_edits)
        return {"sub_edits": [None] * n,
                "sub_edit_reasons": ["not judged: the dataset's own curation is trusted"] * n,
                "background": None, "quality": None, "overall": None,
                "verdict": "accept", "verdict_by": "dataset"}
