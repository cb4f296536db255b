"""Finished samples for the shard/output/verify tests, made by hand (no composer or editor needed):
a procedural source, then sub-edits whose masks are rectangles and whose target repaints them."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from pipeline.record import EditSample, SubEdit
from pipeline.sources.procedural import ProceduralSource

RESOLUTION = 64
SEED = 7
_SOURCE = ProceduralSource(resolution=RESOLUTION)


def finished_sample(index: int, verdict: str = "accept", edits: int = 2, seed: int = SEED) -> EditSample:
    """A sample as routing leaves it: images, per-sub-edit masks, scores, a verdict."""
    sample = _SOURCE.make(seed, index)
    h, w = sample.source.shape[:2]
    target = sample.source.copy()
    types = ["recolor", "add", "remove", "move", "resize"]
    for i in range(edits):
        mask = np.zeros((h, w), dtype=bool)
        y0, x0 = 4 + 9 * i, 3 + 11 * i
        mask[y0 : y0 + 8 + i, x0 : x0 + 10] = True
        target[mask] = (255 - 20 * i, 10 * i, 128)
        rows, cols = np.nonzero(mask)
        sample.sub_edits.append(
            SubEdit(
                type=types[i % len(types)],
                text=f"do edit {i}",
                target=f"object {i}",
                object_ids=[i],
                params={"color": "red", "rgb": [255, 0, 0]},
                box=[int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1],
                mask=mask,
            )
        )
    sample.instruction = " and ".join(e.text for e in sample.sub_edits)
    sample.target = target
    sample.background_mask = ~np.logical_or.reduce([e.mask for e in sample.sub_edits])
    sample.defects = [{"kind": "skip", "sub_edit": 0}] if index % 3 == 0 else []
    passes = [bool((index + i) % 2 == 0) for i in range(edits)]
    sample.scores = {
        "sub_edits": [0.9 if p else 0.1 for p in passes],
        "sub_edit_pass": passes,
        "background": 0.95,
        "quality": None,
        "overall": 0.8,
    }
    sample.verdict = verdict
    sample.verdict_by = "judge"
    sample.provenance.update({"editor": "hand", "judge": "test@1"})
    if verdict == "judge_error":
        sample.scores = {}
        sample.error = "JudgeError: timed out"
        sample.error_stage = "judge"
    return sample


def failed_sample(index: int, stage: str = "edit", with_source: bool = True) -> EditSample:
    sample = _SOURCE.make(SEED, index)
    if not with_source:
        sample.source = None
    sample.fail(stage, ValueError(f"no room for object {index}"))
    return sample


def unit_samples(start: int = 0) -> list[EditSample]:
    """One of each destination: 3 accepted, 2 rejected, a borderline, a judge error, an error."""
    verdicts = ["accept", "reject", "accept", "borderline", "judge_error", "accept", "reject"]
    samples = [finished_sample(start + i, v, edits=1 + i % 3) for i, v in enumerate(verdicts)]
    samples.append(failed_sample(start + len(verdicts)))
    return samples


def procedural_train_shards(out, units: int, per_unit: int, resolution: int = 64):
    """A small build's train shards (OUT/shards/train-NNNNNN.tar, `units` of up to `per_unit`
    accepted samples), made by the factory's own procedural source, composer, editor and shard
    writer: what the trainer tests train on."""
    from pipeline.compose.procedural import Composer
    from pipeline.dataset.shards import write_tar
    from pipeline.editors.procedural import ProceduralEditor

    (out / "shards").mkdir(parents=True)
    source, composer, editor = ProceduralSource(resolution), Composer(1, 5), ProceduralEditor(defect_rate=0.0)
    for unit in range(units):
        made = editor(composer([source.make(3, i) for i in range(unit * per_unit, (unit + 1) * per_unit)]))
        accepted = [sample for sample in made if not sample.failed]
        for sample in accepted:
            sample.verdict, sample.verdict_by = "accept", "judge"
        write_tar(out / "shards" / f"train-{unit:06d}.tar", accepted)
    return out


# Fixtures (import them into a test module by name): a verified one-unit OUT, built once per
# module, and a fresh copy of it per test to damage.
@pytest.fixture(scope="module")
def clean_build(tmp_path_factory):
    from pipeline.dataset.output import finalize, write_unit
    from pipeline.dataset.verify import verify

    out = tmp_path_factory.mktemp("shards") / "out"
    write_unit(out, 0, unit_samples(0))
    finalize(out)
    assert verify(out) == []
    return out


@pytest.fixture
def build(clean_build, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(clean_build, out)
    return out
