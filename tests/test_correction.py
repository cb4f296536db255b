"""A reviewer's corrected regions and texts, without a server: Label Studio's brush RLE (held to
the SDK's own encoder and decoder), the pre-filled prediction read back, and a correction applied
through the one mover (`annotation.queue.commit_decision(..., corrections=...)`): the shard's
regions.png, mask_rle, edit mask and box, the texts, the `corrected` flag and what was corrected.
The same against the real server: tests/test_annotation_server.py::test_corrected_region_and_text."""

from __future__ import annotations

import json

import numpy as np
import pytest
from label_studio_sdk.converter import brush as sdk_brush

from annotation import brush, queue
from annotation.corrections import Proposal, Stroke, apply_proposal, prefill_results, read_proposal, tally
from annotation.tasks import build_task, data_url, parse_annotation
from labelstudio_fixtures import make_build, out_dir  # noqa: F401  (fixture)
from pipeline import rle
from pipeline.dataset.output import read_manifest
from pipeline.dataset.shards import decode_mask, decode_regions, iter_tar_groups, member_metadata


def _masks():
    rng = np.random.default_rng(3)
    speckled = rng.random((37, 53)) > 0.6
    full = np.ones((300, 260), bool)  # a run longer than 2**16 RGBA values
    half = np.zeros((40, 30), bool)
    half[5:30, 3:17] = True
    return [speckled, full, half]


@pytest.mark.parametrize("which", range(3))
def test_brush_rle_matches_label_studio_sdk(which):
    mask = _masks()[which]
    ours = brush.encode(mask)
    assert ours == sdk_brush.mask2rle(mask.astype(np.uint8) * 255)  # byte for byte
    rgba = sdk_brush.decode_rle(ours).reshape(*mask.shape, 4)
    assert np.array_equal(rgba[:, :, 3] == 255, mask)
    assert np.array_equal(brush.decode(ours, *mask.shape), mask)


def test_brush_decode_reads_literal_segments_and_alpha_threshold():
    # the frontend's canvas: anti-aliased alpha, literal (non-repeat) segments
    alpha = np.array([[0, 127, 128, 255]], np.uint8)
    rgba = np.stack([alpha] * 4, axis=-1).ravel()
    assert np.array_equal(brush.decode(sdk_brush.encode_rle(rgba), 1, 4), [[False, False, True, True]])
    with pytest.raises(ValueError, match="not 2x4x4"):
        brush.decode(sdk_brush.encode_rle(rgba), 2, 4)
    with pytest.raises(ValueError):
        brush.decode([1, 2, 300], 1, 4)


def _annotation(result, verdict="Accept"):
    return {"id": 11, "completed_by": 1, "created_at": "t", "result": result + [
        {"from_name": "verdict", "to_name": "target", "type": "choices", "value": {"choices": [verdict]}}]}


def test_prefill_reads_back_as_no_change(out_dir):  # noqa: F811
    ids = make_build(out_dir, borderline=1)
    item = queue.read_review(out_dir, ids[0])
    task = build_task(item.meta, item.members, lambda name, png: data_url(png), lean_threshold=0.5)
    result = task["predictions"][0]["result"]
    brushes = [r for r in result if r["type"] == "brushlabels"]
    assert [r["value"]["brushlabels"] for r in brushes] == [["Region 1"], ["Region 2"]]
    vote = parse_annotation(_annotation(result), task_id=1, num_sub=2)
    sample = queue.decode_sample(item.members)
    masks = vote.proposal.masks(sample.sub_edits[0].mask.shape)  # decoded at the sample's size
    for i, edit in enumerate(sample.sub_edits):
        assert np.array_equal(masks[i], edit.mask)
        assert vote.proposal.texts[i] == edit.text
    assert vote.proposal.texts["instruction"] == sample.instruction
    assert apply_proposal(sample, vote.proposal, 11).changes == []  # the untouched form corrects nothing
    assert sample.human is None


def test_two_brush_strokes_with_one_label_are_one_region():
    a = np.zeros((8, 8), bool)
    a[1:3, 1:3] = True
    b = np.zeros((8, 8), bool)
    b[5:7, 5:7] = True
    strokes = [{"from_name": "regions", "to_name": "target", "type": "brushlabels", "original_width": 8,
                "original_height": 8, "value": {"format": "rle", "rle": brush.encode(m), "brushlabels": ["Region 2"]}}
               for m in (a, b)]
    proposal = read_proposal(strokes, num_sub=2)
    assert list(proposal.regions) == [1] and np.array_equal(proposal.masks((8, 8))[1], a | b)
    assert read_proposal(strokes, num_sub=1).regions == {}  # no sub-edit 2: ignored


def test_correction_through_the_mover(out_dir):  # noqa: F811
    ids = make_build(out_dir, borderline=1)
    item = queue.read_review(out_dir, ids[0])
    original = queue.decode_sample(item.members)
    corrected = np.zeros_like(original.sub_edits[1].mask)
    corrected[40:60, 30:50] = True
    proposal = Proposal(regions={1: (Stroke.of(corrected),), 0: (Stroke.of(original.sub_edits[0].mask),)},
                        texts={"instruction": "  Paint it blue.  ", 0: original.sub_edits[0].text, 1: "make it blue"})
    changes = []
    queue.commit_decision(out_dir, item, "accept", "human", {"verdict": "accept"},
                          corrections=lambda s: changes.extend(apply_proposal(s, proposal, 42).changes))
    # (sub-instruction texts first: a corrected one may rewrite the instruction)
    assert changes == [("add", "region"), ("add", "text"), ("instruction", "text")]
    assert tally(changes) == {"region": {"add": 1}, "text": {"add": 1, "instruction": 1}}

    row = {r["id"]: r for r in read_manifest(out_dir).to_pylist()}[ids[0]]
    assert row["corrected"] and row["verdict_by"] == "human"
    members = dict(iter_tar_groups(out_dir / "shards" / row["shard"]))[ids[0]]
    view = json.loads(members["json"])
    regions = decode_regions(members["regions.png"], 2)
    assert np.array_equal(regions[1], corrected) and np.array_equal(regions[0], original.sub_edits[0].mask)
    assert np.array_equal(rle.decode(view["sub_edits"][1]["mask_rle"]), corrected)
    assert view["sub_edits"][1]["box"] == [30, 40, 50, 60]
    assert np.array_equal(decode_mask(members["edit_mask.png"]), corrected | original.sub_edits[0].mask)
    assert view["instruction"] == "Paint it blue." and view["sub_edits"][1]["text"] == "make it blue"
    assert view["corrected"] is True
    record = member_metadata(members)["human"]["corrections"]
    assert record["regions"] == [1] and record["texts"] == [1, "instruction"] and record["annotation_id"] == 42
    assert record["original_texts"] == {"instruction": original.instruction, "1": original.sub_edits[1].text}
    assert np.array_equal(rle.decode(record["original_masks"]["1"]), original.sub_edits[1].mask)
