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
from pipeline.dataset.report import (REPORT, REPORT_FILES, THUMB_PX, background_changes, mask_overlay,
                                     render_report, write_report)
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
    assert not re.search(r'src="(?!data:)', page), "every thumbnail is inline"
    for href in re.findall(r'href="([^"]+)"', page):  # links: in the page, or a file inside OUT
        if not href.startswith("#"):
            assert ".." not in href and not href.startswith("/") and ":" not in href, href
            assert (build / href).exists(), href
    rows = pq.read_table(build / "manifest.parquet").to_pylist()
    verdicts = {r["verdict"] for r in rows}
    assert "error" in verdicts and len(verdicts) >= 3
    for verdict in verdicts:
        count = sum(r["verdict"] == verdict for r in rows)
        assert re.search(rf"</span>{verdict}</td><td class=n>{count}</td>", page), verdict
        word = "sample" if count == 1 else "samples"
        assert re.search(rf"</span>{verdict} \({count} {word}, showing", page), verdict
    accepted = sum(r["verdict"] == "accept" for r in rows)
    assert f"accept rate {accepted / len(rows):.1%}" in page
    assert "edit: ValueError: region left the canvas" in page  # the quarantine reason
    assert page.count("<svg") >= 4 and "overall score (n=" in page
    for edit_type in {t for r in rows for t in r["sub_edit_types"]}:
        assert f"<tr><td>{edit_type}</td>" in page
    for n in {r["num_sub_edits"] for r in rows}:
        assert f"<tr><td>{n}</td>" in page


def _examples(page: str) -> dict[str, list[str]]:
    """verdict → the ids of the example rows under its heading."""
    found = {}
    for verdict, block in re.findall(r'</span>(\w+) \(\d+ samples?, showing \d+\)</h3>(.*?)</table>', page, re.S):
        found[verdict] = re.findall(r'<tr id="ex-([^"]+)">', block)
    return found


def test_examples_of_every_verdict_and_every_edit_type(build: Path):
    page = render_report(build, samples_per_verdict=1)
    rows = {r["id"]: r for r in pq.read_table(build / "manifest.parquet").to_pylist()}
    shown = _examples(page)
    assert set(shown) == {r["verdict"] for r in rows.values()}
    for verdict, ids in shown.items():
        in_verdict = sorted((r for r in rows.values() if r["verdict"] == verdict), key=lambda r: r["index"])
        assert ids[0] == in_verdict[0]["id"]  # the first by index, then one per edit type
        wanted = {t for r in in_verdict for t in r["sub_edit_types"]}
        assert wanted == {t for i in ids for t in rows[i]["sub_edit_types"]}, verdict
        assert len(ids) <= 1 + len(wanted)
    # the per-type table links each (edit type, verdict) to an example of it
    table = page[page.index("<table class=types>"):]
    table = table[:table.index("</table>")]
    for edit_type in {t for r in rows.values() for t in r["sub_edit_types"]}:
        line = re.search(rf"<tr><td>{edit_type}</td>.*?</tr>", table).group(0)
        for target, verdict in re.findall(r'<a href="#ex-([^"]+)">(\w+)</a>', line):
            assert target in shown[verdict] and edit_type in rows[target]["sub_edit_types"]
        assert {v for _, v in re.findall(r'<a href="#ex-([^"]+)">(\w+)</a>', line)} == \
            {r["verdict"] for r in rows.values() if edit_type in r["sub_edit_types"]}
    images = re.findall(r'<img alt="(\w+)" src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 3 * sum(len(ids) for ids in shown.values())  # source, target, masks each
    for _, data in images:
        with Image.open(io.BytesIO(base64.b64decode(data))) as thumb:
            assert thumb.format == "PNG" and max(thumb.size) <= THUMB_PX
    assert f"#{BROKEN} · error" in page
    assert render_report(build, samples_per_verdict=1) == page  # deterministic


def test_each_thumbnail_opens_its_full_size_image(build: Path):
    from pipeline.dataset.report import load_samples

    stale = build / REPORT_FILES / "0000stale.png"
    stale.parent.mkdir(exist_ok=True)
    stale.write_bytes(b"old")
    page = write_report(build, samples_per_verdict=1).read_text()
    assert not stale.exists()  # images the page no longer links are removed
    rows = {r["id"]: r for r in pq.read_table(build / "manifest.parquet").to_pylist()}
    samples = load_samples(build, [rows[i] for ids in _examples(page).values() for i in ids])
    linked = re.findall(r'<tr id="ex-([^"]+)">(.*?)</tr>', page, re.S)
    assert linked
    for sample_id, row_html in linked:
        sample = samples.get(sample_id)
        if sample is None or sample.target is None:
            continue
        links = dict((alt, href) for href, alt in
                     re.findall(r'<a href="([^"]+)" target="_blank"[^>]*><img alt="(\w+)"', row_html))
        assert set(links) == {"source", "target", "masks"}
        for alt, expected in (("source", sample.source), ("target", sample.target), ("masks", mask_overlay(sample))):
            assert links[alt].startswith(f"{REPORT_FILES}/")
            with Image.open(build / links[alt]) as full:
                assert np.array_equal(np.asarray(full.convert("RGB")), expected)  # full size, lossless
    assert sorted(p.name for p in (build / REPORT_FILES).iterdir()) == \
        sorted({href.split("/")[1] for href in re.findall(rf'href="({REPORT_FILES}/[^"]+)"', page)})


def test_mask_overlay_tints_each_sub_edit_region(build: Path):
    from pipeline.dataset.shards import read_shard

    sample = next(read_shard(next((build / "shards").glob("train-*.tar"))))
    overlay = mask_overlay(sample)
    assert overlay.shape == sample.target.shape
    first = sample.sub_edits[0].mask
    outside = ~np.logical_or.reduce([e.mask for e in sample.sub_edits])
    changed = background_changes(sample)
    assert np.array_equal(overlay[changed], np.full((changed.sum(), 3), 255, np.uint8))  # white
    outside &= ~changed
    if outside.any():  # outside every mask: only dimmed
        expected = (sample.target[outside].astype(np.float32) * 0.45 + 255 * 0.15).astype(np.uint8)
        assert np.abs(overlay[outside].astype(int) - expected).max() <= 1
    assert first.any() and not np.array_equal(overlay[first], sample.target[first])

    # a background pixel that changed is marked, so a background failure can be seen
    ys, xs = np.nonzero(sample.background_mask)
    y, x = ys[len(ys) // 2], xs[len(xs) // 2]
    sample.target = sample.target.copy()
    sample.target[y, x] = np.where(sample.source[y, x] > 127, 0, 255)
    assert background_changes(sample)[y, x] and (mask_overlay(sample)[y, x] == 255).all()
