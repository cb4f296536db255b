"""Hostile inputs for the decoders, importers and source paths (issue 25): each is generated here,
small on disk, and run in a child process under an address-space ceiling (`RLIMIT_AS`, 1.5 GiB:
every case is a single process, no Ray, no torch) that reports its own peak RSS
(`ru_maxrss`). Each case asserts the outcome — the bad item refused with a one-line reason, the
good items still read — and the memory it took, never a time.

The case functions (`case_*`) run in the child: they return a JSON-able dict the test checks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
CEILING = 1536 << 20  # the ceiling for a whole command, in bytes
RES = 128


def in_child(case: str, *args: str, address_space: int = CEILING) -> dict:
    """Run `case(*args)` of this module in a fresh interpreter under RLIMIT_AS = `address_space`;
    its result, with `maxrss` (bytes, the child's own peak RSS, always under CEILING) and
    `baseline` (the RSS after imports)."""
    code = (
        "import json, resource, sys, faulthandler\nfaulthandler.dump_traceback_later(240, exit=True)\n"
        f"resource.setrlimit(resource.RLIMIT_AS, ({address_space}, {address_space}))\n"
        f"sys.path[:0] = [{str(TESTS)!r}, {str(ROOT)!r}]\n"
        "import test_bounds_decoders as t\n"
        "t.warm_imports()\n"
        "baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024\n"
        f"out = t.{case}(*{list(args)!r})\n"
        "out['baseline'] = baseline\n"
        "out['maxrss'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024\n"
        "print('RESULT ' + json.dumps(out))\n")
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1",
               PREFECT_HOME=str(ROOT / ".prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(l for l in done.stdout.splitlines() if l.startswith("RESULT "))
    result = json.loads(line[len("RESULT "):])
    assert result["maxrss"] < CEILING
    return result


def warm_imports() -> None:
    """What every case imports anyway, so that `baseline` is the interpreter with its modules."""
    import numpy  # noqa: F401
    from PIL import Image  # noqa: F401

    import pipeline.importers.seats  # noqa: F401
    import pipeline.sources.folder  # noqa: F401
    import pipeline.sources.listfile  # noqa: F401
    import pipeline.sources.parquet  # noqa: F401


def one_line(reason: str) -> bool:
    return bool(reason) and "\n" not in reason and len(reason) <= 200


def _refusal(call) -> str:
    """The one-line reason `call` is refused with (a SourceError or a ValueError)."""
    try:
        call()
    except ValueError as exc:
        return str(exc)
    raise AssertionError("not refused")


def _png(array) -> bytes:
    import io

    from PIL import Image
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


# ---- masks: COCO RLE (parquet `masks`, folder COCO, importers) and Label Studio's brush RLE ------

BOMB = {"size": [50000, 50000], "counts": "0" * 40}  # 50 bytes declaring 2.5 G pixels


def case_masks(tmp: str) -> dict:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from annotation import brush
    from pipeline import rle
    from pipeline.sources.folder import FolderSource
    from pipeline.sources.parquet import ParquetSource

    root = Path(tmp)
    out: dict = {}
    out["bomb"] = _refusal(lambda: rle.decode(BOMB))
    good = np.zeros((48, 64), bool)
    good[5:20, 10:30] = True
    out["mismatch"] = _refusal(lambda: rle.decode(BOMB, expected=(48, 64)))
    out["short_runs"] = _refusal(lambda: rle.decode({"size": [8000, 8000], "counts": "0"}))
    out["too_many_runs"] = _refusal(lambda: rle.decode({"size": [4, 4], "counts": "1" * 1000}))
    out["infinite_size"] = _refusal(lambda: rle.decode({"size": [float("inf"), 4], "counts": [16]}))
    out["good_rle"] = bool(np.array_equal(rle.decode(rle.encode(good), expected=(48, 64)), good))

    # the parquet source's masks column: the bomb fails its row alone
    image = np.full((48, 64, 3), 120, np.uint8)
    pq.write_table(pa.table({"id": ["bad", "good"], "image": [_png(image)] * 2,
                             "labels": [["x"], ["box"]],
                             "masks": [[json.dumps(BOMB)], [json.dumps(rle.encode(good))]]}),
                   root / "regions.parquet")
    source = ParquetSource(path=str(root / "regions.parquet"), resolution=RES)
    out["parquet_bad"] = _refusal(lambda: source.read("bad"))
    out["parquet_good"] = [o.label for o in source.read("good").objects]

    # the folder source's COCO annotations: a bomb RLE, and an image entry declaring a bomb size
    folder = root / "photos"
    folder.mkdir()
    for name in ("a.png", "b.png", "c.png"):
        (folder / name).write_bytes(_png(image))
    coco = {"images": [{"id": 1, "file_name": "a.png", "width": 64, "height": 48},
                       {"id": 2, "file_name": "b.png", "width": 50000, "height": 50000},
                       {"id": 3, "file_name": "c.png", "width": 64, "height": 48}],
            "categories": [{"id": 1, "name": "box"}],
            "annotations": [{"id": 10, "image_id": 1, "category_id": 1, "bbox": [0, 0, 9, 9],
                             "segmentation": BOMB},
                            {"id": 11, "image_id": 2, "category_id": 1, "bbox": [0, 0, 9, 9],
                             "segmentation": BOMB},
                            {"id": 12, "image_id": 3, "category_id": 1, "bbox": [10, 5, 20, 15],
                             "segmentation": rle.encode(good)}]}
    (root / "coco.json").write_text(json.dumps(coco))
    folder_source = FolderSource(path=str(folder), resolution=RES, annotations=str(root / "coco.json"))
    out["coco_bomb_rle"] = _refusal(lambda: folder_source.read("a.png"))
    out["coco_bomb_entry"] = _refusal(lambda: folder_source.read("b.png"))
    out["coco_good"] = [o.label for o in folder_source.read("c.png").objects]

    # brush RLE: its declared size is compared with the sample's before it is decoded
    stroke = brush.encode(good)
    out["brush_good"] = bool(np.array_equal(brush.decode(stroke, 48, 64, expected=(48, 64)), good))
    out["brush_mismatch"] = _refusal(lambda: brush.decode(stroke, 50000, 50000, expected=(48, 64)))
    out["brush_bomb"] = _refusal(lambda: brush.decode(stroke, 50000, 50000))
    # within the pixel cap, but a stream that ends at once: refused, allocating 1 bit a pixel
    header = list((8000 * 8000 * 4).to_bytes(4, "big")) + [0x39, 0x1B, 0xF8]
    out["brush_short"] = _refusal(lambda: brush.decode(header, 8000, 8000))
    return out


def test_masks_declaring_more_than_their_image_are_refused_unread(tmp_path):
    result = in_child("case_masks", str(tmp_path))
    for name in ("bomb", "mismatch", "short_runs", "too_many_runs", "infinite_size", "parquet_bad",
                 "coco_bomb_rle", "coco_bomb_entry", "brush_mismatch", "brush_bomb", "brush_short"):
        assert one_line(result[name]), (name, result[name])
    assert "over the limit of 64,000,000" in result["bomb"]
    assert "declares 50000x50000, its image is 64x48" in result["mismatch"]
    assert "cover 0 pixels, size says 8000x8000" in result["short_runs"]
    assert "region 0 is unreadable" in result["parquet_bad"] and "its image is 64x48" in result["parquet_bad"]
    assert "COCO annotation 10" in result["coco_bomb_rle"]
    assert "COCO image entry is unusable" in result["coco_bomb_entry"]
    assert "its image is 64x48" in result["brush_mismatch"]
    assert "ends early" in result["brush_short"]
    assert result["good_rle"] and result["brush_good"]
    assert result["parquet_good"] == ["box"] and result["coco_good"] == ["box"]
    # nothing of a declared size was allocated: the only large buffer is the brush case's
    # 64 MB alpha plane (8000 x 8000 x 1 byte) — the RGBA uint32 plane it replaces was 1 GB
    assert result["maxrss"] - result["baseline"] < 200 << 20, result


# ---- importers: turn indices, texts, masks of a session ----------------------------------------

def _generic_dataset(root: Path) -> None:
    from photo_fixtures import photo_array
    from test_importers import paint

    from pipeline import rle

    (root / "img").mkdir(parents=True)
    image = photo_array("chelsea")
    edited, region = paint(image, (0.0, 0.0, 0.4, 0.4), (255, 0, 0))
    (root / "img/in.png").write_bytes(_png(image))
    (root / "img/out.png").write_bytes(_png(edited))
    turn = {"source": "img/in.png", "target": "img/out.png"}
    text = "Make the top left corner red."
    lines = [
        {"session": "good", "turn": 1, "instruction": text, **turn},
        {"session": "controls", "turn": 1, "instruction": "Make the\ttop left\x00 corner\x1b red.\r\n",
         **turn},
        {"session": "mask", "turn": 1, "instruction": text, "mask_rle": rle.encode(region), **turn},
    ]
    text_lines = [json.dumps(line) for line in lines]
    # one line each: a 22-digit turn, Infinity, 1e30, 2e7 (2.36 GB before), a megabyte text, a bomb mask
    for sid, value in (("huge", "9999999999999999999999"), ("infinite", "Infinity"),
                       ("e30", "1e30"), ("big", "20000000")):
        text_lines.append(f'{{"session": "{sid}", "turn": {value}, "instruction": "{text}", '
                          f'"source": "img/in.png", "target": "img/out.png"}}')
    text_lines.append(json.dumps({"session": "long", "turn": 1, "instruction": "red " * 200_000,
                                  **turn}))
    text_lines.append(json.dumps({"session": "bomb", "turn": 1, "instruction": text,
                                  "mask_rle": BOMB, **turn}))
    (root / "edits.jsonl").write_text("\n".join(text_lines) + "\n")


def case_generic_import(tmp: str) -> dict:
    from test_importers import import_config, load, run_inline

    root = Path(tmp)
    _generic_dataset(root / "g")
    out = root / "out"
    manifest = run_inline(out, import_config("generic", root / "g" / "edits.jsonl"))
    rows = {}
    for row in manifest.values():
        sample = load(out, row)
        rows[sample.source_key] = {"verdict": row["verdict"], "error": row["error"] or ""}
        if sample.source_key == "controls":
            rows["controls"]["text"] = sample.sub_edits[0].params["original_text"]
    return {"rows": rows}


def test_generic_import_refuses_bad_sessions_alone(tmp_path):
    result = in_child("case_generic_import", str(tmp_path))
    rows = result["rows"]
    assert sorted(rows) == ["big", "bomb", "controls", "e30", "good", "huge", "infinite", "long",
                            "mask"]
    for sid in ("good", "controls", "mask"):
        assert rows[sid]["verdict"] != "error", (sid, rows[sid])
    reasons = {sid: rows[sid]["error"] for sid in ("huge", "infinite", "e30", "big", "long", "bomb")}
    for sid, reason in reasons.items():
        assert rows[sid]["verdict"] == "error" and one_line(reason), (sid, reason)
    assert "turn index 9999999999999999999999 is not an integer in 1..256" in reasons["huge"]
    assert "turn index inf is not an integer" in reasons["infinite"]
    assert "turn index 1e+30 is not an integer" in reasons["e30"]
    assert "turn index 20000000 is not within 1..256" in reasons["big"]
    assert "over the limit of 4,096" in reasons["long"]
    assert "bad RLE mask" in reasons["bomb"] and "over the limit" in reasons["bomb"]
    assert rows["controls"]["text"] == "Make the top left corner red."
    assert result["maxrss"] < 1 << 30, result


def case_magicbrush(tmp: str) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from photo_fixtures import photo_array
    from test_importers import IMAGE, paint

    from pipeline.importers.seats import ImportSource

    root = Path(tmp) / "mb"
    (root / "data").mkdir(parents=True)
    image = photo_array("coffee")
    edited, _ = paint(image, (0.0, 0.0, 0.4, 0.4), (255, 0, 0))
    schema = pa.schema([("img_id", pa.string()), ("turn_index", pa.int32()), ("source_img", IMAGE),
                        ("mask_img", IMAGE), ("instruction", pa.string()), ("target_img", IMAGE)])
    row = {"source_img": {"bytes": _png(image), "path": None}, "mask_img": None,
           "instruction": "Make the top left corner red.", "target_img": {"bytes": _png(edited), "path": None}}
    rows = [{"img_id": "good", "turn_index": 1, **row},
            {"img_id": "huge", "turn_index": 30_000_000, **row},  # 3.1 GB while listing before
            {"img_id": "none", "turn_index": None, **row}]
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), root / "data/dev-00000-of-00001.parquet")
    source = ImportSource(format="magicbrush", path=str(root), resolution=RES)
    out = {"keys": source.keys()}
    out["good"] = list(source.read("dev/good").image.shape)
    out["huge"] = _refusal(lambda: source.read("dev/huge"))
    out["none"] = _refusal(lambda: source.read("dev/none"))
    return out


def test_magicbrush_turn_index_out_of_bounds_refuses_its_session_alone(tmp_path):
    result = in_child("case_magicbrush", str(tmp_path))
    assert result["keys"] == ["dev/good", "dev/huge", "dev/none"]
    assert result["good"] == [RES, 192, 3]  # coffee is 600 x 400
    assert "turn index 30000000 is not within 1..256" in result["huge"] and one_line(result["huge"])
    assert "turn index None is not an integer" in result["none"] and one_line(result["none"])
    assert result["maxrss"] - result["baseline"] < 300 << 20, result


def case_imgedit(tmp: str) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from photo_fixtures import photo_array
    from test_importers import paint

    from pipeline.importers.seats import ImportSource

    root = Path(tmp) / "ie"
    folder = root / "res/00031_00020_000209651"
    folder.mkdir(parents=True)
    image = photo_array("chelsea")
    for k, (box, rgb) in enumerate((((0.0, 0.0, 0.4, 0.4), (255, 0, 0)),
                                    ((0.6, 0.6, 1.0, 1.0), (0, 255, 0))), start=1):
        edited, _ = paint(image, box, rgb)
        (folder / f"origin_{k}.png").write_bytes(_png(image))
        (folder / f"edit_{k}.png").write_bytes(_png(edited))
    turn = pa.struct([("input_images", pa.list_(pa.string())), ("output_images", pa.list_(pa.string())),
                      ("prompt", pa.string())])

    def session(k: int, text: str) -> list[dict]:
        rel = "res/00031_00020_000209651"
        return [{"input_images": [f"{rel}/origin_{k}.png"], "output_images": [f"{rel}/edit_{k}.png"],
                 "prompt": text}]

    # two rows whose images live in the same folder: the same session id
    pq.write_table(pa.table({"data": pa.array([session(1, "Make the top left corner red."),
                                               session(2, "Add a green box in the bottom right.")],
                                              pa.list_(turn))}), root / "content_part0.parquet")
    # a file whose turns are not records
    pq.write_table(pa.table({"data": [["not a turn"]]}), root / "content_bad.parquet")
    source = ImportSource(format="imgedit", path=str(root), resolution=RES)
    keys = source.keys()
    out = {"keys": keys}
    for key in keys:
        try:
            item = source.read(key)
            out[key] = {"ok": item.private["imported"].provenance["source_id"]}
        except ValueError as exc:
            out[key] = {"error": str(exc)}
    return out


def test_imgedit_keeps_rows_sharing_a_session_id_and_refuses_non_record_turns(tmp_path):
    result = in_child("case_imgedit", str(tmp_path))
    assert result["keys"] == ["content_bad/row0", "content_part0/00031_00020_000209651",
                              "content_part0/00031_00020_000209651#2"]
    assert result["content_part0/00031_00020_000209651"] == {"ok": "00031_00020_000209651"}
    assert result["content_part0/00031_00020_000209651#2"] == {"ok": "00031_00020_000209651"}
    reason = result["content_bad/row0"]["error"]
    assert "turn 1 is not a turn record (str)" in reason and one_line(reason)


# ---- the RGBA decoder: cost proportional to pixels, a measured constant -------------------------

def case_write_rgba(path: str) -> dict:
    import numpy as np
    from PIL import Image

    side = 8000  # 64 M pixels: the decoder's cap
    rgba = np.zeros((side, side, 4), np.uint8)
    rgba[..., 0] = np.arange(side, dtype=np.uint8)[None, :]
    rgba[..., 1] = 77
    rgba[..., 3] = np.arange(side, dtype=np.uint8)[:, None]
    Image.fromarray(rgba, "RGBA").save(path, compress_level=1)
    return {"bytes": os.path.getsize(path)}


def case_decode_rgba(path: str) -> dict:
    import resource

    from pipeline.sources.decode import decode_image

    data = Path(path).read_bytes()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    decoded = decode_image(data)
    # row 200, column 100: red 100, green 77, blue 0, alpha 200 → round((v * 200 + 255 * 55) / 255)
    corner = decoded.image[200, 100].tolist()
    return {"shape": list(decoded.image.shape), "notes": decoded.notes, "corner": corner,
            "before": before}


def case_decode_rgba_threads(path: str) -> dict:
    """Four copies at the cap decoded from a thread pool, as the build fingerprints a folder."""
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.sources.decode import decode_image

    data = Path(path).read_bytes()
    with ThreadPoolExecutor(4) as pool:
        shapes = list(pool.map(lambda _: list(decode_image(data).image.shape), range(4)))
    return {"shapes": shapes}


def test_an_rgba_png_at_the_pixel_cap_decodes_in_uint8_bands(tmp_path):
    path = tmp_path / "big.png"
    assert in_child("case_write_rgba", str(path))["bytes"] < 8 << 20  # small on disk
    result = in_child("case_decode_rgba", str(path))
    assert result["shape"] == [8000, 8000, 3] and "alpha composited on white" in result["notes"]
    assert result["corner"] == [133, 115, 55]
    # measured 7.5 bytes a pixel (Pillow's RGBA 4 + the RGB result 3 + one band); the float32
    # compositing it replaced took 60 (3.7 GB for this file)
    per_pixel = (result["maxrss"] - result["before"]) / 64e6
    assert per_pixel < 9.0, per_pixel
    # four at once (four killed `mcie build` while fingerprinting): two decode at a time
    # (`DECODE_BUDGET_PIXELS`), the others wait
    # (threads reserve address space they never touch: the RSS is held to the ceiling, the
    # address space to twice it, so a regression fails here rather than swapping the machine)
    together = in_child("case_decode_rgba_threads", str(path), address_space=2 * CEILING)
    assert together["shapes"] == [[8000, 8000, 3]] * 4
    assert together["maxrss"] - together["baseline"] < 2 * 9.0 * 64e6, together


# ---- source paths: the list and parquet sources stay inside their file's folder -----------------

def case_paths(tmp: str) -> dict:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.sources.listfile import ListSource
    from pipeline.sources.parquet import ParquetSource

    root = Path(tmp)
    data = root / "data"
    (data / "imgs").mkdir(parents=True)
    png = _png(np.full((48, 64, 3), 90, np.uint8))
    (data / "imgs/in.png").write_bytes(png)
    (root / "outside.png").write_bytes(png)
    (data / "imgs/link.png").symlink_to(root / "outside.png")
    absolute = str(root / "outside.png")
    names = ["imgs/in.png", "../outside.png", absolute, "imgs/../../outside.png", "imgs/link.png",
             "~/outside.png"]
    (data / "list.txt").write_text("\n".join(names) + "\n")
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(len(names))], "file_name": names}),
                   data / "paths.parquet")
    out: dict = {}
    for kind, make in (("list", lambda **o: ListSource(path=str(data / "list.txt"), resolution=RES, **o)),
                       ("parquet", lambda **o: ParquetSource(path=str(data / "paths.parquet"),
                                                             resolution=RES, **o))):
        for allow in (False, True):
            source = make(allow_outside_root=allow)
            results = []
            for key in source.keys():
                try:
                    results.append(["ok", list(source.read(key).image.shape)])
                except ValueError as exc:
                    results.append(["refused", str(exc)])
            out[f"{kind}-{allow}"] = results
    return out


def test_list_and_parquet_paths_stay_inside_their_folder_unless_allowed(tmp_path):
    result = in_child("case_paths", str(tmp_path))
    for kind in ("list", "parquet"):
        refused = result[f"{kind}-False"]
        assert refused[0] == ["ok", [RES, RES, 3]]  # inside the folder: read
        for outcome, reason in refused[1:]:
            assert outcome == "refused" and one_line(reason), (kind, reason)
            assert "--allow-outside-root" in reason
        assert "leads outside" in refused[1][1] and "absolute path refused" in refused[2][1]
        assert "leads outside" in refused[3][1] and "leads outside" in refused[4][1]  # the symlink
        allowed = result[f"{kind}-True"]
        assert [o for o, _ in allowed[:5]] == ["ok"] * 5, allowed  # `~/outside.png` does not exist


def test_the_allow_outside_root_flag_reaches_the_source_options():
    import argparse

    from pipeline.cli_args import add_seat_arguments, seat_fields

    parser = argparse.ArgumentParser()
    add_seat_arguments(parser)
    args = parser.parse_args(["--source", "list", "--source-path", "l.txt", "--allow-outside-root"])
    assert seat_fields(args)["source_options"] == {"path": "l.txt", "allow_outside_root": True}
    args = parser.parse_args(["--source", "list", "--source-path", "l.txt"])
    assert "allow_outside_root" not in seat_fields(args)["source_options"]


# ---- bounds themselves: JSON values, texts, parquet row groups -----------------------------------

def test_json_lines_texts_and_numbers_are_bounded():
    from pipeline import bounds

    assert bounds.json_value('{"a": 1, "b": [1.5]}') == {"a": 1, "b": [1.5]}
    for line, words in (('{"turn": Infinity}', "Infinity is not a finite"),
                        ('{"turn": NaN}', "NaN is not a finite"),
                        ('{"x": 1e400}', "1e400 is not a finite"),
                        ('{"x": 9999999999999999999999}', "22 digits"),
                        ("{" * 10 + "x", "is not JSON")):
        with pytest.raises(bounds.OutOfBounds, match=words):
            bounds.json_value(line)
    with pytest.raises(bounds.OutOfBounds, match="over the limit"):
        bounds.json_value('"' + "x" * (bounds.MAX_JSON_LINE_BYTES + 1) + '"')
    assert bounds.json_value('{"turn": Infinity}', strict=False)["turn"] == float("inf")
    assert bounds.clean_text(" a\tb\r\nc\x00d\x1b[0m\u2028e\n") == "a b cd[0m e"
    with pytest.raises(bounds.OutOfBounds, match="over the limit of 4,096"):
        bounds.clean_text("x" * 5000)
    assert len(bounds.clip_text("y" * 10_000)) == bounds.MAX_LABEL_CHARS
    for value in (True, "3", [1], None, 0.5, float("nan"), 0, 257, -1):
        with pytest.raises(bounds.OutOfBounds):
            bounds.turn_index(value)
    assert bounds.turn_index(3.0) == 3 and bounds.turn_index(256) == 256


def test_a_parquet_row_group_declaring_too_much_is_refused_before_it_is_read(tmp_path, monkeypatch):
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline import bounds
    from pipeline.sources.base import SourceError
    from pipeline.sources.parquet import ParquetSource

    png = _png(np.full((48, 64, 3), 90, np.uint8))
    pq.write_table(pa.table({"image": [png] * 4}), tmp_path / "t.parquet", row_group_size=2)
    source = ParquetSource(path=str(tmp_path / "t.parquet"), resolution=RES)
    assert source.read("t.parquet:0").image.shape == (RES, RES, 3)
    monkeypatch.setattr(bounds, "MAX_ROW_GROUP_BYTES", len(png))  # one image per group, not two
    with pytest.raises(SourceError, match="row group 1 declares .* over the limit") as info:
        source.read("t.parquet:2")
    assert one_line(str(info.value))
