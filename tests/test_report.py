"""OUT/report.html from a real (small) build made with the stage code directly, no Prefect or Ray."""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.config import BuildConfig
from pipeline.dataset.output import finalize, write_unit
from pipeline.dataset.report import REPORT, THUMB_PX, mask_overlay, render_report, write_report
from pipeline.unit import UnitPipeline

BROKEN = 13  # this sample's edit "fails": it must show up in quarantine, with its reason


@pytest.fixture(scope="module")
def build(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report") / "out"
    config = BuildConfig(count=16, resolution=64, shard_size=4, seed=3, defect_rate=0.5)
    pipeline = UnitPipeline(config, out)
    for unit in range(config.num_units(config.count)):
        samples = pipeline.process(unit)
        for sample in samples:
            if sample.index == BROKEN:
                sample.fail("edit", ValueError("region left the canvas"))
        write_unit(out, unit, samples)
    finalize(out)
    return out


def test_report_is_self_contained_and_counts_what_the_manifest_says(build: Path):
    path = write_report(build)
    assert path == build / REPORT
    page = path.read_text()
    assert "<script" not in page and "<link" not in page
    assert not re.search(r'(src|href)="(?!data:)', page), "every image must be inline"
    rows = pq.read_table(build / "manifest.parquet").to_pylist()
    verdicts = {r["verdict"] for r in rows}
    assert "error" in verdicts and len(verdicts) >= 3
    for verdict in verdicts:
        count = sum(r["verdict"] == verdict for r in rows)
        assert re.search(rf"</span>{verdict}</td><td class=n>{count}</td>", page), verdict
        assert re.search(rf"</span>{verdict} \({count} samples, showing", page), verdict
    accepted = sum(r["verdict"] == "accept" for r in rows)
    assert f"accept rate {accepted / len(rows):.1%}" in page
    assert "edit: ValueError: region left the canvas" in page  # the quarantine reason
    assert page.count("<svg") >= 4 and "overall score (n=" in page
    for edit_type in {t for r in rows for t in r["sub_edit_types"]}:
        assert f"<tr><td>{edit_type}</td>" in page
    for n in {r["num_sub_edits"] for r in rows}:
        assert f"<tr><td>{n}</td>" in page


def test_contact_sheet_shows_thumbnails_of_every_verdict(build: Path):
    page = render_report(build, samples_per_verdict=2)
    rows = pq.read_table(build / "manifest.parquet").to_pylist()
    shown = sum(min(2, sum(r["verdict"] == v for r in rows)) for v in {r["verdict"] for r in rows})
    images = re.findall(r'<img alt="(\w+)" src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 3 * shown  # source, target, masks for each shown sample
    for _, data in images:
        with Image.open(io.BytesIO(base64.b64decode(data))) as thumb:
            assert thumb.format == "PNG" and max(thumb.size) <= THUMB_PX
    assert f"#{BROKEN} · error" in page
    assert render_report(build, samples_per_verdict=2) == page  # deterministic


def test_mask_overlay_tints_each_sub_edit_region(build: Path):
    from pipeline.dataset.shards import read_shard

    sample = next(read_shard(next((build / "shards").glob("train-*.tar"))))
    overlay = mask_overlay(sample)
    assert overlay.shape == sample.target.shape
    first = sample.sub_edits[0].mask
    outside = ~np.logical_or.reduce([e.mask for e in sample.sub_edits])
    if outside.any():  # outside every mask: only dimmed
        expected = (sample.target[outside].astype(np.float32) * 0.45 + 255 * 0.15).astype(np.uint8)
        assert np.abs(overlay[outside].astype(int) - expected).max() <= 1
    assert first.any() and not np.array_equal(overlay[first], sample.target[first])
