"""Generative editors (inpaint, instruct, routed, best of N) with tiny random diffusers pipelines
built from configs and saved with save_pretrained, editing scikit-image's photos on the CPU."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from model_fixtures import tiny_inpaint, tiny_instruct
from photo_fixtures import photo_folder, skimage_photos
from pipeline.config import BuildConfig
from pipeline.editors.base import EDITORS
from pipeline.editors.inpaint import composite, step_seed
from pipeline.dataset.output import write_preference
from pipeline.record import EditSample
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
            # (photos with things the classical grounder names even at 64 px)
            "photos": photo_folder(root / "photos", ["rocket", "motorcycle_left", "coffee"])}


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


# -- batching -------------------------------------------------------------------------------------


class Recording:
    """The editor's diffusers pipeline, recording the batch of each call (and failing on cue)."""

    def __init__(self, pipe):
        self.pipe, self.poison, self.batches, self.seeds = pipe, None, [], []

    def __call__(self, **kwargs):
        seeds = [g.initial_seed() for g in kwargs["generator"]]  # one generator per item
        self.batches.append(list(kwargs["prompt"]))
        self.seeds.append(seeds)
        if self.poison in seeds:
            raise RuntimeError("poisoned seed")
        return self.pipe(**kwargs)


def composed(models, tmp_path: Path, count: int, **options):
    """`count` samples of one photo (so one working size), grounded and composed."""
    from flows.plan import prepare_build
    from pipeline.dataset.source_index import read_index

    one = tmp_path / "one"
    one.mkdir()
    # (the rocket: at 64 px it has things the classical grounder may name; the cat has none)
    (one / "rocket.jpg").write_bytes(skimage_photos()["rocket"].read_bytes())
    cfg = BuildConfig(count=count, seed=5, resolution=64, shard_size=count, source="folder",
                      source_options={"path": str(one)}, editor="inpaint", editor_options={
                          "path": str(models["inpaint"]), **STEPS, **options},
                      edits_per_image=count, min_edits=2, max_edits=3, defect_rate=0.0)
    prepare_build(tmp_path / "out", cfg)
    source, index = make_source(cfg), read_index(tmp_path / "out")
    samples = [read_sample(source, cfg, index, n) for n in range(count)]
    grounder, composer, editor = front_stages(cfg)
    composer(grounder(samples))
    assert not any(s.failed for s in samples), [s.error for s in samples]
    return samples, editor


def recorded(editor) -> Recording:
    editor.model._pipe = Recording(editor.model.pipe)
    return editor.model._pipe


def same_edit(a: EditSample, b: EditSample, regions) -> None:
    """The same sample edited in two different batches: the same bytes outside its regions, and
    inside at most one uint8 level apart on a few pixels (the kernels' summation order may follow
    the batch's shape; on this machine the bytes were identical)."""
    allowed = np.logical_or.reduce(regions)
    assert np.array_equal(a.target[~allowed], b.target[~allowed])
    diff = np.abs(a.target.astype(int) - b.target.astype(int))
    assert diff.max() <= 1 and (diff > 0).any(axis=2).sum() <= 0.01 * allowed.sum()


def test_a_units_samples_go_through_the_model_in_batches(models, tmp_path):
    import copy

    samples, editor = composed(models, tmp_path, count=4, batch_size=3)
    regions = {s.id: [sub.mask.copy() for sub in s.sub_edits] for s in samples}
    alone = copy.deepcopy(samples[2])
    calls = recorded(editor)
    editor(samples)
    assert check_exact(samples, regions) == 4
    # step 0: four samples in chunks of 3 and 1, then step 1 likewise, then the 3-sub-edit ones
    steps = [len(s.sub_edits) for s in samples]
    sizes = [len(b) for b in calls.batches]
    expected = []
    for i in range(max(steps)):
        n = sum(k > i for k in steps)
        expected += [3] * (n // 3) + ([n % 3] if n % 3 else [])
    assert sizes == expected and sizes[0] == 3
    assert "batch_size=3" in samples[0].provenance["editor"]
    # the same sample alone: same seeds, the same edit up to kernel rounding (module docstring)
    assert calls.seeds[0] == [step_seed(5, s.index, 0, 0) for s in samples[:3]]
    first, calls.seeds = calls.seeds[0], []
    editor([alone])  # the same sample alone: the same seeds, the same edit
    assert calls.seeds[0] == [first[2]] and not alone.failed
    same_edit(alone, samples[2], regions[alone.id])


def test_one_failing_item_fails_its_sample_only(models, tmp_path):
    import copy

    samples, editor = composed(models, tmp_path, count=3, batch_size=4)
    bad = copy.deepcopy(samples)
    regions = [sub.mask.copy() for sub in samples[2].sub_edits]
    editor(samples)
    calls = recorded(editor)
    calls.poison = step_seed(5, bad[1].index, 0, 0)  # the model fails on sample 1's first step
    bad[0].source = bad[0].source.astype(np.float32)  # sample 0 fails before the model
    editor(bad)
    assert bad[0].failed and "RGB uint8" in bad[0].error
    assert bad[1].failed and "poisoned seed" in bad[1].error and bad[1].error_stage == "edit"
    assert not bad[2].failed and bad[2].target is not None
    assert [len(s) for s in calls.seeds[:3]] == [2, 1, 1]  # together, then one by one
    same_edit(bad[2], samples[2], regions)


def test_the_routes_files_contents_are_part_of_the_builds_identity(models, tmp_path):
    from flows.plan import prepare_build
    from pipeline.config import ConfigError

    routes = tmp_path / "routes.json"
    spec = {"default": {"backend": "photo"},
            "types": {"add": {"backend": "inpaint", "path": str(models["inpaint"]), **STEPS}}}
    routes.write_text(json.dumps(spec))
    cfg = config(models, "routed", routes=str(routes))
    assert cfg.editor_options["routes"] == spec  # embedded: workers never read the file
    out = tmp_path / "out"
    prepare_build(out, cfg)
    assert json.loads((out / "config.json").read_text())["editor_options"]["routes"] == spec
    prepare_build(out, config(models, "routed", routes=str(routes)))  # same file: resumes
    spec["types"]["add"]["steps"] = 3
    routes.write_text(json.dumps(spec))  # same path, other contents: refused
    with pytest.raises(ConfigError, match=r"different parameters \(editor_options\)"):
        prepare_build(out, config(models, "routed", routes=str(routes)))
    from_file = EDITORS.make("routed", routes=str(routes))
    assert from_file.settings() == EDITORS.make("routed", routes=spec).settings()
    routes.write_text("{not json")
    with pytest.raises(ConfigError, match="routes file .*routes.json"):
        config(models, "routed", routes=str(routes))
