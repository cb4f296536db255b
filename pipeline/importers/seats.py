"""An import is a build: the importer sits in the four front seats of `BuildConfig`.

- source `import` (options: `format`, `path`, `split`, and the format's own, e.g. ImgEdit's
  `images`, `masks`): its keys are the dataset's session keys, sorted; sessions with fewer turns
  than `min_edits` are left out of the key list and counted (`skipped`), except a session with a
  gap in its turns, which is listed so that it is quarantined with that reason; `read(key)`
  assembles the session (`assemble.assemble`) — a session that cannot be assembled raises
  `SourceError` and is quarantined by the build, the import goes on;
- grounder `imported`: keeps the objects the dataset segmented (ImgEdit's masks), nothing else;
- composer `imported`: the session's turn texts as the sub-edits, with their regions, joined into
  one complex instruction with the composer's connectives (`join_instruction`);
- editor `imported`: the dataset's own output of the last kept turn as the target.

So `mcie import` runs the build machinery unchanged: work units are slices of the sorted session
keys, the judge and routing are the configured ones, the outputs, manifest, report, verify and
resume are the build's. The source lists keys without fingerprinting them (`fingerprints =
False`): reading a whole session to hash its first photo would double the import's cost, and two
sessions editing the same photo are two samples, not duplicates.
"""

from __future__ import annotations

import logging
from typing import Any

from pipeline.compose.base import COMPOSERS
from pipeline.compose.procedural import join_instruction
from pipeline.editors.base import EDITORS
from pipeline.grounders.base import GROUNDERS
from pipeline.importers.assemble import Assembled, assemble, has_gap
from pipeline.importers.base import IMPORTERS, Importer
from pipeline.record import EditSample, check_edit_bounds
from pipeline.sources.base import SOURCES, SourceItem
from pipeline.stage import RecordStage, sample_rng

log = logging.getLogger(__name__)

PRIVATE = "imported"  # the assembled session, in `sample.private` (never written, never judged)


@SOURCES.register("import")
class ImportSource:
    name = "import"
    fingerprints = False  # see the module docstring

    def __init__(self, *, format: str, path: str, split: str | None = None,
                 images: str | None = None, masks: str | None = None, resolution: int = 512,
                 min_edits: int = 2, max_edits: int = 8):
        check_edit_bounds(min_edits, max_edits)
        options: dict[str, Any] = {"path": path}
        if split is not None:
            options["split"] = split
        if images is not None:
            options["images"] = images
        if masks is not None:
            options["masks"] = masks
        self.format = format
        self.importer: Importer = IMPORTERS.make(format, **options)
        self.resolution, self.min_edits, self.max_edits = resolution, min_edits, max_edits
        self._keys: list[str] | None = None
        self.found = self.skipped = 0

    def keys(self) -> list[str]:
        if self._keys is None:
            sessions = self.importer.sessions()
            keep = sorted(k for k, turns in sessions.items()
                          if len(turns) >= self.min_edits or has_gap(turns))
            self.found, self.skipped = len(sessions), len(sessions) - len(keep)
            if self.skipped:
                log.info("%s: %d of %d sessions have fewer than %d turns: skipped", self.format,
                         self.skipped, self.found, self.min_edits)
            self._keys = keep
        return self._keys

    def read(self, key: str) -> SourceItem:
        session = self.importer.read(key)
        parts = assemble(session, resolution=self.resolution, min_edits=self.min_edits,
                         max_edits=self.max_edits)
        meta = {"license": session.license, "dataset": session.dataset, "split": session.split}
        return SourceItem(image=parts.source, meta=meta, objects=parts.objects,
                          private={PRIVATE: parts})


def _parts(sample: EditSample) -> Assembled:
    parts = sample.private.get(PRIVATE)
    if not isinstance(parts, Assembled):
        raise ValueError("the imported seats need the 'import' source (an imported session)")
    return parts


@GROUNDERS.register("imported")
class ImportedGrounder(RecordStage):
    """The dataset's own objects (if it segmented any) are the inventory: nothing to find."""

    name = "ground"

    def process(self, sample: EditSample) -> None:
        _parts(sample)


@COMPOSERS.register("imported")
class ImportedComposer(RecordStage):
    """The session's turns as the ordered sub-edits, joined into one complex instruction."""

    name = "compose"

    def process(self, sample: EditSample) -> None:
        parts = _parts(sample)
        sample.sub_edits = parts.sub_edits
        sample.instruction = join_instruction(parts.texts, sample_rng(sample, self.name))
        sample.provenance.update(parts.provenance)


@EDITORS.register("imported")
class ImportedEditor(RecordStage):
    """The dataset's output of the last kept turn is the target; the background is what no turn
    touched."""

    name = "edit"

    def process(self, sample: EditSample) -> None:
        parts = _parts(sample)
        sample.target = parts.target
        sample.background_mask = parts.background_mask
        sample.provenance["editor"] = f"{parts.provenance['dataset']}@dataset"
        sample.private.pop(PRIVATE, None)  # the arrays now live in the record itself
