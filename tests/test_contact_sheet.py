"""OUT/contact_sheet.jpg (accepted pairs) and OUT/contact_sheet_others.jpg (borderline and
rejected), written with the report from a real (small) build: one tile per pair, each showing that
pair's source, a big build capped with the count in the title."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.config import BuildConfig
from pipeline.dataset import contact_sheet
from pipeline.dataset.contact_sheet import ACCEPTED, OTHERS, _tiles, render_sheet, write_contact_sheets
from pipeline.dataset.output import finalize, read_manifest, write_unit
from pipeline.dataset.report import load_samples, write_report
from pipeline.unit import UnitPipeline


@pytest.fixture(scope="module")
def build(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sheet") / "out"
    config = BuildConfig(count=10, resolution=64, shard_size=5, seed=4, defect_rate=0.4)
    pipeline = UnitPipeline(config, out)
    for unit in range(config.num_units(config.count)):
        write_unit(out, unit, pipeline.process(unit))
    finalize(out)
    return out


def _rows(out: Path, *verdicts: str) -> list[dict]:
    return sorted((r for r in read_manifest(out).to_pylist() if r["verdict"] in verdicts),
                  key=lambda r: r["index"])


def test_the_report_writes_both_sheets_with_a_tile_per_pair(build: Path):
    write_report(build)  # the sheets come with the report, and the report links them
    accepted, others = _rows(build, "accept"), _rows(build, "borderline", "reject")
    assert accepted and others  # the defect rate makes both kinds
    page = (build / "report.html").read_text()
    for name in (ACCEPTED, OTHERS):
        with Image.open(build / name) as sheet:
            assert sheet.format == "JPEG" and sheet.width >= 1000  # two 240 px pairs per row
        assert f'href="{name}"' in page
    assert write_contact_sheets(build) == {ACCEPTED: len(accepted), OTHERS: len(others)}


def test_each_tile_shows_its_pairs_source_in_index_order(build: Path):
    accepted = _rows(build, "accept")
    tiles = _tiles(build, accepted, with_reason=False)
    sheet = render_sheet("title", tiles)
    assert len(sheet.source_boxes) == len(accepted)
    samples = load_samples(build, accepted)
    for row, box in zip(accepted, sheet.source_boxes):
        shown = np.asarray(sheet.image.crop(box), np.float32)
        expected = np.asarray(Image.fromarray(samples[row["id"]].source).resize(
            (box[2] - box[0], box[3] - box[1]), Image.Resampling.LANCZOS), np.float32)
        assert np.abs(shown - expected).mean() < 2, row["id"]
    reasons = _tiles(build, _rows(build, "reject"), with_reason=True)
    assert all(tile.note for tile in reasons)  # a rejected pair says which check it failed


def test_a_big_build_shows_the_first_pairs_and_says_so(build: Path, monkeypatch):
    monkeypatch.setattr(contact_sheet, "MAX_TILES", 2)
    titles = []
    real = contact_sheet.render_sheet
    monkeypatch.setattr(contact_sheet, "render_sheet", lambda title, tiles: titles.append(title) or real(title, tiles))
    shown = write_contact_sheets(build)
    assert shown == {ACCEPTED: 2, OTHERS: 2}
    assert f"(2 of {len(_rows(build, 'accept'))}, first by index)" in titles[0]


def test_make_demo_says_what_its_edit_is_and_ends_at_the_photo_contact_sheet():
    import re
    import subprocess

    root = Path(__file__).resolve().parents[1]
    # (--no-print-directory: under `make test` this is a sub-make, which would add "Leaving directory")
    lines = subprocess.run(["make", "-n", "--no-print-directory", "demo", "DEMO_OUT=out/x"], cwd=root,
                           capture_output=True, text=True, timeout=60,
                           check=True).stdout.strip().splitlines()
    assert lines[-1].startswith("echo ") and f"out/x-photos/{ACCEPTED}" in lines[-1]
    edit = next(i for i, line in enumerate(lines) if "/mcie edit " in line)
    assert "makes noise; this shows the command path, not quality" in lines[edit - 1]
    # the files pyproject.toml's comments name exist
    for name in re.findall(r"[\w./-]+\.md\b", (root / "pyproject.toml").read_text()):
        assert (root / name).exists(), name


def test_the_same_build_in_another_folder_gives_the_same_sheets(build: Path, tmp_path: Path):
    import shutil

    copy = tmp_path / "elsewhere"
    shutil.copytree(build, copy)
    write_contact_sheets(build)
    write_contact_sheets(copy)
    for name in (ACCEPTED, OTHERS):
        assert (copy / name).read_bytes() == (build / name).read_bytes()
