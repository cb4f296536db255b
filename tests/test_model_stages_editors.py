"""Generative editors (inpaint, instruct, routed, best of N) with tiny random diffusers pipelines
built from configs and saved with save_pretrained, editing scikit-image's photos on the CPU."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from model_fixtures import tiny_inpaint, tiny_instruct
from photo_fixtures import photo_folder
from pipeline.config import BuildConfig
from pipeline.editors.base import EDITORS
from pipeline.editors.inpaint import composite, step_seed
from pipeline.dataset.output import write_preference
from pipeline.unit import UnitPipeline, front_stages, make_source, read_sample

STEPS = {"steps": 2, "max_side": 96}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two threads on a loaded 2-core machine are 10x slower than one
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {"inpaint": tiny_inpaint(root / "inpaint" / "sd-inpaint-tiny"),
            "instruct": tiny_instruct(root / "instruct" / "ip2p-tiny"),
            "photos": photo_folder(root / "photos", ["chelsea", "coffee", "astronaut"])}


def config(models, editor: str, count: int = 3, **options) -> BuildConfig:
    return BuildConfig(count=count, seed=5, resolution=64, shard_size=2, source="folder",
                       source_options={"path": str(models["photos"])}, editor=editor,
                       editor_options=options, min_edits=2, max_edits=3, defect_rate=0.0)


def edited(models, cfg: BuildConfig, tmp_path: Path):
    """Samples grounded and composed, then edited; with the composer's regions kept."""
    from flows.plan import prepare_build

    prepare_build(tmp_path, cfg)
    from pipeline.dataset.source_index import read_index

    source, index = make_source(cfg), read_index(tmp_path)
    samples = [read_sample(source, cfg, index, n) for n in range(cfg.count)]
    grounder, composer, editor = front_stages(cfg)
    composer(grounder(samples))
    regions = {s.id: [sub.mask.copy() for sub in s.sub_edits] for s in samples if not s.failed}
    editor(samples)
    return samples, regions, editor


def check_exact(samples, regions) -> int:
    done = 0
    for s in samples:
        if s.failed:
            assert s.error_stage in ("ground", "compose"), s.error  # the editor failed none
            continue
        allowed = np.logical_or.reduce(regions[s.id])
        assert np.array_equal(s.target[~allowed], s.source[~allowed])  # bit for bit
        for sub, region in zip(s.sub_edits, regions[s.id]):
            assert sub.mask.any() and not (sub.mask & ~region).any()
        assert np.array_equal(s.background_mask, ~np.logical_or.reduce([x.mask for x in s.sub_edits]))
        changed = (s.target != s.source).any(axis=2)
        assert not (changed & s.background_mask).any()
        done += 1
    return done


def test_inpaint_edits_real_photos_and_leaves_the_background_exact(models, tmp_path):
    cfg = config(models, "inpaint", path=str(models["inpaint"]), **STEPS)
    samples, regions, editor = edited(models, cfg, tmp_path)
    assert check_exact(samples, regions) >= 2
    s = next(s for s in samples if not s.failed)
    assert s.provenance["editor"].startswith("inpaint@")
    assert "StableDiffusionInpaintPipeline:sd-inpaint-tiny:steps=2,guidance=7.5" in s.provenance["editor"]
    again, _, _ = edited(models, cfg, tmp_path / "again")  # a fresh editor: same seeds, same bytes
    for a, b in zip(samples, again):
        assert (a.target is None and b.target is None) or np.array_equal(a.target, b.target)


def test_instruct_is_composited_inside_the_regions(models, tmp_path):
    cfg = config(models, "instruct", count=2, path=str(models["instruct"]), **STEPS)
    samples, regions, _ = edited(models, cfg, tmp_path)
    assert check_exact(samples, regions) >= 1
    s = next(s for s in samples if not s.failed)
    assert "StableDiffusionInstructPix2PixPipeline:ip2p-tiny" in s.provenance["editor"]


def test_routed_sends_each_type_to_its_backend(models, tmp_path):
    routes = tmp_path / "routes.json"
    inpaint = {"backend": "inpaint", "path": str(models["inpaint"]), **STEPS}
    routes.write_text(json.dumps({"default": inpaint, "types": {
        "add_text": {"backend": "photo"}, "move": {"backend": "photo"},
        "background": {"backend": "instruct", "path": str(models["instruct"]), **STEPS}}}))
    cfg = config(models, "routed", routes=str(routes))
    samples, regions, editor = edited(models, cfg, tmp_path / "out")
    assert check_exact(samples, regions) >= 2
    assert editor.routes["add_text"] is editor.routes["move"]  # one photo step
    assert editor.routes["add"] is editor.routes["remove"]  # identical specs share one model
    assert "move+add_text->photo@" in editor.settings()
    assert "background->instruct@" in editor.settings()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"types": {"explode": {"backend": "photo"}}}))
    with pytest.raises(ValueError, match="unknown edit types"):
        EDITORS.make("routed", routes=str(bad))


def test_best_of_n_keeps_the_negatives_with_their_scores(models, tmp_path):
    cfg = config(models, "inpaint", count=1, path=str(models["inpaint"]), candidates=2, **STEPS)
    samples, regions, _ = edited(models, cfg, tmp_path)
    (s,) = [s for s in samples if not s.failed]
    assert check_exact(samples, regions) == 1
    log = s.provenance["candidates"]
    assert [r["sub_edit"] for r in log] == list(range(len(s.sub_edits)))
    for r in log:
        seeds = [c["seed"] for c in r["candidates"]]
        assert seeds == [step_seed(5, s.index, r["sub_edit"], k) for k in range(2)]
        assert len(set(seeds)) == 2 and r["judge"].startswith("pixel")
    negatives = s.private["preference"]
    assert len(negatives) == len(s.sub_edits)  # one rejected candidate per sub-edit
    path = write_preference(tmp_path, 0, samples)
    with tarfile.open(path) as tar:
        names = tar.getnames()
    first = f"{s.id}-e0-c{negatives[0]['candidate']}"
    assert f"{first}.json" in names and f"{first}.rejected.png" in names
    assert f"{first}.chosen.png" in names and f"{first}.source.png" in names


def test_a_resumed_build_equals_an_uninterrupted_one(models, tmp_path):
    from flows.plan import prepare_build

    cfg = config(models, "inpaint", count=3, path=str(models["inpaint"]), **STEPS)
    whole, parts = tmp_path / "whole", tmp_path / "resumed"
    prepare_build(whole, cfg)
    pipeline = UnitPipeline(cfg, whole)
    for unit in (0, 1):
        pipeline.run(unit)
    prepare_build(parts, cfg)
    UnitPipeline(cfg, parts).run(0)  # then the worker dies; a new one takes the rest
    UnitPipeline(cfg, parts).run(1)
    files = sorted(p.relative_to(whole) for p in (whole / "shards").iterdir())
    assert files and files == sorted(p.relative_to(parts) for p in (parts / "shards").iterdir())
    for name in files:
        assert (whole / name).read_bytes() == (parts / name).read_bytes()


def test_composite_is_exact_outside_and_feathered_inside():
    rng = np.random.default_rng(0)
    prev = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    gen = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    region = np.zeros((40, 50), bool)
    region[5:35, 10:40] = True
    out = composite(prev, gen, region, feather=4)
    assert np.array_equal(out[~region], prev[~region])
    assert np.array_equal(out[20, 25], gen[20, 25])  # deep inside: the model's pixels
    rim = out[5, 20].astype(int)  # on the region's edge: a blend of both
    assert np.all(np.minimum(prev[5, 20], gen[5, 20]) <= rim)
    assert np.all(rim <= np.maximum(prev[5, 20], gen[5, 20]))


def test_editor_options_are_checked(models):
    with pytest.raises(ValueError, match="model_index.json"):
        EDITORS.make("inpaint", path=str(models["photos"]))
    with pytest.raises(ValueError, match="candidates"):
        EDITORS.make("inpaint", path=str(models["inpaint"]), candidates=0)
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match="editor 'inpaint' needs option 'path'"):
        BuildConfig(source="folder", source_options={"path": "x"}, editor="inpaint")
