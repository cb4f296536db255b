"""The first run's key index fingerprinted on Ray workers (flows/index.py): the same table bytes
as in one process, whatever the number of workers; duplicates found across chunks; an unreadable
item keeps its place with its error. Prints the index throughput with 1 and 2 workers."""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from photo_fixtures import photo_folder, skimage_photos
from pipeline.config import BuildConfig
from pipeline.dataset.source_index import make_index
from pipeline.unit import make_source

pytestmark = pytest.mark.slow  # starts Ray


@pytest.fixture(scope="module")
def ray_two_cpus():
    from flows.ray_runtime import start_ray, stop_ray

    start_ray(None, 2)
    yield
    stop_ray()


def _bytes(table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


def corpus(folder: Path) -> Path:
    """Photos, two exact copies (one next to its original, one at the end of the key list), a
    resized copy, a corrupt file and a text file."""
    photo_folder(folder, ["astronaut", "chelsea", "coffee", "rocket", "motorcycle_left"])
    photos = skimage_photos()
    (folder / "astronaut_copy.png").write_bytes(photos["astronaut"].read_bytes())
    (folder / "zz_late_copy.png").write_bytes(photos["chelsea"].read_bytes())  # far from its original
    with Image.open(photos["coffee"]) as im:
        im.convert("RGB").resize((im.width * 3 // 4, im.height * 3 // 4)).save(folder / "coffee_small.png")
    (folder / "corrupt.png").write_bytes(photos["chelsea"].read_bytes()[:3000])
    (folder / "readme.txt").write_text("not a photo")
    return folder


def test_a_generator_source_is_indexed_without_ray(tmp_path):
    import ray

    from flows.index import index_source

    if ray.is_initialized():
        pytest.skip("Ray already running in this process")
    index, table = index_source(BuildConfig(source="procedural", count=4), workers=2)
    assert index.keys is None and table is None and not ray.is_initialized()


def test_plan_build_makes_the_index_on_ray_and_stops_the_ray_it_started_when_nothing_is_left(tmp_path):
    """`plan_build` (the flow's planning task, called as a function) with workers: Ray started for
    the index; the units it plans are the in-process plan's."""
    import ray

    from flows.build import plan_build
    from flows.plan import prepare_build, pending_units

    if ray.is_initialized():
        pytest.skip("Ray already running in this process")
    folder = photo_folder(tmp_path / "photos", ["astronaut", "chelsea", "coffee"])
    config = BuildConfig(source="folder", source_options={"path": str(folder)}, resolution=128,
                         shard_size=2)
    here = tmp_path / "here"
    assert prepare_build(here, config) == 3
    pending, total = plan_build.fn(str(tmp_path / "ray"), config, workers=2)
    try:
        assert (pending, total) == (pending_units(here, config), 3)
        assert ray.is_initialized()  # left for the units
        assert (tmp_path / "ray" / "source_index.parquet").read_bytes() == \
            (here / "source_index.parquet").read_bytes()
    finally:
        from flows.ray_runtime import stop_ray

        stop_ray()


def test_index_on_one_and_two_workers_equals_the_index_made_in_process(ray_two_cpus, tmp_path):
    from flows.index import index_source

    config = BuildConfig(source="folder", source_options={"path": str(corpus(tmp_path / "photos"))},
                         resolution=128)
    index, table = make_index(make_source(config))
    keys = table.column("key").to_pylist()
    assert keys == sorted(keys) and len(keys) == 10
    rows = {row["key"]: row for row in table.to_pylist()}
    assert rows["astronaut_copy.png"]["duplicate_of"] == "astronaut.png"  # exact copy
    assert rows["coffee_small.png"]["duplicate_of"] == "coffee.png"  # resized: near (pHash)
    assert rows["astronaut_copy.png"]["exact"] == rows["astronaut.png"]["exact"]
    assert rows["coffee_small.png"]["exact"] != rows["coffee.png"]["exact"]
    assert "truncated" in rows["corrupt.png"]["error"].lower() and rows["corrupt.png"]["exact"] is None
    assert rows["readme.txt"]["error"] == "not an image (.txt)"
    assert rows["zz_late_copy.png"]["duplicate_of"] == "chelsea.png"  # 7 keys later, across chunks
    assert sum(r["duplicate_of"] is not None for r in rows.values()) == 3
    for workers in (1, 2):
        # chunks of 3 keys: originals and their copies land in different chunks and actors
        phases: dict[str, float] = {}
        ray_index, ray_table = index_source(config, workers, chunk=3, phases=phases)
        assert _bytes(ray_table) == _bytes(table), workers
        assert set(phases) == {"list_s", "fingerprint_s", "decide_s"} and min(phases.values()) > 0
        assert ray_index.keys == index.keys and ray_index.duplicate_of == index.duplicate_of


def _small_corpus(folder: Path, count: int) -> None:
    """`count` distinct 96x96 PNGs cut from the photos (different windows, so few duplicates)."""
    folder.mkdir(parents=True)
    photos = [np.asarray(Image.open(p).convert("RGB")) for p in skimage_photos().values()]
    rng = np.random.default_rng(0)
    for i in range(count):
        photo = photos[i % len(photos)]
        y = int(rng.integers(0, photo.shape[0] - 96))
        x = int(rng.integers(0, photo.shape[1] - 96))
        Image.fromarray(photo[y:y + 96, x:x + 96]).save(folder / f"{i:05d}.png")


def test_index_throughput_one_and_two_workers(ray_two_cpus, tmp_path, capsys):
    """~2000 small images: keys/s in process (4 threads) and on 1 and 2 Ray workers (printed,
    not asserted: 2 shared cores); the three tables are the same bytes."""
    from flows.index import index_source

    _small_corpus(tmp_path / "many", 2000)
    config = BuildConfig(source="folder", source_options={"path": str(tmp_path / "many")},
                         resolution=64)
    started = time.perf_counter()
    _, table = make_index(make_source(config))
    rates = {"in-process (4 threads)": 2000 / (time.perf_counter() - started)}
    for workers in (1, 2):
        started = time.perf_counter()
        _, ray_table = index_source(config, workers)
        rates[f"ray, {workers} worker(s)"] = 2000 / (time.perf_counter() - started)
        assert _bytes(ray_table) == _bytes(table)
    with capsys.disabled():
        print("\nindex throughput, 2000 keys of 96x96 PNG: " +
              ", ".join(f"{name} {rate:.0f} keys/s" for name, rate in rates.items()))


def test_a_worker_that_cannot_open_the_source_fails_the_index_loudly(ray_two_cpus, tmp_path):
    """(A cluster node without the driver's disk.) Not a corpus of quarantined keys: an error."""
    from flows.index import fingerprint_on_ray

    config = BuildConfig(source="folder", source_options={"path": str(tmp_path / "elsewhere")},
                         resolution=128)
    with pytest.raises(RuntimeError, match="could not open the source.*does not exist"):
        fingerprint_on_ray(config, ["a.png", "b.png"], workers=2, chunk=1)
