"""The photo plausibility gate on oracle inputs: real photographs with edits made here by hand,
so each check's answer is known — a clean feathered paste passes and a jagged one fails, a flat
fill in a textured surround fails and a texture-preserving one passes, a ghost left after a move
fails — and the pixel judge routes a crude pair to reject with the gate's reason."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from photo_fixtures import photo_array
from pipeline.judges.base import make_judge
from pipeline.judges.plausibility import (
    BAND_BOTTOM,
    FAULT_TOP,
    assess,
    fold,
    grade,
)
from pipeline.record import JudgeView, SubEdit
from pipeline.routing import RoutingPolicy

SIDE = 256


def _photo(name: str) -> np.ndarray:
    image = photo_array(name)
    h, w = image.shape[:2]
    s = min(h, w)
    return np.ascontiguousarray(cv2.resize(image[:s, :s], (SIDE, SIDE), interpolation=cv2.INTER_AREA))


def _disk(cx: int, cy: int, r: int) -> np.ndarray:
    yy, xx = np.mgrid[:SIDE, :SIDE]
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r


def _blend(base: np.ndarray, top: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha.astype(np.float32)[..., None]
    return np.clip(np.rint(base * (1 - a) + top * a), 0, 255).astype(np.uint8)


def _view(source: np.ndarray, target: np.ndarray, kind: str, **params) -> JudgeView:
    changed = (source != target).any(axis=2)
    sub = SubEdit(kind, f"{kind} it", "it", [1], {"domain": "photo", **params})
    sub.mask = changed
    return JudgeView("oracle", source, target, f"{kind} it", [sub], ~changed)


def _scores(view: JudgeView) -> dict[str, float]:
    return {f.check: f.score for f in assess(view, 0)}


def _paste(jagged: bool) -> JudgeView:
    """A compact textured blob (a patch of the cat's fur) pasted on the coffee photo's table."""
    host, donor = _photo("coffee"), _photo("chelsea")
    blob = np.zeros((SIDE, SIDE), np.float32)
    cv2.ellipse(blob, (60, 200), (34, 24), 20, 0, 360, 1.0, -1)
    if jagged:  # a hard alpha with a noisy edge, no feather
        rng = np.random.default_rng(0)
        alpha = (cv2.GaussianBlur(blob, (0, 0), 2.0) + rng.uniform(-0.45, 0.45, blob.shape)) > 0.5
    else:
        alpha = cv2.GaussianBlur(blob, (0, 0), 1.0)
    return _view(host, _blend(host, donor, alpha), "add", cx=60, cy=200)


def test_a_clean_feathered_paste_passes_and_a_jagged_one_fails():
    clean = _scores(_paste(jagged=False))
    assert clean == {"ragged": 1.0, "halo": 1.0}
    jagged = _scores(_paste(jagged=True))
    assert jagged["ragged"] < FAULT_TOP


def _object_on(photo: np.ndarray, centre: tuple[int, int], r: int) -> tuple[np.ndarray, np.ndarray]:
    """The photo with a textured dark-blue object drawn on it, and the object's mask."""
    disk = _disk(*centre, r)
    rng = np.random.default_rng(1)
    paint = np.clip(np.array([30, 40, 150]) + rng.normal(0, 12, (SIDE, SIDE, 3)), 0, 255)
    return _blend(photo, paint, cv2.GaussianBlur(disk.astype(np.float32), (0, 0), 1.0)), disk


def test_a_flat_fill_in_a_textured_surround_fails():
    fur = _photo("chelsea")
    source, disk = _object_on(fur, (60, 190), 18)
    hole = cv2.dilate(disk.astype(np.uint8), np.ones((7, 7), np.uint8)).astype(bool)
    ring = cv2.dilate(hole.astype(np.uint8), np.ones((13, 13), np.uint8)).astype(bool) & ~hole
    target = source.copy()
    target[hole] = np.rint(fur[ring].mean(axis=0)).astype(np.uint8)
    scores = _scores(_view(source, target, "remove"))
    assert scores["residual"] < FAULT_TOP, scores


def test_a_texture_preserving_fill_on_a_smooth_area_passes():
    sky = _photo("rocket")  # the evening sky above the launch pad: smooth
    source, disk = _object_on(sky, (40, 40), 16)
    scores = _scores(_view(source, sky, "remove"))  # the sky as it was behind the object
    assert scores and all(v == 1.0 for v in scores.values()), scores


def _moved(ghost: float) -> JudgeView:
    """A fur-textured object moved right by 80 px on the coffee photo; `ghost` of its detail left
    at the old place."""
    host, fur = _photo("coffee"), _photo("chelsea")
    disk = _disk(60, 200, 20)
    alpha = cv2.GaussianBlur(disk.astype(np.float32), (0, 0), 1.0)
    source = _blend(host, fur, alpha)
    moved = np.roll(alpha, 80, axis=1)
    target = _blend(host, np.roll(fur, 80, axis=1), moved)
    if ghost:
        grey = cv2.cvtColor(source, cv2.COLOR_RGB2GRAY).astype(np.float32)
        detail = grey - cv2.GaussianBlur(grey, (0, 0), 1.5)
        old = (alpha > 0) & (moved == 0)
        faded = target.astype(np.float32)
        faded[old] += ghost * detail[old][:, None]
        target = np.clip(np.rint(faded), 0, 255).astype(np.uint8)
    return _view(source, target, "move", dx=80, dy=0)


def test_a_ghost_left_after_a_move_fails():
    clean = _scores(_moved(ghost=0.0))
    assert clean.get("ghost", 1.0) == 1.0, clean
    haunted = _scores(_moved(ghost=0.8))
    assert haunted["ghost"] < FAULT_TOP, haunted


def test_the_gate_maps_onto_the_routing_bands():
    policy = RoutingPolicy()
    assert grade(0.1, 0.2, 0.4) == 1.0
    unsure = grade(0.25, 0.2, 0.4)
    assert policy.overall_reject <= BAND_BOTTOM <= unsure < policy.sub_edit_pass
    assert grade(0.4, 0.2, 0.4) < policy.overall_reject
    assert grade(1.0, 0.2, 0.4) == 0.0


def test_the_judge_rejects_a_crude_pair_with_the_reason():
    view = _paste(jagged=True)
    policy = RoutingPolicy()
    scores = make_judge("pixel").score(view)
    assert policy.route(scores) == "reject", scores
    assert "implausible" in scores["sub_edit_reasons"][0] and "ragged" in scores["sub_edit_reasons"][0]
    ungated = make_judge("pixel", plausibility=False).score(view)
    assert policy.route(ungated) != "reject", ungated  # the gate made the difference
    clean = make_judge("pixel").score(_paste(jagged=False))
    assert policy.route(clean) == "accept", clean


@pytest.mark.parametrize("change", ["imported", "procedural"])
def test_other_pairs_are_left_alone(change):
    view = _paste(jagged=True)
    if change == "imported":
        view.kind = "imported"
    else:
        view.sub_edits[0].params.pop("domain")
    assert fold(view, [1.0], ["add: fine"]) == ([1.0], ["add: fine"])
