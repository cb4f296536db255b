"""Human review without a server: agreement policy, κ, tasks, the labeling config, and moving a
decided sample out of the queue (idempotent, crash-safe)."""

from __future__ import annotations

import io
import math
import xml.etree.ElementTree as ET

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from annotation import queue
from annotation.agreement import AgreementPolicy, Confusion, majority_pass
from annotation.sync import ReviewSettings, human_decisions, resolve_image_mode
from annotation.client import Connection
from annotation.tasks import (
    build_task,
    counted_votes,
    data_url,
    labeling_config,
    overlay_png,
    parse_annotation,
)
from labelstudio_fixtures import make_build, out_dir  # noqa: F401  (fixture)
from pipeline.dataset.output import read_manifest
from pipeline.dataset.shards import checksum, iter_tar_groups, member_metadata


def test_policy_majority_ties_and_minimum():
    two = AgreementPolicy(2)
    assert two.decide(["accept"]) is None  # too few
    assert two.decide(["accept", "reject"]) is None  # tie stays open
    assert two.decide(["accept", "accept"]) == "accept"
    assert two.decide(["accept", "reject", "reject"]) == "reject"
    assert AgreementPolicy(1).decide(["reject"]) == "reject"
    with pytest.raises(ValueError):
        AgreementPolicy(0)
    with pytest.raises(ValueError):
        two.decide(["maybe", "accept"])
    assert majority_pass([True, False, True]) is True
    assert majority_pass([True, False]) is None
    assert majority_pass([None, False]) is False


def test_cohens_kappa_matches_hand_computation():
    # 20 pairs: judge accept & human accept 8, a/r 2, r/a 3, r/r 7
    c = Confusion(accept_accept=8, accept_reject=2, reject_accept=3, reject_reject=7)
    p_o = 15 / 20
    p_e = (10 / 20) * (11 / 20) + (10 / 20) * (9 / 20)
    assert c.kappa == pytest.approx((p_o - p_e) / (1 - p_e))
    assert Confusion().kappa is None
    assert Confusion(accept_accept=4).kappa == 1.0
    assert math.isclose(Confusion(accept_reject=5, reject_accept=5).kappa, -1.0)
    assert Confusion.of([("accept", "reject"), ("accept", "reject")]).accept_reject == 2


def _annotation(id_, user, verdict, subs=(), cancelled=False, updated="2026-01-01T00:00:00Z"):
    result = [{"from_name": "verdict", "to_name": "target", "type": "choices", "value": {"choices": [verdict]}}]
    for n, answer in enumerate(subs, start=1):
        result.append({"from_name": f"sub_{n}", "to_name": "target", "type": "choices", "value": {"choices": [answer]}})
    result.append({"from_name": "comment", "to_name": "target", "type": "textarea", "value": {"text": ["looks off"]}})
    return {"id": id_, "completed_by": user, "was_cancelled": cancelled, "result": result,
            "created_at": updated, "updated_at": updated}


def test_parse_annotation_and_one_vote_per_annotator():
    vote = parse_annotation(_annotation(1, 7, "Reject", ["pass", "fail"]), task_id=3, num_sub=3)
    assert vote.verdict == "reject" and vote.sub_edits == (True, False, None) and vote.comment == "looks off"
    assert parse_annotation(_annotation(2, 7, "Accept", cancelled=True), 3, 2) is None
    no_verdict = {"id": 9, "completed_by": 1, "result": []}
    assert parse_annotation(no_verdict, 3, 2) is None
    votes = [
        parse_annotation(_annotation(1, 7, "Reject", updated="2026-01-01T00:00:00Z"), 3, 2),
        parse_annotation(_annotation(2, 7, "Accept", updated="2026-01-02T00:00:00Z"), 4, 2),  # same person, duplicate task
        parse_annotation(_annotation(3, 8, "Reject"), 3, 2),
    ]
    counted = counted_votes(votes)
    assert sorted((v.annotator, v.verdict) for v in counted) == [(7, "accept"), (8, "reject")]


def test_labeling_config_has_the_controls():
    root = ET.fromstring(labeling_config())
    verdict = root.find(".//Choices[@name='verdict']")
    assert [c.get("value") for c in verdict] == ["Accept", "Reject"]
    assert all(c.get("hotkey") for c in verdict)
    assert verdict.get("choice") == "single-radio"
    subs = [c for c in root.iter("Choices") if c.get("name", "").startswith("sub_")]
    assert [c.get("name") for c in subs] == [f"sub_{n}" for n in range(1, 9)]
    images = {i.get("name"): i.get("value") for i in root.iter("Image")}
    assert images == {"source": "$source_image", "edited": "$target_image", "target": "$overlay_image"}
    # the brush paints on the outlined copy, never on the target the reviewer judges
    assert root.find(".//BrushLabels").get("toName") == "target"
    assert root.find(".//TextArea[@name='comment']") is not None


# Task fields of Label Studio's data manager that shadow a data key of the same name: with
# `$source` the Image loaded the whole task as JSON as its URL (seen in the labeling UI).
DATA_MANAGER_TASK_FIELDS = {"source", "id", "data", "annotations", "predictions", "drafts"}


def test_labeling_config_reads_only_task_data_keys(out_dir):  # noqa: F811
    ids = make_build(out_dir, borderline=1)
    item = queue.read_review(out_dir, ids[0])
    data = build_task(item.meta, item.members, lambda name, png: data_url(png), lean_threshold=0.5)["data"]
    root = ET.fromstring(labeling_config())
    variables = {el.get("value")[1:] for el in root.iter() if (el.get("value") or "").startswith("$")}
    assert {"source_image", "target_image", "overlay_image", "instruction", "judge_summary"} <= variables
    assert variables <= set(data)
    assert not variables & DATA_MANAGER_TASK_FIELDS
    # each sub-instruction row is a `mcie-sub` view, which the style hides when it has no options
    rows = [v for v in root.iter("View") if v.get("className") == "mcie-sub"]
    assert [r.find("Choices").get("value") for r in rows] == [f"$sub_{n}_options" for n in range(1, 9)]
    assert ".mcie-sub:not(:has(input[type=radio])) { display: none; }" in root.find("Style").text


def test_task_carries_sample_prediction_and_hotkeys(out_dir):  # noqa: F811
    ids = make_build(out_dir, borderline=3)
    item = queue.read_review(out_dir, ids[2])  # 4 sub-edits, overall 0.7 → leans accept
    task = build_task(item.meta, item.members, lambda name, png: data_url(png), lean_threshold=0.5)
    data = task["data"]
    assert data["sample_id"] == ids[2]
    assert data["num_sub_instructions"] == 4
    assert data["sub_4"].endswith(item.meta["sub_edits"][3]["text"]) and data["sub_5"] == ""
    assert data["sub_5_options"] == [] and [o["value"] for o in data["sub_1_options"]] == ["pass", "fail"]
    hotkeys = [o["hotkey"] for n in range(1, 5) for o in data[f"sub_{n}_options"]]
    assert len(set(hotkeys)) == 8 and not {"a", "x"} & set(hotkeys)
    pred = task["predictions"][0]
    assert pred["model_version"] == "test@1" and pred["score"] == pytest.approx(0.7)
    by_name = {r["from_name"]: r["value"]["choices"][0] for r in pred["result"] if r["type"] == "choices"}
    assert by_name["verdict"] == "Accept"
    passes = item.meta["scores"]["sub_edit_pass"]
    assert [by_name[f"sub_{n}"] for n in range(1, 5)] == ["pass" if p else "fail" for p in passes]
    assert data["source_image"] == data_url(item.members["source.png"])
    # the judge's opinion: a head line, then one line per sub-instruction
    summary = data["judge_summary"].splitlines()
    assert summary[0].startswith("test@1 leans accept") and len(summary) == 1 + 4
    assert [line.split()[0] for line in summary[1:]] == ["#1", "#2", "#3", "#4"]
    overlay = np.asarray(Image.open(io.BytesIO(overlay_png(item.members))))
    target = np.asarray(Image.open(io.BytesIO(item.members["target.png"])).convert("RGB"))
    assert overlay.shape == target.shape and (overlay != target).any()


def test_image_mode_auto(tmp_path):
    settings = ReviewSettings(document_root=tmp_path)
    local = Connection(url="http://127.0.0.1:8080", api_key="k")
    remote = Connection(url="https://ls.example.org", api_key="k")
    assert resolve_image_mode(tmp_path / "out", local, settings) == "local-files"
    assert resolve_image_mode(tmp_path / "out", remote, settings) == "inline"
    assert resolve_image_mode(tmp_path.parent, local, settings) == "inline"
    with pytest.raises(ValueError):
        ReviewSettings(image_mode="ftp")


def _tar_keys(path):
    return [key for key, _ in iter_tar_groups(path)] if path.exists() else []


def test_commit_decision_moves_sample_once_even_after_a_crash(out_dir, monkeypatch):  # noqa: F811
    ids = make_build(out_dir, borderline=2)
    item = queue.read_review(out_dir, ids[0])
    human = {"verdict": "reject", "annotations": [{"annotator": "a@b", "verdict": "reject"}]}

    # Crash after the shard was written, before the manifest: the queue keeps the sample.
    from pipeline.dataset import move

    real = move.update_rows
    monkeypatch.setattr(move, "update_rows", lambda *a, **k: (_ for _ in ()).throw(OSError("disk gone")))
    with pytest.raises(OSError):
        queue.commit_decision(out_dir, item, "reject", "human", human)
    assert ids[0] in queue.review_ids(out_dir)
    assert _tar_keys(out_dir / "shards" / "negatives-000000.tar").count(ids[0]) == 1
    monkeypatch.setattr(move, "update_rows", real)

    # The re-run completes it, with no second copy.
    item = queue.read_review(out_dir, ids[0])
    shard = queue.commit_decision(out_dir, item, "reject", "human", human)
    assert shard == "negatives-000000.tar"
    assert ids[0] not in queue.review_ids(out_dir)
    groups = dict(iter_tar_groups(out_dir / "shards" / shard))
    assert list(_tar_keys(out_dir / "shards" / shard)).count(ids[0]) == 1
    meta = member_metadata(groups[ids[0]])
    assert (meta["verdict"], meta["verdict_by"], meta["human"]) == ("reject", "human", human)
    assert ids[0] not in _tar_keys(out_dir / "shards" / "train-000000.tar")
    row = next(r for r in read_manifest(out_dir).to_pylist() if r["id"] == ids[0])
    assert (row["verdict"], row["verdict_by"], row["shard"]) == ("reject", "human", shard)
    assert row["checksum"] == checksum(groups[ids[0]])
    part = pq.read_table(out_dir / "parts" / "unit-000000.parquet").to_pylist()
    assert next(r for r in part if r["id"] == ids[0])["verdict"] == "reject"
    assert human_decisions(out_dir) == [("accept", "reject")]  # overrode the judge's lean
    # the other rows are untouched
    assert sum(r["verdict"] == "borderline" for r in read_manifest(out_dir).to_pylist()) == 1


def test_overlay_outlines_and_numbers_each_region_and_fills_none():
    """The labeling interface paints the pre-filled regions over the overlay; a background region
    (not pre-filled) is only outlined, so nothing covers the target."""
    from pipeline.dataset.shards import encode_mask, encode_png

    target = np.full((128, 128, 3), 100, np.uint8)
    large = np.zeros((128, 128), bool)
    large[:, :100] = True  # most of the frame, like a background edit
    small = np.zeros((128, 128), bool)
    small[40:100, 108:124] = True
    members = {"target.png": encode_png(target), "mask_0.png": encode_mask(large),
               "mask_1.png": encode_mask(small)}
    overlay = np.asarray(Image.open(io.BytesIO(overlay_png(members)))).astype(int)
    assert (overlay[5, 30] == 100).all() and (overlay[110, 116] == 100).all()  # insides untouched
    assert tuple(overlay[60, 99]) == (255, 0, 110)  # the large region's edge, in colour 1
    assert tuple(overlay[41, 108]) == (0, 200, 255)  # the small one's, in colour 2
    # each number is black on a box of its region's colour, beside the region, big enough to read
    black = np.all(overlay == 0, axis=-1)  # only labels draw black on this grey target
    assert np.count_nonzero(black.any(axis=1)) >= 2 * 12  # two labels, each 12+ px tall
    near_black = np.zeros_like(black)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            near_black |= np.roll(black, (dy, dx), axis=(0, 1))
    for color in ((255, 0, 110), (0, 200, 255)):
        assert np.count_nonzero(np.all(overlay == color, axis=-1) & near_black) > 20, color


def test_prefill_paints_no_background_region_and_a_corrected_text_rewrites_the_instruction():
    from annotation.corrections import apply_proposal, prefill_results, rewritten_instruction, Proposal
    from pipeline.record import EditSample, SubEdit

    masks = [np.ones((8, 8), bool), np.eye(8, dtype=bool)]
    subs = [{"type": "background", "text": "blur the background"}, {"type": "recolor", "text": "make the cup red"}]
    results = prefill_results("Blur the background, then make the cup red.", subs, masks, 8)
    brushes = [r for r in results if r["type"] == "brushlabels"]
    assert [b["value"]["brushlabels"] for b in brushes] == [["Region 2"]]
    assert brushes[0]["to_name"] == "target"  # the image that shows the overlay

    # in place where the old words occur once (a sentence start keeps its capital) ...
    assert rewritten_instruction("Blur the background, then make the cup red.",
                                 ["blur the background", "make the cup red"],
                                 ["Darken the background.", "make the cup red"]) == \
        "Darken the background, then make the cup red."
    # ... else re-joined, one sentence per sub-instruction
    assert rewritten_instruction("Give it a moody look.", ["blur the background", "make the cup red"],
                                 ["blur the background", "make the mug blue"]) == \
        "Blur the background. Then make the mug blue."
    sample = EditSample(id="s0-00000000000000aa", index=0, seed=0, source_key="k",
                        instruction="Blur the background, then make the cup red.",
                        sub_edits=[SubEdit(type="background", text="blur the background", target="the background"),
                                   SubEdit(type="recolor", text="make the cup red", target="the cup")])
    applied = apply_proposal(sample, Proposal(texts={1: "make the cup green", "instruction": sample.instruction}), 7)
    assert applied.changes == [("recolor", "text")]  # the derived instruction is no reviewer's change
    assert sample.instruction == "Blur the background, then make the cup green."
    assert sample.human["corrections"]["original_texts"]["instruction"] == "Blur the background, then make the cup red."
    # the reviewer's own instruction wins over the derived one
    apply_proposal(sample, Proposal(texts={0: "blur everything behind", "instruction": "Do it all."}), 8)
    assert sample.instruction == "Do it all."
