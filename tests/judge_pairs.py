"""Edit pairs built straight from the scene graph, for the judge and routing tests.

Independent of the composer/editor on purpose: the judge is tested against pairs whose truth is
known by construction (render a scene, change its graph, re-render), with a few faults of our own
(a sub-edit skipped, half done, done in the wrong colour, a change spilled outside the regions).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from pipeline.record import EditSample, SubEdit, sample_id
from pipeline.sources.scene import (
    BACKGROUND_COLORS,
    COLORS,
    SIZES,
    Background,
    Scene,
    SceneObject,
    fits,
    random_object,
    random_scene,
    render,
)

Op = Callable[[Scene], None]


@dataclass
class Step:
    edit: SubEdit
    apply: Op
    touched: list[int] = field(default_factory=list)  # object ids whose pixels are the region
    background: bool = False


def _other_color(rng: np.random.Generator, *avoid: str) -> str:
    names = [c for c in COLORS if c not in avoid]
    return names[rng.integers(len(names))]


def make_step(edit_type: str, scene: Scene, rng: np.random.Generator,
              busy: frozenset[int] = frozenset()) -> Step | None:
    """One sub-edit of `edit_type` valid for `scene` (None when the scene cannot host it), acting
    on objects not in `busy` (each object is the subject of one sub-edit at most)."""
    objs = [o for o in scene.objects if o.kind != "text" and o.id not in busy]
    obj = objs[rng.integers(len(objs))] if objs else None
    w, h = scene.width, scene.height
    if edit_type == "recolor" and obj:
        to = _other_color(rng, obj.color)
        p = {"kind": obj.kind, "from_color": obj.color, "to_color": to,
             "from_rgb": list(COLORS[obj.color]), "to_rgb": list(COLORS[to])}
        return Step(SubEdit("recolor", f"make the {obj.kind} {to}", object_ids=[obj.id], params=p),
                    lambda s, i=obj.id, c=to: setattr(s.get(i), "color", c), [obj.id])
    if edit_type == "remove" and obj:
        p = {"kind": obj.kind, "color": obj.color, "rgb": list(COLORS[obj.color])}
        return Step(SubEdit("remove", f"remove the {obj.kind}", object_ids=[obj.id], params=p),
                    lambda s, i=obj.id: s.objects.remove(s.get(i)), [obj.id])
    if edit_type == "add":
        new = random_object(rng, scene)
        if new is None:
            return None
        p = {"kind": new.kind, "color": new.color, "rgb": list(COLORS[new.color]), "size": new.size,
             "cx": new.cx, "cy": new.cy}
        return Step(SubEdit("add", f"add a {new.color} {new.kind}", object_ids=[new.id], params=p),
                    lambda s, o=new: s.objects.append(SceneObject(**{f: getattr(o, f) for f in o.__slots__})),
                    [new.id])
    if edit_type == "add_text":
        new = random_object(rng, scene, kind="text", size="large")
        if new is None:
            return None
        new.text = ["HELLO", "SALE", "OPEN", "CAFE"][rng.integers(4)]
        p = {"text": new.text, "color": new.color, "rgb": list(COLORS[new.color]), "cx": new.cx,
             "cy": new.cy, "size": new.size, "on_object": None}
        return Step(SubEdit("add_text", f"write {new.text}", object_ids=[new.id], params=p),
                    lambda s, o=new: s.objects.append(SceneObject(**{f: getattr(o, f) for f in o.__slots__})),
                    [new.id])
    if edit_type == "replace" and obj:
        kinds = [k for k in ("circle", "square", "star", "triangle", "diamond") if k != obj.kind]
        kind = kinds[rng.integers(len(kinds))]
        to = _other_color(rng, obj.color)
        p = {"from_kind": obj.kind, "to_kind": kind, "from_color": obj.color, "to_color": to,
             "to_rgb": list(COLORS[to])}

        def op(s: Scene, i=obj.id, k=kind, c=to) -> None:
            s.get(i).kind, s.get(i).color = k, c
        return Step(SubEdit("replace", f"replace the {obj.kind} with a {to} {kind}",
                            object_ids=[obj.id], params=p), op, [obj.id])
    if edit_type == "resize" and obj:
        for to in [z for z in SIZES if z != obj.size]:
            trial = SceneObject(**{f: getattr(obj, f) for f in obj.__slots__})
            trial.size = to
            if fits(scene, trial):
                p = {"kind": obj.kind, "color": obj.color, "rgb": list(COLORS[obj.color]),
                     "from_size": obj.size, "to_size": to}
                return Step(SubEdit("resize", f"make the {obj.kind} {to}", object_ids=[obj.id], params=p),
                            lambda s, i=obj.id, z=to: setattr(s.get(i), "size", z), [obj.id])
        return None
    if edit_type == "move" and obj:
        for direction, (dx, dy) in {"left": (-0.2, 0), "right": (0.2, 0), "up": (0, -0.2),
                                    "down": (0, 0.2)}.items():
            trial = SceneObject(**{f: getattr(obj, f) for f in obj.__slots__})
            trial.cx, trial.cy = obj.cx + dx, obj.cy + dy
            if fits(scene, trial):
                p = {"kind": obj.kind, "color": obj.color, "rgb": list(COLORS[obj.color]),
                     "direction": direction, "from_cx": obj.cx, "from_cy": obj.cy,
                     "to_cx": trial.cx, "to_cy": trial.cy}

                def op(s: Scene, i=obj.id, x=trial.cx, y=trial.cy) -> None:
                    s.get(i).cx, s.get(i).cy = x, y
                return Step(SubEdit("move", f"move the {obj.kind} {direction}", object_ids=[obj.id],
                                    params=p), op, [obj.id])
        return None
    if edit_type == "swap" and len(objs) >= 2:
        a, b = (objs[i] for i in rng.choice(len(objs), 2, replace=False))
        if a.color == b.color:
            return None
        p = {"kinds": [a.kind, b.kind], "colors": [a.color, b.color]}

        def op(s: Scene, i=a.id, j=b.id) -> None:
            oa, ob = s.get(i), s.get(j)
            (oa.cx, oa.cy), (ob.cx, ob.cy) = (ob.cx, ob.cy), (oa.cx, oa.cy)
        return Step(SubEdit("swap", f"swap the {a.kind} and the {b.kind}", object_ids=[a.id, b.id],
                            params=p), op, [a.id, b.id])
    if edit_type == "texture" and obj:
        pattern = ["stripes", "dots", "checker"][rng.integers(3)]
        p = {"kind": obj.kind, "color": obj.color, "rgb": list(COLORS[obj.color]),
             "from_pattern": obj.pattern, "to_pattern": pattern}
        return Step(SubEdit("texture", f"give the {obj.kind} {pattern}", object_ids=[obj.id], params=p),
                    lambda s, i=obj.id, t=pattern: setattr(s.get(i), "pattern", t), [obj.id])
    if edit_type == "background":
        kind = ["flat", "gradient", "texture", "horizon"][rng.integers(4)]
        names = [n for n in BACKGROUND_COLORS if n not in scene.background.colors]
        picked = [names[i] for i in rng.choice(len(names), 2, replace=False)]
        colors = picked[:1] if kind == "flat" else picked
        p = {"from_kind": scene.background.kind, "from_colors": list(scene.background.colors),
             "to_kind": kind, "to_colors": colors, "to_rgbs": [list(BACKGROUND_COLORS[c]) for c in colors]}

        def op(s: Scene, k=kind, c=colors) -> None:
            s.background = Background(kind=k, colors=list(c), horizon=s.background.horizon)
        return Step(SubEdit("background", f"make the background {kind}", params=p), op, background=True)
    return None


def _region(before: Scene, after: Scene, step: Step) -> np.ndarray:
    img0, ids0 = render(before)
    img1, ids1 = render(after)
    mask = (img0 != img1).any(axis=2)
    for i in step.touched:
        mask |= (ids0 == i + 1) | (ids1 == i + 1)
    if step.background:
        mask |= (ids0 == 0) | (ids1 == 0)
    return mask


def build_pair(seed: int, types: list[str], resolution: int = 256,
               skip: int | None = None) -> tuple[EditSample, list[Step]]:
    """A sample whose target applies `types` in order (each where the scene allows); with
    `skip=i` the target leaves step i out while the regions still describe it."""
    rng = np.random.default_rng(seed)
    scene = random_scene(rng, resolution, resolution, 3, 6)
    source, _ = render(scene)
    current = scene.copy()
    steps: list[Step] = []
    for edit_type in types:
        busy = frozenset(i for st in steps for i in st.touched)
        step = make_step(edit_type, current, rng, busy)
        if step is None:
            continue
        after = current.copy()
        step.apply(after)
        step.edit.mask = _region(current, after, step)
        rows = np.flatnonzero(step.edit.mask.any(axis=1))
        cols = np.flatnonzero(step.edit.mask.any(axis=0))
        step.edit.box = [int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1]
        steps.append(step)
        current = after
    final = scene.copy()
    for k, step in enumerate(steps):
        if k != skip:
            try:
                step.apply(final)
            except KeyError:  # it acted on what the skipped step made
                pass
    target, _ = render(final)
    sample = EditSample(id=sample_id(seed, 0), index=0, seed=seed, source=source, target=target,
                        instruction="; ".join(s.edit.text for s in steps),
                        sub_edits=[s.edit for s in steps])
    sample.background_mask = ~np.logical_or.reduce([s.edit.mask for s in steps])
    return sample, steps


def half_done(sample: EditSample, k: int) -> None:
    """Leave the left half of sub-edit k's region as it was in the source."""
    mask = sample.sub_edits[k].mask
    x0, _, x1, _ = sample.sub_edits[k].box
    undo = mask.copy()
    undo[:, (x0 + x1) // 2 :] = False
    sample.target = np.where(undo[..., None], sample.source, sample.target)


def spill(sample: EditSample, size: int = 10) -> None:
    """Paint a small square outside every region (a change the instruction did not ask for)."""
    outside = sample.background_mask
    ys, xs = np.nonzero(outside[: -size, : -size])
    for y, x in zip(ys[:: 101], xs[:: 101]):
        if outside[y : y + size, x : x + size].all():
            sample.target = sample.target.copy()
            patch = sample.target[y : y + size, x : x + size]
            sample.target[y : y + size, x : x + size] = 255 - patch
            return
    raise RuntimeError("no room outside the regions for a spill")
