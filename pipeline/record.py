"""The one record every stage passes along: `EditSample`, and the manifest schema derived from it.

A sample grows as it flows: the source fills `source` (and what it knows: `source_meta`, maybe
`objects`), the grounder fills the object inventory `objects`, the composer fills `instruction`
and `sub_edits` with their regions, the editor fills `target`, the changed-pixel masks and (hidden
from judges) `defects`, the judge fills `scores`, routing fills `verdict`. Any stage may instead
fill `error`, after which later stages pass the sample through untouched and it ends in quarantine.

What only one backend knows (the procedural scene graph, an editor's donor cut-outs) lives in
`private`: never written to shards, never shown to a judge.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pyarrow as pa

from pipeline import __version__ as CODE_VERSION

EDIT_TYPES = (
    "add",
    "remove",
    "replace",
    "recolor",
    "resize",
    "move",
    "background",
    "add_text",
    "swap",
    "texture",
)
# Types only an importer gives, never drafted by a composer: GLOBAL, an edit of the whole image
# (a style, "make it look like a painting", weather, season, lighting: its region is the frame);
# OTHER, a text it could not type. The pixel judge cannot verify either (unknown).
GLOBAL = "global"
OTHER = "other"
SUB_EDIT_TYPES = EDIT_TYPES + (GLOBAL, OTHER)

# What a pair's pixels promise, which decides how its background is judged (`EditSample.pair_kind`):
# - exact: an exact editor (procedural, photo) changed the source's pixels inside the regions
#   only; outside them target == source bit for bit;
# - generative: a model made the content inside the regions, composited so that outside them
#   target == source bit for bit;
# - imported: an edit dataset's pair: re-encoded, perhaps regenerated whole; the background is
#   equal only up to the pair's own codec noise.
PAIR_KINDS = ("exact", "generative", "imported")

# Final verdicts a manifest row can carry. `judge_error`: the judge could not score the sample
# (kept for a re-judge run, never accepted).
VERDICTS = ("accept", "reject", "borderline", "error", "judge_error")
VERDICT_SOURCES = ("judge", "human", "both", "dataset")  # dataset: judge "none" trusted its curation

# A complex instruction has this many sub-edits at most (the product's 2–8; 1 allowed for tests
# and single edits). The one place this bound is written.
MAX_SUB_EDITS = 8



def check_edit_bounds(min_edits: int, max_edits: int) -> None:
    """ValueError unless 1 <= min_edits <= max_edits <= MAX_SUB_EDITS."""
    if not 1 <= min_edits <= max_edits <= MAX_SUB_EDITS:
        raise ValueError(f"need 1 <= min edits <= max edits <= {MAX_SUB_EDITS}, "
                         f"got {min_edits}..{max_edits}")


ERROR_MAX_CHARS = 500  # error strings are capped so logs and manifests stay readable


def failure_reason(exc: BaseException | str) -> str:
    """One line a person understands: `Type: message`; for an exception raised without a
    message (a bare `ZeroDivisionError`, `OverflowError`), its type's own description
    ("ZeroDivisionError: second argument to a division or modulo operation was zero")."""
    if isinstance(exc, str):
        text = exc
    else:
        name = type(exc).__name__
        message = " ".join(str(exc).split())
        if not message:
            doc = (type(exc).__doc__ or "").strip().splitlines()
            described = doc[0].strip().rstrip(".") if doc else ""
            message = (described[:1].lower() + described[1:]) if described else "raised without a message"
        text = f"{name}: {message}"
    text = " ".join(text.split()) or "failed without a reason"
    return text[:ERROR_MAX_CHARS]


def sample_id(seed: int, key: int | str, edit_index: int = 0) -> str:
    """Stable id from the build seed, the source key and the edit index: resume depends on it.
    (Edit 0 hashes as the key alone, so procedural ids are what they always were.)"""
    name = f"mcie:{seed}:{key}" if edit_index == 0 else f"mcie:{seed}:{key}#{edit_index}"
    digest = hashlib.sha256(name.encode()).hexdigest()
    return f"s{seed}-{digest[:16]}"


@dataclass(slots=True)
class InventoryObject:
    """One object the grounder found (or the source knew): what the composer is told.

    `attributes` hold what is known of it in words and numbers (`color` name, `rgb`, `size` word,
    `position` word, ...); `producer` names the grounder/source that found it."""

    id: int
    label: str
    box: list[int]  # [x0, y0, x1, y1], exclusive upper bounds
    mask: np.ndarray | None = None  # bool HxW
    attributes: dict[str, Any] = field(default_factory=dict)
    confidence: float = 1.0
    producer: str = ""

    def to_json(self) -> dict[str, Any]:
        from pipeline import rle

        return {
            "id": self.id,
            "label": self.label,
            "box": [int(v) for v in self.box],
            "mask_rle": None if self.mask is None else rle.encode(self.mask),
            "attributes": self.attributes,
            "confidence": float(self.confidence),
            "producer": self.producer,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "InventoryObject":
        from pipeline import rle

        mask = data.get("mask_rle")
        return cls(
            id=int(data["id"]),
            label=str(data["label"]),
            box=[int(v) for v in data["box"]],
            mask=None if mask is None else rle.decode(mask),
            attributes=dict(data.get("attributes", {})),
            confidence=float(data.get("confidence", 1.0)),
            producer=str(data.get("producer", "")),
        )


@dataclass(slots=True)
class SubEdit:
    """One sub-instruction of the complex instruction, tied to its spatial region.

    `params` is the structured form of the edit, the same information the text states (colours as
    names and RGB, kinds, directions, sizes): a judge may read it, since a real instruction says it.
    `box` is [x0, y0, x1, y1] in pixels (exclusive upper bounds) of `mask`'s true pixels.
    `mask` (bool HxW) is first the region the composer allows this sub-edit to change; the editor
    then narrows it to the pixels the sub-edit actually changed (it never grows it).
    `object_ids` name objects of the sample's inventory (`EditSample.objects`).
    """

    type: str
    text: str
    target: str = ""  # the referring phrase of the object acted on ("the small red cup on the left")
    object_ids: list[int] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)
    box: list[int] | None = None
    mask: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.type not in SUB_EDIT_TYPES:
            raise ValueError(f"unknown edit type {self.type!r}; expected one of {SUB_EDIT_TYPES}")

    def to_json(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "text": self.text,
            "target": self.target,
            "object_ids": list(self.object_ids),
            "params": self.params,
            "box": self.box,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], mask: np.ndarray | None = None) -> "SubEdit":
        return cls(
            type=data["type"],
            text=data["text"],
            target=data.get("target", ""),
            object_ids=list(data.get("object_ids", [])),
            params=dict(data.get("params", {})),
            box=data.get("box"),
            mask=mask,
        )


@dataclass(slots=True)
class JudgeView:
    """What a judge may see: the two images and the structured instruction. Nothing else."""

    id: str
    source: np.ndarray
    target: np.ndarray
    instruction: str
    sub_edits: list[SubEdit]
    background_mask: np.ndarray
    kind: str = "exact"  # one of PAIR_KINDS


@dataclass(slots=True)
class EditSample:
    id: str
    index: int
    seed: int
    source: np.ndarray | None = None  # uint8 HxWx3
    source_key: str = ""  # the source's own key for the image (relative path, tar key, row id)
    edit_index: int = 0  # which of the image's complex instructions this is (--edits-per-image)
    source_meta: dict[str, Any] = field(default_factory=dict)  # caption, url, license, notes
    objects: list[InventoryObject] = field(default_factory=list)  # the grounder's inventory
    instruction: str = ""
    sub_edits: list[SubEdit] = field(default_factory=list)
    background_mask: np.ndarray | None = None  # bool HxW: pixels no sub-edit may change
    target: np.ndarray | None = None  # uint8 HxWx3
    # Ground truth of the editor's injected faults. Never given to a judge (see `judge_view`),
    # never written into shards; it goes to OUT/defects.jsonl only.
    defects: list[dict[str, Any]] = field(default_factory=list)
    scores: dict[str, Any] = field(default_factory=dict)
    verdict: str | None = None
    verdict_by: str | None = None
    human: dict[str, Any] | None = None  # annotators' answers once a person decided
    error: str | None = None
    error_stage: str | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    # Backend-private data (procedural scene graphs, donor cut-outs): never in shards or judges.
    private: dict[str, Any] = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        return self.error is not None

    @property
    def edit_mask(self) -> np.ndarray:
        """Union of the sub-edit regions."""
        if self.background_mask is not None:
            return ~self.background_mask
        masks = [s.mask for s in self.sub_edits if s.mask is not None]
        return np.logical_or.reduce(masks) if masks else None

    def fail(self, stage: str, exc: BaseException | str) -> None:
        self.error = failure_reason(exc)
        self.error_stage = stage
        self.verdict = "error"

    @property
    def pair_kind(self) -> str:
        """One of PAIR_KINDS, as the editor recorded it (`provenance["pair"]`); a record written
        before editors recorded it is imported when its editor is a dataset's, else exact."""
        kind = self.provenance.get("pair")
        if kind in PAIR_KINDS:
            return kind
        return "imported" if str(self.provenance.get("editor", "")).endswith("@dataset") else "exact"

    def judge_view(self) -> JudgeView:
        if self.source is None or self.target is None or self.background_mask is None:
            raise ValueError(f"sample {self.id} is not ready to judge (missing images or masks)")
        return JudgeView(
            id=self.id,
            source=self.source,
            target=self.target,
            instruction=self.instruction,
            sub_edits=self.sub_edits,
            background_mask=self.background_mask,
            kind=self.pair_kind,
        )

    def metadata(self) -> dict[str, Any]:
        """The JSON member of a shard sample (everything but pixels and the hidden defect log)."""
        return {
            "id": self.id,
            "index": self.index,
            "seed": self.seed,
            "instruction": self.instruction,
            "sub_edits": [s.to_json() for s in self.sub_edits],
            "scores": self.scores,
            "verdict": self.verdict,
            "verdict_by": self.verdict_by,
            "human": self.human,
            "error": self.error,
            "error_stage": self.error_stage,
            "source_key": self.source_key,
            "edit_index": self.edit_index,
            "source_meta": self.source_meta,
            "objects": [o.to_json() for o in self.objects],
            "provenance": self.provenance,
        }


# ---- manifest schema: one table of (column, arrow type, how to read it off a sample) -------------

def _score(key: str) -> Callable[[EditSample], float | None]:
    def get(s: EditSample) -> float | None:
        value = s.scores.get(key)
        return None if value is None else float(value)

    return get


def _passes(s: EditSample) -> list[bool] | None:
    value = s.scores.get("sub_edit_pass")
    return None if value is None else [bool(x) for x in value]


def pixel_sha256(image: np.ndarray | None) -> str | None:
    """sha256 of an image's pixels (shape line, then the raw uint8 bytes): the same for the same
    pixels whatever the PNG encoder, so duplicates across builds and exports can be found."""
    if image is None:
        return None
    digest = hashlib.sha256("x".join(str(n) for n in image.shape).encode() + b"\n")
    digest.update(np.ascontiguousarray(image).tobytes())
    return digest.hexdigest()


def _boxes(s: EditSample) -> list[list[int] | None]:
    return [None if e.box is None else [int(v) for v in e.box] for e in s.sub_edits]


# The shard format the factory writes (pipeline.dataset.shards.FORMAT_VERSION): 1 = a mask_N.png
# per sub-edit; 2 = one regions.png (bit i = sub-edit i) and a fixed-schema json.
SHARD_FORMAT = 2


MANIFEST_COLUMNS: list[tuple[str, pa.DataType, Callable[[EditSample], Any]]] = [
    ("id", pa.string(), lambda s: s.id),
    ("index", pa.int64(), lambda s: s.index),
    ("verdict", pa.string(), lambda s: s.verdict),
    ("verdict_by", pa.string(), lambda s: s.verdict_by),
    ("instruction", pa.string(), lambda s: s.instruction),
    ("num_sub_edits", pa.int32(), lambda s: len(s.sub_edits)),
    ("sub_edit_types", pa.list_(pa.string()), lambda s: [e.type for e in s.sub_edits]),
    ("sub_edit_texts", pa.list_(pa.string()), lambda s: [e.text for e in s.sub_edits]),
    ("sub_edit_boxes", pa.list_(pa.list_(pa.int32())), _boxes),
    # Scores in float64, as the judge and routing computed them: a float32 column could not tell
    # 0.91999995 from a 0.92 threshold.
    ("score_overall", pa.float64(), _score("overall")),
    ("score_background", pa.float64(), _score("background")),
    ("score_quality", pa.float64(), _score("quality")),
    ("background_changed", pa.float64(), _score("background_changed")),
    ("background_psnr", pa.float64(), _score("background_psnr")),
    (
        "sub_edit_scores",
        pa.list_(pa.float64()),
        # null = "unknown": the judge could not verify that sub-edit (the pair goes to review)
        lambda s: [None if x is None else float(x) for x in s.scores.get("sub_edits", [])],
    ),
    # routing's per-sub-edit decision (scores["sub_edit_pass"]); null until routed. Lets a
    # resumed build recount per-edit-type pass rates from the manifest alone.
    ("sub_edit_pass", pa.list_(pa.bool_()), _passes),
    ("width", pa.int32(), lambda s: None if s.source is None else int(s.source.shape[1])),
    ("height", pa.int32(), lambda s: None if s.source is None else int(s.source.shape[0])),
    ("error", pa.string(), lambda s: s.error),
    ("error_stage", pa.string(), lambda s: s.error_stage),
    ("corrected", pa.bool_(), lambda s: bool((s.human or {}).get("corrected"))),
    ("source_key", pa.string(), lambda s: s.source_key),
    ("edit_index", pa.int32(), lambda s: s.edit_index),
    ("source_sha256", pa.string(), lambda s: pixel_sha256(s.source)),
    ("target_sha256", pa.string(), lambda s: pixel_sha256(s.target)),
    ("source_kind", pa.string(), lambda s: s.provenance.get("source")),
    ("editor", pa.string(), lambda s: s.provenance.get("editor")),
    ("judge", pa.string(), lambda s: s.provenance.get("judge")),
    ("seed", pa.int64(), lambda s: s.seed),
    ("code_version", pa.string(), lambda s: s.provenance.get("code_version", CODE_VERSION)),
]

# Columns filled by the shard writer, not read off the sample.
SHARD_COLUMNS: list[tuple[str, pa.DataType]] = [
    ("shard", pa.string()),  # file name under OUT/shards (or review/quarantine path), None if none
    ("checksum", pa.string()),  # sha256 over the sample's members, as written
]

# What each column means: written into the parquet's schema metadata ("mcie.columns"), beside
# the shard format ("mcie.format"), so a manifest explains itself to whoever opens it.
COLUMN_MEANINGS: dict[str, str] = {
    "id": "stable sample id (build seed, source key, edit index); the shard key",
    "index": "sample number in the build (resume and shard placement)",
    "verdict": "accept | reject | borderline | error | judge_error",
    "verdict_by": "judge | human | both | dataset",
    "instruction": "the complex instruction",
    "num_sub_edits": "number of sub-edits (bits of regions.png)",
    "sub_edit_types": "edit type per sub-edit",
    "sub_edit_texts": "sub-instruction text per sub-edit",
    "sub_edit_boxes": "[x0, y0, x1, y1] per sub-edit (exclusive upper bounds), null if none",
    "score_overall": "judge's overall score in [0, 1]",
    "score_background": "judge's background-preservation score in [0, 1]",
    "score_quality": "judge's image-quality score in [0, 1]",
    "background_changed": "share of pixels outside every region that changed",
    "background_psnr": "PSNR (dB) of the outside pixels, source vs target",
    "sub_edit_scores": "judge's score per sub-edit; null = could not verify",
    "sub_edit_pass": "routing's pass/fail per sub-edit",
    "width": "image width in pixels",
    "height": "image height in pixels",
    "error": "why the sample failed (quarantine), one line",
    "error_stage": "the stage that failed it",
    "corrected": "a human corrected a region or a text in review",
    "source_key": "the source's own key of the image (path, tar key, row)",
    "edit_index": "which of the image's complex instructions this is",
    "source_sha256": "sha256 of the source pixels (pipeline.record.pixel_sha256)",
    "target_sha256": "sha256 of the target pixels",
    "source_kind": "the source backend",
    "editor": "the editor backend",
    "judge": "the judge backend",
    "seed": "the build seed",
    "code_version": "factory version that wrote the sample",
    "shard": "where it is: shards/<tar>, review/<id>, rejudge/<id> or quarantine/<id>.json",
    "checksum": "sha256 over its members (pipeline.dataset.shards.checksum)",
}

MANIFEST_SCHEMA = pa.schema(
    [pa.field(name, dtype) for name, dtype, _ in MANIFEST_COLUMNS]
    + [pa.field(name, dtype) for name, dtype in SHARD_COLUMNS],
    metadata={"mcie.format": str(SHARD_FORMAT),
              "mcie.columns": json.dumps(COLUMN_MEANINGS, sort_keys=True)},
)


def manifest_row(sample: EditSample, shard: str | None, checksum: str | None) -> dict[str, Any]:
    row = {name: get(sample) for name, _, get in MANIFEST_COLUMNS}
    row["shard"] = shard
    row["checksum"] = checksum
    return row


def dumps(data: Any) -> bytes:
    """Canonical JSON bytes (sorted keys) so the same sample always writes the same bytes."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), default=_json_default).encode()


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
