"""A review sample as a Label Studio task (data + the judge's prediction), and an annotation back
as a vote.

The task data carry `sample_id`, which is how push finds what a project already holds and how
pull maps annotations back to the queue. The labeling interface is `labeling_config.xml` beside
this file; its control names (`verdict`, `sub_1`..`sub_8`, `comment`) are used here.
"""

from __future__ import annotations

import base64
import io
import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable
from urllib.parse import quote

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from annotation.corrections import Proposal, prefill_results, read_proposal
from pipeline.dataset.shards import decode_png, member_masks

log = logging.getLogger(__name__)

MAX_SUB_INSTRUCTIONS = 8  # controls in the labeling config
PASS_KEYS = "12345678"
FAIL_KEYS = "qwertyui"
VERDICT_CHOICES = {"Accept": "accept", "Reject": "reject"}
SUB_CHOICES = {"pass": True, "fail": False}
# Overlay colours, one per sub-instruction (distinct on pale backgrounds and saturated objects).
OVERLAY_COLORS = [
    (255, 0, 110), (0, 200, 255), (255, 190, 0), (120, 255, 0),
    (170, 0, 255), (255, 90, 0), (0, 255, 170), (255, 255, 255),
]


def labeling_config() -> str:
    return resources.files("annotation").joinpath("labeling_config.xml").read_text()


def judge_lean(scores: dict[str, Any], threshold: float) -> str | None:
    """The way the judge leans on a borderline sample: 'accept' when its overall score reaches
    `threshold`, else 'reject'; None when it gave no overall score."""
    overall = scores.get("overall")
    if overall is None:
        return None
    return "accept" if float(overall) >= threshold else "reject"


def sub_edit_passes(scores: dict[str, Any]) -> list[bool | None]:
    """The judge's pass/fail per sub-edit: routing's `sub_edit_pass`, else score >= 0.5; None
    where the judge could not verify it (score None: routing does not pass it, but it did not
    fail either, so the annotator gets no pre-filled answer)."""
    subs = scores.get("sub_edits") or []
    unknown = [s is None for s in subs]
    if scores.get("sub_edit_pass") is not None:
        return [None if i < len(unknown) and unknown[i] else bool(x)
                for i, x in enumerate(scores["sub_edit_pass"])]
    return [None if s is None else float(s) >= 0.5 for s in subs]


def overlay_png(members: dict[str, bytes]) -> bytes:
    """The target with each sub-edit's region outlined in its own colour and numbered, no fill:
    the labeling interface paints the regions it pre-fills over it (`annotation.corrections`), and a
    background region, left outlined only, never hides the target."""
    target = decode_png(members["target.png"])
    canvas = target.copy()
    height, width = canvas.shape[:2]
    thick = max(1, round(min(height, width) / 200))  # ≈ 2 px on a 384 px image, visible when scaled down
    labels = []
    for i, mask in enumerate(member_masks(members)):
        color = np.array(OVERLAY_COLORS[i % len(OVERLAY_COLORS)], np.uint8)
        inner = mask.copy()
        for _ in range(thick):  # erode by `thick` px: what is left out of `inner` is the edge
            inner &= np.roll(inner, 1, 0) & np.roll(inner, -1, 0) & np.roll(inner, 1, 1) & np.roll(inner, -1, 1)
        canvas[mask & ~inner] = color
        if mask.any():
            labels.append((i + 1, mask, tuple(int(c) for c in color)))
    image = Image.fromarray(canvas, "RGB")
    draw = ImageDraw.Draw(image)
    size = max(12, round(min(height, width) / 11))  # readable when a pane shows it at ≈ 200 px
    font = ImageFont.load_default(size=size)
    pad = max(2, size // 5)
    for number, mask, color in labels:
        x0, y0, x1, y1 = draw.textbbox((0, 0), str(number), font=font, anchor="lt")
        w, h = x1 - x0 + 2 * pad, y1 - y0 + 2 * pad
        left, top = _label_corner(mask, w, h)
        draw.rectangle([left, top, left + w - 1, top + h - 1], fill=color, outline=(0, 0, 0),
                       width=max(1, size // 12))
        draw.text((left + pad, top + pad), str(number), fill=(0, 0, 0), font=font, anchor="lt")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _label_corner(mask: np.ndarray, w: int, h: int) -> tuple[int, int]:
    """Top-left corner of a w x h label just above the region's box, at its left (so the label
    does not hide the edit itself), moved inside the frame where the region touches its edge."""
    ys, xs = np.nonzero(mask)
    height, width = mask.shape
    left = min(max(int(xs.min()), 0), max(width - w, 0))
    top = int(ys.min()) - h
    if top < 0:  # no room above: below the box, else the frame's top
        top = int(ys.max()) + 1 if int(ys.max()) + 1 + h <= height else 0
    return left, top


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


# `images(name, png_bytes) -> url`: how a task points at an image (inline data URL, local file)
ImageRef = Callable[[str, bytes], str]


def build_task(meta: dict[str, Any], members: dict[str, bytes], image_ref: ImageRef,
               lean_threshold: float) -> dict[str, Any]:
    """Task (data + judge prediction) for one review sample."""
    sample_id = meta["id"]
    sub_edits = meta.get("sub_edits") or []
    data: dict[str, Any] = {
        "sample_id": sample_id,
        "instruction": meta.get("instruction", ""),
        # not plain "source": Label Studio's data manager sets a task field `source` (the task as
        # JSON) that shadows a data key of that name, so `$source` would load no image
        "source_image": image_ref("source", members["source.png"]),
        "target_image": image_ref("target", members["target.png"]),
        "overlay_image": image_ref("overlay", overlay_png(members)),
        "num_sub_instructions": len(sub_edits),
    }
    for n in range(1, MAX_SUB_INSTRUCTIONS + 1):
        present = n <= len(sub_edits)
        data[f"sub_{n}"] = f"{n}. {sub_edits[n - 1]['text']}" if present else ""
        data[f"sub_{n}_options"] = (
            [{"value": "pass", "hotkey": PASS_KEYS[n - 1]}, {"value": "fail", "hotkey": FAIL_KEYS[n - 1]}]
            if present else []
        )
    extra = sub_edits[MAX_SUB_INSTRUCTIONS:]
    if extra:
        log.warning("sample %s has %d sub-instructions; those past %d have no pass/fail control",
                    sample_id, len(sub_edits), MAX_SUB_INSTRUCTIONS)
    data["sub_more"] = "; ".join(
        f"{MAX_SUB_INSTRUCTIONS + k + 1}. {e['text']}" for k, e in enumerate(extra)
    )
    scores = meta.get("scores") or {}
    lean = judge_lean(scores, lean_threshold)
    data["judge_summary"] = _judge_summary(meta, scores, lean)
    prediction = judge_prediction(meta, lean)
    # the editable regions and texts start from ours, whether or not the judge leans anywhere
    prediction["result"] += prefill_results(meta.get("instruction", ""), sub_edits,
                                            member_masks(members), MAX_SUB_INSTRUCTIONS)
    return {"data": data, "predictions": [prediction]}


def _judge_summary(meta: dict[str, Any], scores: dict[str, Any], lean: str | None) -> str:
    """The judge's scores as lines: its lean and overall scores, then one line per sub-instruction
    (the labeling interface shows the newlines)."""
    judge = (meta.get("provenance") or {}).get("judge") or "judge"
    head = [f"{judge} leans {lean or 'nowhere'}"]
    for key in ("overall", "background", "quality"):
        if scores.get(key) is not None:
            head.append(f"{key} {float(scores[key]):.2f}")
    lines = [" · ".join(head)]
    reasons = scores.get("sub_edit_reasons") or []
    subs = scores.get("sub_edits") or []
    for n, score in enumerate(subs, start=1):
        reason = reasons[n - 1] if n - 1 < len(reasons) else ""
        # None: the judge could not verify it (an imported free-text edit): say so, not a number
        shown = "not checked" if score is None else f"{float(score):.2f}"
        lines.append(f"#{n} {shown}{' ' + reason if reason else ''}")
    return "\n".join(lines)


def judge_prediction(meta: dict[str, Any], lean: str | None) -> dict[str, Any]:
    """The judge's opinion as a pre-annotation: model_version = judge name@version, score =
    overall score (Label Studio orders and samples tasks by it); no verdict when it leans nowhere."""
    scores = meta.get("scores") or {}
    result = [] if lean is None else [_choice("verdict", "Accept" if lean == "accept" else "Reject")]
    for n, passed in enumerate(sub_edit_passes(scores)[:MAX_SUB_INSTRUCTIONS], start=1):
        if passed is not None:
            result.append(_choice(f"sub_{n}", "pass" if passed else "fail"))
    prediction: dict[str, Any] = {
        "model_version": (meta.get("provenance") or {}).get("judge") or "judge",
        "result": result,
    }
    if scores.get("overall") is not None:
        prediction["score"] = float(scores["overall"])
    return prediction


def _choice(name: str, value: str) -> dict[str, Any]:
    return {"from_name": name, "to_name": "target", "type": "choices", "value": {"choices": [value]}}


@dataclass(frozen=True)
class Vote:
    """One annotator's counted answer on one sample."""

    annotation_id: int
    task_id: int
    annotator: int | None
    verdict: str
    sub_edits: tuple[bool | None, ...]
    comment: str
    created_at: str
    updated_at: str
    proposal: Proposal = Proposal()  # the regions and texts it hands back (annotation.corrections)


def parse_annotation(annotation: dict[str, Any], task_id: int, num_sub: int) -> Vote | None:
    """An annotation → Vote; None when it is cancelled (skipped) or gives no verdict."""
    if annotation.get("was_cancelled"):
        return None
    verdict = None
    subs: list[bool | None] = [None] * min(num_sub, MAX_SUB_INSTRUCTIONS)
    comment = ""
    for region in annotation.get("result") or []:
        name = region.get("from_name", "")
        value = region.get("value") or {}
        if name == "verdict":
            choices = value.get("choices") or []
            verdict = VERDICT_CHOICES.get(choices[0]) if choices else None
        elif name.startswith("sub_") and name[4:].isdigit():
            n = int(name[4:])
            choices = value.get("choices") or []
            if 1 <= n <= len(subs) and choices:
                subs[n - 1] = SUB_CHOICES.get(choices[0])
        elif name == "comment":
            comment = " ".join(value.get("text") or [])
    if verdict is None:
        return None
    try:
        proposal = read_proposal(annotation.get("result") or [], min(num_sub, MAX_SUB_INSTRUCTIONS))
    except (ValueError, TypeError, KeyError, AttributeError) as exc:  # typed by people: costs the corrections only
        log.warning("annotation %s of task %s: its regions/texts are unreadable and ignored: %s",
                    annotation.get("id"), task_id, exc)
        proposal = Proposal()
    return Vote(
        annotation_id=int(annotation["id"]),
        task_id=task_id,
        annotator=annotation.get("completed_by"),
        verdict=verdict,
        sub_edits=tuple(subs),
        comment=comment,
        created_at=str(annotation.get("created_at") or ""),
        updated_at=str(annotation.get("updated_at") or annotation.get("created_at") or ""),
        proposal=proposal,
    )


def counted_votes(votes: list[Vote]) -> list[Vote]:
    """One vote per annotator (their latest), across all tasks of a sample, in a stable order."""
    latest: dict[Any, Vote] = {}
    for vote in sorted(votes, key=lambda v: (v.updated_at, v.annotation_id)):
        key = vote.annotator if vote.annotator is not None else ("annotation", vote.annotation_id)
        latest[key] = vote
    return sorted(latest.values(), key=lambda v: (v.updated_at, v.annotation_id))


def local_files_url(path: Path, document_root: Path) -> str:
    relative = Path(path).resolve().relative_to(Path(document_root).resolve())
    return f"/data/local-files/?d={quote(relative.as_posix())}"
