"""The shards load in the tools researchers use, as they are, with no schema given: Hugging Face
`datasets` (normal and streaming), Ray Data `read_webdataset`, and webdataset + a torch
`DataLoader` with default collate and 2 workers. Each reads every sample of a real build (a
procedural one and a photo one) and recovers every sub-edit's mask."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flows.plan import prepare_build
from pipeline.config import BuildConfig
from pipeline.dataset.output import finalize
from pipeline.dataset.shards import read_shard
from pipeline.dataset.verify import verify
from pipeline.rle import decode as rle_decode
from pipeline.unit import UnitPipeline
from photo_fixtures import photo_folder

MEMBERS = {"json", "source.png", "target.png", "edit_mask.png", "regions.png"}


def _build(out: Path, config: BuildConfig) -> Path:
    total = prepare_build(out, config)
    pipeline = UnitPipeline(config, out)
    for unit in range(config.num_units(total)):
        pipeline.run(unit)
    finalize(out)
    assert verify(out) == []
    return out


@pytest.fixture(scope="module", params=["procedural", "photo"])
def build(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    if request.param == "procedural":
        config = BuildConfig(count=16, shard_size=8, resolution=64, seed=3, max_edits=6)
    else:
        folder = photo_folder(root / "photos", ["astronaut", "chelsea", "coffee"])
        config = BuildConfig(source="folder", source_options={"path": str(folder)}, resolution=128,
                             edits_per_image=2, shard_size=3, seed=5)
    out = _build(root / "out", config)
    tars = sorted((out / "shards").glob("*.tar"))
    # what the factory's own reader says: id -> sub-edit masks
    truth = {s.id: [e.mask for e in s.sub_edits] for tar in tars for s in read_shard(tar)}
    assert truth and tars
    assert max(len(m) for m in truth.values()) >= 2  # bits beyond the first are exercised
    return request.param, tars, truth


def check_sample(truth, key: str, meta: dict, regions: np.ndarray) -> None:
    """Every sub-edit's mask, from regions.png's bits and from its COCO RLE, equals the truth."""
    masks = truth[key]
    assert meta["id"] == key and meta["num_sub_edits"] == len(masks) == len(meta["sub_edits"])
    for i, (want, sub) in enumerate(zip(masks, meta["sub_edits"])):
        assert np.array_equal((regions >> sub["region_bit"]) & 1 == 1, want), (key, i)
        assert np.array_equal(rle_decode(sub["mask_rle"]), want), (key, i)
    assert regions.max() >> len(masks) == 0


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.mark.parametrize("streaming", [False, True])
def test_hugging_face_datasets_reads_every_sample_without_features(build, streaming, tmp_path):
    import datasets

    _, tars, truth = build
    ds = datasets.load_dataset("webdataset", data_files={"train": [str(t) for t in tars]},
                               split="train", streaming=streaming, cache_dir=str(tmp_path / "hf"))
    seen = set()
    for row in ds:
        assert set(row) - {"__key__", "__url__"} == MEMBERS  # nothing dropped, nothing added
        regions = row["regions.png"]
        assert regions.mode == "L"
        check_sample(truth, row["__key__"], row["json"], np.asarray(regions))
        seen.add(row["__key__"])
    assert seen == set(truth)


def test_ray_data_read_webdataset_reads_every_sample(build):
    import ray

    from flows.ray_runtime import start_ray, stop_ray

    _, tars, truth = build
    start_ray(None, 1)
    try:
        rows = ray.data.read_webdataset([str(t) for t in tars]).take_all()
    finally:
        stop_ray()
    assert sorted(r["__key__"] for r in rows) == sorted(truth)
    for row in rows:
        assert set(row) - {"__key__", "__url__"} == MEMBERS
        assert row["regions.png"].dtype == np.uint8 and row["regions.png"].ndim == 2
        check_sample(truth, row["__key__"], row["json"], row["regions.png"])


def test_webdataset_and_a_torch_dataloader_with_default_collate_and_two_workers(build):
    import torch
    import webdataset as wds
    from torch.utils.data import DataLoader

    kind, tars, truth = build
    dataset = (wds.WebDataset([str(t) for t in tars], shardshuffle=False,
                              workersplitter=wds.split_by_worker, empty_check=False)
               .decode("torchl8", only=["regions.png", "edit_mask.png"])
               .decode("torchrgb8", only=["source.png", "target.png"])
               .to_tuple("__key__", "source.png", "target.png", "regions.png", "json"))
    # photo records keep their aspect ratio, so their sizes differ: one per batch
    loader = DataLoader(dataset, batch_size=2 if kind == "procedural" else 1, num_workers=2)
    seen = []
    for keys, sources, targets, regions, metas in loader:
        assert sources.dtype == torch.uint8 and sources.shape[1] == 3
        for key, region, meta in zip(keys, regions, metas):
            check_sample(truth, key, json.loads(meta), region.numpy())
        seen += keys
    assert sorted(seen) == sorted(truth)


def test_the_regions_member_is_a_lossless_single_channel_png(build):
    import webdataset as wds

    _, tars, truth = build
    for raw in wds.WebDataset([str(t) for t in tars], shardshuffle=False, empty_check=False):
        with Image.open(io.BytesIO(raw["regions.png"])) as image:
            assert (image.format, image.mode) == ("PNG", "L")
            check_sample(truth, raw["__key__"], json.loads(raw["json"]), np.asarray(image))
