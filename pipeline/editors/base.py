"""The editor seat: source + sub-edits with regions → target + the pixels each sub-edit changed.

An editor is a `RecordStage` that fills `sample.target`, narrows every `sub_edit.mask` to the
pixels that sub-edit changed (never beyond the composer's region), sets `sample.background_mask`
(the pixels no sub-edit changed) and records what it injected on purpose in `sample.defects`
(the hidden defect log; no judge reads it). Chosen by name from `EDITORS`.
"""

from __future__ import annotations

from pipeline.registry import Registry
from pipeline.stage import RecordStage

EDITORS: Registry[RecordStage] = Registry("editor", (
    "pipeline.editors.procedural",
    "pipeline.editors.photo",
    "pipeline.editors.inpaint",
    "pipeline.editors.instruct",
    "pipeline.editors.routed",
    "pipeline.importers.seats",
))

# The composer an editor works with unless its class names another (`composer`).
DEFAULT_COMPOSER = "inventory"


def composer_of(editor_class: type) -> str:
    return getattr(editor_class, "composer", DEFAULT_COMPOSER)
