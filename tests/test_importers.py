"""Importing edit datasets: fixtures in each format's published schema, made from scikit-image's
real photos (multi-turn and single-turn sessions, shuffled rows, masks at another resolution, a
missing turn, a broken image, a broken turn chain), imported through the build machinery and
checked sample by sample; the InstructPix2Pix dev pairs in ../shared/real-edits when present."""

from __future__ import annotations

import io
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from flows.plan import prepare_build
from photo_fixtures import photo_array
from pipeline import rle
from pipeline.compose.procedural import join_turns, split_turns, turn_text
from pipeline.config import BuildConfig
from pipeline.dataset.output import finalize, read_quarantine
from pipeline.dataset.report import write_report
from pipeline.dataset.shards import iter_tar_groups, decode_sample, read_members_dir
from pipeline.dataset.verify import check_build
from pipeline.imagediff import changed_region
from pipeline.importers.edit_types import infer_edit_type
from pipeline.judges.pixel import PixelJudge
from pipeline.record import EDIT_TYPES, SUB_EDIT_TYPES, SubEdit
from pipeline.sources.frame import Frame
from pipeline.unit import UnitPipeline

ROOT = Path(__file__).resolve().parents[1]
RES = 128
IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


def paint(image: np.ndarray, box: tuple[float, float, float, float], rgb) -> tuple[np.ndarray, np.ndarray]:
    """A real edit: the box (fractions of the image) painted; returns (edited, region)."""
    h, w = image.shape[:2]
    x0, y0, x1, y1 = int(box[0] * w), int(box[1] * h), int(box[2] * w), int(box[3] * h)
    out = image.copy()
    out[y0:y1, x0:x1] = rgb
    region = np.zeros((h, w), dtype=bool)
    region[y0:y1, x0:x1] = True
    return out, region


def rgba_mask(region: np.ndarray, image: np.ndarray, scale: float = 0.5, brush: int = 0) -> bytes:
    """MagicBrush's masked image: the photo with the edited region (grown by a `brush` of that
    many px, as a person paints it) transparent, at `scale` of the photo's size."""
    if brush:
        import cv2

        region = cv2.dilate(region.astype(np.uint8), np.ones((2 * brush + 1,) * 2, np.uint8)).astype(bool)
    h, w = region.shape
    rgba = np.dstack([image, np.where(region, 0, 255).astype(np.uint8)])
    im = Image.fromarray(rgba, "RGBA").resize((max(1, int(w * scale)), max(1, int(h * scale))),
                                              Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    im.save(buffer, "PNG")
    return buffer.getvalue()


BOXES = [(0.1, 0.1, 0.4, 0.4), (0.55, 0.5, 0.9, 0.85), (0.1, 0.6, 0.35, 0.9)]
COLOURS = [(220, 30, 30), (30, 200, 40), (40, 60, 230)]
TEXTS = ["Make the top left corner red.", "add a green box in the bottom right",
         "Turn it into winter, please!"]


def chain(photo: str, turns: int):
    """[(input, output, region, text)] of a real `turns`-turn session on a skimage photo."""
    image = photo_array(photo)
    out = []
    for k in range(turns):
        edited, region = paint(image, BOXES[k], COLOURS[k])
        out.append((image, edited, region, TEXTS[k]))
        image = edited
    return out


def magicbrush(root: Path) -> dict:
    """data/{split}-NNNNN-of-NNNNN.parquet in MagicBrush's schema; returns what each session is."""
    rows, expect = [], {}

    def session(img_id, photo, turns, drop=None, broken=None, mask_scale=0.5):
        for k, (src, tgt, region, text) in enumerate(chain(photo, turns), start=1):
            if k == drop:
                continue
            target = b"\x89PNG\r\n\x1a\n broken" if k == broken else png(tgt)
            cut = slice(None) if mask_scale else slice(0, region.shape[1] // 2)  # 106: half the width
            masked = rgba_mask(region[:, cut], src[:, cut], mask_scale or 0.5)
            rows.append({"img_id": img_id, "turn_index": k, "source_img": {"bytes": png(src), "path": None},
                         "mask_img": {"bytes": masked, "path": None},
                         "instruction": text, "target_img": {"bytes": target, "path": None}})

    session("101", "chelsea", 3); expect["dev/101"] = "ok"
    session("102", "coffee", 2); expect["dev/102"] = "ok"
    session("103", "astronaut", 3, drop=2); expect["dev/103"] = "gap in the turn chain"
    session("104", "rocket", 2, broken=2); expect["dev/104"] = "turn 2 output"
    session("105", "coffee", 1); expect["dev/105"] = "skipped"
    session("106", "chelsea", 2, mask_scale=0); expect["dev/106"] = "aspect ratio"
    random.Random(4).shuffle(rows)
    schema = pa.schema([("img_id", pa.string()), ("turn_index", pa.int32()), ("source_img", IMAGE),
                        ("mask_img", IMAGE), ("instruction", pa.string()), ("target_img", IMAGE)])
    (root / "data").mkdir(parents=True)
    half = len(rows) // 2
    for i, part in enumerate((rows[:half], rows[half:])):
        pq.write_table(pa.Table.from_pylist(part, schema=schema), root / f"data/dev-0000{i}-of-00002.parquet",
                       row_group_size=3)
    train = []
    for k, (src, tgt, region, text) in enumerate(chain("coffee", 2), start=1):
        train.append({"img_id": "201", "turn_index": k, "source_img": {"bytes": png(src), "path": None},
                      "mask_img": {"bytes": rgba_mask(region, src, brush=6), "path": None},
                      "instruction": text, "target_img": {"bytes": png(tgt), "path": None}})
    pq.write_table(pa.Table.from_pylist(train, schema=schema), root / "data/train-00000-of-00001.parquet")
    return expect


def run_inline(out: Path, config: BuildConfig):
    """The build of `config` in this process (the flow's own steps, without Prefect and Ray)."""
    total = prepare_build(out, config)
    pipeline = UnitPipeline(config, out)
    for unit in range(config.num_units(total)):
        pipeline.run(unit)
    table = finalize(out)
    write_report(out)
    return {row["id"]: row for row in table.to_pylist()}


def import_config(fmt: str, path: Path, judge: str = "none", min_edits: int = 1, **options) -> BuildConfig:
    return BuildConfig(resolution=RES, shard_size=4, defect_rate=0.0, min_edits=min_edits, max_edits=8,
                       judge=judge, source="import", source_options={"format": fmt, "path": str(path), **options},
                       grounder="imported", composer="imported", editor="imported")


def load(out: Path, row: dict):
    if row["shard"].endswith(".tar"):
        for key, members in iter_tar_groups(out / "shards" / row["shard"]):
            if key == row["id"]:
                return decode_sample(members)
    if row["shard"].startswith("quarantine/"):
        return read_quarantine(out, row["id"])
    return decode_sample(read_members_dir(out / row["shard"]))


# ---- the rule and the text ----------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ('Add the word "SALE" on the wall', "add_text"), ("swap the positions of the cat and the dog", "swap"),
    ("make the background a beach", "background"), ("make the shirt striped", "texture"),
    ("Make the car red", "recolor"), ("change the color of the bus to blue", "recolor"),
    ("turn the dog into a red fox", "replace"), ("replace the cake with a pizza", "replace"),
    ("Remove the cat.", "remove"), ("get rid of the bottle", "remove"),
    ("make the dog bigger", "resize"), ("move the cup to the left", "move"),
    ("Put a hat on the man", "add"), ("let there be a rainbow", "add"),
    ("make it winter", "global"), ("What if it was night?", "global"),
    ("Make it look like a painting", "global"), ("make the painting into a mosaic", "global"),
    ("change the lighting to dusk", "global"), ("make it black and white", "global"),
    ("make the dog wear a winter hat", "other"), ("add a painting on the wall", "add"),
    ("What if the horse wears a hat?", "other"),
])
def test_edit_type_rule(text, expected):
    assert infer_edit_type(text) == expected
    assert expected in SUB_EDIT_TYPES


def test_other_is_a_record_type_but_never_drafted():
    assert "other" not in EDIT_TYPES and "other" in SUB_EDIT_TYPES  # composers draw EDIT_TYPES only
    SubEdit("other", "make it winter")
    with pytest.raises(ValueError):
        SubEdit("dance", "make it dance")


def test_turn_texts_keep_their_words_join_as_sentences_and_split_back():
    raw = ["Make the cat red, then blue.", "What if the horse wears a hat?", "Put a hat on it!",
           "3 birds; on the branch", "Replace the TV with a plant.", "I want the sky pink, Mr. Smith",
           'write "OPEN" on the door', "  TV   off. "]
    texts = [turn_text(t) for t in raw]
    assert texts == ["make the cat red, then blue", "what if the horse wears a hat?", "put a hat on it!",
                     "3 birds; on the branch", "replace the TV with a plant",
                     "I want the sky pink, Mr. Smith", 'write "OPEN" on the door', "TV off"]
    for seed in range(30):
        joined = join_turns(texts, np.random.default_rng(seed))
        assert joined.startswith("Make the cat red, then blue. ") and joined.endswith(" TV off.")
        assert " what if the horse wears a hat? " in joined and " 3 birds; on the branch. " in joined
        assert split_turns(joined) == texts, joined
    assert join_turns(texts[1:3]) == "What if the horse wears a hat? Then put a hat on it!"
    assert join_turns(["i see a dog"]) == "i see a dog." and split_turns("i see a dog.") == ["i see a dog"]
    with pytest.raises(ValueError):
        turn_text("  . ")
    for bad in (["Make it red"], ["make it red."], [], ["make  it red"]):
        with pytest.raises(ValueError):
            join_turns(bad)
    # the one ambiguity, documented: a turn that itself holds a sentence end and a connective
    assert split_turns(join_turns(["add a hat. Then make it red"])) == ["add a hat", "make it red"]


def test_diff_region_is_the_changed_box_without_noise():
    image = photo_array("coffee")
    edited, region = paint(image, BOXES[0], COLOURS[0])
    noise = np.random.default_rng(0).integers(-10, 11, edited.shape)
    noisy = np.clip(edited.astype(np.int16) + noise, 0, 255).astype(np.uint8)
    found = changed_region(image, noisy)
    assert (found & region).sum() / region.sum() >= 0.99  # all of the edit
    near = cv2.dilate(region.astype(np.uint8), np.ones((17, 17), np.uint8)).astype(bool)
    assert not (found & ~near).any()  # and nothing farther than two 4 px blocks from it
    # the noise alone is no edit
    assert not changed_region(image, np.clip(image.astype(np.int16) + noise, 0, 255).astype(np.uint8)).any()


# ---- MagicBrush ---------------------------------------------------------------------------------

def test_magicbrush_sessions_become_complex_samples(tmp_path):
    expect = magicbrush(tmp_path / "mb")
    out = tmp_path / "out"
    rows = run_inline(out, import_config("magicbrush", tmp_path / "mb" / "data", split="dev", min_edits=2))
    by_key = {}
    for row in rows.values():
        sample = load(out, row)
        by_key[sample.source_key] = (row, sample)
    assert set(by_key) == {k for k, v in expect.items() if v != "skipped"}  # 105: one turn, skipped
    for key, outcome in expect.items():
        if outcome in ("ok", "skipped"):
            continue
        row, _ = by_key[key]
        assert row["verdict"] == "error" and row["error_stage"] == "source", row
        assert outcome in row["error"], row["error"]

    row, sample = by_key["dev/101"]
    assert row["verdict"] == "accept" and row["verdict_by"] == "dataset" and row["judge"] == "none@1"
    assert row["num_sub_edits"] == 3 and row["sub_edit_types"] == ["recolor", "add", "global"]
    assert split_turns(sample.instruction) == [turn_text(t) for t in TEXTS]
    assert sample.instruction.startswith("Make the top left corner red. ")
    p = sample.provenance
    assert (p["dataset"], p["split"], p["source_id"], p["license"]) == ("magicbrush", "dev", "101", "CC-BY-4.0")
    assert len(p["turn_ids"]) == 3 and p["turns_in_session"] == 3
    turns = chain("chelsea", 3)
    h, w = sample.source.shape[:2]
    assert min(h, w) == RES and w > h  # chelsea is landscape: not squared
    for sub, (_, _, region, text) in zip(sample.sub_edits, turns):
        assert sub.params["mask_from"] == "dataset" and sub.params["original_text"] == text
        truth = Frame.fit(*region.shape[::-1], RES).mask(region)
        assert (sub.mask & truth).sum() / (sub.mask | truth).sum() > 0.9  # half-res alpha mask, resized
        ys, xs = np.nonzero(sub.mask)
        assert sub.box == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    assert np.array_equal(sample.background_mask, ~np.logical_or.reduce([s.mask for s in sample.sub_edits]))
    last = Frame.fit(*turns[-1][1].shape[1::-1], RES).image(turns[-1][1])
    assert np.abs(sample.target.astype(int) - last).max() <= 1
    assert check_build(out).ok, check_build(out).problems[:5]


def test_imported_pairs_go_through_the_pixel_judge_to_review(tmp_path):
    magicbrush(tmp_path / "mb")
    out = tmp_path / "out"
    rows = run_inline(out, import_config("magicbrush", tmp_path / "mb" / "data", judge="pixel", split="train"))
    (row,) = rows.values()
    assert row["verdict"] == "borderline" and row["verdict_by"] == "judge"  # unknown → a person
    assert row["sub_edit_scores"] == [None, None]
    sample = load(out, row)
    assert all("free text" in r for r in sample.scores["sub_edit_reasons"])
    assert check_build(out).ok


def test_pixel_judge_scores_an_other_sub_edit_unknown_unless_nothing_changed():
    image = photo_array("coffee")[:128, :192]
    edited, region = paint(image, BOXES[0], COLOURS[0])
    judge = PixelJudge()
    from pipeline.record import JudgeView

    for target, expect_none in ((edited, True), (image, False)):
        sub = SubEdit("other", "make it winter", mask=region, box=[0, 0, 1, 1])
        view = JudgeView("x", image, target, "Make it winter.", [sub], ~region)
        scores = judge.score(view)
        assert (scores["sub_edits"][0] is None) == expect_none, scores


# ---- UltraEdit, ImgEdit, generic ----------------------------------------------------------------

def test_ultraedit_region_rows_are_one_turn_sessions_with_their_masks(tmp_path):
    rows = []
    for idx, photo in enumerate(("chelsea", "rocket")):
        (src, tgt, region, text), = chain(photo, 1)
        small = Image.fromarray(region.astype(np.uint8) * 255).resize(
            (region.shape[1] // 3, region.shape[0] // 3), Image.Resampling.NEAREST)
        buffer = io.BytesIO()
        small.save(buffer, "PNG")
        rows.append({"clip_sim_source": 0.3, "clip_sim_target": 0.3, "clip_sim_dir": 0.2,
                     "clip_sim_image": 0.9, "dinov2_sim": 0.9, "ssim": 0.8, "source_caption": "a photo",
                     "target_caption": "a photo", "idx": 7 + idx, "edit_prompt": text,
                     "source_image": {"bytes": png(src), "path": None},
                     "edited_image": {"bytes": png(tgt), "path": None},
                     "mask_image": {"bytes": buffer.getvalue(), "path": None}})
    (tmp_path / "ue/data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "ue/data/RegionBase-00000-of-00001.parquet")
    out = tmp_path / "out"
    manifest = run_inline(out, import_config("ultraedit", tmp_path / "ue", min_edits=1))
    assert len(manifest) == 2 and all(r["verdict"] == "accept" for r in manifest.values())
    sample = load(out, next(r for r in manifest.values()))
    assert sample.provenance["source_id"] in ("7", "8") and sample.provenance["split"] == "RegionBase"
    assert sample.sub_edits[0].params["mask_from"] == "dataset"
    assert check_build(out).ok


def imgedit(root: Path) -> None:
    """Parquet/ with a multi-turn `data` column, the images extracted beside it, a recap json."""
    rows = []
    for sid, photo, turns in (("00031_00020_000209651", "coffee", 2), ("00031_00020_000209652", "rocket", 3)):
        folder = f"results_content_memory_part0/{sid}"
        (root / folder).mkdir(parents=True)
        data = []
        for k, (src, tgt, _, text) in enumerate(chain(photo, turns)):
            Image.fromarray(src).save(root / folder / f"origin_{k}.png")
            Image.fromarray(tgt).save(root / folder / f"result_{k}.png")
            data.append({"input_images": [f"{folder}/origin_{k}.png"],
                         "output_images": [f"{folder}/result_{k}.png"], "prompt": text})
        if turns == 3:  # version backtracking: turn 3 starts again from the photo
            data[2]["input_images"] = [f"{folder}/origin_0.png"]
        rows.append({"data": data})
    (root / "Parquet").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), root / "Parquet/content_memory_part0.parquet")
    h, w = photo_array("coffee").shape[:2]
    cup = np.zeros((h, w), dtype=bool)
    cup[int(0.1 * h):int(0.4 * h), int(0.1 * w):int(0.4 * w)] = True
    record = {"path": "00031/00020/000209651.jpg", "resolution": {"height": h, "width": w},
              "segmentation": {"object": [{"class_name": "corner", "bbox": [0, 0, 1, 1],
                                           "mask": rle.encode(cup)["counts"], "score": 0.9}],
                               "background": [], "box_format": "xyxy"}}
    (root / "recap.json").write_text(json.dumps([record]))


def test_imgedit_multiturn_regions_from_diff_and_rle(tmp_path):
    imgedit(tmp_path / "ie")
    out = tmp_path / "out"
    manifest = run_inline(out, import_config("imgedit", tmp_path / "ie" / "Parquet",
                                             images=str(tmp_path / "ie"), masks=str(tmp_path / "ie/recap.json")))
    samples = {load(out, r).source_key: (r, load(out, r)) for r in manifest.values()}
    row, sample = samples["content_memory_part0/00031_00020_000209651"]
    assert row["verdict"] == "accept"
    assert [s.params["mask_from"] for s in sample.sub_edits] == ["rle+diff", "diff"]  # "top left corner"
    assert [o.label for o in sample.objects] == ["corner"] and sample.sub_edits[0].object_ids == [0]
    h, w = sample.source.shape[:2]
    region = chain("coffee", 2)[1][2]
    truth = Frame.fit(*region.shape[::-1], RES).mask(region)
    got = sample.sub_edits[1].mask
    # all of the edit, grown by at most two 4 px blocks (the robust difference works on blocks)
    assert (got & truth).sum() / truth.sum() >= 0.97
    near = cv2.dilate(truth.astype(np.uint8), np.ones((17, 17), np.uint8)).astype(bool)
    assert not (got & ~near).any()
    row, _ = samples["content_memory_part0/00031_00020_000209652"]
    assert row["verdict"] == "error" and "turn 3's input is not turn 2's output" in row["error"]
    assert check_build(out).ok


def test_generic_jsonl_with_rle_masks_and_a_missing_turn(tmp_path):
    root = tmp_path / "g"
    (root / "img").mkdir(parents=True)
    lines = []
    for sid, photo, drop in (("a", "chelsea", None), ("b", "coffee", 2)):
        for k, (src, tgt, region, text) in enumerate(chain(photo, 3), start=1):
            Image.fromarray(src).save(root / f"img/{sid}{k}_in.png")
            Image.fromarray(tgt).save(root / f"img/{sid}{k}_out.png")
            if k != drop:
                lines.append({"session": sid, "turn": k, "instruction": text, "source": f"img/{sid}{k}_in.png",
                              "target": f"img/{sid}{k}_out.png", "mask_rle": rle.encode(region),
                              "license": "CC0-1.0"})
    random.Random(1).shuffle(lines)
    (root / "edits.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "out"
    manifest = run_inline(out, import_config("generic", root / "edits.jsonl"))
    verdicts = sorted((r["verdict"], (r["error"] or "")[:40]) for r in manifest.values())
    assert verdicts[0][0] == "accept" and verdicts[1][0] == "error" and "gap" in verdicts[1][1]
    sample = load(out, next(r for r in manifest.values() if r["verdict"] == "accept"))
    assert sample.provenance["license"] == "CC0-1.0" and len(sample.sub_edits) == 3
    gap = load(out, next(r for r in manifest.values() if r["verdict"] == "error"))
    assert gap.source_meta["failed_turn"] == 2 and gap.source_meta["license"] == "CC0-1.0"
    assert gap.source_meta["instructions"] == [TEXTS[0], TEXTS[2]] and "instruction" in gap.source_meta
    assert check_build(out).ok


# ---- single-turn sessions, turns in their own words, what a quarantined session keeps -----------

SESSIONS = {  # session → its turns' instructions
    "one": ["What if the top left corner were red?"],
    "two": ["Paint the top left corner red, like a brick.", "In the bottom right, add a green box, please!"],
    "bad": ["make the top left corner red", "add a green box in the bottom right"],  # turn 2 output broken
    "chain": ["make the top left corner red", "add a green box in the bottom right"],  # turn 2 input: another photo
}


def generic_sessions(root: Path) -> None:
    """A generic jsonl (split "train", CC0) of the SESSIONS on real photos, no masks."""
    (root / "img").mkdir(parents=True)
    lines = []
    for sid, texts in SESSIONS.items():
        for k, (src, tgt, _, _) in enumerate(chain("coffee", len(texts)), start=1):
            Image.fromarray(src).save(root / f"img/{sid}{k}_in.png")
            Image.fromarray(tgt).save(root / f"img/{sid}{k}_out.png")
            line = {"session": sid, "turn": k, "instruction": texts[k - 1], "source": f"img/{sid}{k}_in.png",
                    "target": f"img/{sid}{k}_out.png", "split": "train", "license": "CC0-1.0"}
            if sid == "bad" and k == 2:
                (root / "img/bad2_out.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
            if sid == "chain" and k == 2:
                Image.fromarray(photo_array("rocket")).save(root / "img/chain2_in.png")
            lines.append(line)
    random.Random(2).shuffle(lines)
    (root / "edits.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


def cli_import_config(*argv: str) -> BuildConfig:
    """The BuildConfig `mcie import ARGV` runs (the command's own argument parsing)."""
    from flows.cli import build_parser
    from flows.import_data import import_config as from_args

    return from_args(build_parser().parse_args(["import", *argv]))


def quarantine_json(out: Path, row: dict) -> dict:
    """The record in a quarantined sample's json, as written."""
    assert row["shard"] == f"quarantine/{row['id']}.json"
    return json.loads(json.loads((out / row["shard"]).read_text())["record"])


def test_single_turn_sessions_import_by_default_in_their_own_words(tmp_path):
    generic_sessions(tmp_path / "g")
    out = tmp_path / "out"
    config = cli_import_config("--format", "generic", "--input", str(tmp_path / "g"), "--out", str(out),
                               "--judge", "none", "--resolution", str(RES))
    assert config.min_edits == 1  # no --min-edits: a session of one turn is a sample
    rows = {load(out, r).source_key: r for r in run_inline(out, config).values()}
    assert sorted(rows) == ["train/bad", "train/chain", "train/one", "train/two"]

    one = load(out, rows["train/one"])
    assert rows["train/one"]["verdict"] == "accept" and len(one.sub_edits) == 1
    assert one.instruction == "What if the top left corner were red?"  # still a question
    assert one.sub_edits[0].text == "what if the top left corner were red?"
    assert one.sub_edits[0].params["original_text"] == SESSIONS["one"][0]
    assert rows["train/one"]["sub_edit_texts"] == ["what if the top left corner were red?"]

    two = load(out, rows["train/two"])
    texts = ["paint the top left corner red, like a brick", "in the bottom right, add a green box, please!"]
    assert [e.text for e in two.sub_edits] == texts and split_turns(two.instruction) == texts
    assert two.instruction.startswith("Paint the top left corner red, like a brick. ")
    assert two.instruction.endswith(" in the bottom right, add a green box, please!")
    assert [e.params["original_text"] for e in two.sub_edits] == SESSIONS["two"]

    for sid, error in (("bad", "turn 2 output"), ("chain", "turn 2's input is not turn 1's output")):
        row = rows[f"train/{sid}"]
        assert row["verdict"] == "error" and row["error_stage"] == "source" and error in row["error"], row
        record = quarantine_json(out, row)
        meta = record["source_meta"]
        assert (meta["dataset"], meta["split"], meta["license"]) == ("generic", "train", "CC0-1.0")
        assert meta["instructions"] == SESSIONS[sid] and meta["failed_turn"] == 2
        joined = "Make the top left corner red. Then add a green box in the bottom right."
        assert meta["instruction"] == joined and record["instruction"] == joined
        assert row["instruction"] == joined  # the manifest row says what the session asked
        assert record["provenance"]["license"] == "CC0-1.0" and record["provenance"]["source"] == "import"
        assert read_quarantine(out, row["id"]).source_meta == meta
    assert check_build(out).ok, check_build(out).problems[:5]

    # asking for more turns still skips the single-turn session
    assert cli_import_config("--format", "generic", "--input", str(tmp_path / "g"), "--out", str(out),
                             "--min-edits", "2").min_edits == 2


REAL_EDITS = Path(__file__).resolve().parents[2] / "shared" / "real-edits"


def test_real_instructpix2pix_pairs_import_as_single_turn_samples(tmp_path):
    jsonl = REAL_EDITS / "instructpix2pix" / "generic.jsonl"
    if not jsonl.is_file():
        pytest.skip(f"no real dev set at {jsonl}")
    given = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    out = tmp_path / "out"
    config = cli_import_config("--format", "generic", "--input", str(jsonl), "--out", str(out),
                               "--judge", "none", "--resolution", str(RES))
    rows = run_inline(out, config)
    assert len(rows) == len(given) and all(r["verdict"] == "accept" for r in rows.values())
    by_session = {line["session"]: line["instruction"] for line in given}
    for row in rows.values():
        sample = load(out, row)
        (sub,) = sample.sub_edits
        assert sub.params["original_text"] == by_session[sample.source_key]
        assert sample.instruction == sub.text[0].upper() + sub.text[1:] + "."
        assert split_turns(sample.instruction) == [sub.text]
    assert check_build(out).ok


# ---- the command --------------------------------------------------------------------------------

def mcie(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_bad_import_arguments_are_one_line_and_create_nothing(tmp_path):
    out = tmp_path / "out"
    for args in (["--format", "nope", "--input", str(tmp_path)],
                 ["--format", "magicbrush", "--input", str(tmp_path / "missing")]):
        result = mcie("import", *args, "--out", str(out))
        assert result.returncode == 2, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
        assert not out.exists()
    # an import, like a build, never writes into a directory that holds something else
    magicbrush(tmp_path / "mb")
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("mine")
    result = mcie("import", "--format", "magicbrush", "--input", str(tmp_path / "mb"),
                  "--out", str(junk))
    assert result.returncode == 2 and "is not empty and holds no build" in result.stderr
    assert sorted(p.name for p in junk.iterdir()) == ["notes.txt"]


@pytest.mark.slow
def test_mcie_import_runs_the_build_flow_and_a_rerun_does_nothing(tmp_path):
    magicbrush(tmp_path / "mb")
    out = tmp_path / "out"
    args = ["import", "--format", "magicbrush", "--input", str(tmp_path / "mb"), "--split", "dev",
            "--out", str(out), "--judge", "none", "--resolution", str(RES), "--shard-size", "3",
            "--workers", "1"]
    first = mcie(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "6 sessions, 0 skipped" in first.stdout  # no --min-edits: 105's single turn is a sample
    rows = pq.read_table(out / "manifest.parquet").to_pylist()
    assert sorted(r["verdict"] for r in rows) == ["accept", "accept", "accept", "error", "error", "error"]
    (broken,) = [r for r in rows if r["source_key"] == "dev/104"]  # turn 2's output does not decode
    record = quarantine_json(out, broken)
    meta = record["source_meta"]
    assert (meta["dataset"], meta["split"], meta["license"]) == ("magicbrush", "dev", "CC-BY-4.0")
    assert meta["instructions"] == TEXTS[:2] and meta["failed_turn"] == 2
    assert broken["instruction"] == meta["instruction"] == join_turns([turn_text(t) for t in TEXTS[:2]])
    assert mcie("verify", str(out)).returncode == 0
    again = mcie(*args)
    assert again.returncode == 0 and "already complete, nothing to do" in again.stdout
    # one writer per OUT: an import is refused while another process holds the build's lock
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys\nfrom pathlib import Path\n"
         "from pipeline.dataset.lock import out_lock\n"
         "with out_lock(Path(sys.argv[1]), 'holder'):\n"
         "    print('locked', flush=True)\n    sys.stdin.readline()", str(out)],
        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        refused = mcie(*args)
        assert refused.returncode == 2 and f"pid {holder.pid}" in refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
