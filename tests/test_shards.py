"""Sample ↔ webdataset members: encoding, deterministic atomic tars, reading back."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from pipeline.dataset import shards
from pipeline.dataset.shards import (
    checksum,
    decode_mask,
    decode_sample,
    read_sample_dir,
    read_shard,
    sample_members,
    write_sample_dir,
    write_tar,
)
from shard_samples import RESOLUTION, finished_sample


@pytest.fixture
def samples():
    return [finished_sample(i, "accept", edits=1 + i) for i in range(3)]


def test_plain_webdataset_reads_the_shard(tmp_path, samples):
    path = tmp_path / "train-000000.tar"
    write_tar(path, samples)
    read = list(wds.WebDataset(str(path), shardshuffle=False).decode("pil"))
    assert [r["__key__"] for r in read] == [s.id for s in samples]
    for record, sample in zip(read, samples):
        # format 2: the same five members whatever the sub-edit count
        assert set(record) - {"__key__", "__url__", "__local_path__"} == {
            "json", "source.png", "target.png", "edit_mask.png", "regions.png"
        }
        assert record["json"]["id"] == sample.id and record["json"]["format"] == 2
        assert record["json"]["verdict"] == "accept"
        assert record["json"]["num_sub_edits"] == len(sample.sub_edits)
        for name in ("source.png", "target.png", "edit_mask.png", "regions.png"):
            assert record[name].size == (RESOLUTION, RESOLUTION)
        assert set(np.unique(np.asarray(record["edit_mask.png"]))) <= {0, 255}
        assert np.array_equal(np.asarray(record["source.png"]), sample.source)
        bits = np.asarray(record["regions.png"])[..., 0]  # decode("pil") gives RGB: any channel
        for i, edit in enumerate(sample.sub_edits):
            assert np.array_equal((bits >> i) & 1 == 1, edit.mask)
            assert record["json"]["sub_edits"][i]["region_bit"] == i
    # undecoded, the masks are single-channel (L) PNGs
    raw = next(iter(wds.WebDataset(str(path), shardshuffle=False)))
    assert Image.open(io.BytesIO(raw["edit_mask.png"])).mode == "L"
    assert Image.open(io.BytesIO(raw["regions.png"])).mode == "L"


def test_the_json_has_the_same_keys_and_types_in_every_sample_and_no_nulls(samples):
    samples[1].verdict_by = None
    samples[2].scores = {}
    samples[2].sub_edits[0].box = None

    def shape(value):
        if isinstance(value, dict):
            return {k: shape(v) for k, v in sorted(value.items())}
        if isinstance(value, list):
            return ["list", shape(value[0]) if value else "empty"]
        assert value is not None
        return type(value).__name__

    views = [json.loads(sample_members(s)["json"]) for s in samples]
    assert len({json.dumps(shape(v), sort_keys=True) for v in views}) == 1
    from pycocotools import mask as coco

    for view, sample in zip(views, samples):
        for i, edit in enumerate(sample.sub_edits):
            rle = view["sub_edits"][i]["mask_rle"]
            # the COCO RLE pycocotools writes, and it decodes to the mask
            want = coco.encode(np.asfortranarray(edit.mask.astype(np.uint8)))
            assert rle == {"size": list(want["size"]), "counts": want["counts"].decode()}
            assert np.array_equal(coco.decode({"size": rle["size"], "counts": rle["counts"]}) == 1, edit.mask)
    assert views[2]["sub_edits"][0]["box"] == shards._mask_box(samples[2].sub_edits[0].mask)


def test_format_1_samples_still_decode(samples):
    """A shard written before format 2 (mask_N.png members, metadata() as the json) reads back."""
    sample = samples[1]
    old = {"json": shards.dumps(sample.metadata()), "source.png": shards.encode_png(sample.source),
           "target.png": shards.encode_png(sample.target),
           "edit_mask.png": shards.encode_mask(~sample.background_mask)}
    old.update({f"mask_{i}.png": shards.encode_mask(e.mask) for i, e in enumerate(sample.sub_edits)})
    back = decode_sample(old)
    assert back.metadata() == json.loads(json.dumps(sample.metadata()))
    for got, want in zip(back.sub_edits, sample.sub_edits):
        assert np.array_equal(got.mask, want.mask)
    with pytest.raises(ValueError, match="format 3"):
        decode_sample({"json": json.dumps({"id": sample.id, "format": 3}).encode()})


def test_read_shard_round_trips_every_field(tmp_path, samples):
    path = tmp_path / "s.tar"
    write_tar(path, samples)
    back = list(read_shard(path))
    assert [s.id for s in back] == [s.id for s in samples]
    for got, want in zip(back, samples):
        assert got.metadata() == json.loads(json.dumps(want.metadata()))
        assert np.array_equal(got.source, want.source) and got.source.dtype == np.uint8
        assert np.array_equal(got.target, want.target)
        assert np.array_equal(got.background_mask, want.background_mask)
        assert got.background_mask.dtype == bool
        for g, w in zip(got.sub_edits, want.sub_edits):
            assert np.array_equal(g.mask, w.mask) and g.mask.dtype == bool
            assert (g.type, g.box, g.params) == (w.type, w.box, w.params)
        assert got.defects == []  # the hidden defect log never goes into shards


def test_same_samples_give_identical_bytes_in_any_input_order(tmp_path, samples):
    first, second = tmp_path / "a.tar", tmp_path / "b.tar"
    sums_a = write_tar(first, samples)
    sums_b = write_tar(second, list(reversed(samples)))
    assert first.read_bytes() == second.read_bytes()
    assert sums_a == sums_b
    with tarfile.open(first) as tar:
        members = tar.getmembers()
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in members} == {(0, 0, 0, "", "", 0o644)}
    # fixed member order: samples by index; json, source, target, edit_mask, masks by number
    key = samples[2].id
    names = [m.name for m in members if m.name.startswith(key)]
    assert names == [f"{key}.{s}" for s in ("json", "source.png", "target.png", "edit_mask.png",
                                           "regions.png")]


def test_checksum_is_over_suffix_length_and_bytes_in_member_order():
    members = {"source.png": b"abc", "json": b"{}", "mask_10.png": b"z", "mask_2.png": b"y"}
    digest = hashlib.sha256()
    for suffix in ("json", "source.png", "mask_2.png", "mask_10.png"):
        digest.update(f"{suffix}\n{len(members[suffix])}\n".encode() + members[suffix])
    assert checksum(members) == digest.hexdigest()
    assert checksum({**members, "json": b"{ }"}) != checksum(members)


def test_checksum_and_sample_agree_between_tar_and_sample_dir(tmp_path, samples):
    sums = write_tar(tmp_path / "s.tar", samples)
    directory = tmp_path / "review" / samples[1].id
    assert write_sample_dir(directory, samples[1]) == sums[samples[1].id]
    assert sorted(p.name for p in directory.iterdir()) == [
        "edit_mask.png", "regions.png", "sample.json", "source.png", "target.png"
    ]
    back = read_sample_dir(directory)
    assert back.metadata() == json.loads(json.dumps(samples[1].metadata()))
    assert np.array_equal(back.sub_edits[1].mask, samples[1].sub_edits[1].mask)
    # rewriting over an existing dir replaces it and leaves no temporary beside it
    write_sample_dir(directory, samples[1])
    assert [p.name for p in directory.parent.iterdir()] == [samples[1].id]


def test_a_crash_while_writing_leaves_no_file_under_the_final_name(tmp_path, samples, monkeypatch):
    path = tmp_path / "train-000000.tar"
    calls = {"n": 0}
    real_addfile = tarfile.TarFile.addfile

    def dying_addfile(self, info, fileobj=None, **kw):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError("disk full")
        return real_addfile(self, info, fileobj, **kw)

    monkeypatch.setattr(tarfile.TarFile, "addfile", dying_addfile)
    with pytest.raises(OSError, match="disk full"):
        write_tar(path, samples)
    assert list(tmp_path.iterdir()) == []  # neither the final name nor the temporary


def test_a_killed_writer_leaves_only_a_temporary(tmp_path, samples, monkeypatch):
    # os.replace never runs (the process "dies" first): the bytes sit under a hidden temp name
    monkeypatch.setattr(shards.os, "replace", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    path = tmp_path / "train-000000.tar"
    with pytest.raises(KeyboardInterrupt):
        write_tar(path, samples)
    assert not path.exists()
    assert all(shards.is_temp_name(p.name) for p in tmp_path.iterdir())


def test_incomplete_sample_is_refused_before_anything_is_written(tmp_path, samples):
    samples[1].target = None
    with pytest.raises(ValueError, match=f"{samples[1].id} is incomplete: no target"):
        write_tar(tmp_path / "s.tar", samples)
    assert list(tmp_path.iterdir()) == []
    samples[1].target = samples[1].source.copy()
    samples[1].sub_edits[0].mask = samples[1].sub_edits[0].mask[:10]
    with pytest.raises(ValueError, match="differ in size"):
        sample_members(samples[1])


def test_partial_members_for_quarantine_keep_whatever_pixels_exist(samples):
    sample = samples[2]
    sample.target = None
    sample.sub_edits[1].mask = None
    members = sample_members(sample, complete=False)
    assert list(members) == ["json", "source.png", "edit_mask.png", "regions.png"]
    back = decode_sample(members)
    assert back.target is None and back.sub_edits[1].mask is None
    assert np.array_equal(back.sub_edits[2].mask, sample.sub_edits[2].mask)


def test_ids_that_break_webdataset_keys_are_refused(tmp_path, samples):
    samples[0].id = "s7.abc"
    with pytest.raises(ValueError, match="cannot be a shard key"):
        write_tar(tmp_path / "s.tar", samples)


def test_decode_rejects_bad_members(samples):
    members = sample_members(samples[0])
    with pytest.raises(ValueError, match="no json"):
        decode_sample({k: v for k, v in members.items() if k != "json"})
    with pytest.raises(ValueError, match="differs from the json id"):
        decode_sample({"__key__": "other", **members})
    with pytest.raises(ValueError, match="unexpected member 'mask_1.png'"):
        decode_sample({**members, "mask_1.png": members["edit_mask.png"]})
    two_bits = shards.encode_regions([samples[0].sub_edits[0].mask] * 2, (RESOLUTION, RESOLUTION))
    with pytest.raises(ValueError, match="bits set beyond its 1 sub-edits"):
        decode_sample({**members, "regions.png": two_bits})
    grey = io.BytesIO()
    Image.fromarray(np.full((4, 4), 7, np.uint8), "L").save(grey, format="PNG")
    with pytest.raises(ValueError, match="other than 0 and 255"):
        decode_mask(grey.getvalue())


def test_png_encoding_is_lossless_and_deterministic(samples):
    image = samples[0].source
    assert shards.encode_png(image) == shards.encode_png(image.copy())
    assert np.array_equal(shards.decode_png(shards.encode_png(image)), image)
    with pytest.raises(ValueError, match="uint8 HxWx3"):
        shards.encode_png(image.astype(np.float32))
