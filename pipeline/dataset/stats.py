"""Build statistics that merge with `+` (datatrove style): each work unit counts its own samples,
the flow adds them up, and a resumed build recounts finished units from the manifest."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable

import pyarrow as pa

from pipeline.record import EDIT_TYPES, VERDICTS, EditSample

REASON_MAX_CHARS = 120  # quarantine reasons are grouped by text: keep them short and comparable


def quarantine_reason(stage: str | None, error: str | None) -> str:
    """`stage: first line of the error`, capped, so similar failures fall into one bucket."""
    lines = (error or "").strip().splitlines()
    return f"{stage or 'unknown'}: {lines[0] if lines else 'unknown error'}"[:REASON_MAX_CHARS]


@dataclass
class BuildStats:
    samples: int = 0
    verdicts: Counter = field(default_factory=Counter)  # verdict → samples
    sub_edits: Counter = field(default_factory=Counter)  # edit type → sub-edits in judged samples
    sub_edit_passes: Counter = field(default_factory=Counter)  # edit type → judged carried out
    quarantine_reasons: Counter = field(default_factory=Counter)  # capped reason → samples
    seconds: float = 0.0  # worker time spent on these samples (adds up across workers)

    def __add__(self, other: "BuildStats") -> "BuildStats":
        if not isinstance(other, BuildStats):
            return NotImplemented
        return BuildStats(
            samples=self.samples + other.samples,
            verdicts=self.verdicts + other.verdicts,
            sub_edits=self.sub_edits + other.sub_edits,
            sub_edit_passes=self.sub_edit_passes + other.sub_edit_passes,
            quarantine_reasons=self.quarantine_reasons + other.quarantine_reasons,
            seconds=self.seconds + other.seconds,
        )

    def __radd__(self, other: Any) -> "BuildStats":
        # lets `sum(stats_list)` work (it starts from 0)
        if other == 0:
            return self
        return self.__add__(other)

    @classmethod
    def from_samples(cls, samples: Iterable[EditSample], seconds: float = 0.0) -> "BuildStats":
        stats = cls(seconds=float(seconds))
        for sample in samples:
            types = [edit.type for edit in sample.sub_edits]
            passes = sample.scores.get("sub_edit_pass") if isinstance(sample.scores, dict) else None
            stats._count(sample.verdict or "error", types, passes, sample.error_stage, sample.error)
        return stats

    def _count(self, verdict: str, types: list[str], passes: Any, stage: str | None, error: str | None) -> None:
        self.samples += 1
        self.verdicts[verdict] += 1
        # pass rates only over sub-edits that routing judged (a pass list aligned with the types)
        if passes is not None and len(passes) == len(types):
            for edit_type, passed in zip(types, passes):
                self.sub_edits[edit_type] += 1
                self.sub_edit_passes[edit_type] += int(bool(passed))
        if verdict == "error":
            self.quarantine_reasons[quarantine_reason(stage, error)] += 1

    @property
    def accept_rate(self) -> float:
        return self.verdicts["accept"] / self.samples if self.samples else 0.0

    def pass_rate(self, edit_type: str) -> float | None:
        total = self.sub_edits[edit_type]
        return self.sub_edit_passes[edit_type] / total if total else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "samples": self.samples,
            "verdicts": dict(sorted(self.verdicts.items())),
            "sub_edits": dict(sorted(self.sub_edits.items())),
            "sub_edit_passes": dict(sorted(self.sub_edit_passes.items())),
            "quarantine_reasons": dict(self.quarantine_reasons.most_common()),
            "seconds": self.seconds,
            "accept_rate": self.accept_rate,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "BuildStats":
        return cls(
            samples=int(data.get("samples", 0)),
            verdicts=Counter(data.get("verdicts", {})),
            sub_edits=Counter(data.get("sub_edits", {})),
            sub_edit_passes=Counter(data.get("sub_edit_passes", {})),
            quarantine_reasons=Counter(data.get("quarantine_reasons", {})),
            seconds=float(data.get("seconds", 0.0)),
        )

    def summary_table(self, seconds: float | None = None, top_reasons: int = 5) -> str:
        """A plain-text report. Throughput uses `seconds` when given (the build's elapsed wall
        time), else the summed worker seconds."""
        lines = [f"{'samples':<14}{self.samples:>9}"]
        for verdict in [v for v in VERDICTS if self.verdicts[v]] + sorted(set(self.verdicts) - set(VERDICTS)):
            share = self.verdicts[verdict] / self.samples if self.samples else 0.0
            lines.append(f"  {verdict:<12}{self.verdicts[verdict]:>9}  {share:6.1%}")
        lines.append(f"{'accept rate':<14}{self.accept_rate:>9.1%}")
        label = "wall" if seconds is not None else "worker"
        seconds = seconds if seconds is not None else self.seconds
        if seconds and seconds > 0:
            lines.append(
                f"{'throughput':<14}{self.samples / seconds:>9.2f} samples/s ({seconds:.1f} s {label})"
            )
        types = [t for t in EDIT_TYPES if self.sub_edits[t]] + sorted(set(self.sub_edits) - set(EDIT_TYPES))
        if types:
            lines.append(f"{'edit type':<14}{'sub-edits':>9}  {'passed':>7}  {'pass rate':>9}")
            for edit_type in types:
                lines.append(
                    f"  {edit_type:<12}{self.sub_edits[edit_type]:>9}  "
                    f"{self.sub_edit_passes[edit_type]:>7}  {self.pass_rate(edit_type):>9.1%}"
                )
        if self.quarantine_reasons:
            lines.append("quarantine reasons")
            for reason, count in self.quarantine_reasons.most_common(top_reasons):
                lines.append(f"  {count:>6}  {reason}")
        return "\n".join(lines)


def stats_from_manifest(table: pa.Table) -> BuildStats:
    """Recount a (partial) build from manifest rows, e.g. the finished units of a resumed build.
    Worker seconds are not in the manifest and come back as 0."""
    stats = BuildStats()
    columns = table.column_names
    passes_column = table.column("sub_edit_pass").to_pylist() if "sub_edit_pass" in columns else None
    for i, (verdict, types, stage, error) in enumerate(
        zip(
            table.column("verdict").to_pylist(),
            table.column("sub_edit_types").to_pylist(),
            table.column("error_stage").to_pylist(),
            table.column("error").to_pylist(),
        )
    ):
        passes = passes_column[i] if passes_column is not None else None
        stats._count(verdict or "error", types or [], passes, stage, error)
    return stats
