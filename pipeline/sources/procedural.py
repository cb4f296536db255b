"""Sources make the first form of a record: a source image and what is in it."""

from __future__ import annotations

from pipeline import __version__
from pipeline.record import EditSample, sample_id
from pipeline.sources.scene import random_scene, render
from pipeline.stage import sample_rng


class ProceduralSource:
    """Seeded procedural scenes with their scene graph: sample `index` of build `seed`."""

    name = "procedural"

    def __init__(self, resolution: int = 512, min_objects: int = 2, max_objects: int = 8):
        if resolution < 64:
            raise ValueError(f"resolution must be at least 64 px, got {resolution}")
        self.resolution = resolution
        self.min_objects = min_objects
        self.max_objects = max_objects

    def make(self, seed: int, index: int) -> EditSample:
        sample = EditSample(id=sample_id(seed, index), index=index, seed=seed)
        rng = sample_rng(sample, "source")
        scene = random_scene(rng, self.resolution, self.resolution, self.min_objects, self.max_objects)
        sample.source, _ = render(scene)
        sample.scene = scene.to_dict()
        sample.provenance = {"source": self.name, "seed": seed, "code_version": __version__}
        return sample
