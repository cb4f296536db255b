"""Referring phrases over an object inventory (photos): say only what is known, name one object.

A reference is a dict {"label": l, "color"?: c, "size"?: s, "position"?: region,
"relation"?: {"type": "left of" | "right of" | "above" | "below", "landmark": <reference>}},
the same grammar as the procedural composer's with the inventory's `label` for its `kind`.
`describe` writes it ("the large dark-red region in the bottom left"), `resolve` returns the ids
of the inventory objects it denotes, and `refer` finds the shortest robust reference that
denotes exactly one object, or None.

Positions are the 9 regions of `pipeline.compose.procedural.REGIONS` (thirds of the frame),
judged by the centre of the object's box. An attribute the inventory does not know for an object
(no colour name, say) never rules that object out: a phrase is unambiguous only if no object
could match it. Robustness as in the procedural composer: a position word is only used when the
box centre lies `POSITION_MARGIN` inside that region, and uniqueness is checked with every region
grown by that margin, so no other object is even close to matching.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from pipeline.compose.frame import (
    POSITION_MARGIN,
    REGION_PHRASES,
    REGIONS,
    RELATION_SLACK,
    RELATIONS,
    SIZE_WORDS,
    clearly_related,
    in_region,
    related,
)
from pipeline.record import InventoryObject

ATTRIBUTES = ("color", "size")  # word attributes a reference may use besides position


def image_shape(objects: Sequence[InventoryObject]) -> tuple[int, int]:
    """(H, W) of the image, read off the first object with a mask."""
    for obj in objects:
        if obj.mask is not None:
            return int(obj.mask.shape[0]), int(obj.mask.shape[1])
    raise ValueError("no object has a mask: pass the image shape")


def centre(obj: InventoryObject, shape: Sequence[int]) -> tuple[float, float]:
    """Box centre of the object as fractions (cx of the width, cy of the height)."""
    x0, y0, x1, y1 = obj.box
    return (x0 + x1) / 2 / shape[1], (y0 + y1) / 2 / shape[0]


def resolve(ref: dict[str, Any], objects: Sequence[InventoryObject],
            shape: Sequence[int] | None = None, slack: float = 0.0) -> list[int]:
    """Sorted ids of the objects the reference may denote (unambiguous = exactly one id).
    `slack` grows positional regions and relations."""
    shape = shape if shape is not None else image_shape(objects)
    landmarks = []
    relation = ref.get("relation")
    if relation is not None:
        ids = set(resolve(relation["landmark"], objects, shape))
        landmarks = [o for o in objects if o.id in ids]
        if not landmarks:
            return []
    found = []
    for obj in objects:
        if obj.label != ref["label"]:
            continue
        if any(key in ref and key in obj.attributes and obj.attributes[key] != ref[key]
               for key in ATTRIBUTES):
            continue
        point = centre(obj, shape)
        if "position" in ref and not in_region(point, ref["position"], slack):
            continue
        if relation is not None and not any(
            lm.id != obj.id and related(point, relation["type"], centre(lm, shape), slack)
            for lm in landmarks
        ):
            continue
        found.append(obj.id)
    return sorted(found)


def describe(ref: dict[str, Any]) -> str:
    """The English phrase of a reference: "the large dark-red region in the bottom left"."""
    words = ["the"]
    if "size" in ref:
        words.append(SIZE_WORDS.get(ref["size"], ref["size"]))
    if "color" in ref:
        words.append(ref["color"].replace(" ", "-"))
    words.append(ref["label"])
    if "position" in ref:
        words.append(REGION_PHRASES[ref["position"]])
    if "relation" in ref:
        words.append(RELATIONS[ref["relation"]["type"]])
        words.append(describe(ref["relation"]["landmark"]))
    return " ".join(words)


def _tiers(obj: InventoryObject, shape: Sequence[int]) -> list[list[dict[str, Any]]]:
    """Candidate references to `obj` by number of attributes said (label always)."""
    base = {"label": obj.label}
    known = {k: obj.attributes[k] for k in ATTRIBUTES if obj.attributes.get(k)}
    point = centre(obj, shape)
    positions = [{"position": r} for r in REGIONS if in_region(point, r, -POSITION_MARGIN)]
    singles = [{k: v} for k, v in known.items()] + positions
    tiers = [[base]]
    for count in (1, 2, 3):
        tier = []
        for extras in _combinations(singles, count):
            keys = [k for e in extras for k in e]
            if len(keys) == len(set(keys)):
                merged = dict(base)
                for e in extras:
                    merged.update(e)
                tier.append(merged)
        tiers.append(tier)
    return tiers


def _combinations(items: list[dict[str, Any]], count: int) -> list[tuple[dict[str, Any], ...]]:
    from itertools import combinations

    return list(combinations(items, count))


def _unique(ref: dict[str, Any], obj: InventoryObject, objects: Sequence[InventoryObject],
            shape: Sequence[int], slack: float = POSITION_MARGIN) -> bool:
    return resolve(ref, objects, shape, slack=slack) == [obj.id]


def refer(obj: InventoryObject, objects: Sequence[InventoryObject], rng: np.random.Generator,
          shape: Sequence[int] | None = None) -> dict[str, Any] | None:
    """The shortest robust reference that denotes exactly `obj` among `objects`, or None.

    Among equally short references one is drawn with `rng`; relations to a landmark (itself
    named without a relation) are the last resort."""
    shape = shape if shape is not None else image_shape(objects)
    for tier in _tiers(obj, shape):
        valid = [ref for ref in tier if _unique(ref, obj, objects, shape)]
        if valid:
            return valid[int(rng.integers(len(valid)))]
    point = centre(obj, shape)
    relational = []
    for landmark in objects:
        if landmark.id == obj.id or landmark.attributes.get("role", "object") != "object":
            continue  # a landmark must itself be a thing a person can find by its words
        lm_ref = next((ref for tier in _tiers(landmark, shape)[:3] for ref in tier
                       if "position" not in ref and _unique(ref, landmark, objects, shape, 0.0)),
                      None)
        if lm_ref is None:
            continue
        for relation in RELATIONS:
            if clearly_related(point, relation, centre(landmark, shape)):
                relational.append({"type": relation, "landmark": lm_ref})
    known = {k: obj.attributes[k] for k in ATTRIBUTES if obj.attributes.get(k)}
    extras_list: list[dict[str, Any]] = [{}] + [{k: v} for k, v in known.items()]
    if len(known) == 2:
        extras_list.append(dict(known))
    for extras in extras_list:
        valid = []
        for relation in relational:
            ref = {"label": obj.label, **extras, "relation": relation}
            if _unique(ref, obj, objects, shape, RELATION_SLACK):
                valid.append(ref)
        if valid:
            return valid[int(rng.integers(len(valid)))]
    return None
