"""MLLM grounding (`--grounder vllm`) against the protocol-faithful OpenAI test server, with
GrabCut or a tiny random SAM (built from its config, saved with save_pretrained) for the masks."""

from __future__ import annotations

import numpy as np
import pytest

from model_fixtures import tiny_sam
from openai_server import OpenAIServer
from photo_fixtures import photo_array
from pipeline.grounders.base import GROUNDERS
from pipeline.grounders.mllm import answer_schema, sent_size
from pipeline.record import EditSample
from pipeline.sources.scene import bbox

MODEL = "qwen2.5-vl-test"
FAST = {"backoff_s": 0.01, "backoff_max_s": 0.05}


@pytest.fixture(scope="module")
def server():
    with OpenAIServer(model=MODEL) as srv:
        yield srv


def sample(name: str, index: int, side: int) -> EditSample:
    from PIL import Image

    image = photo_array(name)
    h, w = image.shape[:2]
    scale = side / max(h, w)
    image = np.asarray(Image.fromarray(image).resize((round(w * scale), round(h * scale))))
    return EditSample(id=f"s-{index}", index=index, seed=0, source=image)


def objects_answer(*objects) -> dict:
    return {"kind": "content", "content": {"objects": [
        {"label": label, "attributes": words, "bbox_2d": box} for label, words, box in objects]}}


def size_rule(s: EditSample, *then) -> dict:
    w, h = sent_size(s.source.shape[1], s.source.shape[0], 1036, 28)
    return {"match": f"The image is {w}x{h} pixels", "then": list(then)}


def grounder(server, **options):
    return GROUNDERS.make("vllm", context={"seed": 0}, url=server.url, model=MODEL, **FAST, **options)


def test_objects_from_boxes_with_grabcut_masks(server):
    cat = sample("chelsea", 0, 300)  # 300x200 -> sent as 308x196
    sw, sh = sent_size(300, 200, 1036, 28)
    assert (sw, sh) == (308, 196) and cat.source.shape[:2] == (200, 300)
    server.script(rules=[size_rule(cat, objects_answer(
        ("Tabby  Cat", ["orange", "striped"], [40, 10, 250, 196]),
        ("tabby cat", ["orange"], [40, 10, 250, 196])))])  # a duplicate is kept once
    stage = grounder(server)
    stage([cat])
    assert not cat.failed, cat.error
    (obj,) = cat.objects
    assert obj.label == "tabby cat" and obj.attributes["described"] == ["orange", "striped"]
    assert obj.mask.shape == (200, 300) and obj.mask.any() and obj.box == bbox(obj.mask)
    x0, y0, x1, y1 = obj.box  # inside the model's box, scaled back to the sample's pixels
    assert x0 >= 40 * 300 // 308 and x1 <= -(-250 * 300 // 308) and y1 <= 200
    assert {"color", "rgb", "size", "position", "area"} <= set(obj.attributes)
    assert obj.producer == f"vllm:{MODEL}"
    assert cat.provenance["grounder"].startswith(f"vllm:{MODEL}@ground-v1+grabcut")
    request = server.stats()["last_request"]
    assert request["response_format"]["json_schema"]["schema"] == answer_schema(12)
    assert server.stats()["image_sizes"] == [[308, 196]] and request["temperature"] == 0
    again = sample("chelsea", 0, 300)
    stage([again])
    assert np.array_equal(again.objects[0].mask, obj.mask)  # deterministic masks
    stage.close()


@pytest.mark.parametrize("bad, reason", [
    (objects_answer(("cat", [], [0, 0, 900, 100])), "outside"),
    (objects_answer(("cat", [], [50, 50, 50, 90])), "degenerate"),
    (objects_answer(("!!!", [], [10, 10, 90, 90])), "noun phrase"),
    ("garbage", "not JSON"),
    ({"kind": "content", "content": {"objects": [{"label": "cat", "bbox_2d": [1, 2, 3]}]}},
     "fails the schema"),
])
def test_a_sample_that_cannot_be_grounded_is_quarantined_with_why(server, bad, reason):
    s = sample("coffee", 1, 200)
    server.script(rules=[size_rule(s, bad)])
    stage = grounder(server)
    stage([s])
    stage.close()
    assert s.failed and s.error_stage == "ground" and s.objects == []
    assert "MLLM grounding failed: bad answer after 2 tries" in s.error and reason in s.error
    assert server.stats()["requests"] == 2  # asked once more (sampled), then quarantined


def test_a_bad_answer_is_asked_again_and_an_unreachable_server_fails_the_sample(server):
    s = sample("coffee", 2, 200)
    server.script(rules=[size_rule(s, "garbage", objects_answer(("cup", ["white"], [20, 20, 150, 120])))])
    stage = grounder(server, min_fill=0.0, min_area=0.0)
    stage([s])
    stage.close()
    assert not s.failed and s.objects[0].label == "cup"
    down = sample("coffee", 3, 200)
    server.script(rules=[size_rule(down, {"kind": "status", "status": 503})])
    stage = grounder(server, max_retries=1)
    stage([down])
    stage.close()
    assert down.failed and "unreachable after 2 attempts" in down.error and down.target is None


def test_sam_masks_batched_per_unit(server, tmp_path, monkeypatch):
    path = tiny_sam(tmp_path / "sam")
    samples = [sample(name, i, 160) for i, name in enumerate(("chelsea", "coffee", "astronaut"))]
    rules = [size_rule(s, objects_answer(("thing", ["red"], [10, 10, 100, 90]),
                                         ("other thing", [], [100, 20, 150, 100])))
             for s in samples]
    server.script(rules=rules)
    stage = grounder(server, sam_path=str(path), sam_batch=8, min_fill=0.0, min_area=0.0)
    calls = []
    encoder = stage.masker.model.get_image_embeddings
    monkeypatch.setattr(stage.masker.model, "get_image_embeddings",
                        lambda pixels: calls.append(len(pixels)) or encoder(pixels))
    stage(samples)
    stage.close()
    assert calls == [3]  # one image-encoder batch for the unit's three images
    for s in samples:
        if s.failed:  # a random SAM may give an empty mask: then the sample says so
            assert "usable mask" in s.error
            continue
        for obj in s.objects:
            x0, y0, x1, y1 = obj.box
            assert obj.mask[y0:y1, x0:x1].sum() == obj.mask.sum() and obj.box == bbox(obj.mask)
        assert s.provenance["grounder"].endswith(f"SamModel:{path.name}")
    assert any(not s.failed for s in samples)


def test_grounder_options_are_checked_by_the_build():
    from pipeline.config import BuildConfig, ConfigError

    with pytest.raises(ConfigError, match="grounder 'vllm' needs option 'url'"):
        BuildConfig(source="folder", source_options={"path": "x"}, grounder="vllm")
    with pytest.raises(ConfigError, match="has no option 'sam'"):
        BuildConfig(source="folder", source_options={"path": "x"}, grounder="vllm",
                    grounder_options={"url": "http://h/v1", "model": "m", "sam": "x"})
