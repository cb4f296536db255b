"""The judge contract and the judging stage.

A judge sees only a `JudgeView` (the two images and the structured instruction), never the editor's
defect log or scene graphs. It returns scores in [0, 1]:

    {"sub_edits": [s_0, ..., s_n-1],        # was sub-edit i carried out, inside its region
     "sub_edit_reasons": [str, ...],        # one short line per sub-edit
     "background": b,                        # is everything outside the regions unchanged
     "quality": q or None,                   # visual quality, where the judge rates it
     "overall": o}

Judges are chosen by name from `JUDGES` (the way diffusers swaps attention processors): the
embedded pixel judge by default, the vLLM-served MLLM judge in production.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

from pipeline.record import EditSample, JudgeView
from pipeline.registry import Registry
from pipeline.stage import RecordStage

log = logging.getLogger(__name__)


class JudgeError(RuntimeError):
    """The judge could not score this sample (timeout, bad answer after retries, ...).
    The sample is routed `judge_error`: never accepted, kept for `mcie rejudge`."""


class Judge(Protocol):
    name: str
    version: str

    def score_batch(self, views: list[JudgeView]) -> list[dict[str, Any] | JudgeError]:
        """Scores per view, in order; a view that could not be scored gets its JudgeError."""
        ...


class JudgeStage(RecordStage):
    name = "judge"

    def __init__(self, judge: Judge):
        self.judge = judge

    def __call__(self, batch: list[EditSample]) -> list[EditSample]:
        ready = []
        for sample in batch:
            if sample.failed:
                continue
            try:
                ready.append((sample, sample.judge_view()))
            except Exception as exc:
                sample.fail(self.name, exc)
        if not ready:
            return batch
        try:
            results = self.judge.score_batch([view for _, view in ready])
        except Exception as exc:  # a judge bug must not kill the batch either
            log.warning("judge %s failed on a whole batch: %s", self.judge.name, exc)
            results = [JudgeError(f"{type(exc).__name__}: {exc}")] * len(ready)
        for (sample, _), result in zip(ready, results):
            sample.provenance["judge"] = f"{self.judge.name}@{self.judge.version}"
            if isinstance(result, JudgeError):
                sample.scores = {}
                sample.verdict = "judge_error"
                sample.verdict_by = "judge"
                sample.error_stage = self.name
                sample.error = str(result)[:500]
            else:
                sample.scores = result
        return batch


JUDGES: Registry[Judge] = Registry("judge", ("pipeline.judges.pixel", "pipeline.judges.vllm",
                                             "pipeline.judges.none"))
register_judge = JUDGES.register


def make_judge(name: str, **options: Any) -> Judge:
    """Build a judge by name (the registry imports judge modules on first use, so the heavy
    optional ones cost nothing when unused)."""
    return JUDGES.make(name, **options)
