"""An import is a build: the importer sits in the four front seats of `BuildConfig`.

- source `import` (options: `format`, `path`, `split`, and the format's own, e.g. ImgEdit's
  `images`, `masks`): its keys are the dataset's session keys, sorted; sessions with fewer turns
  than `min_edits` (default 1: a single-turn session is a sample) are left out of the key list and
  counted (`skipped`), except a session with a gap in its turns, which is listed so that it is
  quarantined with that reason; `read(key)` assembles the session (`assemble.assemble`) — a
  session that cannot be assembled raises `SourceError` and is quarantined by the build, the
  import goes on. That error's `context` says what the session was (`failure_context`: dataset,
  split, license, the turns' instructions, their joined `instruction`, the `failed_turn`), and
  the quarantined record keeps it as its `source_meta` (`pipeline.unit.read_sample`);
- grounder `imported`: keeps the objects the dataset segmented (ImgEdit's masks), nothing else;
- composer `imported`: the session's turns as the sub-edits, with their regions, each in its own
  words (`compose.procedural.turn_text`), joined into one complex instruction of one sentence per
  turn that keeps each turn's punctuation, a question stays a question (`join_turns`; the rule
  and how `split_turns` takes it apart are in `pipeline.compose.procedural`);
- editor `imported`: the dataset's own output of the last kept turn as the target.

So `mcie import` runs the build machinery unchanged: work units are slices of the sorted session
keys, the judge and routing are the configured ones, the outputs, manifest, report, verify and
resume are the build's. The source lists keys without fingerprinting them (`fingerprints =
False`): reading a whole session to hash its first photo would double the import's cost, and two
sessions editing the same photo are two samples, not duplicates.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from pipeline import bounds
from pipeline.compose.base import COMPOSERS
from pipeline.compose.procedural import join_turns, turn_text
from pipeline.editors.base import EDITORS
from pipeline.grounders.base import GROUNDERS
from pipeline.importers.assemble import Assembled, assemble, has_gap
from pipeline.importers.base import IMPORTERS, Importer, RawSession
from pipeline.record import EditSample, check_edit_bounds
from pipeline.sources.base import SOURCES, SourceError, SourceItem
from pipeline.stage import RecordStage, sample_rng

log = logging.getLogger(__name__)

PRIVATE = "imported"  # the assembled session, in `sample.private` (never written, never judged)


@SOURCES.register("import")
class ImportSource:
    name = "import"
    fingerprints = False  # see the module docstring

    def __init__(self, *, format: str, path: str, split: str | None = None,
                 images: str | None = None, masks: str | None = None, resolution: int = 512,
                 min_edits: int = 1, max_edits: int = 8):
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
        try:
            session = self.importer.read(key)
        except SourceError as exc:
            exc.context = {"dataset": self.importer.name, **exc.context}
            raise
        try:
            parts = assemble(session, resolution=self.resolution, min_edits=self.min_edits,
                             max_edits=self.max_edits)
        except SourceError as exc:
            exc.context = {**failure_context(session, self.max_edits, exc), **exc.context}
            exc.context.pop("turn", None)  # now `failed_turn`
            raise
        meta = {"license": session.license, "dataset": session.dataset, "split": session.split}
        return SourceItem(image=parts.source, meta=meta, objects=parts.objects,
                          private={PRIVATE: parts})


_TURN = re.compile(r"\bturn (\d+)\b")


def failure_context(session: RawSession, max_edits: int, exc: SourceError) -> dict[str, Any]:
    """What a session that cannot be assembled still says about itself: dataset, split, license,
    `instructions` (every turn's text, in turn order, None where a turn has none), the complex
    `instruction` its first `max_edits` turns would have had (`join_turns` with "Then"; absent when
    a turn has no usable text), and `failed_turn` (the turn the error names: `exc.context["turn"]`
    where `assemble` attaches it, else the first "turn N" of the message; absent when the failure
    is the session's as a whole)."""
    # a turn index out of bounds (refused by `check_chain`) may be anything: sort ints first
    turns = sorted(session.turns, key=lambda t: (0, t.index) if isinstance(t.index, int)
                   and not isinstance(t.index, bool) else (1, 0))
    texts = [None if t.instruction is None else bounds.clip_text(t.instruction, bounds.MAX_TEXT_CHARS)
             for t in turns]
    context: dict[str, Any] = {
        "dataset": session.dataset, "split": session.split,
        "license": bounds.clip_text(session.license), "instructions": texts}
    try:
        context["instruction"] = join_turns([turn_text(t or "") for t in texts[:max_edits]])
    except ValueError:
        pass
    turn = exc.context.get("turn")
    if turn is None:
        named = _TURN.search(str(exc))
        turn = int(named.group(1)) if named else None
    if turn is not None:
        context["failed_turn"] = int(turn)
    return context


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
        sample.instruction = join_turns(parts.texts, sample_rng(sample, self.name))
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
        sample.provenance["pair"] = "imported"
        sample.private.pop(PRIVATE, None)  # the arrays now live in the record itself
