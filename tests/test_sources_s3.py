"""File sources on object storage: the same corpus read from a real S3 server (SeaweedFS) and from
local disk gives the same keys, the same pixels and the same refusals, for every file source."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from photo_fixtures import skimage_photos
from pipeline.sources.base import SOURCES, SourceError

pytestmark = pytest.mark.slow  # starts a SeaweedFS server

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")


def _jpeg(name: str, size: int | None = None) -> bytes:
    with Image.open(skimage_photos()[name]) as im:
        im = im.convert("RGB")
        if size:
            im = im.resize((size, size * im.height // im.width))
        buffer = io.BytesIO()
        im.save(buffer, "JPEG", quality=90)
        return buffer.getvalue()


def _tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def make_corpus(root: Path) -> Path:
    """Every kind of file source over the same photos, in one folder tree."""
    photos = skimage_photos()
    folder = root / "folder"
    (folder / "a" / "b").mkdir(parents=True)
    (folder / "a" / "astronaut.png").write_bytes(photos["astronaut"].read_bytes())
    (folder / "a" / "b" / "chelsea.png").write_bytes(photos["chelsea"].read_bytes())
    (folder / "coffee.png").write_bytes(photos["coffee"].read_bytes())
    (folder / "rocket.jpg").write_bytes(photos["rocket"].read_bytes())
    (folder / "notes.txt").write_text("not an image")
    (folder / "broken.png").write_bytes(photos["coffee"].read_bytes()[:2000])  # truncated
    (folder / ".hidden.png").write_bytes(photos["coffee"].read_bytes())

    listed = root / "listed"
    (listed / "img").mkdir(parents=True)
    for name in PHOTOS[:3]:
        (listed / "img" / f"{name}.jpg").write_bytes(_jpeg(name))
    (listed / "list.csv").write_text(
        "path,caption,license\n"
        "img/astronaut.jpg,an astronaut,cc0\n"
        "img/chelsea.jpg,a cat,\n"
        "img/./coffee.jpg,,\n"
        "img/missing.jpg,,\n"
        "../folder/coffee.png,outside,\n"
        "/etc/hostname,absolute,\n")
    (listed / "list.txt").write_text("# comment\nimg/coffee.jpg\n\nimg/astronaut.jpg\n")

    shards = root / "shards"
    shards.mkdir()
    for number, names in enumerate((PHOTOS[:2], PHOTOS[2:])):
        members = []
        for name in names:
            members += [(f"{name}.jpg", _jpeg(name)),
                        (f"{name}.json", json.dumps({"url": f"http://x/{name}", "license": "cc0"}).encode()),
                        (f"{name}.txt", f"a photo of {name}".encode())]
        members.append(("textonly.txt", b"no image here"))
        _tar(shards / f"{number:05d}.tar", members)

    tables = root / "tables"
    (tables / "img").mkdir(parents=True)
    pq.write_table(pa.table({
        "id": [f"p{i}" for i in range(len(PHOTOS))],
        "image": [_jpeg(name, 300) for name in PHOTOS],
        "caption": [f"caption {name}" for name in PHOTOS],
    }), tables / "bytes.parquet", row_group_size=2)
    (tables / "img" / "chelsea.png").write_bytes(photos["chelsea"].read_bytes())
    paths = tables / "paths"
    paths.mkdir()
    (paths / "img").mkdir()
    (paths / "img" / "chelsea.png").write_bytes(photos["chelsea"].read_bytes())
    pq.write_table(pa.table({"image_path": ["img/chelsea.png", "img/none.png", "../bytes.parquet"]}),
                   paths / "rows.parquet")
    return root


@pytest.fixture
def corpus(s3, tmp_path):
    """(local root, s3 root URL) holding the same corpus."""
    local = make_corpus(tmp_path / "corpus")
    bucket = s3.bucket()
    fs = s3.filesystem()
    for path in sorted(local.rglob("*")):
        if path.is_file():
            fs.pipe_file(f"{bucket}/corpus/{path.relative_to(local).as_posix()}", path.read_bytes())
    return local, f"s3://{bucket}/corpus"


def _read(source, key):
    try:
        item = source.read(key)
    except SourceError as exc:
        return ("error", str(exc))
    return ("item", item.image.shape, item.image.tobytes(), item.meta,
            [(o.label, o.box) for o in item.objects or []])


def same_source(name: str, local: str, remote: str, **options) -> list:
    """Both sources list the same keys and read the same items; the reads, for more checks."""
    here = SOURCES.make(name, path=local, resolution=128, **options)
    there = SOURCES.make(name, path=remote, resolution=128, **options)
    keys = here.keys()
    assert keys and there.keys() == keys
    reads = []
    for key in keys:
        mine, theirs = _read(here, key), _read(there, key)
        assert theirs[0] == mine[0] and theirs[1:] == mine[1:], key
        reads.append((key, theirs))
    return reads


def test_folder_prefix_reads_as_the_local_folder(corpus):
    local, remote = corpus
    reads = dict(same_source("folder", str(local / "folder"), f"{remote}/folder"))
    assert list(reads) == ["a/astronaut.png", "a/b/chelsea.png", "broken.png", "coffee.png",
                           "notes.txt", "rocket.jpg"]  # sorted, hidden name skipped
    assert reads["a/b/chelsea.png"][0] == "item"
    assert reads["notes.txt"] == ("error", "not an image (.txt)")
    assert reads["broken.png"][0] == "error" and "truncated" in reads["broken.png"][1]


@pytest.mark.parametrize("list_name", ["list.csv", "list.txt"])
def test_list_file_in_a_bucket_reads_its_rows_relative_to_it(corpus, list_name):
    local, remote = corpus
    reads = dict(same_source("list", str(local / "listed" / list_name),
                             f"{remote}/listed/{list_name}"))
    if list_name == "list.txt":
        assert list(reads) == ["img/coffee.jpg", "img/astronaut.jpg"]
        return
    assert reads["img/astronaut.jpg"][0] == "item"
    assert reads["img/astronaut.jpg"][3]["caption"] == "an astronaut"
    assert reads["img/./coffee.jpg"][0] == "item"
    assert reads["img/missing.jpg"][0] == "error" and "not found" in reads["img/missing.jpg"][1]
    assert "leads outside" in reads["../folder/coffee.png"][1]
    assert "absolute path refused" in reads["/etc/hostname"][1]


def test_list_rows_that_climb_out_or_name_a_bucket_need_allow_outside_root(corpus, s3):
    local, remote = corpus
    fs = s3.filesystem()
    bucket = remote.removeprefix("s3://").split("/")[0]
    fs.pipe_file(f"{bucket}/corpus/listed/urls.txt",
                 f"{remote}/folder/coffee.png\n../folder/rocket.jpg\n".encode())
    refused = SOURCES.make("list", path=f"{remote}/listed/urls.txt", resolution=128)
    for key in refused.keys():
        with pytest.raises(SourceError, match="allow-outside-root"):
            refused.read(key)
    allowed = SOURCES.make("list", path=f"{remote}/listed/urls.txt", resolution=128,
                           allow_outside_root=True)
    folder = SOURCES.make("folder", path=str(local / "folder"), resolution=128)
    for key, same in zip(allowed.keys(), ("coffee.png", "rocket.jpg")):
        assert np.array_equal(allowed.read(key).image, folder.read(same).image)


def test_webdataset_shards_read_by_range_requests(corpus):
    local, remote = corpus
    reads = dict(same_source("webdataset", str(local / "shards"), f"{remote}/shards"))
    assert list(reads) == ["00000/astronaut", "00000/chelsea", "00000/textonly",
                           "00001/coffee", "00001/rocket", "00001/textonly"]
    assert reads["00001/rocket"][3]["caption"] == "a photo of rocket"
    assert reads["00001/rocket"][3]["url"] == "http://x/rocket"
    assert "no image member" in reads["00000/textonly"][1]
    # one .tar object as the source, and the cost of a read: one open file per shard, whose
    # read-ahead brings the image and its json/txt in one or two range GETs
    single = SOURCES.make("webdataset", path=f"{remote}/shards/00001.tar", resolution=128)
    assert single.keys() == ["00001/coffee", "00001/rocket", "00001/textonly"]
    for key in ("00001/coffee", "00001/rocket"):
        before = single._open["00001"][0].cache.miss_count if "00001" in single._open else 0
        single.read(key)
        assert single._open["00001"][0].cache.miss_count - before <= 2
    assert len(single._open) == 1


def test_parquet_objects_read_as_local_files(corpus):
    local, remote = corpus
    reads = dict(same_source("parquet", str(local / "tables" / "bytes.parquet"),
                             f"{remote}/tables/bytes.parquet"))
    assert list(reads) == ["p0", "p1", "p2", "p3"]
    assert reads["p2"][3]["caption"] == "caption coffee"
    # a prefix of parquet files, and path cells resolved against the object's prefix
    reads = dict(same_source("parquet", str(local / "tables" / "paths"), f"{remote}/tables/paths"))
    assert reads["rows.parquet:0"][0] == "item"
    assert "not found" in reads["rows.parquet:1"][1]
    assert "leads outside" in reads["rows.parquet:2"][1]


def test_index_of_a_bucket_equals_the_index_of_the_same_files_on_disk(corpus):
    from pipeline.dataset.source_index import make_index, read_index, write_index
    from pipeline.storage import location

    local, remote = corpus
    here = make_index(SOURCES.make("folder", path=str(local / "folder"), resolution=128))[1]
    index, there = make_index(SOURCES.make("folder", path=f"{remote}/folder", resolution=128))
    assert there.equals(here)
    assert there.schema.field("exact").type == pa.uint64()
    out = location(f"{remote}/out")
    write_index(out, there)  # OUT on the bucket: one PUT, read back
    back = read_index(out)
    assert back.keys == index.keys and back.duplicate_of == index.duplicate_of


@pytest.mark.parametrize("fmt", ["magicbrush", "generic"])
def test_edit_datasets_import_from_a_bucket_as_from_disk(s3, tmp_path, fmt):
    from test_importers import generic_sessions, magicbrush

    local = tmp_path / fmt
    local.mkdir()
    magicbrush(local) if fmt == "magicbrush" else generic_sessions(local)
    bucket = s3.bucket()
    fs = s3.filesystem()
    for path in sorted(local.rglob("*")):
        if path.is_file():
            fs.pipe_file(f"{bucket}/{fmt}/{path.relative_to(local).as_posix()}", path.read_bytes())
    reads = same_source("import", str(local), f"s3://{bucket}/{fmt}", format=fmt)
    assert sum(read[0] == "item" for _, read in reads) >= 2


def test_an_object_over_the_size_cap_is_refused_after_one_capped_read(corpus):
    from pipeline.sources.decode import read_bytes
    from pipeline.storage import location

    local, remote = corpus
    size = (local / "folder" / "coffee.png").stat().st_size
    for where in (local / "folder" / "coffee.png", location(f"{remote}/folder/coffee.png")):
        assert len(read_bytes(where, max_bytes=size)) == size
        with pytest.raises(SourceError, match="over the limit"):
            read_bytes(where, max_bytes=size - 1)
    with pytest.raises(SourceError, match="not found"):
        read_bytes(location(f"{remote}/folder/none.png"))


def test_a_build_plans_into_a_bucket_from_a_bucket(corpus, tmp_path):
    """flows.plan with OUT and the source on S3: the same key list (bytes) and units as on disk;
    a resume reads the saved list instead of indexing again."""
    from flows.plan import index_here, is_complete, pending_units, prepare_build
    from pipeline.config import BuildConfig
    from pipeline.storage import location

    local, remote = corpus

    def config(path: str) -> BuildConfig:
        return BuildConfig(source="folder", source_options={"path": path}, resolution=128,
                           shard_size=2)

    here = tmp_path / "out"
    assert prepare_build(here, config(str(local / "folder"))) == 6
    made = []

    def maker(c):
        made.append(c)
        return index_here(c)

    out = f"{remote}/out"
    assert prepare_build(out, config(f"{remote}/folder"), index_maker=maker) == 6
    assert prepare_build(out, config(f"{remote}/folder"), index_maker=maker) == 6  # a resume
    assert len(made) == 1
    assert (location(out) / "source_index.parquet").read_bytes() == \
        (here / "source_index.parquet").read_bytes()
    assert pending_units(out, config(f"{remote}/folder")) == pending_units(here, config(str(local / "folder"))) == [0, 1, 2]
    assert not is_complete(out, config(f"{remote}/folder"))
