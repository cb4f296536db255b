"""One work unit, end to end: read its images, run the stages, write its outputs.

This is the whole per-sample pipeline, free of orchestration: the Prefect flow runs it inside Ray
actors, a benchmark runs it in a bare loop, and both produce the same bytes. The four front seats
(source, grounder, composer, editor) and the judge are built by name from the config's
registries; nothing here knows which backends they are.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from pipeline.compose.base import COMPOSERS
from pipeline.config import BuildConfig
from pipeline.dataset.output import write_unit
from pipeline.dataset.source_index import KeyIndex, read_index
from pipeline.dataset.stats import BuildStats
from pipeline.editors.base import EDITORS
from pipeline.grounders.base import GROUNDERS
from pipeline.judges.base import JudgeStage, make_judge
from pipeline.record import EditSample, sample_id
from pipeline.routing import RouteStage, RoutingPolicy
from pipeline.sources.base import SOURCES, Source, SourceError, SourceItem, new_sample
from pipeline.stage import RecordStage
from pipeline.storage import location

log = logging.getLogger(__name__)


def make_source(config: BuildConfig) -> Source:
    return SOURCES.make(config.source, context=config.context(), **config.source_options)


def front_stages(config: BuildConfig) -> list[RecordStage]:
    """Grounder, composer, rewriter (when the build names one) and editor of a build, in order."""
    context = config.context()
    stages = [
        GROUNDERS.make(config.grounder, context=context, **config.grounder_options),
        COMPOSERS.make(config.composer, context=context, **config.composer_options),
        EDITORS.make(config.editor, context=context, **config.editor_options),
    ]
    if config.rewriter:
        from pipeline.compose.rewrite import REWRITERS

        stages.insert(2, REWRITERS.make(config.rewriter, context=context, **config.rewriter_options))
    return stages


def read_sample(source: Source, config: BuildConfig, index: KeyIndex, number: int) -> EditSample:
    """Sample `number` of the build as the source gives it (failed with the reason if the image
    cannot be read or repeats an earlier one). A failed sample keeps what the source still knew
    (`SourceError.context`) as a read item's meta: its `source_meta`, the license/url/caption in
    its provenance, and a context `instruction` as its instruction, so that its quarantine json
    and manifest row say what it was."""
    position, edit = config.key_of(number)
    key = index.key(position)
    first = index.duplicate_of.get(key)
    try:
        if first is not None:
            raise SourceError(f"duplicate of {sample_id(config.seed, first, edit)} "
                              f"({key} repeats {first})")
        return new_sample(source.read(key), source.name, config.seed, key, number, edit)
    except Exception as exc:  # the sample still gets its row, in quarantine
        context = exc.context if isinstance(exc, SourceError) else {}
        sample = new_sample(SourceItem(image=None, meta=context), source.name, config.seed, key,
                            number, edit)
        if isinstance(context.get("instruction"), str):
            sample.instruction = context["instruction"]
        sample.fail("source", exc)
        return sample


def isolated_sample(source: Source, config: BuildConfig, index: KeyIndex, number: int,
                    reason: str) -> EditSample:
    """Sample `number`, quarantined unread with `reason`: running it failed its unit (a worker
    killed while processing it, `flows.execute`), so its input is never touched again."""
    position, edit = config.key_of(number)
    sample = new_sample(SourceItem(image=None, meta={}), source.name, config.seed,
                        index.key(position), number, edit)
    sample.fail("isolation", reason)
    return sample


class UnitPipeline:
    """The stages of a build, constructed once per worker and reused for every unit."""

    def __init__(self, config: BuildConfig, out: Path):
        self.config = config
        self.out = location(out)  # a local folder or an object-store URL: units go straight there
        self.source = make_source(config)
        self.index = read_index(self.out)
        self.total = config.total_samples(self.index.size)
        judge = make_judge(config.judge, **config.judge_options)
        self.stages = [
            *front_stages(config),
            JudgeStage(judge),
            RouteStage(RoutingPolicy.for_judge(judge, config.routing)),
        ]

    def make_sources(self, unit: int) -> list[EditSample]:
        return [read_sample(self.source, self.config, self.index, number)
                for number in self.config.unit_indices(unit, self.total)]

    def process(self, unit: int) -> list[EditSample]:
        samples = self.make_sources(unit)
        for stage in self.stages:
            samples = stage(samples)
        return samples

    def items(self, unit: int) -> list[int]:
        """Sample numbers of `unit`."""
        return list(self.config.unit_indices(unit, self.total))

    def process_item(self, number: int) -> EditSample:
        """One sample through every stage, alone (stages are per-item deterministic: the same
        bytes as in its unit's batch)."""
        samples = [read_sample(self.source, self.config, self.index, number)]
        for stage in self.stages:
            samples = stage(samples)
        return samples[0]

    def process_isolated(self, unit: int, poisoned: dict[int, str]) -> list[EditSample]:
        """The unit item by item; the items in `poisoned` (number → reason) quarantined unread."""
        return [isolated_sample(self.source, self.config, self.index, n, poisoned[n])
                if n in poisoned else self.process_item(n) for n in self.items(unit)]

    def run(self, unit: int, poisoned: dict[int, str] | None = None) -> BuildStats:
        """Process and write `unit`. With `poisoned` (a unit that failed `MAX_UNIT_ATTEMPTS`
        times, isolated by `flows.execute`), item by item, those items quarantined."""
        started = time.perf_counter()
        samples = self.process(unit) if poisoned is None else self.process_isolated(unit, poisoned)
        stats = write_unit(self.out, unit, samples)
        stats.seconds = time.perf_counter() - started
        log.debug("unit %d: %d samples in %.2fs", unit, len(samples), stats.seconds)
        return stats
