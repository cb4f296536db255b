"""Import throughput: 48 three-turn MagicBrush sessions (skimage photos, the published parquet schema)
imported at 512 px in one process, with judge none and the pixel judge; prints sessions/s on one core.
Run: OMP_NUM_THREADS=1 .venv/bin/python bench/importers.py"""
import sys, time, tempfile, pathlib
sys.path.insert(0, "tests")
import pyarrow as pa, pyarrow.parquet as pq
from test_importers import chain, png, rgba_mask, IMAGE
from pipeline.config import BuildConfig
from flows.plan import prepare_build
from pipeline.unit import UnitPipeline
root = pathlib.Path(tempfile.mkdtemp())
rows = []
photos = ["chelsea", "coffee", "astronaut", "rocket"]
for i in range(48):
    for k, (src, tgt, region, text) in enumerate(chain(photos[i % 4], 3), start=1):
        rows.append({"img_id": str(1000 + i), "turn_index": k, "source_img": {"bytes": png(src), "path": None},
                     "mask_img": {"bytes": rgba_mask(region, src, 0.5, brush=4), "path": None},
                     "instruction": text, "target_img": {"bytes": png(tgt), "path": None}})
schema = pa.schema([("img_id", pa.string()), ("turn_index", pa.int32()), ("source_img", IMAGE),
                    ("mask_img", IMAGE), ("instruction", pa.string()), ("target_img", IMAGE)])
(root / "data").mkdir()
pq.write_table(pa.Table.from_pylist(rows, schema=schema), root / "data/dev-00000-of-00001.parquet", row_group_size=24)
for judge in ("none", "pixel"):
    out = root / f"out-{judge}"
    config = BuildConfig(resolution=512, shard_size=16, defect_rate=0.0, min_edits=2, max_edits=8, judge=judge,
                         source="import", source_options={"format": "magicbrush", "path": str(root / "data")},
                         grounder="imported", composer="imported", editor="imported")
    total = prepare_build(out, config)
    pipe = UnitPipeline(config, out)
    t = time.perf_counter()
    for unit in range(config.num_units(total)):
        pipe.run(unit)
    dt = time.perf_counter() - t
    print(f"judge={judge}: {total} sessions x 3 turns at 512 px in {dt:.2f} s = {total/dt:.2f} sessions/s on one core")
