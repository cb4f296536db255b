"""Real pairs judged right: the codec-robust background test, the region of a mask-less turn, and
`judge-bench --real` (issue 23). Real photographs from scikit-image's wheel and the real
InstructPix2Pix pairs in ../shared/real-edits, found at run time."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline import imagediff
from pipeline.judges.pixel import PixelJudge
from pipeline.judges.realbench import _jpeg, _resampled, _shifted_colour, _vae_like, real_bench
from pipeline.record import JudgeView, SubEdit
from pipeline.routing import RoutingPolicy
from photo_fixtures import photo_array

REAL_EDITS = Path(__file__).resolve().parents[2] / "shared" / "real-edits"
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


def _photo(name: str) -> np.ndarray:
    image = photo_array(name)
    h, w = image.shape[:2]
    return np.ascontiguousarray(image[: h - h % 8, : w - w % 8])


def _local_edit(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A faithful local edit: a disc in the upper left quarter recoloured blue (luminance kept
    roughly), and its region."""
    h, w = image.shape[:2]
    region = np.zeros((h, w), dtype=bool)
    cv2.circle(region.view(np.uint8), (w // 4, h // 4), min(h, w) // 8, 1, -1)
    edited = image.copy()
    grey = image[region].astype(np.float32).mean(axis=1, keepdims=True)
    edited[region] = np.clip(grey * np.array([0.4, 0.6, 1.6]), 0, 255).astype(np.uint8)
    return edited, region


def _view(source, target, region, kind="imported", text="make the round thing blue"):
    sub = SubEdit("recolor", text, mask=region, box=[0, 0, 1, 1], params={"free_text": True})
    return JudgeView("x", source, target, text, [sub], ~region, kind=kind)


def _route(scores):
    return RoutingPolicy.for_judge(PixelJudge()).route(scores)


KEEP = {
    "jpeg 70": lambda s, t, rng: (_jpeg(s, 70), _jpeg(t, 70)),
    "jpeg 95": lambda s, t, rng: (_jpeg(s, 95), _jpeg(t, 95)),
    "resampled": lambda s, t, rng: (s, _resampled(t)),
    "vae-like": lambda s, t, rng: (_jpeg(s, 90), _vae_like(t, rng)),
    "colour shift 3 %": lambda s, t, rng: (_jpeg(s, 90), _jpeg(_shifted_colour(t), 90)),
}


@pytest.mark.parametrize("name", PHOTOS)
@pytest.mark.parametrize("noise", sorted(KEEP))
def test_a_faithful_edit_whose_background_differs_by_codec_noise_is_never_rejected(name, noise):
    source = _photo(name)
    edited, region = _local_edit(source)
    s, t = KEEP[noise](source, edited, np.random.default_rng(0))
    scores = PixelJudge().score(_view(s, t, region))
    assert scores["background_changed"] <= 0.01, scores
    assert scores["background"] >= 0.5 and _route(scores) != "reject", scores
    # ... while the exact test (for exact pairs) would have rejected every one of them but the
    # bit-exact resampled source
    if noise != "resampled":
        exact = PixelJudge().score(_view(s, t, region, kind="exact"))
        assert exact["background"] == 0.0, exact


def _paste_object(image: np.ndarray, donor: np.ndarray, at: tuple[int, int], size: int) -> np.ndarray:
    out = image.copy()
    y, x = at
    out[y:y + size, x:x + size] = cv2.resize(donor, (size, size), interpolation=cv2.INTER_AREA)
    return out


@pytest.mark.parametrize("name", PHOTOS)
def test_a_background_whose_content_changed_is_never_accepted(name):
    source = _photo(name)
    edited, region = _local_edit(source)
    h, w = source.shape[:2]
    side = min(h, w) // 10  # an object of ≈ 1 % of the frame, away from the edit
    donor = _photo("rocket")[100:300, 250:450]
    rng = np.random.default_rng(1)
    changed = {
        "an object added": _paste_object(edited, donor, (h - 2 * side, w - 2 * side), side),
        "an object recoloured": np.where(
            _box(h, w, h // 2, 3 * w // 4, side)[..., None], edited[..., ::-1], edited),
        "the background shifted 8 px": np.where(region[..., None], edited, np.roll(source, (8, 8), (0, 1))),
        "a new scene": np.where(region[..., None], edited,
                                cv2.resize(_photo("coffee" if name != "coffee" else "chelsea"), (w, h))),
        "the background blurred": np.where(region[..., None], edited,
                                           cv2.GaussianBlur(source, (0, 0), 3.0)),
        "the background tinted": np.where(region[..., None], edited, np.clip(
            source.astype(np.int16) + np.array([40, -10, -30]), 0, 255).astype(np.uint8)),
    }
    for what, target in changed.items():
        s, t = _jpeg(source, 90), _vae_like(target, rng)
        scores = PixelJudge().score(_view(s, t, region))
        assert _route(scores) != "accept", (what, scores)
        assert scores["background"] < 0.9, (what, scores)


def _box(h: int, w: int, cy: int, cx: int, side: int) -> np.ndarray:
    box = np.zeros((h, w), dtype=bool)
    box[cy - side // 2: cy + side // 2, cx - side // 2: cx + side // 2] = True
    return box


def test_exact_pairs_keep_the_exact_background_test():
    source = _photo("astronaut")
    edited, region = _local_edit(source)
    spilled = edited.copy()
    spilled[-20:, -20:] = 0  # 400 px outside the region: 0.15 % of the frame
    exact = PixelJudge().score(_view(source, spilled, region, kind="exact"))
    assert exact["background"] == 0.0
    real = PixelJudge().score(_view(source, spilled, region))
    assert "background_floor" in real and "background_floor" not in exact


def test_a_real_sub_edit_is_unknown_when_its_region_changed_and_fails_when_it_did_not():
    source = _photo("chelsea")
    edited, region = _local_edit(source)
    done = PixelJudge().score(_view(_jpeg(source, 80), _jpeg(edited, 80), region))
    assert done["sub_edits"] == [None] and _route(done) == "borderline", done
    assert "unknown" in done["sub_edit_reasons"][0]
    skipped = PixelJudge().score(_view(_jpeg(source, 80), _jpeg(source, 75), region))
    assert skipped["sub_edits"] == [0.0] and _route(skipped) == "reject", skipped


def test_a_broken_target_is_rejected_however_quiet_its_background():
    source = _photo("coffee")
    _, region = _local_edit(source)
    blank = np.full_like(source, 128)
    scores = PixelJudge().score(_view(source, blank, region))
    assert scores["quality"] == 0.0 and "blank" in scores["quality_reason"]
    assert _route(scores) == "reject"


def test_global_edit_has_no_background_to_keep():
    source = _photo("astronaut")
    painted = cv2.stylization(source[..., ::-1].copy(), sigma_s=30, sigma_r=0.4)[..., ::-1].copy()
    whole = np.ones(source.shape[:2], dtype=bool)
    sub = SubEdit("global", "make it look like a painting", mask=whole, box=[0, 0, 1, 1],
                  params={"free_text": True})
    view = JudgeView("x", source, painted, "Make it look like a painting.", [sub], ~whole, kind="imported")
    scores = PixelJudge().score(view)
    assert scores["background"] == 1.0 and scores["sub_edits"] == [None]
    assert _route(scores) == "borderline"


# ---- the region of a mask-less turn -------------------------------------------------------------

@pytest.mark.parametrize("name", PHOTOS)
def test_changed_region_finds_a_subtle_edit_under_jpeg_noise(name):
    source = _photo(name)
    edited, region = _local_edit(source)
    found = imagediff.changed_region(_jpeg(source, 75), _jpeg(edited, 75))
    recall = np.count_nonzero(found & region) / np.count_nonzero(region)
    spill = np.count_nonzero(found & ~region) / np.count_nonzero(~region)
    assert recall >= 0.9 and spill <= 0.03, (recall, spill)
    # nothing changed: nothing found, however noisy the codec
    assert not imagediff.changed_region(_jpeg(source, 95), _jpeg(source, 70)).any()


def test_changed_region_of_a_background_replacement_leaves_the_subject_out():
    source = _photo("astronaut")
    h, w = source.shape[:2]
    subject = np.zeros((h, w), dtype=bool)
    cv2.ellipse(subject.view(np.uint8), (w // 2, h // 2), (w // 5, h // 3), 0, 0, 360, 1, -1)
    backdrop = cv2.resize(_photo("coffee"), (w, h))
    target = np.where(subject[..., None], source, backdrop)
    found = imagediff.changed_region(_jpeg(source, 85), _jpeg(target, 85))
    assert np.count_nonzero(found & ~subject) / np.count_nonzero(~subject) >= 0.9
    # grown by about two coarse pixels (8 px) around its edge, no more
    assert np.count_nonzero(found & subject) / np.count_nonzero(subject) <= 0.15


# ---- judge-bench --real ---------------------------------------------------------------------------

def test_real_bench_every_class_holds_its_rule_and_the_real_global_pairs_are_not_rejected():
    real = REAL_EDITS if REAL_EDITS.is_dir() else None
    report = real_bench(real, resolution=256, per_class=4)
    rows = report["classes"]
    assert any(n.startswith("keep:") for n in rows) and any(n.startswith("changed:") for n in rows)
    for name, row in rows.items():
        if row["rule"]:
            assert row["held"], (name, row)
            assert row["pairs"] > 0 and row["error"] == 0, (name, row)
    if real is not None:
        ip2p = rows["real instructpix2pix: global"]
        assert ip2p["pairs"] == 4 and ip2p["reject"] == 0, ip2p
    assert report["held"]


def test_judge_bench_real_cli_prints_the_table_and_refuses_a_missing_path(tmp_path):
    bad = subprocess.run([sys.executable, "-m", "flows.cli", "judge-bench", "--real", str(tmp_path / "nope")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "does not exist" in bad.stderr
    none = subprocess.run([sys.executable, "-m", "flows.cli", "judge-bench"], capture_output=True,
                          text=True, timeout=120)
    assert none.returncode == 2 and "--defect-rate is required" in none.stderr


def test_real_bench_variants_of_generative_editor_pairs_hold_their_rules(tmp_path):
    """The variants made from a generative editor's pairs (a tiny random inpainting pipeline
    saved with save_pretrained, composited: background exact) hold the same rules."""
    import torch
    from model_fixtures import tiny_inpaint

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = tiny_inpaint(tmp_path / "sd-inpaint-tiny")
        report = real_bench(None, resolution=128, per_class=2, editor="inpaint",
                            editor_options={"path": str(model), "steps": 1}, edits_per_image=1)
    finally:
        torch.set_num_threads(threads)
    assert report["editor"] == "inpaint" and report["held"], report
    assert all(row["pairs"] > 0 for name, row in report["classes"].items()
               if not name.startswith("changed: an object")), report


def test_the_pair_kind_comes_from_the_editor_and_old_imported_records_still_read_as_imported():
    from pipeline.record import EditSample

    sample = EditSample(id="x", index=0, seed=0)
    assert sample.pair_kind == "exact"
    sample.provenance["editor"] = "magicbrush@dataset"  # written before editors recorded the kind
    assert sample.pair_kind == "imported"
    sample.provenance["pair"] = "generative"
    assert sample.pair_kind == "generative"


@pytest.mark.parametrize("options", [{"real_budget": 0}, {"real_budget": 1.5}, {"real_shift": 0},
                                     {"real_shift": 500}])
def test_bad_real_pair_options_are_refused(options):
    with pytest.raises(ValueError, match="real_"):
        PixelJudge(**options)
