"""One work unit, end to end: make its samples, run the stages, write its outputs.

This is the whole per-sample pipeline, free of orchestration: the Prefect flow runs it inside Ray
actors, a benchmark runs it in a bare loop, and both produce the same bytes.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from pipeline.compose.procedural import Composer
from pipeline.config import BuildConfig
from pipeline.editors.procedural import ProceduralEditor
from pipeline.judges.base import JudgeStage, make_judge
from pipeline.dataset.output import write_unit
from pipeline.record import EditSample, sample_id
from pipeline.routing import RouteStage, RoutingPolicy
from pipeline.sources.procedural import ProceduralSource
from pipeline.dataset.stats import BuildStats

log = logging.getLogger(__name__)


class UnitPipeline:
    """The stages of a build, constructed once per worker and reused for every unit."""

    def __init__(self, config: BuildConfig, out: Path):
        self.config = config
        self.out = Path(out)
        self.source = ProceduralSource(resolution=config.resolution)
        judge = make_judge(config.judge, **config.judge_options)
        self.stages = [
            Composer(min_edits=config.min_edits, max_edits=config.max_edits),
            ProceduralEditor(defect_rate=config.defect_rate),
            JudgeStage(judge),
            RouteStage(RoutingPolicy.for_judge(judge, config.routing)),
        ]

    def make_sources(self, unit: int) -> list[EditSample]:
        samples = []
        for index in self.config.unit_indices(unit):
            try:
                samples.append(self.source.make(self.config.seed, index))
            except Exception as exc:  # the sample still gets its row, in quarantine
                sample = EditSample(id=sample_id(self.config.seed, index), index=index,
                                    seed=self.config.seed)
                sample.fail("source", exc)
                samples.append(sample)
        return samples

    def process(self, unit: int) -> list[EditSample]:
        samples = self.make_sources(unit)
        for stage in self.stages:
            samples = stage(samples)
        return samples

    def run(self, unit: int) -> BuildStats:
        started = time.perf_counter()
        samples = self.process(unit)
        stats = write_unit(self.out, unit, samples)
        stats.seconds = time.perf_counter() - started
        log.debug("unit %d: %d samples in %.2fs", unit, len(samples), stats.seconds)
        return stats
