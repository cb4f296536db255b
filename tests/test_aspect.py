"""No image is ever stretched (issue 23): photos of every common aspect, cut from scikit-image's
real photographs, read by a file source and imported as edit sessions, keep their aspect; the
sample, its target and every mask line up with the original file's pixels through the recorded
`provenance["crop"]`, and regions a source gives (COCO, parquet) land on their object."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from flows.plan import prepare_build
from photo_fixtures import photo_array
from pipeline import rle
from pipeline.config import BuildConfig
from pipeline.dataset.output import finalize, read_quarantine
from pipeline.dataset.shards import decode_sample, iter_tar_groups, read_members_dir
from pipeline.importers.assemble import assemble
from pipeline.importers.base import MaskSpec, RawSession, RawTurn
from pipeline.sources.base import SOURCES, SourceError, new_sample
from pipeline.sources.frame import Frame, same_aspect
from pipeline.unit import UnitPipeline

R = 128
MAGENTA, CYAN = (255, 0, 255), (0, 255, 255)
EDIT, EDIT2 = (20, 200, 20), (250, 220, 0)

# name: (photo, crop box in the skimage photo, file format) — every common aspect and an odd one
PHOTOS = {
    "4x3": ("motorcycle_left", (50, 10, 690, 490), "PNG"),  # 640 x 480
    "3x2": ("coffee", (0, 0, 600, 400), "PNG"),  # 600 x 400: fits the grid, nothing cropped
    "16x9": ("rocket", (0, 40, 640, 400), "JPEG"),  # 640 x 360
    "9x16": ("astronaut", (120, 0, 390, 480), "PNG"),  # 270 x 480
    "odd": ("astronaut", (100, 60, 407, 420), "PNG"),  # 307 x 360
}


def expected_frame(w: int, h: int, resolution: int = R) -> tuple[tuple[int, int], list[float], float]:
    """The documented rule, written out independently: (size, crop, scale)."""
    short, long = min(w, h), max(w, h)
    scale = resolution / short
    out = max(resolution, math.floor(long * scale / 64 + 1e-9) * 64)
    cut = (long - out / scale) / 2
    if w >= h:
        return (out, resolution), [cut, 0, w - cut, h], scale
    return (resolution, out), [0, cut, w, h - cut], scale


def square(w: int, h: int, fx: float, fy: float, side: float = 0.12) -> list[int]:
    """A square box (in whole pixels) of `side` x the short side, its corner at (fx, fy) of the image."""
    n = round(side * min(w, h))
    x0, y0 = round(fx * w), round(fy * h)
    return [x0, y0, x0 + n, y0 + n]


def marked(name: str) -> tuple[np.ndarray, dict[str, list[int]]]:
    """The photo cut to its aspect, with a magenta and a cyan square at known places."""
    photo, box, _ = PHOTOS[name]
    image = np.array(Image.fromarray(photo_array(photo)).crop(box))
    h, w = image.shape[:2]
    marks = {"magenta": square(w, h, 0.22, 0.3), "cyan": square(w, h, 0.62, 0.58)}
    for colour, (x0, y0, x1, y1) in zip((MAGENTA, CYAN), marks.values()):
        image[y0:y1, x0:x1] = colour
    return image, marks


def save(image: np.ndarray, path: Path, fmt: str = "PNG") -> Path:
    Image.fromarray(image).save(path, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return path


def found(image: np.ndarray, colour: tuple[int, int, int], near: list[float], pad: int = 6) -> list[int] | None:
    """Bounding box of the pixels of `colour` (within 60 levels) in a window around box `near`."""
    h, w = image.shape[:2]
    x0, y0 = max(0, int(near[0]) - pad), max(0, int(near[1]) - pad)
    x1, y1 = min(w, int(math.ceil(near[2])) + pad), min(h, int(math.ceil(near[3])) + pad)
    window = image[y0:y1, x0:x1].astype(int)
    hit = np.sqrt(((window - np.array(colour)) ** 2).sum(axis=2)) < 60
    ys, xs = np.nonzero(hit)
    if xs.size == 0:
        return None
    return [x0 + int(xs.min()), y0 + int(ys.min()), x0 + int(xs.max()) + 1, y0 + int(ys.max()) + 1]


def carried(box: list[int], crop: list[float], scale: float) -> list[float]:
    return [(box[0] - crop[0]) * scale, (box[1] - crop[1]) * scale,
            (box[2] - crop[0]) * scale, (box[3] - crop[1]) * scale]


def assert_lines_up(sample_image: np.ndarray, original: np.ndarray, provenance: dict,
                    marks: dict[str, list[int]]) -> None:
    """The sample is the original at the recorded crop, scaled alike on both axes, and the
    markers land where the rule puts them."""
    h, w = original.shape[:2]
    size, crop, scale = expected_frame(w, h)
    assert provenance["original_size"] == [w, h]
    assert provenance["crop"] == pytest.approx(crop, abs=1e-3)
    assert (sample_image.shape[1], sample_image.shape[0]) == size
    # cropping the original at the recorded window and resizing it reproduces the sample
    redo = np.asarray(Image.fromarray(original).resize(size, Image.Resampling.LANCZOS,
                                                       box=tuple(provenance["crop"])))
    gap = np.abs(redo.astype(int) - sample_image.astype(int))
    assert gap.mean() < 1.5 and np.percentile(gap, 99) <= 12, (gap.mean(), np.percentile(gap, 99))
    at = {}
    for colour, name in ((MAGENTA, "magenta"), (CYAN, "cyan")):
        want = carried(marks[name], crop, scale)
        got = found(sample_image, colour, want)
        assert got is not None, name
        assert np.allclose(got, want, atol=1.01), (name, got, want)
        assert abs((got[2] - got[0]) - (got[3] - got[1])) <= 1  # a square stays a square
        at[name] = got
    # the two markers' offsets scale alike on both axes: nothing is stretched
    dx = (at["cyan"][0] - at["magenta"][0]) / (marks["cyan"][0] - marks["magenta"][0])
    dy = (at["cyan"][1] - at["magenta"][1]) / (marks["cyan"][1] - marks["magenta"][1])
    assert dx == pytest.approx(scale, abs=1.5 / (marks["cyan"][0] - marks["magenta"][0]))
    assert dy == pytest.approx(scale, abs=1.5 / (marks["cyan"][1] - marks["magenta"][1]))


# ---------------------------------------------------------------- the rule

def test_same_aspect_accepts_rounding_of_any_real_size_and_nothing_more():
    assert same_aspect((512, 384), (683, 512)) and same_aspect((683, 512), (512, 384))
    assert same_aspect((451, 300), (225, 150))  # MagicBrush's half-size mask, floored
    assert same_aspect((640, 427), (213, 142)) and same_aspect((307, 360), (154, 180))
    assert not same_aspect((640, 480), (640, 427)) and not same_aspect((451, 300), (112, 150))
    assert not same_aspect((640, 480), (660, 480))
    for w, h in ((640, 480), (307, 360), (1920, 1080), (451, 300)):
        for k in (0.13, 0.5, 0.77, 1.9):
            for rounding in (math.floor, round, math.ceil):
                assert same_aspect((w, h), (rounding(w * k), rounding(h * k)))


def test_the_frame_carries_an_array_of_another_resolution_through_the_same_window():
    original, marks = marked("4x3")
    frame = Frame.fit(640, 480, R)
    half = np.asarray(Image.fromarray(original).resize((320, 240), Image.Resampling.LANCZOS))
    assert frame.crop_in((320, 240)) == pytest.approx((40, 0, 280, 240))
    a, b = frame.image(original).astype(int), frame.image(half).astype(int)
    assert np.abs(a - b).mean() < 3
    mask = np.zeros((480, 640), bool)
    x0, y0, x1, y1 = marks["cyan"]
    mask[y0:y1, x0:x1] = True
    small = np.asarray(Image.fromarray(mask).resize((213, 160), Image.Resampling.NEAREST))  # 1/3, rounded
    want = frame.box(marks["cyan"])
    for m in (mask, small):
        ys, xs = np.nonzero(frame.mask(m))
        assert np.allclose([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], want, atol=1.01)
    with pytest.raises(ValueError, match="aspect"):
        frame.image(np.zeros((427, 640, 3), np.uint8))
    assert frame.box([0, 0, 70, 70])[2] == 0  # inside the band the crop cuts away: empty


# ---------------------------------------------------------------- file sources

@pytest.mark.parametrize("name", list(PHOTOS))
def test_a_file_source_keeps_the_aspect_and_records_the_crop(tmp_path, name):
    original, marks = marked(name)
    fmt = PHOTOS[name][2]
    save(original, tmp_path / f"{name}.{fmt.lower().replace('jpeg', 'jpg')}", fmt)
    if fmt == "JPEG":  # what the source decodes is the JPEG's pixels
        original = np.asarray(Image.open(next(tmp_path.glob(f"{name}.*"))).convert("RGB"))
    (tmp_path / "list.txt").write_text("".join(f"{p.name}\n" for p in tmp_path.glob(f"{name}.*")))
    for kind, path in (("folder", tmp_path), ("list", tmp_path / "list.txt")):
        source = SOURCES.make(kind, context={"seed": 0, "resolution": R}, path=str(path))
        key = [k for k in source.keys() if k.startswith(name)][0]
        sample = new_sample(source.read(key), kind, 0, key, 0)
        assert_lines_up(sample.source, original, sample.provenance, marks)


def test_coco_regions_land_on_their_object_after_the_crop(tmp_path):
    original, marks = marked("4x3")  # 640 x 480 at 128: the middle 480 x 480, 80 px cut each side
    save(original, tmp_path / "moto.png")
    mx0, my0, mx1, my1 = marks["magenta"]
    cyan = np.zeros((480, 640), bool)
    cyan[marks["cyan"][1]:marks["cyan"][3], marks["cyan"][0]:marks["cyan"][2]] = True
    annotations = [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [mx0, my0, mx1 - mx0, my1 - my0],
         "segmentation": [[mx0, my0, mx1, my0, mx1, my1, mx0, my1]]},
        {"id": 2, "image_id": 1, "category_id": 2, "bbox": [0, 0, 1, 1], "segmentation": rle.encode(cyan)},
        {"id": 3, "image_id": 1, "category_id": 1, "bbox": [mx0, my0, mx1 - mx0, my1 - my0]},
        {"id": 4, "image_id": 1, "category_id": 1, "bbox": [10, 200, 50, 50],  # in the cut band
         "segmentation": [[10, 200, 60, 200, 60, 250, 10, 250]]},
    ]
    (tmp_path / "coco.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "moto.png", "width": 640, "height": 480}],
        "categories": [{"id": 1, "name": "magenta square"}, {"id": 2, "name": "cyan square"}],
        "annotations": annotations}))
    source = SOURCES.make("folder", context={"seed": 0, "resolution": R}, path=str(tmp_path),
                          annotations="coco.json")
    item = source.read("moto.png")
    assert item.image.shape == (128, 128, 3) and item.meta["crop"] == [80, 0, 560, 480]
    assert [o.attributes["coco_id"] for o in item.objects] == [1, 2, 3]  # 4 was cropped away
    for obj in item.objects:
        colour = MAGENTA if obj.label == "magenta square" else CYAN
        seen = found(item.image, colour, obj.box)
        assert np.allclose(obj.box, seen, atol=1.01), (obj.label, obj.box, seen)
        if obj.mask is not None:
            ys, xs = np.nonzero(obj.mask)
            hit = np.sqrt(((item.image[ys, xs].astype(int) - colour) ** 2).sum(axis=1)) < 60
            assert hit.mean() > 0.8  # the mask covers the object's pixels


def test_parquet_regions_land_on_their_object_after_the_crop(tmp_path):
    original, marks = marked("odd")  # 307 x 360 at 128: 26.5 px cut from top and bottom
    cyan = np.zeros((360, 307), bool)
    cyan[marks["cyan"][1]:marks["cyan"][3], marks["cyan"][0]:marks["cyan"][2]] = True
    buffer = io.BytesIO()
    Image.fromarray(original).save(buffer, "PNG")
    pq.write_table(pa.table({
        "image": [buffer.getvalue()],
        "boxes": [[[float(v) for v in marks["magenta"]], None, [100.0, 2.0, 150.0, 20.0]]],
        "labels": [["magenta square", "cyan square", "cut away"]],
        "masks": [[None, rle.encode(cyan), None]],
    }), tmp_path / "regions.parquet")
    item = SOURCES.make("parquet", context={"seed": 0, "resolution": R},
                        path=str(tmp_path / "regions.parquet")).read("regions.parquet:0")
    assert item.image.shape == (128, 128, 3) and item.meta["crop"] == [0, 26.5, 307, 333.5]
    assert [o.label for o in item.objects] == ["magenta square", "cyan square"]
    for obj, colour in zip(item.objects, (MAGENTA, CYAN)):
        assert np.allclose(obj.box, found(item.image, colour, obj.box), atol=1.01)


# ---------------------------------------------------------------- imports

def paint(image: np.ndarray, box: list[int], rgb) -> np.ndarray:
    out = image.copy()
    out[box[1]:box[3], box[0]:box[2]] = rgb
    return out


def white_mask(size: tuple[int, int], box: list[int], to: tuple[int, int] | None = None) -> np.ndarray:
    mask = np.zeros((size[1], size[0]), np.uint8)
    mask[box[1]:box[3], box[0]:box[2]] = 255
    if to is not None:
        mask = np.asarray(Image.fromarray(mask).resize(to, Image.Resampling.NEAREST))
    return mask


def smaller(image: np.ndarray, k: float) -> tuple[np.ndarray, tuple[int, int]]:
    """`image` saved at k x its size (each side rounded to whole pixels), as a dataset may."""
    h, w = image.shape[:2]
    size = (round(w * k), round(h * k))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.LANCZOS)), size


def generic_session(root: Path, sid: str, name: str) -> dict:
    """Two turns on a marked photo: turn 1 at the file's size with a mask file; turn 2's input,
    output and mask saved at 3/4 of it (a different resolution of the same aspect)."""
    original, marks = marked(name)
    h, w = original.shape[:2]
    edit1, edit2 = square(w, h, 0.4, 0.12, 0.15), square(w, h, 0.3, 0.62, 0.1)
    after1 = paint(original, edit1, EDIT)
    after2 = paint(after1, edit2, EDIT2)
    in2, size2 = smaller(after1, 0.75)
    out2, _ = smaller(after2, 0.75)
    files = {f"{sid}_in1.png": original, f"{sid}_out1.png": after1, f"{sid}_mask1.png": white_mask((w, h), edit1),
             f"{sid}_in2.png": in2, f"{sid}_out2.png": out2,
             f"{sid}_mask2.png": white_mask((w, h), edit2, to=size2)}
    for file, array in files.items():
        save(array, root / file)
    lines = [{"session": sid, "turn": 1, "instruction": "paint a green square", "source": f"{sid}_in1.png",
              "target": f"{sid}_out1.png", "mask": f"{sid}_mask1.png"},
             {"session": sid, "turn": 2, "instruction": "paint a yellow square", "source": f"{sid}_in2.png",
              "target": f"{sid}_out2.png", "mask": f"{sid}_mask2.png"}]
    return {"lines": lines, "original": original, "marks": marks, "edits": (edit1, edit2),
            "after": after2}


def run_import(root: Path, out: Path) -> dict[str, tuple[dict, object]]:
    """Import `root/edits.jsonl` inline (the flow's own steps); {session id: (row, sample)}."""
    config = BuildConfig(resolution=R, shard_size=8, defect_rate=0.0, min_edits=1, max_edits=8,
                         judge="none", source="import",
                         source_options={"format": "generic", "path": str(root / "edits.jsonl")},
                         grounder="imported", composer="imported", editor="imported")
    total = prepare_build(out, config)
    pipeline = UnitPipeline(config, out)
    for unit in range(config.num_units(total)):
        pipeline.run(unit)
    samples = {}
    for row in finalize(out).to_pylist():
        if row["shard"].endswith(".tar"):
            sample = next(decode_sample(m) for k, m in iter_tar_groups(out / "shards" / row["shard"])
                          if k == row["id"])
        elif row["shard"].startswith("quarantine/"):
            sample = read_quarantine(out, row["id"])
        else:
            sample = decode_sample(read_members_dir(out / row["shard"]))
        samples[sample.source_key] = (row, sample)
    return samples


def test_imported_sessions_keep_the_aspect_and_line_up_with_the_first_file(tmp_path):
    root = tmp_path / "g"
    root.mkdir()
    sessions = {name: generic_session(root, name, name) for name in PHOTOS}
    lines = [line for s in sessions.values() for line in s["lines"]]
    (root / "edits.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    samples = run_import(root, tmp_path / "out")
    assert set(samples) == set(PHOTOS)
    for name, session in sessions.items():
        row, sample = samples[name]
        assert row["verdict"] == "accept", (name, row["error"])
        original, marks = session["original"], session["marks"]
        assert_lines_up(sample.source, original, sample.provenance, marks)
        # the target (turn 2's output, saved at 3/4 size) lines up with the original file too
        h, w = original.shape[:2]
        size, crop, scale = expected_frame(w, h)
        for colour, mark in ((MAGENTA, "magenta"), (CYAN, "cyan")):
            want = carried(marks[mark], crop, scale)
            assert np.allclose(found(sample.target, colour, want), want, atol=1.51), (name, mark)
        for sub, box, colour in zip(sample.sub_edits, session["edits"], (EDIT, EDIT2)):
            want = carried(box, crop, scale)
            assert sub.params["mask_from"] == "dataset"
            assert np.allclose(sub.box, want, atol=1.51), (name, sub.box, want)  # the mask, moved
            assert np.allclose(found(sample.target, colour, want), want, atol=1.51)  # the edit, moved


def test_a_later_turn_at_another_size_is_accepted_and_another_aspect_refused_with_real_sizes():
    def session(first: np.ndarray, later: np.ndarray) -> RawSession:
        def png(a: np.ndarray) -> bytes:
            buffer = io.BytesIO()
            Image.fromarray(a).save(buffer, "PNG")
            return buffer.getvalue()

        mask = white_mask((first.shape[1], first.shape[0]), [40, 40, 120, 120])
        return RawSession(key="s", dataset="generic", source_id="s", split=None, license="CC0", turns=[
            RawTurn(index=1, turn_id="1", instruction="paint a square", source=lambda: png(first),
                    target=lambda: png(first), mask=lambda: MaskSpec("white", png(mask))),
            RawTurn(index=2, turn_id="2", instruction="paint another square", source=None,
                    target=lambda: png(later), mask=None)])

    photo = photo_array("motorcycle_left")
    first = np.array(Image.fromarray(photo).crop((0, 0, 683, 500)).resize((683, 512)))
    later = paint(np.asarray(Image.fromarray(first).resize((512, 384), Image.Resampling.LANCZOS)),
                  [300, 100, 360, 160], EDIT)  # 683 x 512 and 512 x 384: 4:3 up to a pixel
    parts = assemble(session(first, later), resolution=R, min_edits=1, max_edits=8)
    assert parts.source.shape == parts.target.shape == (128, 128, 3)
    assert parts.provenance["original_size"] == [683, 512]
    # turn 2's region is its difference (no mask), found in 4 px blocks: it holds the painted
    # square, carried through the crop, and reaches at most two blocks beyond it
    x0, y0, x1, y1 = Frame.fit(683, 512, R).box([400, 133.4, 480, 213.4])
    bx0, by0, bx1, by1 = parts.sub_edits[1].box
    assert bx0 <= x0 + 1 and by0 <= y0 + 1 and bx1 >= x1 - 1 and by1 >= y1 - 1
    assert bx0 >= x0 - 8 and by0 >= y0 - 8 and bx1 <= x1 + 8 and by1 <= y1 + 8
    other = np.asarray(Image.fromarray(photo).crop((0, 0, 640, 427)))
    with pytest.raises(SourceError) as info:
        assemble(session(np.asarray(Image.fromarray(photo).crop((0, 0, 640, 480))), other),
                 resolution=R, min_edits=1, max_edits=8)
    assert str(info.value) == "turn 2 output is 640x427, turn 1 input 640x480: a different aspect ratio"
