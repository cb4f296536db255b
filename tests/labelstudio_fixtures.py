"""A real Label Studio server for the annotation tests (session-scoped), and builds with a review
queue.

The server venv `.ls-venv` is created on demand (`annotation.server.ensure_ls_venv`, PyPI needed
the first time, ≈ 1 min). The tests skip, with the reason, only when that venv cannot be created.
The server binds 127.0.0.1 on a free port, with a fresh data dir under the project's `tmp/`, an
admin and a legacy token from its environment; it serves local files under `tmp/`.
"""

from __future__ import annotations

import json
import secrets
import shutil
from pathlib import Path

import pytest

from annotation.client import Connection
from annotation.queue import review_ids
from annotation.server import LabelStudioServer, ServerConfig, ServerError, ensure_ls_venv
from pipeline.dataset.output import finalize, write_unit
from processes import free_port
from shard_samples import finished_sample

ROOT = Path(__file__).resolve().parents[1]
TMP_ROOT = ROOT / "tmp"  # ignored by git; the server's local-files document root in tests
SHARD_SIZE = 4


@pytest.fixture(scope="session")
def ls_server():
    try:
        ensure_ls_venv()
    except ServerError as exc:
        pytest.skip(f"the Label Studio server venv (.ls-venv) could not be created: {exc}")
    TMP_ROOT.mkdir(exist_ok=True)
    data_dir = TMP_ROOT / f"ls-data-{secrets.token_hex(4)}"
    config = ServerConfig(
        port=free_port(), data_dir=data_dir, username="admin@mcie.test",
        password=secrets.token_hex(8), token=secrets.token_hex(20), document_root=TMP_ROOT,
    )
    server = LabelStudioServer(config)
    server.start(timeout_s=240)
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture
def ls_conn(ls_server) -> Connection:
    return Connection(url=ls_server.url, api_key=ls_server.config.token)


@pytest.fixture
def out_dir():
    """A fresh build folder under the document root (so local-files mode can serve it)."""
    TMP_ROOT.mkdir(exist_ok=True)
    path = TMP_ROOT / f"review-out-{secrets.token_hex(4)}"
    path.mkdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


def make_build(out: Path, borderline: int, extra_accept: int = 1, overall=None,
               unknown: bool = False) -> list[str]:
    """A finished build with `borderline` queued samples (2..4 sub-edits) among a few accepted
    and rejected ones; returns the queued ids in index order. `overall(i)` sets the judge's
    overall score of borderline sample i (its lean); `unknown` makes their sub-edit scores None
    (what the pixel judge gives an imported free-text edit)."""
    samples = []
    index = 0
    queued = []
    for i in range(borderline):
        sample = finished_sample(index, "borderline", edits=2 + i % 3)
        sample.scores["overall"] = overall(i) if overall else (0.7 if i % 2 == 0 else 0.3)
        if unknown:
            sample.scores["sub_edits"] = [None] * len(sample.sub_edits)
            sample.scores["sub_edit_pass"] = [False] * len(sample.sub_edits)  # as routing writes
        samples.append(sample)
        queued.append(sample.id)
        index += 1
    for _ in range(extra_accept):
        samples.append(finished_sample(index, "accept"))
        index += 1
    samples.append(finished_sample(index, "reject"))
    index += 1
    (out / "config.json").write_text(json.dumps({"count": index, "shard_size": SHARD_SIZE}))
    for unit in range((index + SHARD_SIZE - 1) // SHARD_SIZE):
        write_unit(out, unit, [s for s in samples if s.index // SHARD_SIZE == unit])
    finalize(out)
    return queued


def make_photo_build(out: Path, photos: Path, seed: int = 1) -> list[str]:
    """A finished photo build (four scikit-image photos, two edits each, at 128 px) through the
    embedded photo path: classical grounder, photo composer and editor, pixel judge. Every sample
    carries an injected fault and nothing is rejected outright, so the judge's doubts all go to
    review; returns the queued ids."""
    from flows.plan import prepare_build
    from photo_fixtures import photo_folder
    from pipeline.config import BuildConfig
    from pipeline.dataset.report import write_report
    from pipeline.unit import UnitPipeline

    folder = photo_folder(photos, ["astronaut", "chelsea", "coffee", "rocket"])
    config = BuildConfig(source="folder", source_options={"path": str(folder)}, resolution=128,
                         edits_per_image=2, min_edits=1, max_edits=2, shard_size=4, seed=seed,
                         defect_rate=1.0, routing={"overall_reject": 0.0, "background_reject": 0.0})
    total = prepare_build(out, config)
    pipeline = UnitPipeline(config, out)
    for unit in range(config.num_units(total)):
        pipeline.run(unit)
    finalize(out)
    write_report(out)  # what a build leaves: report.html, stats.json and the card
    return review_ids(out)
