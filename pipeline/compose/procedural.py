"""The instruction composer: a complex instruction as an ordered chain of non-conflicting sub-edits.

The composer plays its edits forward on a working copy of the scene graph, so each sub-edit is
phrased against the scene as it will be when that sub-edit applies (after "make the cup blue", the
cup is "the blue cup"). Objects are named by the shortest unambiguous referring expression; the
structured form of each reference stays in `params["ref"]` (`params["refs"]` for a swap), and
`resolve_reference` turns it back into the object ids it denotes, so uniqueness is checkable.

Reference grammar (a dict): {"kind": k, "color"?: c, "size"?: s, "position"?: region,
"relation"?: {"type": "left of" | "right of" | "above" | "below", "landmark": <reference>}}.
Positions are coarse regions of the frame (thirds); a relation is judged from object centres.
A phrase is only used when it is robust: the target lies well inside its region (or clearly on
the stated side of the landmark) and every other candidate lies well outside it.

Sub-edit texts never contain ",", "." or ";" and start with a lower-case verb, so that
`split_instruction` can recover them from the joined instruction with the connective grammar below.

A free-text turn of an imported edit dataset keeps its own words and punctuation instead
("What if the horse wears a hat?", "make the cup, the plate and the fork blue"): `turn_text` is its
sub-edit text, `join_turns` / `split_turns` the complex instruction of such turns (rule below).
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from typing import Any, Callable, Iterator

import numpy as np

from pipeline.compose import frame
from pipeline.compose.base import COMPOSERS
from pipeline.compose.frame import (
    CELLS,
    POSITION_MARGIN,
    REGION_PHRASES,
    REGIONS,
    RELATION_SLACK,
    RELATIONS,
    SIZE_WORDS,
)
from pipeline.editors.procedural import apply_sub_edit, exact_regions
from pipeline.record import EDIT_TYPES, EditSample, SubEdit, check_edit_bounds
from pipeline.sources.scene import (
    BACKGROUND_COLORS,
    BACKGROUND_KINDS,
    COLORS,
    KINDS,
    PATTERNS,
    SIZES,
    TEXT_KIND,
    Scene,
    SceneObject,
    bbox,
    fits,
    font,
    pattern_color,
    sign_board_box,
    text_font_size,
)
from pipeline.stage import RecordStage, sample_rng

log = logging.getLogger(__name__)

# ---- referring expressions ------------------------------------------------------------------

def in_region(obj: SceneObject, region: str, slack: float = 0.0) -> bool:
    """Whether the object's centre lies in the region, grown by `slack` (shrunk if negative)."""
    return frame.in_region((obj.cx, obj.cy), region, slack)


def related(obj: SceneObject, relation: str, landmark: SceneObject, slack: float = 0.0) -> bool:
    """The loose reading of a relation: "left of" = centre left of the landmark's (+ slack)."""
    return frame.related((obj.cx, obj.cy), relation, (landmark.cx, landmark.cy), slack)


def _clearly_related(obj: SceneObject, relation: str, landmark: SceneObject) -> bool:
    return frame.clearly_related((obj.cx, obj.cy), relation, (landmark.cx, landmark.cy))


def resolve_reference(ref: dict[str, Any], scene: Scene, slack: float = 0.0) -> list[int]:
    """Ids of the objects of `scene` that the reference denotes (sorted). Unambiguous = one id.

    `slack` grows the positional regions and relations (the composer resolves with a positive
    slack to make sure no other object is even close to matching)."""
    found = []
    landmarks: list[SceneObject] = []
    relation = ref.get("relation")
    if relation is not None:
        landmarks = [scene.get(i) for i in resolve_reference(relation["landmark"], scene)]
        if not landmarks:
            return []
    for obj in scene.objects:
        if obj.kind != ref["kind"]:
            continue
        if "color" in ref and obj.color != ref["color"]:
            continue
        if "size" in ref and obj.size != ref["size"]:
            continue
        if "position" in ref and not in_region(obj, ref["position"], slack):
            continue
        if relation is not None and not any(
            lm.id != obj.id and related(obj, relation["type"], lm, slack) for lm in landmarks
        ):
            continue
        found.append(obj.id)
    return sorted(found)


def noun(kind: str) -> str:
    return "text" if kind == TEXT_KIND else kind


def describe(ref: dict[str, Any]) -> str:
    """The English phrase of a reference: "the small red cup on the left"."""
    words = ["the"]
    if "size" in ref:
        words.append(ref["size"])
    if "color" in ref:
        words.append(ref["color"])
    words.append(noun(ref["kind"]))
    if "position" in ref:
        words.append(REGION_PHRASES[ref["position"]])
    if "relation" in ref:
        words.append(RELATIONS[ref["relation"]["type"]])
        words.append(describe(ref["relation"]["landmark"]))
    return " ".join(words)


def _unique(ref: dict[str, Any], target: SceneObject, scene: Scene) -> bool:
    return resolve_reference(ref, scene, slack=POSITION_MARGIN) == [target.id]


def refer(target: SceneObject, scene: Scene, rng: np.random.Generator) -> dict[str, Any] | None:
    """The shortest robust, unambiguous reference to `target` in `scene`, or None if it has none.

    Tiers by number of attributes (kind is always said); among equally short references one is
    drawn at random for variety. Relations to a landmark are a last resort."""
    base = {"kind": target.kind}
    positions = [r for r in REGIONS if in_region(target, r, -POSITION_MARGIN)]
    attribute_sets: list[list[dict[str, Any]]] = [
        [{}],
        [{"color": target.color}, {"size": target.size}]
        + [{"position": p} for p in positions],
        [{"color": target.color, "size": target.size}]
        + [{"color": target.color, "position": p} for p in positions]
        + [{"size": target.size, "position": p} for p in positions],
        [{"color": target.color, "size": target.size, "position": p} for p in positions],
    ]
    for tier in attribute_sets:
        valid = [{**base, **extra} for extra in tier if _unique({**base, **extra}, target, scene)]
        if valid:
            return valid[int(rng.integers(len(valid)))]
    # Relations to a landmark that is itself named by kind (and colour) alone.
    relational = []
    for landmark in scene.objects:
        if landmark.id == target.id or landmark.kind in (target.kind, TEXT_KIND):
            continue
        lm_ref = next(
            (r for r in ({"kind": landmark.kind}, {"kind": landmark.kind, "color": landmark.color})
             if resolve_reference(r, scene) == [landmark.id]),
            None,
        )
        if lm_ref is None:
            continue
        for relation in RELATIONS:
            if _clearly_related(target, relation, landmark):
                relational.append({"type": relation, "landmark": lm_ref})
    for extras in ({}, {"color": target.color}, {"size": target.size},
                   {"color": target.color, "size": target.size}):
        valid = []
        for relation in relational:
            ref = {**base, **extras, "relation": relation}
            if resolve_reference(ref, scene, slack=RELATION_SLACK) == [target.id]:
                valid.append(ref)
        if valid:
            return valid[int(rng.integers(len(valid)))]
    return None


# ---- joining and splitting instructions ---------------------------------------------------------

FIRST_PREFIXES = ("First, ", "First ")
# Connectives between sub-edit texts. Sub-edit texts contain none of ",", ".", ";".
THEN_SEPARATORS = (", then ", ", and then ", ". Then ", "; then ")
MIDDLE_SEPARATORS = THEN_SEPARATORS + (", and after that ", ". After that, ", ", and also ", ", ")
FINAL_SEPARATORS = (", and finally ", ", finally ", ". Finally, ", ", then ", ", and ",
                    ". After that, ")
ALL_SEPARATORS = sorted(set(MIDDLE_SEPARATORS + FINAL_SEPARATORS), key=len, reverse=True)
_SPLIT = re.compile("|".join(re.escape(s) for s in ALL_SEPARATORS))
_FIRST = re.compile(r"^First,? ")


def _choice(rng: np.random.Generator, options: tuple[str, ...] | list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def join_instruction(texts: list[str], rng: np.random.Generator) -> str:
    """One fluent sentence (or a few) from the ordered sub-edit texts."""
    if not texts:
        raise ValueError("an instruction needs at least one sub-edit")
    for text in texts:
        if not text or not text[0].islower() or any(c in text for c in ",.;"):
            raise ValueError(f"sub-edit text {text!r} cannot be joined unambiguously")
    first = len(texts) > 1 and rng.random() < 0.3
    if first:
        parts = [_choice(rng, FIRST_PREFIXES) + texts[0]]
    else:
        parts = [texts[0][0].upper() + texts[0][1:]]
    for i, text in enumerate(texts[1:], start=1):
        if i == 1 and first:
            separator = _choice(rng, THEN_SEPARATORS)
        elif i == len(texts) - 1:
            separator = _choice(rng, FINAL_SEPARATORS)
        else:
            separator = _choice(rng, MIDDLE_SEPARATORS)
        parts.append(separator + text)
    return "".join(parts) + "."


def split_instruction(text: str) -> list[str]:
    """The sub-edit texts of an instruction written by `join_instruction`, in order."""
    body = text.strip()
    if body.endswith("."):
        body = body[:-1]
    body = _FIRST.sub("", body, count=1)
    pieces = [p.strip() for p in _SPLIT.split(body)]
    return [p[0].lower() + p[1:] for p in pieces if p]


# ---- joining and splitting free-text turns (imported datasets) ----------------------------------
#
# A turn's sub-edit text (`turn_text`) is the turn on one line (whitespace normalised) without its
# final full stop(s), its first letter lower-cased when its first word is an ordinary capitalised
# word ("What", "Make", "A"; not "I", "TV", "McDonald"): commas, inner full stops, "?", "!",
# quotes and every word stay. The complex instruction (`join_turns`) writes each turn as its own
# sentence, in order, ending with the turn's own "?"/"!" or else a full stop; the first starts
# with a capital (only when its first word is all lower-case, so that it is undone exactly), each
# later one follows a connective of TURN_CONNECTIVES, the turn's own words unchanged:
#     "Make it look like a painting. Then what if the horse wears a hat? Finally, add snow."
# `split_turns` cuts at a sentence end followed by a connective. It gives back the turn texts
# exactly unless a turn itself holds a sentence end followed by a connective ("add a hat. Then
# make it red" as one turn comes back as two): the record's sub-edits remain the authority.

TURN_CONNECTIVES = ("Then ", "Next, ", "After that, ")  # before a later turn
FINAL_TURN_CONNECTIVES = ("Finally, ", "Then ", "After that, ")  # before the last of 3 or more
_TURN_SPLIT = re.compile(r"(?<=[.!?]) (?:%s) " % "|".join(
    re.escape(c.strip()) for c in sorted(set(TURN_CONNECTIVES + FINAL_TURN_CONNECTIVES))))
_FIRST_WORD = re.compile(r"[^\W\d_]+")  # a run of letters at the start


def _lower_first(text: str) -> str:
    word = _FIRST_WORD.match(text)
    w = word.group() if word else ""
    if w and w != "I" and w[0].isupper() and (len(w) == 1 or w[1:].islower()):
        return text[0].lower() + text[1:]
    return text


def _upper_first(text: str) -> str:
    word = _FIRST_WORD.match(text)
    if word and word.group().islower() and word.group() != "i":
        return text[0].upper() + text[1:]
    return text


def turn_text(text: str) -> str:
    """A free-text turn as a sub-edit text (the rule above); ValueError for an empty one."""
    line = " ".join(str(text).split()).rstrip(" .")
    if not line:
        raise ValueError("empty instruction")
    return _lower_first(line)


def join_turns(texts: list[str], rng: np.random.Generator | None = None) -> str:
    """The complex instruction of free-text turns (each `turn_text`'s form): one sentence per turn,
    connectives drawn from `rng` (always "Then " without one)."""
    if not texts:
        raise ValueError("an instruction needs at least one sub-edit")
    for text in texts:
        if not text or text != turn_text(text):
            raise ValueError(f"turn text {text!r} is not in its sub-edit form (turn_text)")
    sentences = []
    for i, text in enumerate(texts):
        end = "" if text.endswith(("?", "!")) else "."
        if i == 0:
            sentences.append(_upper_first(text) + end)
            continue
        options = FINAL_TURN_CONNECTIVES if i == len(texts) - 1 >= 2 else TURN_CONNECTIVES
        connective = "Then " if rng is None else _choice(rng, options)
        sentences.append(connective + text + end)
    return " ".join(sentences)


def split_turns(text: str) -> list[str]:
    """The turn texts of an instruction written by `join_turns`, in order."""
    pieces = []
    for piece in _TURN_SPLIT.split(" ".join(text.split())):
        piece = piece[:-1] if piece.endswith(".") else piece
        if piece:
            pieces.append(_lower_first(piece))
    return pieces


# ---- the composer -----------------------------------------------------------------------------

TEXT_WORDS = ("SALE", "OPEN", "HELLO", "STOP", "CAFE", "EXIT", "SHOP", "NEW", "HOME", "PARK",
              "FOOD", "BOOK", "LOVE", "GO", "SUN", "ZOO", "TAXI", "MENU", "INFO", "BAR")
DIRECTIONS = {
    "left": ((-1, 0), "to the left"),
    "right": ((1, 0), "to the right"),
    "up": ((0, -1), "up"),
    "down": ((0, 1), "down"),
    "up-left": ((-1, -1), "up and to the left"),
    "up-right": ((1, -1), "up and to the right"),
    "down-left": ((-1, 1), "down and to the left"),
    "down-right": ((1, 1), "down and to the right"),
}
CELL_INSET = 0.06  # new things go this far inside their cell, so the cell's phrase is right
MIN_PATTERN_CONTRAST = 40  # a pattern on a black object is too faint to see: none there
TEXT_CONTRAST = 150  # RGB distance between text and the sign it is written on
_PATTERN_TEMPLATES = {
    "stripes": ("give {t} stripes", "make {t} striped", "paint stripes on {t}"),
    "dots": ("cover {t} with dots", "give {t} a polka-dot pattern", "make {t} dotted"),
    "checker": ("give {t} a checkered pattern", "make {t} checkered"),
    "solid": ("make {t} plain", "remove the pattern from {t}"),
}


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _rgb(name: str) -> list[int]:
    return list(COLORS[name])


class _Plan:
    """The working state while composing: the scene as it is now, and what is already spoken for."""

    def __init__(self, scene: Scene):
        self.scene = scene
        self.touched: set[int] = set()
        self.background_changed = False
        self.next_id = scene.next_id()  # ids of new objects are never reused, even after removal

    def free(self, rng: np.random.Generator) -> list[SceneObject]:
        """Objects no sub-edit has touched yet, in random order."""
        objs = [o for o in self.scene.objects if o.id not in self.touched and o.kind != TEXT_KIND]
        return [objs[i] for i in rng.permutation(len(objs))]

    def referable(
        self, rng: np.random.Generator, where: Callable[[SceneObject], bool] = lambda o: True
    ) -> Iterator[tuple[SceneObject, dict[str, Any]]]:
        """(object, reference) pairs of untouched objects, in random order."""
        for obj in self.free(rng):
            if not where(obj):
                continue
            ref = refer(obj, self.scene, rng)
            if ref is not None:
                yield obj, ref

    def commit(self, sub: SubEdit) -> None:
        self.scene = apply_sub_edit(self.scene, sub)
        self.touched.update(sub.object_ids)
        if sub.type == "background":
            self.background_changed = True
        if sub.type in ("add", "add_text"):
            self.next_id = max(self.next_id, sub.object_ids[0] + 1)


def _cell_point(rng: np.random.Generator, margin: float) -> tuple[str, float, float] | None:
    """A random point inside a random cell (inset), at least `margin` from the frame edges."""
    row, col = int(rng.integers(3)), int(rng.integers(3))
    lo_x, hi_x = max(col / 3 + CELL_INSET, margin), min((col + 1) / 3 - CELL_INSET, 1 - margin)
    lo_y, hi_y = max(row / 3 + CELL_INSET, margin), min((row + 1) / 3 - CELL_INSET, 1 - margin)
    if lo_x >= hi_x or lo_y >= hi_y:
        return None
    return CELLS[(row, col)], float(rng.uniform(lo_x, hi_x)), float(rng.uniform(lo_y, hi_y))


def _fits_after(
    plan: _Plan, sub: SubEdit, ids: tuple[int, ...], ignore: tuple[int, ...] = ()
) -> bool:
    """Whether the objects `ids` sit inside the frame, only partly overlapping, after `sub`."""
    after = apply_sub_edit(plan.scene, sub)
    return all(fits(after, after.get(i), ignore=ignore) for i in ids)


def _free_spots(plan: _Plan, rng: np.random.Generator, size: str, tries: int = 30):
    """Up to `tries` random (region name, cx, cy) spots where an object of `size` stays inside
    the frame; the caller takes the first that suits it."""
    w, h = plan.scene.width, plan.scene.height
    margin = (SIZES[size] * min(w, h) + 3) / min(w, h)
    for _ in range(tries):
        point = _cell_point(rng, margin)
        if point is not None:
            yield point


def _draft_add(plan: _Plan, rng: np.random.Generator) -> SubEdit | None:
    kind = _choice(rng, KINDS)
    color = _choice(rng, list(COLORS))
    size = _choice(rng, list(SIZES))
    for region, cx, cy in _free_spots(plan, rng, size):
        params = {"kind": kind, "color": color, "rgb": _rgb(color), "size": size,
                  "cx": cx, "cy": cy, "position": region}
        sub = SubEdit("add", "", object_ids=[plan.next_id], params=params)
        if not _fits_after(plan, sub, (plan.next_id,)):
            continue
        verb = _choice(rng, ("add", "put", "place", "draw"))
        thing = f"{SIZE_WORDS[size]} {color} {kind}"
        sub.text = f"{verb} {article(thing)} {thing} {REGION_PHRASES[region]}"
        sub.target = f"{article(thing)} {thing}"
        return sub
    return None


def _draft_remove(plan: _Plan, rng: np.random.Generator) -> SubEdit | None:
    for obj, ref in plan.referable(rng):
        t = describe(ref)
        verb = _choice(rng, ("remove {t}", "delete {t}", "take away {t}", "get rid of {t}",
                             "erase {t}"))
        return SubEdit("remove", verb.format(t=t), target=t, object_ids=[obj.id],
                       params={"kind": obj.kind, "color": obj.color, "rgb": _rgb(obj.color),
                               "ref": ref})
    return None


def _draft_replace(plan: _Plan, rng: np.random.Generator) -> SubEdit | None:
    for obj, ref in plan.referable(rng):
        to_kind = _choice(rng, [k for k in KINDS if k != obj.kind])
        to_color = obj.color if rng.random() < 0.5 else _choice(
            rng, [c for c in COLORS if c != obj.color])
        params = {"from_kind": obj.kind, "to_kind": to_kind, "from_color": obj.color,
                  "to_color": to_color, "to_rgb": _rgb(to_color), "ref": ref}
        sub = SubEdit("replace", "", target=describe(ref), object_ids=[obj.id], params=params)
        if not _fits_after(plan, sub, (obj.id,)):
            continue
        thing = f"{to_color} {to_kind}"
        template = _choice(rng, ("replace {t} with {a}", "turn {t} into {a}",
                                 "change {t} into {a}"))
        sub.text = template.format(t=sub.target, a=f"{article(thing)} {thing}")
        return sub
    return None


def _draft_recolor(plan: _Plan, rng: np.random.Generator) -> SubEdit | None:
    for obj, ref in plan.referable(rng):
        to_color = _choice(rng, [c for c in COLORS if c != obj.color])
        t = describe(ref)
        template = _choice(rng, ("make {t} {c}", "paint {t} {c}", "turn {t} {c}", "color {t} {c}",
                                 "change the color of {t} to {c}"))
        return SubEdit("recolor", template.format(t=t, c=to_color), target=t,
                       object_ids=[obj.id],
                       params={"kind": obj.kind, "from_color": obj.color, "to_color": to_color,
                               "from_rgb": _rgb(obj.color), "to_rgb": _rgb(to_color), "ref": ref})
    return None


def _draft_resize(plan: _Plan, rng: np.random.Generator) -> SubEdit | None:
    for obj, ref in plan.referable(rng):
        for to_size in rng.permutation([s for s in SIZES if s != obj.size]):
            to_size = str(to_size)
            params = {"kind": obj.kind, "color": obj.color, "rgb": _rgb(obj.color),
                      "from_size": obj.size, "to_size": to_size, "ref": ref}
            sub = SubEdit("resize", "", target=describe(ref), object_ids=[obj.id], params=params)
            if not _fits_after(plan, sub, (obj.id,)):
                continue
            way = "up" if SIZES[to_size] > SIZES[obj.size] else "down"
            template = _choice(rng, ("make {t} {adj}", "resize {t} to be {adj}",
                                     "scale {t} " + way + " to {size} size"))
            sub.text = template.format(t=sub.target, adj=SIZE_WORDS[to_size], size=to_size)
            return sub
    return None


def _draft_move(plan: _Plan, rng: np.random.Generator) -> SubEdit | None:
    for obj, ref in plan.referable(rng):
        for _ in range(8):
            direction = _choice(rng, list(DIRECTIONS))
            (ux, uy), phrase = DIRECTIONS[direction]
            distance = float(rng.uniform(0.15, 0.3)) / math.hypot(ux, uy)
            params = {"kind": obj.kind, "color": obj.color, "rgb": _rgb(obj.color),
                      "direction": direction, "from_cx": obj.cx, "from_cy": obj.cy,
                      "to_cx": obj.cx + ux * distance, "to_cy": obj.cy + uy * distance,
                      "ref": ref}
            sub = SubEdit("move", "", target=describe(ref), object_ids=[obj.id], params=params)
            if not _fits_after(plan, sub, (obj.id,)):
                continue
            verb = _choice(rng, ("move", "shift", "slide"))
            sub.text = f"{verb} {sub.target} {phrase}"
            return sub
    return None


def background_phrase(kind: str, colors: list[str]) -> str:
    if kind == "flat":
        return f"plain {colors[0]}"
    if kind == "gradient":
        return f"a gradient from {colors[0]} at the top to {colors[1]} at the bottom"
    if kind == "horizon":
        return f"{colors[0]} on top and {colors[1]} at the bottom"
    return f"a {colors[0]} and {colors[1]} checkerboard"


def _draft_background(plan: _Plan, rng: np.random.Generator) -> SubEdit | None:
    if plan.background_changed:
        return None
    old = plan.scene.background
    names = list(BACKGROUND_COLORS)
    for _ in range(10):
        kind = _choice(rng, BACKGROUND_KINDS)
        first, second = rng.choice(len(names), size=2, replace=False)
        colors = [names[first]] if kind == "flat" else [names[first], names[second]]
        if kind == old.kind and colors == old.colors:
            continue
        params = {"from_kind": old.kind, "from_colors": list(old.colors), "to_kind": kind,
                  "to_colors": colors, "to_rgbs": [list(BACKGROUND_COLORS[c]) for c in colors]}
        template = _choice(rng, ("change the background to {d}", "make the background {d}",
                                 "replace the background with {d}"))
        return SubEdit("background", template.format(d=background_phrase(kind, colors)),
                       target="the background", params=params)
    return None


def _text_object(
    plan: _Plan, word: str, color: str, size: str, cx: float, cy: float
) -> SceneObject:
    return SceneObject(id=plan.next_id, kind=TEXT_KIND, color=color, size=size, cx=cx, cy=cy,
                       depth=plan.scene.next_depth(), text=word)


def _text_box(obj: SceneObject, width: int, height: int) -> tuple[float, float, float, float]:
    left, top, right, bottom = font(text_font_size(obj, width, height)).getbbox(
        obj.text, anchor="mm")
    x, y = obj.cx * width, obj.cy * height
    return x + left, y + top, x + right, y + bottom


def _draft_text_on_sign(plan: _Plan, rng: np.random.Generator, word: str) -> SubEdit | None:
    w, h = plan.scene.width, plan.scene.height
    for sign, ref in plan.referable(rng, where=lambda o: o.kind == "sign"):
        x0, y0, x1, y1 = sign_board_box(sign, w, h)
        pad = 0.08 * sign.radius(w, h)
        cx, cy = (x0 + x1) / 2 / w, (y0 + y1) / 2 / h
        sign_rgb = COLORS[sign.color]
        colors = [c for c in COLORS if math.dist(COLORS[c], sign_rgb) >= TEXT_CONTRAST]
        color = _choice(rng, colors)
        for size in sorted(SIZES, key=SIZES.get, reverse=True):  # the largest that fits the board
            obj = _text_object(plan, word, color, size, cx, cy)
            tx0, ty0, tx1, ty1 = _text_box(obj, w, h)
            if tx0 >= x0 + pad and tx1 <= x1 - pad and ty0 >= y0 + pad and ty1 <= y1 - pad:
                break
        else:
            continue
        params = {"text": word, "color": color, "rgb": _rgb(color), "cx": cx, "cy": cy,
                  "size": size, "on_object": sign.id, "ref": ref}
        sub = SubEdit("add_text", "", target=describe(ref), object_ids=[plan.next_id, sign.id],
                      params=params)
        if not _fits_after(plan, sub, (plan.next_id,), ignore=(sign.id,)):
            continue
        template = _choice(rng, ("add the word {w} in {c} on {t}", "write {w} in {c} on {t}",
                                 "put the text {w} on {t} in {c}"))
        sub.text = template.format(w=word, c=color, t=sub.target)
        return sub
    return None


def _draft_free_text(plan: _Plan, rng: np.random.Generator, word: str) -> SubEdit | None:
    w, h = plan.scene.width, plan.scene.height
    color = _choice(rng, list(COLORS))
    size = _choice(rng, list(SIZES))
    for region, cx, cy in _free_spots(plan, rng, size):
        obj = _text_object(plan, word, color, size, cx, cy)
        tx0, ty0, tx1, ty1 = _text_box(obj, w, h)
        if tx0 < 3 or ty0 < 3 or tx1 > w - 3 or ty1 > h - 3:
            continue
        params = {"text": word, "color": color, "rgb": _rgb(color), "cx": cx, "cy": cy,
                  "size": size, "on_object": None, "position": region}
        sub = SubEdit("add_text", "", target=f"the word {word}", object_ids=[plan.next_id],
                      params=params)
        if not _fits_after(plan, sub, (plan.next_id,)):
            continue
        template = _choice(rng, ("add the word {w} in {c} {p}", "write {w} in {c} {p}",
                                 "write the word {w} {p} in {c}"))
        sub.text = template.format(w=word, c=color, p=REGION_PHRASES[region])
        return sub
    return None


def _draft_add_text(plan: _Plan, rng: np.random.Generator) -> SubEdit | None:
    word = _choice(rng, TEXT_WORDS)
    return _draft_text_on_sign(plan, rng, word) or _draft_free_text(plan, rng, word)


def _draft_swap(plan: _Plan, rng: np.random.Generator) -> SubEdit | None:
    candidates = list(plan.referable(rng))
    pairs = [(a, b) for i, a in enumerate(candidates) for b in candidates[i + 1:]
             if a[0].kind != b[0].kind or a[0].color != b[0].color]
    for k in rng.permutation(len(pairs))[:20]:
        (a, ref_a), (b, ref_b) = pairs[int(k)]
        params = {"kinds": [a.kind, b.kind], "colors": [a.color, b.color], "refs": [ref_a, ref_b]}
        ta, tb = describe(ref_a), describe(ref_b)
        sub = SubEdit("swap", "", target=f"{ta} and {tb}", object_ids=[a.id, b.id],
                      params=params)
        if not _fits_after(plan, sub, (a.id, b.id)):
            continue
        template = _choice(rng, ("swap {a} and {b}", "swap the positions of {a} and {b}",
                                 "let {a} and {b} trade places", "exchange {a} and {b}"))
        sub.text = template.format(a=ta, b=tb)
        return sub
    return None


def _pattern_shows(obj: SceneObject) -> bool:
    rgb = COLORS[obj.color]
    return math.dist(rgb, pattern_color(rgb)) >= MIN_PATTERN_CONTRAST


def _draft_texture(plan: _Plan, rng: np.random.Generator) -> SubEdit | None:
    for obj, ref in plan.referable(rng, where=_pattern_shows):
        to_pattern = _choice(rng, [p for p in PATTERNS if p != obj.pattern])
        t = describe(ref)
        return SubEdit("texture", _choice(rng, _PATTERN_TEMPLATES[to_pattern]).format(t=t),
                       target=t, object_ids=[obj.id],
                       params={"kind": obj.kind, "color": obj.color, "rgb": _rgb(obj.color),
                               "from_pattern": obj.pattern, "to_pattern": to_pattern,
                               "ref": ref})
    return None


DRAFTERS: dict[str, Callable[[_Plan, np.random.Generator], SubEdit | None]] = {
    "add": _draft_add,
    "remove": _draft_remove,
    "replace": _draft_replace,
    "recolor": _draft_recolor,
    "resize": _draft_resize,
    "move": _draft_move,
    "background": _draft_background,
    "add_text": _draft_add_text,
    "swap": _draft_swap,
    "texture": _draft_texture,
}
if set(DRAFTERS) != set(EDIT_TYPES):  # a new edit type must come with its drafter
    raise RuntimeError(f"composer drafts {sorted(DRAFTERS)}, record knows {sorted(EDIT_TYPES)}")


@COMPOSERS.register("scene")
class Composer(RecordStage):
    """Writes the complex instruction and its ordered sub-edits for a procedural sample, and fixes
    each sub-edit's region exactly from the renders before and after it (`exact_regions`)."""

    name = "compose"

    def __init__(self, min_edits: int = 2, max_edits: int = 5):
        check_edit_bounds(min_edits, max_edits)
        self.min_edits = min_edits
        self.max_edits = max_edits

    def process(self, sample: EditSample) -> None:
        scene = sample.private.get("scene")
        if scene is None:
            raise ValueError("the scene composer needs the source's scene graph (a procedural "
                             "source); photos take the inventory composer")
        rng = sample_rng(sample, self.name)
        plan = _Plan(Scene.from_dict(scene))
        wanted = int(rng.integers(self.min_edits, self.max_edits + 1))
        used: Counter[str] = Counter()
        sub_edits: list[SubEdit] = []
        while len(sub_edits) < wanted:
            # Least-used types first, ties in random order: types stay balanced, and a type
            # that cannot be placed here simply gives way to the next.
            tie = rng.random(len(EDIT_TYPES))
            order = sorted(range(len(EDIT_TYPES)), key=lambda k: (used[EDIT_TYPES[k]], tie[k]))
            for k in order:
                sub = DRAFTERS[EDIT_TYPES[k]](plan, rng)
                if sub is not None:
                    break
            else:
                break
            plan.commit(sub)
            used[sub.type] += 1
            sub_edits.append(sub)
        if len(sub_edits) < self.min_edits:
            raise ValueError(f"could only place {len(sub_edits)} of the {self.min_edits} "
                             "sub-edits asked for in this scene")
        for sub, region in zip(sub_edits, exact_regions(Scene.from_dict(scene), sub_edits)):
            sub.mask, sub.box = region, bbox(region)
        sample.sub_edits = sub_edits
        sample.instruction = join_instruction([s.text for s in sub_edits], rng)
