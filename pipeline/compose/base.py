"""The composer seat: object inventory → complex instruction and sub-edits WITH their regions.

A composer is a `RecordStage` that fills `sample.instruction` and `sample.sub_edits`, each with
its region (`mask`, `box`): the pixels that sub-edit may change. The editor consumes the regions
and narrows each to the pixels it really changed; the judge checks both. Chosen by name from
`COMPOSERS`: `scene` phrases edits against a procedural scene graph, `inventory` against any
grounder's inventory (photos).
"""

from __future__ import annotations

from pipeline.registry import Registry
from pipeline.stage import RecordStage

COMPOSERS: Registry[RecordStage] = Registry("composer", (
    "pipeline.compose.procedural",
    "pipeline.compose.photo",
    "pipeline.importers.seats",
))
