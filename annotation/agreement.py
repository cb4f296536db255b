"""Agreement: how annotators' votes become one human verdict, and how far humans agree with the judge.

Policy (`AgreementPolicy`): a sample is decided once it has at least `annotations_per_task`
counted votes and one verdict has strictly more votes than the other; a tie stays open until
another annotator breaks it. Each annotator counts once per sample (their latest annotation), so a
re-submitted or duplicated annotation is never counted twice.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Sequence

HUMAN_VERDICTS = ("accept", "reject")


@dataclass(frozen=True)
class AgreementPolicy:
    annotations_per_task: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.annotations_per_task, int) or self.annotations_per_task < 1:
            raise ValueError(
                f"annotations per task must be a positive integer, got {self.annotations_per_task!r}"
            )

    def decide(self, votes: Sequence[str]) -> str | None:
        """'accept' / 'reject' once decided, None while open (too few votes, or a tie)."""
        for vote in votes:
            if vote not in HUMAN_VERDICTS:
                raise ValueError(f"unknown vote {vote!r}; expected one of {HUMAN_VERDICTS}")
        if len(votes) < self.annotations_per_task:
            return None
        counts = Counter(votes)
        if counts["accept"] == counts["reject"]:
            return None
        return "accept" if counts["accept"] > counts["reject"] else "reject"


def majority_pass(answers: Iterable[bool | None]) -> bool | None:
    """Majority of the annotators' pass/fail answers for one sub-instruction; None on a tie or
    when nobody answered."""
    counts = Counter(a for a in answers if a is not None)
    if counts[True] == counts[False]:
        return None
    return counts[True] > counts[False]


@dataclass(frozen=True)
class Confusion:
    """Judge lean (rows) against the human verdict (columns) over decided samples."""

    accept_accept: int = 0  # judge leaned accept, humans accepted
    accept_reject: int = 0
    reject_accept: int = 0
    reject_reject: int = 0

    @classmethod
    def of(cls, pairs: Iterable[tuple[str, str]]) -> "Confusion":
        counts = Counter(pairs)
        return cls(
            accept_accept=counts[("accept", "accept")],
            accept_reject=counts[("accept", "reject")],
            reject_accept=counts[("reject", "accept")],
            reject_reject=counts[("reject", "reject")],
        )

    @property
    def total(self) -> int:
        return self.accept_accept + self.accept_reject + self.reject_accept + self.reject_reject

    @property
    def observed_agreement(self) -> float | None:
        if not self.total:
            return None
        return (self.accept_accept + self.reject_reject) / self.total

    @property
    def kappa(self) -> float | None:
        """Cohen's κ = (p_o - p_e) / (1 - p_e); None with no data, 1.0 when both raters used a
        single identical class (p_e = 1 and they agree everywhere), else nan there."""
        n = self.total
        if not n:
            return None
        judge_accept = (self.accept_accept + self.accept_reject) / n
        human_accept = (self.accept_accept + self.reject_accept) / n
        p_e = judge_accept * human_accept + (1 - judge_accept) * (1 - human_accept)
        p_o = self.observed_agreement
        if math.isclose(p_e, 1.0):
            return 1.0 if math.isclose(p_o, 1.0) else math.nan
        return (p_o - p_e) / (1 - p_e)

    def table(self) -> str:
        return (
            "                 human accept  human reject\n"
            f"judge accept     {self.accept_accept:12d}  {self.accept_reject:12d}\n"
            f"judge reject     {self.reject_accept:12d}  {self.reject_reject:12d}"
        )
