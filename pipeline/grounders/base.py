"""The grounder seat: image → object inventory (label, box, mask, attributes, confidence).

A grounder is a `RecordStage` that fills `sample.objects` (it may find nothing: the composer then
fails that sample with a reason). Objects the source already knew (procedural scenes, COCO
annotations, parquet regions) arrive in `sample.objects` before grounding; the `given` grounder
keeps them, others replace them. Chosen by name from `GROUNDERS`.
"""

from __future__ import annotations

from pipeline.registry import Registry
from pipeline.stage import RecordStage

GROUNDERS: Registry[RecordStage] = Registry("grounder", (
    "pipeline.grounders.given",
    "pipeline.grounders.classical",
    "pipeline.grounders.mllm",
    "pipeline.importers.seats",
))
