"""One session of an edit dataset → the parts of one complex, region-annotated sample.

Shared by every format. The session's turns, in order, become the sub-edits: the sample's source
is the first turn's input, its target the last kept turn's output, and turn i's region is

- the dataset's own mask for that turn, decoded from its encoding (`base.MASK_KINDS`) at the
  mask's own resolution and brought to the sample through the session's frame (`mask_from`:
  "dataset"); a mask whose aspect ratio is not the image's (`frame.same_aspect`: equal up to
  rounding to whole pixels) cannot be carried sensibly and fails the session;
- else the difference between turn i's input and output, robust to the dataset's codec noise
  (`imagediff.changed_region`: the pair's own noise floor, coarse blocks, closed, holes filled,
  specks dropped) (`mask_from`: "diff"); a background edit's difference is the background;
- for ImgEdit-style object masks named by the turn's text, their union with that difference
  (`mask_from`: "rle+diff");
- without a dataset mask, the whole frame for an edit of the whole image (`mask_from`:
  "global"): a turn whose text says so (type `global`: a style, a season, the lighting, …), or
  whose difference covers more than `imagediff.GLOBAL_SHARE` of the frame (not a background
  edit; an untyped one becomes `global`). Such a sample has no background to keep. A dataset's
  mask is kept as it is, whatever the text seems to say.

Everything is brought to the build's resolution through one `Frame` of the first input (short
side = `resolution`, long side centre-cropped to a multiple of 64, as a photo source does; never
stretched): every turn's input and output and every mask at any resolution of that aspect gets the
same crop, scaled to its own pixels, so the record is the same whatever the dataset's sizes, and
the provenance records the first input's `original_size` and the `crop` in its pixels. A session
that cannot be made into a sample raises `SourceError` with the reason (turn chain with a gap or
a repeat, an undecodable image, a turn whose input or output has another aspect ratio than the
first input, a turn whose input is not the previous output, an unusable mask, a turn that changed
nothing): the build quarantines it and goes on.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from pipeline import bounds, rle
from pipeline.importers.base import MaskSpec, RawSession, RawTurn
from pipeline.compose.procedural import turn_text
from pipeline.importers.edit_types import infer_edit_type
from pipeline.imagediff import GLOBAL_SHARE, changed_region
from pipeline.record import GLOBAL, OTHER, InventoryObject, SubEdit
from pipeline.sources.base import SourceError
from pipeline.sources.decode import MAX_PIXELS, decode_image, mask_box, one_line
from pipeline.sources.frame import Frame, same_aspect

CHAIN_LEVEL = 6.0  # mean absolute difference (levels) allowed between turn i's input and i-1's output


@dataclass
class Assembled:
    source: np.ndarray
    target: np.ndarray
    texts: list[str]
    sub_edits: list[SubEdit]
    background_mask: np.ndarray
    objects: list[InventoryObject] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)


def check_chain(indices: list[int]) -> None:
    """SourceError unless the turn indices are 1, 2, …, n (each once), n ≤ `bounds.MAX_TURN`.
    Checked in one pass over the sorted indices: nothing as large as the largest index is built."""
    for index in indices:
        try:
            bounds.turn_index(index)
        except bounds.OutOfBounds as exc:
            raise SourceError(str(exc)) from None
    if len(indices) > bounds.MAX_TURN:
        raise SourceError(f"session has {len(indices)} turns, over the limit of {bounds.MAX_TURN}")
    seen = sorted(indices)
    for previous, current in zip(seen, seen[1:]):
        if previous == current:
            raise SourceError(f"turn {current} appears {seen.count(current)} times in the session",
                              context={"turn": current})
    expected = 1
    for current in seen:
        if current != expected:
            break
        expected += 1
    if not seen or expected <= seen[-1]:
        present = ",".join(str(i) for i in seen)
        raise SourceError(f"gap in the turn chain: turn {expected} is missing "
                          f"(turns present: {present})", context={"turn": expected})


def has_gap(indices: list[int]) -> bool:
    try:
        check_chain(indices)
        return False
    except SourceError:
        return True


def _image(data: bytes, what: str) -> np.ndarray:
    try:
        return decode_image(data).image
    except SourceError as exc:
        raise SourceError(f"{what}: {exc}") from None


def _load(loader: Any, what: str) -> Any:
    try:
        return loader()
    except SourceError as exc:
        raise SourceError(f"{what}: {exc}") from None


def _fit(image: np.ndarray, frame: Frame, what: str) -> np.ndarray:
    """An image of the session (at any resolution of the first input's aspect) in the sample's
    frame; SourceError naming both files' sizes when the aspect differs."""
    h, w = image.shape[:2]
    _check_aspect((w, h), frame, what)
    return frame.image(image)


def _check_aspect(size: tuple[int, int], frame: Frame, what: str) -> None:
    if not same_aspect(frame.original, size):
        raise SourceError(f"{what} is {size[0]}x{size[1]}, turn 1 input "
                          f"{frame.original[0]}x{frame.original[1]}: a different aspect ratio")


def decode_mask(spec: MaskSpec, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """The edited region (bool, at the mask's own resolution) of a dataset's mask encoding.
    A mask is never bigger than its image: `max_pixels` is the session's first image's."""
    if spec.kind == "rle":
        try:
            return rle.decode(spec.data, max_pixels=max_pixels)
        except ValueError as exc:
            raise SourceError(one_line(f"bad RLE mask: {exc}")) from None
    if spec.kind not in ("alpha", "white"):
        raise SourceError(f"unknown mask encoding {spec.kind!r}")
    try:
        with Image.open(io.BytesIO(spec.data), formats=("PNG", "WEBP", "JPEG", "BMP", "TIFF", "GIF")) as im:
            if im.width * im.height > max_pixels:
                raise SourceError(f"mask of {im.width}x{im.height} pixels refused (too large)")
            im.load()
            if spec.kind == "alpha" and ("A" in im.getbands() or "transparency" in im.info):
                alpha = np.asarray(im.convert("RGBA"))[..., 3]
                return alpha < 128
            return np.asarray(im.convert("L")) >= 128
    except SourceError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise SourceError(one_line(f"mask does not decode: {type(exc).__name__}: {exc}")) from None


def fit_region(mask: np.ndarray, frame: Frame, what: str) -> np.ndarray:
    """A dataset mask (at any resolution of the first input's aspect) in the sample's frame."""
    mh, mw = mask.shape[:2]
    _check_aspect((mw, mh), frame, what)
    return frame.mask(mask)


def _named(objects: list[InventoryObject], text: str) -> list[InventoryObject]:
    lowered = f" {' '.join(text.lower().split())} "
    return [o for o in objects if o.label and f" {o.label.lower()} " in lowered]


def assemble(session: RawSession, *, resolution: int, min_edits: int, max_edits: int) -> Assembled:
    """The sample parts of `session` (see the module docstring); SourceError with the reason."""
    check_chain([t.index for t in session.turns])
    turns = sorted(session.turns, key=lambda t: t.index)
    for position, turn in enumerate(turns, start=1):
        if turn.instruction is not None:
            try:
                turn.instruction = bounds.clean_text(turn.instruction,
                                                     what=f"turn {position}'s instruction")
            except bounds.OutOfBounds as exc:
                raise SourceError(str(exc), context={"turn": position}) from None
        turn.turn_id = bounds.clip_text(turn.turn_id)
    if len(turns) < min_edits:
        raise SourceError(f"session has {len(turns)} turns, fewer than --min-edits {min_edits}")
    total = len(turns)
    turns = turns[:max_edits]
    if turns[0].source is None:
        raise SourceError("turn 1 has no input image", context={"turn": 1})
    first = _image(_load(turns[0].source, "turn 1 input"), "turn 1 input")
    frame = Frame.fit(first.shape[1], first.shape[0], resolution)
    source = frame.image(first)
    objects = _objects(session, frame)

    before, texts, subs = source, [], []
    for position, turn in enumerate(turns, start=1):
        texts.append(_text(turn, position))
        if position > 1 and turn.source is not None:
            given = _fit(_image(_load(turn.source, f"turn {position} input"), f"turn {position} input"),
                         frame, f"turn {position} input")
            gap = float(np.abs(given.astype(np.int16) - before.astype(np.int16)).mean())
            if gap > CHAIN_LEVEL:
                raise SourceError(f"turn {position}'s input is not turn {position - 1}'s output "
                                  f"(mean difference {gap:.1f} levels)", context={"turn": position})
        after = _fit(_image(_load(turn.target, f"turn {position} output"), f"turn {position} output"),
                     frame, f"turn {position} output")
        subs.append(_sub_edit(turn, position, texts[-1], before, after, frame, objects))
        before = after
    union = np.logical_or.reduce([s.mask for s in subs])
    return Assembled(
        source=source, target=before, texts=texts, sub_edits=subs, background_mask=~union,
        objects=objects,
        provenance={"dataset": session.dataset, "split": session.split,
                    "source_id": session.source_id, "turn_ids": [t.turn_id for t in turns],
                    "turns_in_session": total, "license": session.license, **frame.meta()})


def _text(turn: RawTurn, position: int) -> str:
    if not turn.instruction or not str(turn.instruction).strip():
        raise SourceError(f"turn {position} has no instruction", context={"turn": position})
    try:
        return turn_text(turn.instruction)
    except ValueError as exc:
        raise SourceError(f"turn {position}: {exc}", context={"turn": position}) from None


def _objects(session: RawSession, frame: Frame) -> list[InventoryObject]:
    """The dataset's object masks (at any resolution of the first input's aspect) in the sample's
    frame; one of another aspect, or cropped away, only loses that object."""
    objects = []
    for raw in session.objects:
        try:
            mask = rle.decode(raw.rle)
        except ValueError:
            continue  # an unusable object mask only loses that object
        if not same_aspect(frame.original, (mask.shape[1], mask.shape[0])):
            continue
        mask = frame.mask(mask)
        box = mask_box(mask)
        if box is not None:
            objects.append(InventoryObject(id=len(objects), label=raw.label, box=box, mask=mask,
                                           confidence=float(raw.score), producer=session.dataset))
    return objects


def _sub_edit(turn: RawTurn, position: int, text: str, before: np.ndarray, after: np.ndarray,
              frame: Frame, objects: list[InventoryObject]) -> SubEdit:
    spec = _load(turn.mask, f"turn {position} mask") if turn.mask is not None else None
    named = _named(objects, turn.instruction or "")
    edit_type = infer_edit_type(turn.instruction or "")
    whole = np.ones(before.shape[:2], dtype=bool)
    # The dataset's own mask says where the edit is, whatever the text seems to say.
    if spec is not None:
        what = f"turn {position} mask"
        mask = fit_region(_loaded_mask(spec, what, frame.original[0] * frame.original[1]), frame,
                          what)
        source = "dataset"
    elif edit_type == GLOBAL:
        mask, source = whole, "global"
    else:
        mask = changed_region(before, after)
        source = "diff"
        if named:
            mask = np.logical_or.reduce([o.mask for o in named]) | mask
            source = "rle+diff"
        if edit_type != "background" and np.count_nonzero(mask) > GLOBAL_SHARE * mask.size:
            mask, source = whole, "global"
            edit_type = GLOBAL if edit_type == OTHER else edit_type
    box = mask_box(mask)
    if box is None:
        raise SourceError(f"turn {position} has an empty region ({source}: "
                          + ("the mask marks no pixel)" if source == "dataset" else "nothing changed)"),
                          context={"turn": position})
    params = {"domain": "photo", "free_text": True, "mask_from": source, "turn_id": turn.turn_id,
              "original_text": str(turn.instruction)}  # cleaned and bounded by `assemble`
    return SubEdit(type=edit_type, text=text,
                   object_ids=[o.id for o in named], params=params, box=box, mask=mask)


def _loaded_mask(spec: MaskSpec, what: str, max_pixels: int) -> np.ndarray:
    try:
        return decode_mask(spec, max_pixels)
    except SourceError as exc:
        raise SourceError(f"{what}: {exc}") from None
