"""The procedural editor: applies the sub-edits to the scene graph and renders the exact target.

Each intermediate scene is rendered once. Sub-edit i's region (`exact_regions`, which the scene
composer calls to fix the regions before editing) is derived from the renders before and after
it: the affected objects' visible pixels (the background's, for a background change) in either
render, OR-ed with every pixel the two renders differ in, so the masks cover exactly what
changed; the editor checks that its renders change nothing outside them. With probability `defect_rate` the editor then spoils the target on purpose, the way
generative editors fail (see `pipeline.editors.defects`); the record keeps the INTENDED sub-edits and
regions, and what was injected goes to `sample.defects`, which no judge sees.
"""

from __future__ import annotations

import copy
import logging
import math
from typing import Sequence

import numpy as np

from pipeline import __version__
from pipeline.editors.defects import (
    DEFECT_TYPES,
    check_defect_settings,
    WRONG_COLOR_DISTANCE,
    Detail,
    EditTrace,
    inject_defect,
)
from pipeline.editors.base import EDITORS
from pipeline.record import EditSample, SubEdit
from pipeline.sources.scene import (
    BACKGROUND_COLORS,
    COLORS,
    TEXT_KIND,
    Background,
    Scene,
    SceneObject,
    bbox,
    render,
)
from pipeline.stage import RecordStage, sample_rng

log = logging.getLogger(__name__)


def _get(scene: Scene, object_id: int, sub: SubEdit) -> SceneObject:
    try:
        return scene.get(object_id)
    except KeyError:
        raise ValueError(f"{sub.type} sub-edit {sub.text!r} refers to object {object_id}, "
                         "which is not in the scene") from None


def apply_sub_edit(scene: Scene, sub: SubEdit) -> Scene:
    """The scene after `sub` (a new scene; `scene` is left as it is).

    Only `object_ids` and the "to" side of the params are read, so the same sub-edit applied to
    another object (fault injection) does the same thing to that object."""
    out = scene.copy()
    p = sub.params
    ids = sub.object_ids
    if sub.type in ("add", "add_text"):
        if any(o.id == ids[0] for o in out.objects):
            raise ValueError(f"{sub.type} sub-edit would reuse object id {ids[0]}")
        is_text = sub.type == "add_text"
        out.objects.append(SceneObject(
            id=ids[0], kind=TEXT_KIND if is_text else p["kind"], color=p["color"],
            size=p["size"], cx=float(p["cx"]), cy=float(p["cy"]), depth=out.next_depth(),
            text=p["text"] if is_text else None,
        ))
    elif sub.type == "remove":
        _get(out, ids[0], sub)
        out.objects = [o for o in out.objects if o.id != ids[0]]
    elif sub.type == "replace":
        obj = _get(out, ids[0], sub)
        obj.kind, obj.color, obj.pattern = p["to_kind"], p["to_color"], "solid"
    elif sub.type == "recolor":
        _get(out, ids[0], sub).color = p["to_color"]
    elif sub.type == "resize":
        _get(out, ids[0], sub).size = p["to_size"]
    elif sub.type == "move":
        obj = _get(out, ids[0], sub)
        obj.cx, obj.cy = float(p["to_cx"]), float(p["to_cy"])
    elif sub.type == "background":
        out.background = Background(kind=p["to_kind"], colors=list(p["to_colors"]),
                                    horizon=out.background.horizon)
    elif sub.type == "swap":
        a, b = _get(out, ids[0], sub), _get(out, ids[1], sub)
        (a.cx, a.cy), (b.cx, b.cy) = (b.cx, b.cy), (a.cx, a.cy)
    elif sub.type == "texture":
        _get(out, ids[0], sub).pattern = p["to_pattern"]
    else:
        raise ValueError(f"no editor for sub-edit type {sub.type!r}")
    return out


def affected_ids(sub: SubEdit) -> list[int]:
    """The objects whose pixels a sub-edit changes (text on a sign: the text, not the sign)."""
    if sub.type == "add_text":
        return sub.object_ids[:1]
    return list(sub.object_ids)


def changed_pixels(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """Bool HxW: where two HxWx3 images differ in any channel."""
    unequal = before != after
    return unequal[..., 0] | unequal[..., 1] | unequal[..., 2]  # ~20x faster than .any(axis=2)


def sub_edit_region(
    sub: SubEdit,
    before: tuple[np.ndarray, np.ndarray],
    after: tuple[np.ndarray, np.ndarray],
    changed: np.ndarray | None = None,
) -> np.ndarray:
    """Bool HxW: the pixels sub-edit `sub` may change, from the renders before and after it."""
    (image_b, ids_b), (image_a, ids_a) = before, after
    if changed is None:
        changed = changed_pixels(image_b, image_a)
    if sub.type == "background":
        return (ids_b == 0) | (ids_a == 0) | changed
    ids = affected_ids(sub)
    if len(ids) == 1:  # the common case: two comparisons are ~4x faster than a table lookup
        return (ids_b == ids[0] + 1) | (ids_a == ids[0] + 1) | changed
    lookup = np.zeros(256, dtype=bool)
    lookup[[i + 1 for i in ids]] = True
    return lookup[ids_b] | lookup[ids_a] | changed


def exact_regions(scene: Scene, sub_edits: Sequence[SubEdit]) -> list[np.ndarray]:
    """Each sub-edit's exact region, played forward from `scene`; ValueError for a sub-edit that
    changes no visible pixel (an object hidden behind others: nothing to see, or learn)."""
    before = render(scene)
    regions = []
    for i, sub in enumerate(sub_edits):
        scene = apply_sub_edit(scene, sub)
        after = render(scene)
        changed = changed_pixels(before[0], after[0])
        if not changed.any():
            raise ValueError(f"sub-edit {i} ({sub.text!r}) changes no visible pixel")
        regions.append(sub_edit_region(sub, before, after, changed))
        before = after
    return regions


_COLOR_FIELDS = {"recolor": "to_color", "add": "color", "replace": "to_color",
                 "add_text": "color", "background": "to_colors"}


class SceneHooks:
    """The procedural editor's answers to the injectors (`defects.EditorHooks`), read off the
    scene graphs in `trace.states`: another object of another kind or colour to act on, a far
    colour of the scene's palettes."""

    def wrong_objects(self, trace: EditTrace, i: int, sub: SubEdit, intended: int) -> list[SceneObject]:
        state = trace.states[i]
        meant = state.get(intended)
        touched = trace.touched_ids()
        return [o for o in state.objects if o.id not in touched and o.kind != TEXT_KIND
                and (o.kind != meant.kind or o.color != meant.color)]

    def retarget(self, trace: EditTrace, i: int, sub: SubEdit, intended: int,
                 other: SceneObject) -> tuple[SubEdit, Detail] | None:
        """`sub` done to `other` instead of object `intended`, or None where it would be a no-op."""
        p = sub.params
        wrong = SubEdit(sub.type, sub.text, sub.target, list(sub.object_ids), copy.deepcopy(p))
        wrong.object_ids = [other.id if k == intended else k for k in sub.object_ids]
        if sub.type == "recolor" and other.color == p["to_color"]:
            return None
        if sub.type == "texture" and other.pattern == p["to_pattern"]:
            return None
        if sub.type == "replace" and other.kind == p["to_kind"]:
            return None
        if sub.type == "resize" and other.size == p["to_size"]:
            return None
        if sub.type == "move":  # the same displacement, kept inside the frame
            dx, dy = p["to_cx"] - p["from_cx"], p["to_cy"] - p["from_cy"]
            wrong.params["to_cx"] = float(np.clip(other.cx + dx, 0.1, 0.9))
            wrong.params["to_cy"] = float(np.clip(other.cy + dy, 0.1, 0.9))
        detail = {"intended_object": intended, "actual_object": other.id,
                  "actual_kind": other.kind, "actual_color": other.color}
        return wrong, detail

    def wrong_colors(self, trace: EditTrace, i: int, sub: SubEdit) -> list[str]:
        field = _COLOR_FIELDS.get(sub.type)
        if field is None:
            return []
        palette = BACKGROUND_COLORS if sub.type == "background" else COLORS
        asked = self._asked(sub)
        far = [c for c in palette if math.dist(palette[c], palette[asked]) >= WRONG_COLOR_DISTANCE]
        # Prefer a colour that is not simply "no change" (recolor) or invisible (text on a sign).
        avoid: set[str] = set()
        if sub.type == "recolor":
            avoid.add(sub.params["from_color"])
        if sub.type == "add_text" and sub.params.get("on_object") is not None:
            sign = trace.states[i].get(sub.params["on_object"])
            avoid.update(c for c in COLORS if math.dist(COLORS[c], COLORS[sign.color]) < 100)
        return [c for c in far if c not in avoid] or far

    def recolor(self, trace: EditTrace, i: int, sub: SubEdit, color: str) -> tuple[SubEdit, Detail] | None:
        field = _COLOR_FIELDS[sub.type]
        palette = BACKGROUND_COLORS if sub.type == "background" else COLORS
        asked = self._asked(sub)
        wrong = SubEdit(sub.type, sub.text, sub.target, list(sub.object_ids),
                        copy.deepcopy(sub.params))
        if sub.type == "background":
            wrong.params[field][0] = color
            if color in wrong.params[field][1:]:
                return None
        else:
            wrong.params[field] = color
        detail = {"asked": asked, "used": color,
                  "distance": round(math.dist(palette[color], palette[asked]), 1)}
        return wrong, detail

    @staticmethod
    def _asked(sub: SubEdit) -> str:
        field = _COLOR_FIELDS[sub.type]
        return sub.params[field][0] if sub.type == "background" else sub.params[field]


def apply_chain(scene: Scene, sub_edits: Sequence[SubEdit | None]) -> Scene:
    """`scene` after the sub-edits in order (None entries are skipped)."""
    for sub in sub_edits:
        if sub is not None:
            scene = apply_sub_edit(scene, sub)
    return scene


@EDITORS.register("procedural")
class ProceduralEditor(RecordStage):
    """Exact edits of procedural scenes, with optional fault injection (hidden defect log)."""

    name = "edit"
    composer = "scene"  # it edits the scene graph the scene composer phrased against

    def __init__(self, defect_rate: float = 0.25, defect_types: Sequence[str] = DEFECT_TYPES):
        self.defect_types = check_defect_settings(defect_rate, defect_types)
        self.defect_rate = defect_rate

    def process(self, sample: EditSample) -> None:
        scene = sample.private.get("scene")
        if scene is None:
            raise ValueError("the procedural editor needs the source's scene graph")
        if not sample.sub_edits:
            raise ValueError("no sub-edits to apply (run the composer first)")
        states = [Scene.from_dict(scene)]
        for sub in sample.sub_edits:
            states.append(apply_sub_edit(states[-1], sub))
        rng = sample_rng(sample, "defects")
        spoil = self.defect_rate > 0 and rng.random() < self.defect_rate
        if not spoil and all(sub.mask is not None for sub in sample.sub_edits):
            # The scene composer fixed the exact regions from these same renders: a clean edit
            # only needs the final one.
            regions = [sub.mask for sub in sample.sub_edits]
            renders = [render(states[-1])]
        else:
            renders = [render(state) for state in states]
            if sample.source is not None and not np.array_equal(sample.source, renders[0][0]):
                raise ValueError("the source image does not match its scene graph")
            regions = self._regions(sample.sub_edits, renders)
        for sub, region in zip(sample.sub_edits, regions):
            sub.mask, sub.box = region, bbox(region)
        union = np.logical_or.reduce(regions)
        target = renders[-1][0]

        sample.target = target
        sample.private["target_scene"] = states[-1].to_dict()  # the intended edit's scene
        sample.background_mask = ~union
        sample.defects = []
        sample.provenance["editor"] = f"procedural@{__version__}"
        sample.provenance["pair"] = "exact"

        if spoil:
            trace = EditTrace(
                images=[image for image, _ in renders],
                sub_edits=sample.sub_edits,
                regions=regions,
                background_mask=sample.background_mask,
                replay=lambda subs, start: render(apply_chain(states[start], subs[start:]))[0],
                states=states,
                hooks=SceneHooks(),
            )
            injected = inject_defect(rng, trace, self.defect_types)
            if injected is None:
                log.debug("no defect of %s applies to %s", self.defect_types, sample.id)
            else:
                sample.target, record = injected
                sample.defects = [record]

    @staticmethod
    def _regions(sub_edits: list[SubEdit], renders: list[tuple[np.ndarray, np.ndarray]]) -> list[np.ndarray]:
        """Each sub-edit's exact region from the renders, checked against the composer's."""
        regions = []
        for i, sub in enumerate(sub_edits):
            changed = changed_pixels(renders[i][0], renders[i + 1][0])
            if not changed.any():  # e.g. an object hidden behind others: nothing to see, or learn
                raise ValueError(f"sub-edit {i} ({sub.text!r}) changes no visible pixel")
            region = sub_edit_region(sub, renders[i], renders[i + 1], changed)
            if sub.mask is not None and not np.array_equal(sub.mask, region):
                raise ValueError(f"sub-edit {i} ({sub.text!r}) changes pixels outside the "
                                 "composer's region")
            regions.append(region)
        return regions
