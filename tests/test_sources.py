"""The safe decoder, the four file sources and dedup, on real photographs (scikit-image's package
data) and on every kind of hostile file."""

from __future__ import annotations

import csv
import gzip
import io
import json
import pickle
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageFile

from photo_fixtures import (bomb_png, encode, exif_rotated_jpeg, gradient16, hostile_folder,
                            photo_array, photo_folder, skimage_photos)
from pipeline import rle
from pipeline.sources.base import SOURCES, SourceError
from pipeline.sources.decode import check_shape, decode_image
from pipeline.sources.frame import Frame
from pipeline.sources.dedup import find_duplicates, fingerprint, hamming
from pipeline.sources.folder import FolderSource
from pipeline.sources.listfile import ListSource
from pipeline.sources.parquet import ParquetSource
from pipeline.sources.webdataset import WebDatasetSource

R = 64  # build resolution in these tests: small, so the file stays fast


def fitted(image: np.ndarray, resolution: int = R) -> np.ndarray:
    """`image` as a source at `resolution` makes it."""
    return Frame.fit(image.shape[1], image.shape[0], resolution).image(image)


def one_line_error(call) -> str:
    with pytest.raises(SourceError) as info:
        call()
    reason = str(info.value)
    assert reason and "\n" not in reason and len(reason) <= 200
    return reason


# ---------------------------------------------------------------- the decoder

def test_skimage_photos_are_found_in_the_installed_wheel():
    photos = skimage_photos()
    assert {"astronaut", "chelsea", "coffee", "rocket"} <= set(photos)
    assert all(p.is_file() for p in photos.values())


@pytest.mark.parametrize("name", ["astronaut", "coffee", "rocket", "camera"])
def test_decode_real_photos_to_rgb(name):
    path = skimage_photos()[name]
    decoded = decode_image(path.read_bytes())
    with Image.open(path) as im:
        assert decoded.original_size == im.size
    assert decoded.image.dtype == np.uint8 and decoded.image.shape[2] == 3
    assert decoded.image.shape[:2] == decoded.original_size[::-1]
    assert (name == "camera") == ("grey" in decoded.notes)


def test_decode_16bit_png_is_scaled_not_clipped():
    ramp = gradient16()
    decoded = decode_image(encode(ramp, "PNG"))
    assert "16-bit scaled" in decoded.notes
    row = decoded.image[0, :, 0].astype(int)
    assert row[0] == 0 and row[-1] == 255  # the full range survives: not white, not black
    assert np.all(np.diff(row) >= 0) and len(np.unique(row)) > 200  # the gradient is kept
    assert np.abs(row - ramp[0] / 257).max() <= 1


def test_decode_applies_exif_rotation():
    stored = photo_array("rocket")[::2, ::2]  # 320 wide, 214 high as stored
    decoded = decode_image(exif_rotated_jpeg(stored, orientation=6))
    assert "exif-rotated" in decoded.notes
    assert decoded.original_size == (stored.shape[0], stored.shape[1])  # turned: 214 x 320
    turned = np.rot90(stored, k=-1).astype(int)  # orientation 6: rotate 90° clockwise
    assert np.abs(decoded.image.astype(int) - turned).mean() < 8


def test_decode_composites_alpha_on_white_and_notes_it():
    rgb = photo_array("chelsea")
    alpha = np.full(rgb.shape[:2], 255, np.uint8)
    alpha[:, :100] = 0
    alpha[:, 100:200] = 128
    decoded = decode_image(encode(np.dstack([rgb, alpha]), "PNG"))
    assert "alpha composited on white" in decoded.notes
    assert np.all(decoded.image[:, :100] == 255)
    half = decoded.image[:, 100:200].astype(int)
    expected = rgb[:, 100:200].astype(int) * 128 / 255 + 255 * 127 / 255
    assert np.abs(half - expected).max() <= 1
    assert np.array_equal(decoded.image[:, 200:], rgb[:, 200:])
    grey_alpha = decode_image(encode(np.dstack([rgb[:, :, 0], alpha]), "PNG"))
    assert "alpha composited on white" in grey_alpha.notes and "grey" in grey_alpha.notes


def _cmyk(array):
    buffer = io.BytesIO()
    Image.fromarray(array).convert("CMYK").save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def _palette(array):
    buffer = io.BytesIO()
    Image.fromarray(array).convert("P", palette=Image.Palette.ADAPTIVE).save(buffer, "PNG")
    return buffer.getvalue()


def _animated(array):
    frames = [Image.fromarray(array), Image.fromarray(255 - array), Image.fromarray(array[::-1])]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=50)
    return buffer.getvalue()


@pytest.mark.parametrize("make, note, tolerance", [
    (_cmyk, "cmyk converted", 12),
    (_palette, "palette", 12),
    (lambda a: encode(a[:, :, 1], "PNG"), "grey", 60),
    (_animated, "first frame of 3", 25),
    (lambda a: encode(a, "WEBP", lossless=True), None, 0),
    (lambda a: encode(a, "BMP"), None, 0),
    (lambda a: encode(a, "TIFF"), None, 0),
])
def test_decode_normalises_modes_to_rgb(make, note, tolerance):
    source = photo_array("coffee")[::4, ::4]
    decoded = decode_image(make(source))
    assert decoded.image.shape == source.shape and decoded.image.dtype == np.uint8
    if note:
        assert note in decoded.notes
    assert np.abs(decoded.image.astype(int) - source.astype(int)).mean() <= tolerance


@pytest.mark.parametrize("width, height", [(50_000, 50_000), (10_000, 10_000), (9_000, 8_000)])
def test_decode_refuses_a_bomb_before_decoding(width, height, monkeypatch):
    from PIL import ImageFile

    data = bomb_png(width, height)
    assert len(data) < 200

    def no_pixels(self, *args, **kwargs):  # refused from the header: no pixel is ever decoded
        raise AssertionError("LOADED")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_pixels)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning may escape either
        reason = one_line_error(lambda: decode_image(data))
    assert "bomb" in reason and "pixels" in reason and "LOADED" not in reason


def test_decode_max_pixels_is_the_callers():
    data = encode(photo_array("astronaut"), "PNG")
    reason = one_line_error(lambda: decode_image(data, max_pixels=100_000))
    assert "512x512" in reason and "pixels" in reason


def _bad_crc_png():
    data = bytearray(encode(photo_array("chelsea")[:64, :64], "PNG"))
    data[data.find(b"IDAT") + 20] ^= 0xFF  # inside the first IDAT: its CRC no longer matches
    return bytes(data)


@pytest.mark.parametrize("data, words", [
    (b"", "empty"),
    (skimage_photos()["rocket"].read_bytes()[:30_000], "truncated"),
    (encode(photo_array("chelsea"), "PNG")[:20_000], ""),
    (_bad_crc_png(), ""),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 100, "not an image"),
    (b"hello, this is text\n" * 10, "not an image"),
    (b"<html><body>404</body></html>", "not an image"),
    (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", "not an image"),  # never Ghostscript
    (bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8)), "not an image"),
    (b"\xff\xd8\xff\xe0" + b"\x00" * 50, ""),
    (b"GIF89a" + b"\xff" * 20, ""),
])
def test_decode_refusals_are_one_line_source_errors(data, words):
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    reason = one_line_error(lambda: decode_image(data))
    assert words in reason


def test_check_shape_and_the_frame():
    assert one_line_error(lambda: check_shape(1, 1, 32, 4.0)) == "image is 1x1 px, under --min-side 32"
    assert one_line_error(lambda: check_shape(800, 40, 32, 4.0)) == "aspect 20.0 beyond --max-aspect 4"
    check_shape(400, 100, 32, 4.0)
    coffee = photo_array("coffee")  # 600 x 400: 3:2 fits the grid at 128, nothing cropped
    out = fitted(coffee, 128)
    assert out.shape == (128, 192, 3) and Frame.fit(600, 400, 128).crop == (0, 0, 600, 400)
    assert np.abs(out.astype(float).mean() - coffee.mean()) < 3  # Lanczos keeps the picture
    tall = fitted(coffee.transpose(1, 0, 2).copy(), 128)
    assert tall.shape == (192, 128, 3)
    assert fitted(out, 128) is out
    # at 64 the long side (96) is floored to 64: the middle 400 x 400 of the file, not a squeeze
    assert Frame.fit(600, 400, 64).crop == (100, 0, 500, 400)
    gap = np.abs(fitted(coffee).astype(int) - fitted(coffee[:, 100:500]))
    assert gap.mean() < 1 and gap[:, 2:-2].max() <= 4  # the edges see the real neighbours


# ---------------------------------------------------------------- folder

def test_folder_accounts_for_every_file_of_a_hostile_folder(tmp_path):
    expected = hostile_folder(tmp_path / "hostile")
    source = FolderSource(path=str(tmp_path / "hostile"), resolution=R)
    assert source.keys() == sorted(expected)  # every non-hidden file is a key, sorted
    outcome, reasons = {}, {}
    for key in source.keys():
        try:
            item = source.read(key)
        except SourceError as exc:
            outcome[key], reasons[key] = "quarantine", str(exc)
            assert "\n" not in str(exc)
            continue
        outcome[key] = "ok"
        w, h = item.meta["original_size"]
        assert item.image.shape == (*Frame.fit(w, h, R).size[::-1], 3)
        assert item.meta["crop"] == Frame.fit(w, h, R).meta()["crop"]
        assert isinstance(item.meta["decode_notes"], list)
    assert outcome == expected
    assert reasons["outside_link.png"] == "symlink leads outside the source folder"
    assert reasons["notes.txt"] == "not an image (.txt)"
    assert reasons["tiny.png"] == "image is 1x1 px, under --min-side 32"
    assert reasons["panorama.png"] == "aspect 20.0 beyond --max-aspect 4"
    assert "pixels" in reasons["bomb.png"]
    assert "empty" in reasons["empty.jpg"] and "truncated" in reasons["photos/truncated.jpg"]
    notes = {k: source.read(k).meta["decode_notes"] for k, v in expected.items() if v == "ok"}
    assert "exif-rotated" in notes["rotated.jpg"] and "cmyk converted" in notes["cmyk.jpg"]
    assert "16-bit scaled" in notes["gray16.png"] and "palette" in notes["palette.png"]
    assert "first frame of 3" in notes["animated.gif"]
    assert "alpha composited on white" in notes["rgba.png"]


def test_folder_keys_are_recursive_sorted_and_stable(tmp_path):
    root = photo_folder(tmp_path / "photos", ["coffee", "rocket"])
    photo_folder(root / "b" / "deeper", ["chelsea"])
    photo_folder(root / ".hidden", ["astronaut"])
    (root / "inside_link.png").symlink_to(root / "coffee.png")
    source = FolderSource(path=str(root), resolution=R)
    keys = ["b/deeper/chelsea.png", "coffee.png", "inside_link.png", "rocket.jpg"]
    assert source.keys() == keys
    assert FolderSource(path=str(root), resolution=R).keys() == keys
    coffee = source.read("coffee.png")
    assert coffee.image.shape == (64, 64, 3)  # 600 x 400 → short side 64, long 96 → cropped to 64
    assert coffee.meta["original_size"] == [600, 400] and coffee.meta["crop"] == [100, 0, 500, 400]
    assert np.array_equal(source.read("inside_link.png").image, coffee.image)  # followed inside
    rocket = source.read("rocket.jpg")
    assert rocket.image.shape == (64, 64, 3) and rocket.meta["crop"] == [106.5, 0, 533.5, 427]
    for bad in ("../photos/coffee.png", "/etc/passwd", "missing.png"):
        one_line_error(lambda: source.read(bad))
    copy = pickle.loads(pickle.dumps(source))
    assert np.array_equal(copy.read("coffee.png").image, coffee.image)


def test_folder_options_are_checked():
    with pytest.raises(ValueError, match="does not exist"):
        FolderSource(path="/nonexistent/folder", resolution=R)
    with pytest.raises(ValueError, match="resolution"):
        FolderSource(path=".", resolution=8)


def _coco(tmp_path):
    """chelsea.png (451 x 300) with a polygon, a compressed RLE and an uncompressed RLE."""
    root = photo_folder(tmp_path / "coco", ["chelsea", "coffee"])
    rle_mask = np.zeros((300, 451), bool)
    rle_mask[100:200, 50:150] = True
    list_mask = np.zeros((300, 451), bool)
    list_mask[10:40, 300:420] = True
    compressed = rle.encode(rle_mask)
    uncompressed = {"size": [300, 451], "counts": _list_counts(list_mask)}
    data = {
        "images": [{"id": 7, "file_name": "chelsea.png", "width": 451, "height": 300}],
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "patch"}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 1, "iscrowd": 0, "bbox": [150, 60, 150, 120],
             "segmentation": [[150, 60, 300, 60, 300, 180, 150, 180]]},
            {"id": 2, "image_id": 7, "category_id": 2, "iscrowd": 0, "bbox": [50, 100, 100, 100],
             "segmentation": compressed},
            {"id": 3, "image_id": 7, "category_id": 2, "iscrowd": 1, "bbox": [300, 10, 120, 30],
             "segmentation": uncompressed},
        ],
    }
    (root / "instances.json").write_text(json.dumps(data))
    return root


def _list_counts(mask):
    flat = mask.ravel(order="F")
    counts, current, run = [], False, 0
    for value in flat:
        if value != current:
            counts.append(run)
            current, run = value, 0
        run += 1
    counts.append(run)
    return counts


def test_folder_coco_annotations_become_inventory_objects(tmp_path):
    root = _coco(tmp_path)
    source = FolderSource(path=str(root), resolution=R, annotations=str(root / "instances.json"))
    assert source.keys() == ["chelsea.png", "coffee.png"]  # the json is not a key
    item = source.read("chelsea.png")
    assert item.image.shape == (64, 64, 3)  # 451 x 300 → 96 x 64, the middle 64 x 64 kept
    assert item.meta["crop"] == [75.5, 0, 375.5, 300]
    s = 64 / 300  # the same scale on both axes
    expected = {1: [150, 60, 300, 180], 2: [50, 100, 150, 200], 3: [300, 10, 420, 40]}
    assert [o.label for o in item.objects] == ["cat", "patch", "patch"]
    for obj, (ann_id, (x0, y0, x1, y1)) in zip(item.objects, expected.items()):
        assert obj.producer == "coco" and obj.confidence == 1.0
        assert obj.attributes["coco_id"] == ann_id
        assert obj.mask is not None and obj.mask.shape == (64, 64)
        want = np.clip([(x0 - 75.5) * s, y0 * s, (x1 - 75.5) * s, y1 * s], 0, 64)
        assert np.allclose(obj.box, want, atol=1.01), (obj.box, want)
        ys, xs = np.nonzero(obj.mask)
        assert [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] == obj.box
    assert item.objects[2].attributes.get("iscrowd") is True
    assert source.read("coffee.png").objects == []  # not annotated: an empty inventory
    copy = pickle.loads(pickle.dumps(source))
    assert [o.box for o in copy.read("chelsea.png").objects] == [o.box for o in item.objects]


# ---------------------------------------------------------------- list

def test_list_source_txt_and_csv(tmp_path):
    photo_folder(tmp_path / "imgs", ["chelsea", "coffee", "rocket"])
    (tmp_path / "lists").mkdir()
    txt = tmp_path / "lists" / "images.txt"
    absolute = str(tmp_path / "imgs" / "rocket.jpg")
    txt.write_text(f"# my photos\n../imgs/coffee.png\n\n{absolute}\n../imgs/coffee.png\n"
                   "../imgs/missing.png\n")
    # paths outside the list file's folder are read only with allow_outside_root
    source = ListSource(path=str(txt), resolution=R, allow_outside_root=True)
    assert source.keys() == ["../imgs/coffee.png", absolute, "../imgs/missing.png"]
    assert source.read("../imgs/coffee.png").image.shape == (64, 64, 3)
    assert source.read(absolute).meta["original_size"] == [640, 427]
    assert "not found" in one_line_error(lambda: source.read("../imgs/missing.png"))
    inside = ListSource(path=str(txt), resolution=R)
    assert "leads outside" in one_line_error(lambda: inside.read("../imgs/coffee.png"))
    assert "absolute path refused" in one_line_error(lambda: inside.read(absolute))

    table = tmp_path / "images.csv"
    with table.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption", "url", "license"])
        writer.writerow(["imgs/chelsea.png", "a cat, with a comma", "https://x/cat.png", "CC0"])
        writer.writerow(["imgs/coffee.png", "", "", ""])
        writer.writerow(["https://example.com/a.jpg", "remote", "", ""])
    source = ListSource(path=str(table), resolution=R)
    assert source.keys() == ["imgs/chelsea.png", "imgs/coffee.png", "https://example.com/a.jpg"]
    cat = source.read("imgs/chelsea.png")
    assert {k: cat.meta[k] for k in ("caption", "url", "license")} == {
        "caption": "a cat, with a comma", "url": "https://x/cat.png", "license": "CC0"}
    assert "caption" not in source.read("imgs/coffee.png").meta
    assert "not fetched" in one_line_error(lambda: source.read("https://example.com/a.jpg"))
    (tmp_path / "bad.csv").write_text("name,caption\na.png,x\n")
    with pytest.raises(ValueError, match="no path column"):
        ListSource(path=str(tmp_path / "bad.csv"), resolution=R)


# ---------------------------------------------------------------- webdataset

def _add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _shards(tmp_path):
    photos = skimage_photos()
    root = tmp_path / "wds"
    root.mkdir()
    with tarfile.open(root / "00001.tar", "w") as tar:
        _add(tar, "000010005.jpg", photos["rocket"].read_bytes())
        _add(tar, "000010005.json", json.dumps({"url": "https://r/rocket.jpg", "license": "PD",
                                                "caption": "from json"}).encode())
        _add(tar, "000010005.txt", b"a rocket on its pad\n")
        _add(tar, "000010002.png", photos["coffee"].read_bytes())
        _add(tar, "000010002.json", json.dumps({"caption": "a cup of coffee"}).encode())
    with tarfile.open(root / "00000.tar", "w") as tar:
        _add(tar, "000000001.png", photos["chelsea"].read_bytes())
        _add(tar, "000000001.txt", "a cat — ginger".encode())
        _add(tar, "000000003.json", b"{}")  # a sample whose image is missing
        _add(tar, "000000004.webp", encode(photo_array("astronaut"), "WEBP", quality=80))
    return root


def test_webdataset_source_reads_img2dataset_shards(tmp_path):
    root = _shards(tmp_path)
    source = WebDatasetSource(path=str(root), resolution=R)
    assert source.keys() == ["00000/000000001", "00000/000000003", "00000/000000004",
                             "00001/000010005", "00001/000010002"]
    cat = source.read("00000/000000001")
    assert cat.meta["caption"] == "a cat — ginger" and cat.image.shape == (64, 64, 3)
    rocket = source.read("00001/000010005")
    assert rocket.meta["caption"] == "a rocket on its pad"  # the .txt wins over the json
    assert rocket.meta["url"] == "https://r/rocket.jpg" and rocket.meta["license"] == "PD"
    assert rocket.meta["original_size"] == [640, 427]
    assert source.read("00001/000010002").meta["caption"] == "a cup of coffee"
    assert source.read("00000/000000004").image.shape == (64, 64, 3)
    assert "no image member" in one_line_error(lambda: source.read("00000/000000003"))
    assert one_line_error(lambda: source.read("00009/1"))

    fresh = pickle.loads(pickle.dumps(source))  # a worker: indexes the shard lazily on read
    assert fresh._index == {}
    assert np.array_equal(fresh.read("00001/000010005").image, rocket.image)
    single = WebDatasetSource(path=str(root / "00001.tar"), resolution=R)
    assert single.keys() == ["00001/000010005", "00001/000010002"]
    capped = WebDatasetSource(path=str(root), resolution=R, max_member_bytes=50_000)
    reason = one_line_error(lambda: capped.read("00001/000010002"))
    assert "max_member_bytes" in reason


def test_webdataset_damaged_shards_are_accounted_for(tmp_path, caplog):
    root = _shards(tmp_path)
    whole = (root / "00001.tar").read_bytes()
    (root / "00001.tar").write_bytes(whole[: len(whole) // 2])  # cut inside the coffee png
    (root / "00002.tar").write_bytes(gzip.compress(whole))  # compressed: cannot be seeked
    source = WebDatasetSource(path=str(root), resolution=R)
    keys = source.keys()
    assert keys[3:] == ["00001/000010005", "00001/000010002", "00001/#damaged", "00002/#damaged"]
    assert source.read("00001/000010005").meta["caption"] == "a rocket on its pad"
    assert "truncated" in one_line_error(lambda: source.read("00001/000010002"))
    assert "damaged after 0 samples" in one_line_error(lambda: source.read("00002/#damaged"))
    assert "00002.tar" in caplog.text


# ---------------------------------------------------------------- parquet

def _hf_struct(path):
    return {"bytes": Path(path).read_bytes(), "path": Path(path).name}


def test_parquet_image_columns_and_keys(tmp_path):
    photos = skimage_photos()
    root = tmp_path / "pq"
    root.mkdir()
    # Hugging Face image struct with an id column, two row groups
    pq.write_table(pa.table({
        "id": ["cat", "cup", "rocket"],
        "image": [_hf_struct(photos[n]) for n in ("chelsea", "coffee", "rocket")],
        "text": ["a cat", "a cup", None],
        "url": ["u1", "u2", "u3"],
    }), root / "a.parquet", row_group_size=2)
    source = ParquetSource(path=str(root / "a.parquet"), resolution=R)
    assert source.image_column == "image" and source.image_kind == "struct"
    assert source.keys() == ["cat", "cup", "rocket"]
    assert source.read("cat").meta["caption"] == "a cat"
    rocket = source.read("rocket")
    assert rocket.meta["url"] == "u3" and "caption" not in rocket.meta
    assert rocket.image.shape == (64, 64, 3)
    assert source.read("cup").image.shape == (64, 64, 3)

    # binary column, duplicate ids → file:row keys; a directory of files, sorted
    sub = root / "more"
    sub.mkdir()
    pq.write_table(pa.table({
        "key": ["x", "x"],
        "jpg": [photos["rocket"].read_bytes(), b"garbage"],
        "caption": ["r", "g"],
    }), sub / "b.parquet")
    # a path column, relative to the parquet file's folder
    photo_folder(sub / "files", ["astronaut"])
    pq.write_table(pa.table({"file_name": ["files/astronaut.png", "files/none.png"],
                             "license": ["CC-BY", None]}), sub / "c.parquet")
    binary = ParquetSource(path=str(sub / "b.parquet"), resolution=R)
    assert binary.image_kind == "binary" and binary.keys() == ["b.parquet:0", "b.parquet:1"]
    assert binary.read("b.parquet:0").meta["caption"] == "r"
    assert "not an image" in one_line_error(lambda: binary.read("b.parquet:1"))
    paths = ParquetSource(path=str(sub / "c.parquet"), resolution=R)
    assert paths.image_kind == "path"
    assert paths.read("c.parquet:0").meta == {"license": "CC-BY", "decode_notes": [],
                                              "original_size": [512, 512], "crop": [0, 0, 512, 512]}
    assert "not found" in one_line_error(lambda: paths.read("c.parquet:1"))
    assert one_line_error(lambda: paths.read("c.parquet:7"))
    whole = ParquetSource(path=str(sub), resolution=R, image_column="jpg")
    assert whole.files == {"b.parquet": sub / "b.parquet", "c.parquet": sub / "c.parquet"}
    copy = pickle.loads(pickle.dumps(source))
    assert np.array_equal(copy.read("rocket").image, rocket.image)
    with pytest.raises(ValueError, match="image_column"):
        ParquetSource(path=str(root / "a.parquet"), resolution=R, image_column="url2")


def test_parquet_regions_become_inventory_objects(tmp_path):
    photos = skimage_photos()
    mask = np.zeros((400, 600), bool)  # coffee is 600 x 400
    mask[100:300, 240:480] = True
    pq.write_table(pa.table({
        "image": [photos["coffee"].read_bytes()],
        "boxes": [[[30.0, 50.0, 330.0, 250.0], [0.0, 0.0, 1.0, 1.0]]],
        "labels": [["cup", "speck"]],
        "masks": [[None, rle.encode(mask)]],
    }), tmp_path / "regions.parquet")
    source = ParquetSource(path=str(tmp_path / "regions.parquet"), resolution=128)
    item = source.read("regions.parquet:0")
    assert item.image.shape == (128, 192, 3)
    s = 192 / 600  # = 128 / 400
    cup, masked = item.objects
    assert cup.label == "cup" and cup.mask is None and cup.producer == "parquet"
    assert cup.box == [int(np.floor(30 * s)), 16, int(np.ceil(330 * s)), 80]
    assert masked.label == "speck" and masked.mask.shape == (128, 192)
    assert masked.box == [round(240 * s), round(100 * s), round(480 * s), round(300 * s)]  # its mask


# ---------------------------------------------------------------- registry

def test_sources_are_registered_with_checked_options(tmp_path):
    root = photo_folder(tmp_path / "p", ["chelsea"])
    (tmp_path / "l.txt").write_text("p/chelsea.png\n")
    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        _add(tar, "k.png", (root / "chelsea.png").read_bytes())
    pq.write_table(pa.table({"image": [(root / "chelsea.png").read_bytes()]}), tmp_path / "t.parquet")
    for name, path in [("folder", root), ("list", tmp_path / "l.txt"),
                       ("webdataset", tmp_path / "s.tar"), ("parquet", tmp_path / "t.parquet")]:
        source = SOURCES.make(name, context={"seed": 3, "resolution": R}, path=str(path),
                              min_side=16, max_aspect=3.0)
        assert source.name == name
        (key,) = source.keys()
        assert source.read(key).image.shape == (64, 64, 3)
        with pytest.raises(ValueError, match="needs option 'path'"):
            SOURCES.make(name, context={"resolution": R})
    with pytest.raises(ValueError, match="no option 'annotations'"):
        SOURCES.make("list", path=str(tmp_path / "l.txt"), resolution=R, annotations="x.json")


# ---------------------------------------------------------------- dedup

def _copies(array):
    h, w = array.shape[:2]
    small = Image.fromarray(array).resize((w * 2 // 3, h * 2 // 3), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    small.save(buffer, "JPEG", quality=55)
    brighter = np.clip(array.astype(int) + 10, 0, 255).astype(np.uint8)
    return [decode_image(buffer.getvalue()).image, brighter]


def test_dedup_finds_resized_and_recompressed_copies():
    entries = []
    for name in ("astronaut", "chelsea", "coffee", "rocket"):
        original = photo_array(name)
        entries.append((name, *fingerprint(fitted(original))))
        for i, copy in enumerate(_copies(original)):
            entries.append((f"{name}-copy{i}", *fingerprint(fitted(copy))))
    entries.append(("astronaut-again", *fingerprint(fitted(photo_array("astronaut")))))
    duplicates = find_duplicates(entries)
    assert duplicates == {f"{n}-copy{i}": n for n in ("astronaut", "chelsea", "coffee", "rocket")
                          for i in (0, 1)} | {"astronaut-again": "astronaut"}
    assert entries[-1][1] == entries[0][1]  # same pixels, same sha256


def test_dedup_keeps_different_photos_apart():
    names = [n for n in skimage_photos() if n != "motorcycle_right"]
    prints = {n: fingerprint(fitted(photo_array(n))) for n in names}
    assert len({sha for sha, _ in prints.values()}) == len(names)
    assert find_duplicates([(n, *prints[n]) for n in names]) == {}
    assert min(hamming(prints[a][1], prints[b][1]) for a in names for b in names if a < b) > 12
    # The stereo pair (left and right eye of one scene) is a near-duplicate, and is found in
    # the whole pictures. (In their centre crops at R = 64 the shift between the eyes weighs
    # more: 14 bits apart, not merged.)
    left, right = (fingerprint(photo_array(n)) for n in ("motorcycle_left", "motorcycle_right"))
    assert find_duplicates([("left", *left), ("right", *right)]) == {"right": "left"}


def test_find_duplicates_maps_to_the_first_occurrence_deterministically():
    base = 0x0123_4567_89AB_CDEF
    entries = [("a", "s1", base), ("b", "s2", base ^ 0b111), ("c", "s3", base ^ (0xFFFF << 20)),
               ("d", "s1", 0), ("e", "s5", base ^ (0b1111111 << 40)), ("f", "s6", base ^ 1 << 63)]
    expected = {"b": "a", "d": "a", "f": "a"}
    assert find_duplicates(entries) == expected
    assert find_duplicates(entries, max_distance=0) == {"d": "a"}
    assert find_duplicates(list(entries)) == expected  # same input, same answer
    reordered = [entries[1], entries[0]] + entries[2:]
    assert find_duplicates(reordered)["a"] == "b"


@pytest.mark.parametrize("pairs", [1 << 20, 97])
def test_find_duplicates_equals_a_brute_force_search_on_many_near_copies(pairs, monkeypatch):
    # the 16-bit-band search (max_distance <= 7) must find exactly the earliest original within
    # the distance, as comparing against every earlier original does — candidates gathered at
    # once or in many runs (of about 97)
    from pipeline.sources import dedup

    monkeypatch.setattr(dedup, "_PAIRS", pairs)
    rng = np.random.default_rng(7)
    entries = []
    for i in range(1500):
        if entries and rng.random() < 0.3:  # a copy of an earlier hash with 0-9 bits flipped
            ph = int(entries[int(rng.integers(len(entries)))][2])
            for bit in rng.choice(64, int(rng.integers(0, 10)), replace=False):
                ph ^= 1 << int(bit)
        else:
            ph = int(rng.integers(0, 2**63)) * 2 + int(rng.integers(0, 2))
        entries.append((f"k{i}", f"s{i}" if rng.random() > 0.03 else "same", ph))
    x = 0x5A5A_0F0F_3C3C_9999
    spread = x ^ 0b11 ^ (0b11 << 16) ^ (0b11 << 32) ^ (1 << 48)  # 7 bits: no band agrees exactly
    z = 0x1234_FEDC_BA98_7654
    top = z ^ 0b11 ^ (0b11 << 16) ^ (0b11 << 32) ^ (1 << 63)  # the one bit at a band's top
    entries += [("x", "sx", x), ("x-spread", "sxs", spread),
                ("y", "sy", x ^ 0xFF << 8), ("x-and-y", "sxy", x ^ 0xF << 8),  # 4 from x, 4 from y
                ("z", "sz", z), ("z-top", "szt", top)]
    found = find_duplicates(entries, max_distance=7)
    assert found["x-spread"] == "x" and found["x-and-y"] == "x" and "y" not in found
    assert found["z-top"] == "z"
    for d in (0, 1, 4, 6, 7):
        expected, firsts, exact = {}, [], {}
        for key, sha, ph in entries:
            if sha in exact:
                expected[key] = exact[sha]
                continue
            match = next((k for k, h in firsts if hamming(h, ph) <= d), None)
            if match is not None:
                expected[key] = match
                continue
            firsts.append((key, ph))
            exact[sha] = key
        assert find_duplicates(entries, max_distance=d) == expected, d
        near = sum(sha != "same" for key, sha, _ in entries if key in expected)
        assert near > 30  # the case is not trivial: near copies, not only equal sha256s
    # chains: a copy of a copy that lies within the distance of the copy but not of the original
    # is an original itself (duplicates are never originals)
    assert any(key not in expected and any(hamming(ph, other) <= d for _, _, other in entries[:i])
               for i, (key, _, ph) in enumerate(entries))


# ---------------------------------------------------------------- threads

def _outcome(source, key):
    try:
        item = source.read(key)
        return "ok", item.image.tobytes(), tuple(item.meta["decode_notes"])
    except SourceError as exc:
        return "quarantine", str(exc), ()


def test_sources_read_the_same_from_a_thread_pool(tmp_path):
    """The build fingerprints keys from a thread pool: reads must not share mutable state."""
    from concurrent.futures import ThreadPoolExecutor

    hostile_folder(tmp_path / "h")
    folder = FolderSource(path=str(tmp_path / "h"), resolution=R)
    photos = skimage_photos()
    pq.write_table(pa.table({"image": [photos[n].read_bytes() for n in ("chelsea", "coffee", "rocket",
                                                                         "astronaut")] * 3}),
                   tmp_path / "t.parquet", row_group_size=2)
    table = ParquetSource(path=str(tmp_path / "t.parquet"), resolution=R)
    for source in (folder, table):
        keys = source.keys() * 2
        sequential = [_outcome(source, k) for k in keys]
        with ThreadPoolExecutor(4) as pool:
            assert list(pool.map(lambda k: _outcome(source, k), keys)) == sequential
