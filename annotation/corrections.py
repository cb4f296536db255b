"""A reviewer's corrected regions and texts: pre-filled into the task, read back from an
annotation, applied to the sample.

Push pre-fills the labeling interface's `regions` brush (one region labelled "Region N" per
sub-edit, our mask in Label Studio's brush RLE, `annotation.brush`; none for a background or
whole-frame sub-edit, see NOT_PREFILLED), `instruction_edit` and
`sub_N_edit` (the texts). An annotation that starts from that prediction hands all of it back;
only what differs from the sample is a correction:

- a region: the union of the annotation's "Region N" brush results, when it is not empty and not
  equal to sub-edit N's mask. It replaces that mask (and its box); the background mask is
  re-derived as everything outside the sub-edits' regions, as every editor derives it.
- a text: `instruction_edit` or `sub_N_edit`, whitespace-trimmed, when it is not empty and differs.
  A corrected sub-instruction also rewrites the complex instruction (unless the reviewer rewrote
  that too: theirs wins): its old words are replaced where they occur once in the instruction
  (at a sentence start with a capital), else the instruction is re-joined from the sub-edit texts,
  one sentence each (`join_turns`: "Make the cup red. Then remove the car."), so the instruction
  never keeps words a reviewer took out.

The sample's `human` record gets `corrected: true` and `corrections` (what changed, the original
texts and the original masks in COCO RLE, the annotation that corrected them), so nothing is lost.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from annotation import brush
from pipeline import rle
from pipeline.compose.procedural import join_turns, turn_text
from pipeline.record import EditSample

log = logging.getLogger(__name__)

BRUSH = "regions"  # the BrushLabels control
TARGET = "target"  # the image it paints on (it shows the overlay: the target, regions outlined)
# Regions not pre-filled as brush regions: filled, a background (everything the other regions
# leave) or whole-frame region would cover the target. The overlay image outlines them; a
# reviewer who paints "Region N" for one still replaces its mask.
NOT_PREFILLED = ("background", "global")
INSTRUCTION = "instruction_edit"
REGION_LABEL = "Region {}"


def sub_text_control(n: int) -> str:
    return f"sub_{n}_edit"  # 1-based, like the interface's sub_N controls


class MalformedCorrection(ValueError):
    """An annotation's region or text cannot apply to its sample (a region of another size, a
    sub-instruction the sample does not have, a damaged RLE): the sample stays undecided."""


@dataclass(frozen=True)
class Stroke:
    """One brush result as the annotation declares it. Not decoded when read: the size it
    declares is compared with the sample's before anything is allocated (`decode_region`)."""

    rle: list[int]
    height: int
    width: int

    @classmethod
    def of(cls, mask: np.ndarray) -> "Stroke":
        """The stroke a reviewer painting exactly `mask` hands back."""
        height, width = np.asarray(mask).shape
        return cls(brush.encode(mask), int(height), int(width))


@dataclass(frozen=True)
class Proposal:
    """What one annotation hands back: brush strokes by sub-edit index (0-based; their union is
    the region) and texts by key ("instruction" or the 0-based sub-edit index)."""

    regions: dict[int, tuple[Stroke, ...]] = field(default_factory=dict)
    texts: dict[Any, str] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.regions or self.texts)

    def masks(self, size: tuple[int, int]) -> dict[int, np.ndarray]:
        """The regions decoded for an image of `size` (height, width): `decode_region`."""
        return {i: decode_region(strokes, i + 1, size) for i, strokes in self.regions.items()}


def prefill_results(instruction: str, sub_edits: list[dict[str, Any]], masks: list[np.ndarray],
                    limit: int) -> list[dict[str, Any]]:
    """Prediction results that pre-fill the editable regions and texts (first `limit` sub-edits)."""
    results: list[dict[str, Any]] = [_text(INSTRUCTION, instruction)]
    for i, edit in enumerate(sub_edits[:limit]):
        results.append(_text(sub_text_control(i + 1), str(edit.get("text", ""))))
        if i < len(masks) and masks[i].any() and edit.get("type") not in NOT_PREFILLED:
            height, width = masks[i].shape
            results.append({
                "id": f"region-{i + 1}",
                "from_name": BRUSH, "to_name": TARGET, "type": "brushlabels",
                "original_width": int(width), "original_height": int(height), "image_rotation": 0,
                "value": {"format": "rle", "rle": brush.encode(masks[i]),
                          "brushlabels": [REGION_LABEL.format(i + 1)]},
            })
    return results


def _text(name: str, text: str) -> dict[str, Any]:
    return {"from_name": name, "to_name": TARGET, "type": "textarea", "value": {"text": [text]}}


def read_proposal(result: list[dict[str, Any]], num_sub: int) -> Proposal:
    """Regions and texts of an annotation's result list (malformed entries raise ValueError).
    Brush RLEs are kept as they came; they are decoded against the sample (`apply_proposal`)."""
    regions: dict[int, tuple[Stroke, ...]] = {}
    texts: dict[Any, str] = {}
    for entry in result:
        name = entry.get("from_name", "")
        value = entry.get("value") or {}
        if name == BRUSH:
            labels = value.get("brushlabels") or []
            numbers = [int(label.split()[-1]) for label in labels
                       if isinstance(label, str) and label.split()[-1:] and label.split()[-1].isdigit()]
            if value.get("format", "rle") != "rle" or "rle" not in value:
                raise ValueError(f"brush result with no RLE (format {value.get('format')!r})")
            if not isinstance(value["rle"], list):
                raise ValueError("brush RLE is not a list of bytes")
            stroke = Stroke(value["rle"], int(entry["original_height"]), int(entry["original_width"]))
            for n in numbers:
                if 1 <= n <= num_sub:
                    regions[n - 1] = regions.get(n - 1, ()) + (stroke,)
        elif name == INSTRUCTION or (name.startswith("sub_") and name.endswith("_edit")):
            text = " ".join(str(t) for t in value.get("text") or []).strip()
            if name == INSTRUCTION:
                texts["instruction"] = text
            else:
                n = int(name[len("sub_"):-len("_edit")])
                if 1 <= n <= num_sub:
                    texts[n - 1] = text
    return Proposal(regions, texts)


@dataclass
class Applied:
    """What a correction changed on one sample: (edit type, kind) pairs, kind "region" or "text";
    the instruction's edit type is "instruction"."""

    changes: list[tuple[str, str]] = field(default_factory=list)


def image_size(sample: EditSample) -> tuple[int, int]:
    """(height, width) every region of `sample` has."""
    for array in (sample.source, sample.target, sample.background_mask,
                  *(e.mask for e in sample.sub_edits)):
        if array is not None:
            return int(array.shape[0]), int(array.shape[1])
    raise MalformedCorrection(f"sample {sample.id} has no image to correct a region of")


def decode_region(strokes: tuple[Stroke, ...], number: int, size: tuple[int, int]) -> np.ndarray:
    """The union of a region's strokes as a bool mask of the sample's `size`. A stroke that
    declares another size is refused before it is decoded: the size an annotation declares
    never decides what is allocated (`brush.decode` checks it again against `expected`, and that
    the stream holds exactly height x width x 4 values, before allocating)."""
    height, width = size
    mask = np.zeros(size, dtype=bool)
    for stroke in strokes:
        if (stroke.height, stroke.width) != (height, width):
            raise MalformedCorrection(f"corrected region {number} is declared {stroke.height}x"
                                      f"{stroke.width}, the image is {height}x{width}")
        try:
            mask |= brush.decode(stroke.rle, height, width, expected=size)
        except ValueError as exc:
            raise MalformedCorrection(f"corrected region {number} is unreadable: {exc}") from None
    return mask


def apply_proposal(sample: EditSample, proposal: Proposal, annotation_id: int | None) -> Applied:
    """Apply what differs from the sample (see the module docstring); record it in `human`.
    `MalformedCorrection` when a region or text cannot apply to this sample (nothing changed)."""
    applied = Applied()
    record: dict[str, Any] = {"annotation_id": annotation_id, "regions": [], "texts": [],
                              "original_masks": {}, "original_texts": {}}
    count = len(sample.sub_edits)
    for key in [*proposal.regions, *(k for k in proposal.texts if k != "instruction")]:
        if not isinstance(key, int) or not 0 <= key < count:
            raise MalformedCorrection(f"a correction names sub-instruction {key + 1 if isinstance(key, int) else key!r}, "
                                      f"the sample has {count}")
    size = image_size(sample) if proposal.regions else (0, 0)
    masks = proposal.masks(size)
    for i, mask in sorted(masks.items()):
        edit = sample.sub_edits[i]
        if not mask.any():
            log.warning("sample %s: the reviewer's region %d is empty; the sub-edit keeps its mask",
                        sample.id, i + 1)
            continue
        if edit.mask is not None and mask.shape != edit.mask.shape:
            raise MalformedCorrection(f"corrected region {i + 1} is {mask.shape}, the sub-edit's "
                                      f"mask {edit.mask.shape}")
        if edit.mask is not None and np.array_equal(mask, edit.mask):
            continue
        if edit.mask is not None:
            record["original_masks"][str(i)] = rle.encode(edit.mask)
        edit.mask = mask
        rows, cols = np.nonzero(mask)
        edit.box = [int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1]
        record["regions"].append(i)
        applied.changes.append((edit.type, "region"))
    before = [e.text for e in sample.sub_edits]
    for key, text in sorted(proposal.texts.items(), key=lambda kv: kv[0] == "instruction"):
        old = sample.instruction if key == "instruction" else sample.sub_edits[key].text
        text = text.strip()
        if not text or text == old.strip():
            continue
        record["original_texts"][str(key)] = old
        if key == "instruction":
            sample.instruction = text
        else:
            sample.sub_edits[key].text = text
        record["texts"].append(key)
        applied.changes.append(("instruction" if key == "instruction" else sample.sub_edits[key].type, "text"))
    after = [e.text for e in sample.sub_edits]
    if after != before and "instruction" not in record["texts"]:
        # the reviewer changed sub-instructions but left the instruction: it follows them
        record["original_texts"]["instruction"] = sample.instruction
        sample.instruction = rewritten_instruction(sample.instruction, before, after)
        record["instruction_rewritten"] = True
    if record["regions"]:
        # every editor's rule: the background is what no sub-edit's region covers
        sample.background_mask = ~np.logical_or.reduce([e.mask for e in sample.sub_edits])
    if applied.changes:
        human = dict(sample.human or {})
        human["corrected"] = True
        human["corrections"] = record
        sample.human = human
    return applied


def rewritten_instruction(instruction: str, before: list[str], after: list[str]) -> str:
    """The complex instruction with sub-edit texts `before` changed to `after` (module docstring)."""
    text = instruction
    for old, new in zip(before, after):
        if old == new:
            continue
        mid = turn_text(new)  # mid-sentence form: no final stop, an ordinary first word lower-cased
        forms = [(old, mid), (old[:1].upper() + old[1:], mid[:1].upper() + mid[1:])]
        if not old or sum(text.count(o) for o, _ in forms) != 1:
            return _rejoined(after)
        for o, n in forms:
            text = text.replace(o, n)
    return text


def _rejoined(texts: list[str]) -> str:
    turns = [turn_text(t) for t in texts if t.strip()]
    return join_turns(turns) if turns else ""


def tally(changes: list[tuple[str, str]]) -> dict[str, dict[str, int]]:
    """{kind: {edit type: count}} of applied changes (the pull summary)."""
    counts: dict[str, Counter] = {"region": Counter(), "text": Counter()}
    for edit_type, kind in changes:
        counts[kind][edit_type] += 1
    return {kind: dict(sorted(c.items())) for kind, c in counts.items()}
