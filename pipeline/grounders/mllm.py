"""MLLM grounding (`--grounder vllm`): a multimodal LLM behind vLLM lists the objects it sees.

One chat-completions request per image asks for the visible, separable objects, each with a short
noun label, a few describing words and a Qwen2.5-VL-style box `bbox_2d` [x1, y1, x2, y2] in
absolute pixels of the image as sent. The image is sent at a size whose sides are multiples of
`box_grid` (28, Qwen2.5-VL's patch grid: its processor then keeps the size, so the model's pixel
coordinates are the sent image's) and the prompt states that size. The answer is constrained by a
JSON schema and checked again on arrival, then for what a schema cannot say (boxes inside the
image and not degenerate, labels that are words): a bad answer is asked again once (sampled), and
a sample whose grounding still fails — bad answers, the server unreachable, the circuit breaker
open, no object left — fails the grounding stage with its reason and is quarantined. It is never
edited on a guess.

Masks: with `sam_path` a SAM-family model turns each box into a mask (`pipeline.grounders.sam`,
batched over the unit); without it OpenCV's GrabCut does, seeded from the box (deterministic: its
RNG is reset per object). A mask covering under `min_fill` of its box, or mostly inside an object
already kept, drops that object. Every object gets the pixel-measured attributes the composer
uses (colour name and rgb, size, position, area: `pipeline.grounders.attributes`) and keeps the
model's own words under `attributes["described"]`; its box is its mask's bounding box.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from pipeline.clients.openai import (
    BadAnswer,
    Call,
    CallFailed,
    ClientConfig,
    OpenAIClient,
    data_url,
    options_signature,
)
from pipeline.grounders.attributes import region_attributes
from pipeline.grounders.base import GROUNDERS
from pipeline.record import EditSample, InventoryObject
from pipeline.sources.scene import bbox
from pipeline.stage import RecordStage

log = logging.getLogger(__name__)

PROMPT_VERSION = "ground-v1"
LABEL = re.compile(r"^[a-z][a-z0-9' -]{0,39}$")
MAX_NESTED = 0.5  # an object this much inside one already kept is dropped
BOX_SLACK_PX = 2  # a box this far past the frame is clipped; further, the answer is bad

SYSTEM_PROMPT = (
    "You locate objects in photographs for an image-editing dataset. List the distinct, clearly "
    "visible objects a person could point at and edit (recolour, remove, move): people, animals, "
    "vehicles, furniture, tools, food, signs... not the sky, the floor or the background itself. "
    "Answer with JSON only."
)


@dataclass(frozen=True)
class MllmGrounderConfig(ClientConfig):
    """Options of `--grounder vllm`: the client's (see `ClientConfig`) and the grounder's own."""

    WHAT = "vllm grounder"

    max_objects: int = 12
    min_area: float = 0.002  # share of the image: smaller objects are dropped
    min_fill: float = 0.1  # a mask covering less of its box drops the object
    max_side: int = 1036  # the image is sent with its long side at most this (37 x 28)
    box_grid: int = 28  # sides sent as multiples of this (Qwen2.5-VL); 1 = any size
    image_format: str = "png"
    max_tokens: int = 0  # 0: sized from max_objects
    sam_path: str = ""  # a SAM-family model directory; "" = GrabCut masks
    sam_device: str = "cpu"
    sam_dtype: str = "float32"
    sam_batch: int = 8  # images per SAM image-encoder batch

    def __post_init__(self) -> None:
        super().__post_init__()
        self._int_in("max_objects", 1, 64)
        self._int_in("max_side", 56, 8192)
        self._int_in("box_grid", 1, 256)
        self._int_in("max_tokens", 0, 1_000_000)
        self._int_in("sam_batch", 1, 1024)
        for name in ("min_area", "min_fill"):
            value = getattr(self, name)
            self._require(isinstance(value, (int, float)) and 0 <= value < 1,
                          f"{name} must be within 0..1, got {value!r}")
        self._require(self.image_format in ("png", "jpeg"),
                      f"image_format must be png or jpeg, got {self.image_format!r}")
        self._require(self.sam_dtype in ("float32", "float16", "bfloat16"),
                      f"sam_dtype must be float32, float16 or bfloat16, got {self.sam_dtype!r}")


def answer_schema(max_objects: int) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {
            "objects": {
                "type": "array",
                "maxItems": max_objects,
                "items": {
                    "type": "object",
                    "properties": {
                        "label": {"type": "string", "minLength": 1, "maxLength": 40},
                        "attributes": {"type": "array", "maxItems": 4,
                                       "items": {"type": "string", "maxLength": 30}},
                        "bbox_2d": {"type": "array", "minItems": 4, "maxItems": 4,
                                    "items": {"type": "integer"}},
                    },
                    "required": ["label", "attributes", "bbox_2d"],
                    "additionalProperties": False,
                },
            },
        },
        "required": ["objects"],
        "additionalProperties": False,
    }


def sent_size(width: int, height: int, max_side: int, grid: int) -> tuple[int, int]:
    """The (width, height) the image is sent at: long side <= max_side, sides multiples of grid."""
    scale = min(1.0, max_side / max(width, height))
    snap = lambda v: max(grid, int(round(v * scale / grid)) * grid)  # noqa: E731
    w, h = snap(width), snap(height)
    while max(w, h) > max_side and min(w, h) > grid:  # rounding up pushed a side over
        w, h = (w - grid, h) if w >= h else (w, h - grid)
    return w, h


def prompt(width: int, height: int, max_objects: int) -> str:
    return (
        f"The image is {width}x{height} pixels. List up to {max_objects} objects. For each give "
        '"label": a short lower-case noun phrase ("brown dog", "coffee cup"), "attributes": up to '
        'four words describing it (colour, material, state), and "bbox_2d": [x1, y1, x2, y2], the '
        "tightest box around it in absolute pixel coordinates of this image (origin top-left, "
        "x to the right, y down). One entry per object; no duplicates."
    )


def parse_objects(answer: dict[str, Any], width: int, height: int) -> list[dict[str, Any]]:
    """The objects of a schema-valid answer in sent-image pixels, or BadAnswer."""
    objects, seen = [], set()
    for k, item in enumerate(answer["objects"]):
        label = " ".join(item["label"].lower().split())
        if not LABEL.match(label):
            raise BadAnswer(f"object {k}: label {item['label'][:40]!r} is not a short noun phrase")
        x0, y0, x1, y1 = item["bbox_2d"]
        if min(x0, y0) < -BOX_SLACK_PX or x1 > width + BOX_SLACK_PX or y1 > height + BOX_SLACK_PX:
            raise BadAnswer(f"object {k} ({label}): box {item['bbox_2d']} outside the "
                            f"{width}x{height} image")
        x0, y0, x1, y1 = max(0, x0), max(0, y0), min(width, x1), min(height, y1)
        if x1 - x0 < 2 or y1 - y0 < 2:
            raise BadAnswer(f"object {k} ({label}): degenerate box {item['bbox_2d']}")
        if (label, x0, y0, x1, y1) in seen:
            continue
        seen.add((label, x0, y0, x1, y1))
        words = [" ".join(w.lower().split()) for w in item["attributes"]]
        objects.append({"label": label, "described": [w for w in words if w],
                        "box": [x0, y0, x1, y1]})
    return objects


def grabcut_mask(image: np.ndarray, box: list[int], iterations: int = 3) -> np.ndarray:
    """GrabCut seeded by the box, on a crop around it; bool HxW inside the box. Deterministic."""
    h, w = image.shape[:2]
    x0, y0, x1, y1 = box
    pad = max(4, (x1 - x0 + y1 - y0) // 8)
    X0, Y0, X1, Y1 = max(0, x0 - pad), max(0, y0 - pad), min(w, x1 + pad), min(h, y1 + pad)
    crop = np.ascontiguousarray(image[Y0:Y1, X0:X1, ::-1])  # OpenCV wants BGR
    labels = np.zeros(crop.shape[:2], np.uint8)
    rect = (x0 - X0, y0 - Y0, x1 - x0, y1 - y0)
    mask = np.zeros((h, w), dtype=bool)
    cv2.setRNGSeed(0)  # GrabCut's k-means draws from OpenCV's global RNG
    try:
        cv2.grabCut(crop, labels, rect, np.zeros((1, 65)), np.zeros((1, 65)), iterations,
                    cv2.GC_INIT_WITH_RECT)
    except cv2.error:  # a box GrabCut cannot model (e.g. one flat colour): no mask
        return mask
    fg = (labels == cv2.GC_FGD) | (labels == cv2.GC_PR_FGD)
    mask[Y0:Y1, X0:X1] = fg
    inside = np.zeros_like(mask)
    inside[y0:y1, x0:x1] = mask[y0:y1, x0:x1]
    return inside


class MllmGrounder(RecordStage):
    """Fills `sample.objects` from the MLLM's boxes and a mask per box (see the module docstring);
    a sample that cannot be grounded fails with its reason."""

    name = "ground"

    def __init__(self, config: MllmGrounderConfig):
        self.config = config
        self.client = OpenAIClient(config.client_config())
        self._sam = None  # loaded at first use, once per worker

    def __reduce__(self):
        return (self.__class__, (self.config,))

    @property
    def masker(self):
        if self._sam is None and self.config.sam_path:
            from pipeline.grounders.sam import SamMasker

            c = self.config
            self._sam = SamMasker(c.sam_path, c.sam_device, c.sam_dtype, c.sam_batch)
        return self._sam

    def call(self, sample: EditSample) -> Call:
        c = self.config
        height, width = sample.source.shape[:2]
        size = sent_size(width, height, c.max_side, c.box_grid)

        def build() -> dict[str, Any]:
            from PIL import Image

            image = np.asarray(Image.fromarray(sample.source).resize(size, Image.Resampling.LANCZOS))
            url, _ = data_url(image, max(size), c.image_format)
            return {"messages": [
                {"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": url}},
                    {"type": "text", "text": prompt(*size, c.max_objects)},
                ]},
            ]}

        return Call(key=f"ground {sample.id}", build=build, schema=answer_schema(c.max_objects),
                    schema_name="object_inventory",
                    max_tokens=c.max_tokens or 64 + 48 * c.max_objects,
                    parse=lambda answer: (size, parse_objects(answer, *size)))

    def __call__(self, batch: list[EditSample]) -> list[EditSample]:
        ready = []
        for sample in batch:
            if sample.failed:
                continue
            if sample.source is None or sample.source.ndim != 3 or sample.source.dtype != np.uint8:
                sample.fail(self.name, "no RGB uint8 source image to ground")
                continue
            ready.append(sample)
        if not ready:
            return batch
        answers = self.client.run([self.call(s) for s in ready])
        found: list[tuple[EditSample, list[dict[str, Any]]]] = []
        for sample, answer in zip(ready, answers):
            if isinstance(answer, CallFailed):
                sample.fail(self.name, f"MLLM grounding failed: {answer}")
                continue
            (sw, sh), objects = answer
            height, width = sample.source.shape[:2]
            for obj in objects:  # sent-image pixels -> the sample's pixels
                x0, y0, x1, y1 = obj["box"]
                obj["box"] = [int(np.floor(x0 * width / sw)), int(np.floor(y0 * height / sh)),
                              int(np.ceil(x1 * width / sw)), int(np.ceil(y1 * height / sh))]
            if not objects:
                sample.fail(self.name, "MLLM grounding: the model listed no object")
                continue
            found.append((sample, objects))
        try:
            masks = self._masks(found)
        except Exception as exc:  # a mask model failing on the batch fails these samples, with why
            log.warning("grounder masks failed on a batch: %s", exc)
            for sample, _ in found:
                sample.fail(self.name, f"masks from boxes failed: {type(exc).__name__}: {exc}")
            return batch
        for (sample, objects), per_object in zip(found, masks):
            try:
                self._fill(sample, objects, per_object)
            except Exception as exc:
                sample.fail(self.name, exc)
        return batch

    def _masks(self, found) -> list[list[tuple[np.ndarray, float]]]:
        if self.masker is not None:
            return self.masker.masks([s.source for s, _ in found],
                                     [[o["box"] for o in objects] for _, objects in found])
        return [[(grabcut_mask(s.source, o["box"]), 1.0) for o in objects] for s, objects in found]

    def _fill(self, sample: EditSample, objects: list[dict[str, Any]],
              masks: list[tuple[np.ndarray, float]]) -> None:
        c = self.config
        total = sample.source.shape[0] * sample.source.shape[1]
        kept: list[InventoryObject] = []
        producer = f"vllm:{c.model}"
        for obj, (mask, score) in zip(objects, masks):
            x0, y0, x1, y1 = obj["box"]
            area = int(mask.sum())
            if area < c.min_fill * (x1 - x0) * (y1 - y0) or area < c.min_area * total:
                log.debug("%s: %s dropped (mask %d px in a %dx%d box)", sample.id, obj["label"],
                          area, x1 - x0, y1 - y0)
                continue
            if any((mask & other.mask).sum() > MAX_NESTED * min(area, other.mask.sum())
                   for other in kept):
                continue
            attributes = region_attributes(sample.source, mask)
            attributes["described"] = obj["described"]
            kept.append(InventoryObject(id=len(kept), label=obj["label"], box=bbox(mask), mask=mask,
                                        attributes=attributes,
                                        confidence=round(float(score), 4), producer=producer))
        if not kept:
            raise ValueError(f"MLLM grounding: none of the {len(objects)} boxes gave a usable mask")
        sample.objects = kept
        masker = self.masker.name if self.masker is not None else "grabcut"
        sample.provenance["grounder"] = f"vllm:{c.model}@{PROMPT_VERSION}+{masker}"

    def close(self) -> None:
        self.client.close()


def make_mllm_grounder(**options: Any) -> MllmGrounder:
    """`--grounder vllm --grounder-option url=... --grounder-option model=... [sam_path=DIR ...]`.
    Cheap: nothing connects or loads until the first batch."""
    return MllmGrounder(MllmGrounderConfig.from_options(**options))


make_mllm_grounder.__signature__ = options_signature(MllmGrounderConfig)
GROUNDERS.register("vllm")(make_mllm_grounder)
