"""The `given` grounder: the regions the source itself knew (procedural scenes' exact objects,
COCO annotations beside a folder, box/mask columns of a parquet), completed with the words the
composer needs.

What the source said is kept; what it left out is measured from the pixels with the same helpers
as the classical grounder (`pipeline.grounders.attributes`): a missing mask is the box, a missing
box the mask's bbox, and a missing colour name, rgb, size or position word is read off the
pixels under the mask. A sample whose source gave no usable region fails with that reason.
"""

from __future__ import annotations

import logging

import numpy as np

from pipeline.grounders.attributes import region_attributes
from pipeline.grounders.base import GROUNDERS
from pipeline.record import EditSample, InventoryObject
from pipeline.sources.scene import bbox
from pipeline.stage import RecordStage

log = logging.getLogger(__name__)


def complete(obj: InventoryObject, image: np.ndarray) -> InventoryObject | None:
    """The object with mask, box and attributes filled in; None if it covers no pixel."""
    h, w = image.shape[:2]
    mask = obj.mask
    if mask is None:
        if not obj.box or len(obj.box) != 4:
            return None
        x0, y0, x1, y1 = (int(v) for v in obj.box)
        mask = np.zeros((h, w), dtype=bool)
        mask[max(0, y0):max(0, min(h, y1)), max(0, x0):max(0, min(w, x1))] = True
    elif mask.shape[:2] != (h, w):
        raise ValueError(f"object {obj.id}'s mask is {mask.shape[:2]}, the image is {(h, w)}")
    mask = mask.astype(bool)
    box = bbox(mask)
    if box is None:
        return None
    return InventoryObject(
        id=obj.id, label=obj.label or "region", box=box, mask=mask,
        attributes=region_attributes(image, mask, obj.attributes),
        confidence=obj.confidence, producer=obj.producer or "source")


@GROUNDERS.register("given")
class GivenGrounder(RecordStage):
    """Keeps the source's own regions (`sample.objects`), completing their attributes."""

    name = "ground"

    def process(self, sample: EditSample) -> None:
        if sample.source is None:
            raise ValueError("no source image to ground")
        if not sample.objects:
            raise ValueError("the source gave no regions for this image (grounder 'given')")
        objects = []
        for obj in sample.objects:
            done = complete(obj, sample.source)
            if done is None:
                log.info("sample %s: given object %s covers no pixel; dropped", sample.id, obj.id)
                continue
            objects.append(done)
        if not objects:
            raise ValueError("none of the source's regions covers a pixel of the image")
        if len({o.id for o in objects}) != len(objects):
            for k, obj in enumerate(objects):  # ids must be unique within a sample
                obj.id = k
        sample.objects = objects
        sample.provenance["grounder"] = "given"
