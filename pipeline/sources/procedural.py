"""The procedural source: seeded scenes with their exact ground truth.

A generator source: every non-negative integer is a key, scene `key` of build `seed` is drawn
from its own generator, so any worker makes the same scene. It knows its objects exactly (the id
map of the render gives each visible object's mask), so the `given` grounder needs no model; the
scene graph itself stays private to the procedural composer and editor (`private["scene"]`).
"""

from __future__ import annotations

import zlib

import numpy as np

from pipeline.record import EditSample, InventoryObject
from pipeline.sources.base import SOURCES, SourceItem, new_sample
from pipeline.sources.scene import Scene, bbox, random_scene, render


def scene_objects(scene: Scene, ids: np.ndarray) -> list[InventoryObject]:
    """The visible objects of a rendered scene as an exact inventory."""
    from pipeline.compose.frame import CELLS  # the nine position words

    objects = []
    for obj in sorted(scene.objects, key=lambda o: o.id):
        mask = ids == obj.id + 1
        box = bbox(mask)
        if box is None:  # hidden behind others
            continue
        cell = (min(2, int(obj.cy * 3)), min(2, int(obj.cx * 3)))
        attributes = {"color": obj.color, "rgb": list(obj.rgb()), "size": obj.size,
                      "position": CELLS[cell], "area": round(np.count_nonzero(mask) / mask.size, 5),
                      "pattern": obj.pattern}
        if obj.text:
            attributes["text"] = obj.text
        objects.append(InventoryObject(id=obj.id, label=obj.kind, box=list(box), mask=mask,
                                       attributes=attributes, producer="procedural"))
    return objects


@SOURCES.register("procedural")
class ProceduralSource:
    name = "procedural"
    default_grounder = "given"  # it knows its objects exactly
    default_editor = "procedural"
    generator = True  # every index is a key: a build says how many (--count)

    def __init__(self, resolution: int = 512, seed: int = 0, min_objects: int = 2,
                 max_objects: int = 8):
        if resolution < 64:
            raise ValueError(f"resolution must be at least 64 px, got {resolution}")
        if not 1 <= min_objects <= max_objects:
            raise ValueError(f"need 1 <= min_objects <= max_objects, got {min_objects}, {max_objects}")
        self.resolution = resolution
        self.seed = seed
        self.min_objects = min_objects
        self.max_objects = max_objects

    def keys(self) -> None:
        return None  # a generator: every index is a key

    def read(self, key: str) -> SourceItem:
        # The same generator the first procedural builds used: (seed, index, "source").
        rng = np.random.default_rng([self.seed, int(key), zlib.crc32(b"source")])
        scene = random_scene(rng, self.resolution, self.resolution, self.min_objects,
                             self.max_objects)
        image, ids = render(scene)
        return SourceItem(image=image, objects=scene_objects(scene, ids),
                          private={"scene": scene.to_dict()})

    def make(self, seed: int, index: int) -> EditSample:
        """Scene `index` of build `seed` as a fresh record (benchmarks, CIE-Bench and tests make
        procedural samples without a build)."""
        source = ProceduralSource(self.resolution, seed, self.min_objects, self.max_objects)
        return new_sample(source.read(str(index)), self.name, seed, str(index), index)
