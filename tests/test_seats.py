"""The four front seats share one pattern: a registry per seat, backends chosen by name with an
options dict, checked before anything is built; bad arguments are one line and exit 2."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline import rle
from pipeline.config import BuildConfig, ConfigError
from pipeline.record import InventoryObject, MAX_SUB_EDITS, sample_id
from pipeline.registry import Registry
from pipeline.sources.frame import Frame

ROOT = Path(__file__).resolve().parents[1]


def test_registry_checks_names_and_options_before_building():
    registry: Registry = Registry("widget", ())
    built = []

    @registry.register("round")
    def make_round(radius: int, colour: str = "red", resolution: int = 0):
        built.append((radius, colour, resolution))
        return "round"

    with pytest.raises(ValueError, match="unknown widget 'square'; known: round"):
        registry.make("square")
    with pytest.raises(ValueError, match="widget 'round' has no option 'steps'"):
        registry.make("round", radius=1, steps=3)
    with pytest.raises(ValueError, match="widget 'round' needs option 'radius'"):
        registry.make("round")
    with pytest.raises(ValueError, match="set by the build"):
        registry.make("round", context={"resolution": 64}, radius=1, resolution=3)
    assert built == []
    # the build's context reaches a backend only where its factory takes it by name
    registry.make("round", context={"resolution": 64, "seed": 5}, radius=2)
    assert built == [(2, "red", 64)]


def test_seats_default_from_the_source():
    procedural = BuildConfig(count=3)
    assert (procedural.grounder, procedural.composer, procedural.editor) == ("given", "scene", "procedural")
    photos = BuildConfig(source="folder", source_options={"path": "."})
    assert (photos.grounder, photos.composer, photos.editor) == ("classical", "inventory", "photo")
    # the photo editor on procedural scenes: the composer follows the editor
    mixed = BuildConfig(count=3, editor="photo")
    assert (mixed.grounder, mixed.composer) == ("given", "inventory")


@pytest.mark.parametrize("kwargs, message", [
    ({"count": 3, "source": "nosuch"}, "unknown source 'nosuch'"),
    ({"source": "folder"}, "source 'folder' needs option 'path'"),
    ({"count": 3, "editor_options": {"steps": 4}}, "editor 'procedural' has no option 'steps'"),
    ({"count": 3, "grounder": "given", "grounder_options": {"sam_path": "x"}},
     "grounder 'given' has no option 'sam_path'"),
    ({"count": 3, "source_options": {"seed": 4}}, "'seed' is a build parameter"),
    ({}, "a procedural build needs --count"),
    ({"count": 3, "min_edits": 2, "max_edits": MAX_SUB_EDITS + 1}, f"<= {MAX_SUB_EDITS}"),
    ({"count": 3, "edits_per_image": 0}, "edits per image"),
])
def test_bad_seat_configuration_is_one_clear_error(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        BuildConfig(**kwargs)


def test_count_cannot_exceed_what_the_source_holds():
    config = BuildConfig(source="folder", source_options={"path": "."}, edits_per_image=2)
    assert config.total_samples(5) == 10
    assert BuildConfig(count=4, source="folder", source_options={"path": "."}).total_samples(5) == 4
    with pytest.raises(ConfigError, match="more than the source's 5 images"):
        BuildConfig(count=6, source="folder", source_options={"path": "."}).total_samples(5)
    assert config.key_of(7) == (3, 1)


def test_sample_ids_derive_from_seed_key_and_edit_index():
    assert sample_id(3, "a/b.jpg", 0) == sample_id(3, "a/b.jpg")
    ids = {sample_id(3, "a/b.jpg", k) for k in range(4)} | {sample_id(4, "a/b.jpg"), sample_id(3, "a/c.jpg")}
    assert len(ids) == 6


@pytest.mark.parametrize("size, resolution, expected, crop", [
    ((512, 512), 256, (256, 256), (0, 0, 512, 512)),
    ((640, 480), 256, (320, 256), (20, 0, 620, 480)),  # 341.3 → 320: 20 px cut from each side
    ((480, 1000), 512, (512, 1024), (0, 20, 480, 980)),  # 1066.7 → 1024, floored: never padded
    ((1000, 1010), 512, (512, 512), (0, 5, 1000, 1005)),
    ((600, 400), 512, (768, 512), (0, 0, 600, 400)),  # 3:2 fits the grid: nothing cut
    ((150, 100), 100, (128, 100), (11, 0, 139, 100)),  # a resolution off the grid
    ((100, 100), 100, (100, 100), (0, 0, 100, 100)),  # never below the resolution
])
def test_short_side_is_the_resolution_and_the_long_side_a_centre_crop_to_a_multiple_of_64(
        size, resolution, expected, crop):
    frame = Frame.fit(*size, resolution)
    assert frame.size == expected and frame.crop == pytest.approx(crop)
    x0, y0, x1, y1 = frame.crop
    assert expected[0] / (x1 - x0) == pytest.approx(expected[1] / (y1 - y0))  # one scale: no stretch
    assert x0 + x1 == pytest.approx(size[0]) and y0 + y1 == pytest.approx(size[1])  # centred


def test_rle_matches_pycocotools_and_round_trips():
    mask_api = pytest.importorskip("pycocotools.mask")
    rng = np.random.default_rng(1)
    for _ in range(50):
        h, w = (int(v) for v in rng.integers(1, 70, 2))
        mask = rng.random((h, w)) < rng.random()
        ours = rle.encode(mask)
        theirs = mask_api.encode(np.asfortranarray(mask.astype(np.uint8)))
        assert ours["counts"] == theirs["counts"].decode() and ours["size"] == list(theirs["size"])
        assert np.array_equal(rle.decode(ours), mask)
        assert np.array_equal(mask_api.decode({"size": ours["size"], "counts": ours["counts"].encode()}), mask)
    with pytest.raises(ValueError, match="cover"):
        rle.decode({"size": [4, 4], "counts": [3, 2]})


def test_inventory_objects_round_trip_through_json():
    mask = np.zeros((5, 7), bool)
    mask[1:3, 2:6] = True
    obj = InventoryObject(id=2, label="region", box=[2, 1, 6, 3], mask=mask,
                          attributes={"color": "red"}, confidence=0.5, producer="classical")
    back = InventoryObject.from_json(obj.to_json())
    assert np.array_equal(back.mask, mask) and back.to_json() == obj.to_json()


def mcie(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("args, message", [
    (["--source", "nosuch"], "unknown source 'nosuch'"),
    (["--source", "folder"], "source 'folder' needs option 'path'"),
    (["--source", "folder", "--source-path", "/nonexistent/photos"], "/nonexistent/photos"),
    (["--count", "3", "--editor-option", "steps=4"], "editor 'procedural' has no option 'steps'"),
    (["--count", "3", "--source-option", "nothing"], "expected KEY=VALUE"),
    ([], "needs --count"),
])
def test_bad_build_arguments_are_one_line_exit_2_and_create_nothing(tmp_path, args, message):
    out = tmp_path / "out"
    result = mcie("build", "--out", str(out), *args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr
    assert not out.exists()
