"""Damaged and hostile bytes never end in a traceback: every reader of shards, sample dirs and
images turns them into a reason (issue 17, items 2 and 3). Bounded and seeded: a few hundred
mutations, seconds in all."""

from __future__ import annotations

import io
import random
import tarfile
import tracemalloc

import numpy as np
import pytest

from pipeline.dataset import shards
from pipeline.dataset.output import read_manifest
from pipeline.dataset.report import load_samples
from pipeline.dataset.shards import (
    CORRUPT_DATA_ERRORS,
    decode_mask,
    decode_png,
    decode_regions,
    decode_sample,
    iter_tar_groups,
    read_members_dir,
)
from pipeline.dataset.verify import check_build, verify
from pipeline.sources.base import SourceError
from pipeline.sources.decode import decode_image
from photo_fixtures import skimage_photos
from shard_samples import build, clean_build  # noqa: F401 (fixtures)

GIB = 1 << 30




def tar_with_accepts(out):
    return next(p for p in sorted((out / "shards").glob("*.tar")))


def flip(data: bytes, position: int, rng: random.Random) -> bytes:
    mutated = bytearray(data)
    mutated[position] ^= rng.randrange(1, 256)
    return bytes(mutated)


# ---- untrusted sizes ------------------------------------------------------------------------------

def sparse_member(name: str, declared: int) -> tuple[tarfile.TarInfo, bytes]:
    """A PAX GNU-sparse (0.1) member: 512 bytes stored, `declared` bytes when read back."""
    info = tarfile.TarInfo(name)
    info.size = 512
    info.pax_headers = {"GNU.sparse.size": str(declared), "GNU.sparse.map": f"0,512",
                        "GNU.sparse.numblocks": "1"}
    return info, b"\x01" * 512


def test_a_small_sparse_tar_declaring_a_gib_member_is_refused_unread(build):
    path = tar_with_accepts(build)
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    victim = members[0][0].name.split(".", 1)[0]
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            if info.name == f"{victim}.regions.png":
                info, data = sparse_member(info.name, GIB)
            tar.addfile(info, io.BytesIO(data))
    assert path.stat().st_size < 200_000
    with tarfile.open(path) as tar:  # what Python's tarfile would hand a naive reader
        assert tar.getmember(f"{victim}.regions.png").size == GIB
    tracemalloc.start()
    try:
        problems = verify(build)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024 * 1024
    assert any(p.startswith(f"{victim}: shards/{path.name}: sparse member") and f"declares {GIB} bytes" in p
               for p in problems), problems
    # the other samples of that tar are still checked and clean
    assert all(p.startswith(victim) for p in problems), problems


def test_a_member_over_the_cap_fails_that_sample_with_its_reason(build):
    path = tar_with_accepts(build)
    groups = list(iter_tar_groups(path, max_member_bytes=100))
    assert groups and all("over the cap of 100" in m["__error__"] for _, m in groups)
    with pytest.raises(ValueError, match="over the cap of 100"):
        decode_sample(groups[0][1])
    # a sample dir: the file is not read either
    sample_dir = build / "dir"
    sample_dir.mkdir()
    (sample_dir / "sample.json").write_bytes(b"{}")
    (sample_dir / "source.png").write_bytes(b"x" * 200)
    members = read_members_dir(sample_dir, max_member_bytes=100)
    assert members["source.png"] == b"" and "source.png is 200 bytes" in members["__error__"]


def test_an_image_declaring_too_many_pixels_is_refused_from_its_header(monkeypatch):
    monkeypatch.setattr(shards, "MAX_PIXELS", 1000)
    png = shards.encode_png(np.zeros((40, 40, 3), np.uint8))
    with pytest.raises(ValueError, match="declares 40x40 pixels, over the cap"):
        decode_png(png)


# ---- flipped bytes ----------------------------------------------------------------------------------

def test_verify_and_report_on_shards_with_a_flipped_byte_report_never_raise(build):
    path = tar_with_accepts(build)
    original = path.read_bytes()
    with tarfile.open(path) as tar:
        data_spans = [(m.offset_data, m.offset_data + m.size) for m in tar.getmembers()]
    rows = read_manifest(build).to_pylist()
    rng = random.Random(16)
    positions = [rng.randrange(len(original)) for _ in range(40)]
    positions += [rng.randrange(a, b) for a, b in rng.sample(data_spans, 10)]
    for position in positions:
        path.write_bytes(flip(original, position, rng))
        report = check_build(build)  # never raises
        assert all(isinstance(p, str) and "\n" not in p for p in report.problems)
        if any(a <= position < b for a, b in data_spans):
            assert report.problems, f"a flipped data byte at {position} went unnoticed"
        load_samples(build, rows)  # never raises either
    path.write_bytes(original)
    assert verify(build) == []


def test_verify_keeps_what_it_found_before_a_truncated_tar(build):
    (build / "defects.jsonl").write_text("")  # a problem found apart from the tar
    path = tar_with_accepts(build)
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    problems = verify(build)
    assert any(p.startswith(f"shards/{path.name}: unreadable tar") for p in problems)
    assert any("no line in defects.jsonl" in p for p in problems)


def test_mutated_sample_members_decode_or_fail_with_a_reason(clean_build):
    rng = random.Random(17)
    groups = list(iter_tar_groups(tar_with_accepts(clean_build)))
    for _ in range(120):
        key, members = rng.choice(groups)
        suffix = rng.choice(sorted(members))
        data = members[suffix]
        mutated = dict(members)
        if rng.random() < 0.2:
            mutated[suffix] = data[: rng.randrange(len(data))]  # truncated
        else:
            mutated[suffix] = flip(data, rng.randrange(len(data)), rng)
        try:
            decode_sample({"__key__": key, **mutated})
        except CORRUPT_DATA_ERRORS as exc:
            assert str(exc) or type(exc).__name__


def test_the_trainer_loader_skips_mutated_samples_instead_of_aborting(clean_build):
    from trainer.data import BAD_SAMPLE_ERRORS, decode_sample as trainer_decode

    rng = random.Random(18)
    groups = list(iter_tar_groups(tar_with_accepts(clean_build)))
    for _ in range(60):
        key, members = rng.choice(groups)
        suffix = rng.choice(["source.png", "target.png", "edit_mask.png", "regions.png", "json"])
        mutated = {**members, "__key__": key}
        mutated[suffix] = flip(members[suffix], rng.randrange(len(members[suffix])), rng)
        try:
            trainer_decode(mutated, 32, 4, 1.0, np.random.default_rng(0))
        except BAD_SAMPLE_ERRORS:
            pass


# ---- mutated image bytes ----------------------------------------------------------------------------

def _mutations(data: bytes, count: int, seed: int):
    rng = random.Random(seed)
    for _ in range(count):
        kind = rng.random()
        if kind < 0.15:
            yield data[: rng.randrange(len(data))]
        elif kind < 0.3:  # a byte of the header (size fields, chunk lengths, markers)
            yield flip(data, rng.randrange(min(64, len(data))), rng)
        else:
            mutated = bytearray(data)
            for _ in range(rng.randrange(1, 4)):
                mutated[rng.randrange(len(mutated))] = rng.randrange(256)
            yield bytes(mutated)


def small_png() -> bytes:
    rng = np.random.default_rng(0)
    return shards.encode_png(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8))


def test_mutated_pngs_never_escape_the_shard_decoders():
    image = small_png()
    mask = shards.encode_mask(np.random.default_rng(1).random((24, 32)) > 0.5)
    regions = shards.encode_regions([np.random.default_rng(i).random((24, 32)) > 0.5 for i in range(3)], (24, 32))
    for data, decode in ((image, decode_png), (mask, decode_mask), (regions, lambda d: decode_regions(d, 3))):
        for mutated in _mutations(data, 80, seed=len(data)):
            try:
                decode(mutated)
            except CORRUPT_DATA_ERRORS:
                pass


@pytest.mark.parametrize("name", ["rocket", "astronaut"])  # a real JPEG and a real PNG
def test_mutated_photos_never_escape_the_safe_decoder(name):
    data = skimage_photos()[name].read_bytes()
    for mutated in _mutations(data, 40, seed=len(name)):
        try:
            decode_image(mutated)
        except SourceError as exc:
            assert str(exc) and "\n" not in str(exc)
