"""The photo plausibility gate measured: recall on crude edits, false rejects on credible ones.

Credible edits are the photo editor's own clean outputs (defect_rate 0) on scikit-image's bundled
photographs (located at run time, nothing is downloaded), made through the pipeline API:
ClassicalGrounder -> the InventoryComposer's drafter of each edit type (donors from the other
photos) -> each sub-edit alone -> PhotoEditor. Whatever the grounder, composer and editor do when
this runs is what is measured.

Crude edits are made from the same sub-edits, each the way a careless editor would:
- jagged_paste (add, replace): the donor's alpha roughened with per-pixel noise, pasted by the editor;
- donor_ring (add, replace): the donor's alpha grown by 3 px, dragging its own background along;
- flat_fill (remove, move, resize): the emptied place filled with its ring's mean colour;
- leftover (remove, move, resize): the object's mask cut to 60%, so 40% of it stays behind;
- ghost (move, resize): the old object's detail faded back into its filled place (80%);
- seam_tint (background): a purple tint whose matte keeps only part of the largest kept object
  (cut straight across at 30-70%, across or down);
- spill (recolor): the recolour's region grown 6 px past the object's edge.
Each crude pair's mask is the pixels it changed (as an editor reports them), so the pixel judge's
coverage checks pass and what catches it is the gate, or nothing. Every pair is judged by the
pixel judge with and without the gate and routed with the default policy.

    .venv/bin/python bench/plausibility.py --seeds 0 1 2 --resolution 384
"""

from __future__ import annotations

import argparse
import copy
import importlib.resources
import logging
import sys
from collections import Counter, defaultdict
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.compose.photo import DRAFTERS, _Plan, cut_out, donor_pools  # noqa: E402
from pipeline.compose.regions import box_centre, dilate, region_of, scale_about, shift  # noqa: E402
from pipeline.editors.photo import PhotoEditor  # noqa: E402
from pipeline.grounders.classical import ClassicalGrounder  # noqa: E402
from pipeline.judges.base import make_judge  # noqa: E402
from pipeline.judges.plausibility import assess  # noqa: E402
from pipeline.record import EDIT_TYPES, EditSample, SubEdit, sample_id  # noqa: E402
from pipeline.routing import RoutingPolicy  # noqa: E402
from pipeline.sources.decode import decode_image  # noqa: E402
from pipeline.sources.frame import Frame  # noqa: E402
from pipeline.sources.scene import bbox  # noqa: E402

PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
          "motorcycle_right.png", "hubble_deep_field.jpg", "retina.jpg", "ihc.png")
CHECKS = ("seam", "ragged", "halo", "residual", "ghost", "stray")
CRUDE_OF = {
    "add": ("jagged_paste", "donor_ring"), "replace": ("jagged_paste", "donor_ring"),
    "remove": ("flat_fill", "leftover"), "move": ("flat_fill", "leftover", "ghost"),
    "resize": ("flat_fill", "leftover", "ghost"),
    "background": ("seam_tint",), "recolor": ("spill",),
}
log = logging.getLogger("bench.plausibility")


def photos(resolution: int) -> dict[str, np.ndarray]:
    data = importlib.resources.files("skimage") / "data"
    out = {}
    for name in PHOTOS:
        path = Path(str(data / name))
        if path.is_file():
            image = decode_image(path.read_bytes()).image
            out[path.stem] = Frame.fit(image.shape[1], image.shape[0], resolution).image(image)
    if not out:
        raise SystemExit(f"no sample photos in {data}")
    return out


def singles(images: dict[str, np.ndarray], seed: int, grounded: dict) -> list[EditSample]:
    """For each photo and edit type, the sub-edit the inventory composer's drafter of that type
    makes (its preconditions, its region, its donor from the other photos), as a sample of its
    own. The drafters are called one type at a time on a fresh plan: the composer itself favours
    the credible types and would rarely give an inpainted or pasted one to measure."""
    batch = []
    for k, (name, image) in enumerate(images.items()):
        sample = EditSample(id=sample_id(seed, name), index=k, seed=seed, source=image.copy(),
                            source_key=name)
        if name not in grounded:
            ClassicalGrounder()([sample])
            grounded[name] = None if sample.failed else sample.objects
        if grounded[name] is None:
            continue
        sample.objects = copy.deepcopy(grounded[name])
        batch.append(sample)
    pools = donor_pools(batch)
    out = []
    for sample in batch:
        for t, kind in enumerate(EDIT_TYPES):
            rng = np.random.default_rng([seed, sample.index, t])
            plan = _Plan(sample, pools[id(sample)])
            sub = DRAFTERS[kind](plan, rng)
            unvetted = sub is None and kind in FORCED
            if unvetted:
                sub = forced(kind, sample, pools[id(sample)], rng, plan.donors)
            if sub is None:
                continue
            one = EditSample(id=f"{sample.id}/{kind}", index=sample.index * 100 + t, seed=seed,
                             source=sample.source, source_key=sample.source_key,
                             objects=sample.objects, sub_edits=[sub], instruction=sub.text)
            if id(sub) in plan.donors:
                one.private["donors"] = {"0": plan.donors[id(sub)]}
            one.private["unvetted"] = unvetted
            out.append(one)
    return out


FORCED = ("recolor", "remove", "move", "resize", "replace")
FORCED_COLORS = {"blue": [0, 90, 255], "green": [40, 170, 60], "purple": [128, 0, 128]}


def forced(kind: str, sample: EditSample, pool, rng: np.random.Generator, donors: dict
           ) -> SubEdit | None:
    """A sub-edit of `kind` on a random object-sized region, made by hand where the composer's
    drafter declined (its preconditions failed): what the editor does with it is UNVETTED, not
    credible, and is counted apart; the crude edits made from it still count."""
    h, w = sample.source.shape[:2]
    usable = [o for o in sample.objects if o.mask is not None and 0.004 <= o.mask.mean() <= 0.08
              and o.box[0] > 2 and o.box[1] > 2 and o.box[2] < w - 2 and o.box[3] < h - 2]
    if not usable:
        return None
    obj = usable[int(rng.integers(len(usable)))]
    x0, y0, x1, y1 = obj.box
    p: dict = {"domain": "photo", "label": obj.label}
    donor = None
    if kind == "recolor":
        name = list(FORCED_COLORS)[int(rng.integers(len(FORCED_COLORS)))]
        p.update(to_color=name, to_rgb=FORCED_COLORS[name])
    elif kind == "move":
        right = x1 + (x1 - x0) + 8 < w - 2
        dx = (x1 - x0 + 8) * (1 if right else -1)
        if not (2 < x0 + dx and x1 + dx < w - 2):
            return None
        p.update(dx=int(dx), dy=0, direction="right" if right else "left")
    elif kind == "resize":
        p.update(scale=float(rng.choice([0.6, 1.3])))
    elif kind == "replace":
        lenders = [d for d in pool if d.objects]
        if not lenders:
            return None
        lender = lenders[int(rng.integers(len(lenders)))]
        other = lender.objects[int(rng.integers(len(lender.objects)))]
        scale = min(1.0, max(x1 - x0, y1 - y0) / max(1, max(other.box[2] - other.box[0],
                                                           other.box[3] - other.box[1])))
        rgb, alpha = cut_out(lender, other, scale)
        donor = {"rgb": rgb, "alpha": alpha}
        cx, cy = box_centre(obj.box)
        p.update(cx=int(round(cx)), cy=int(round(cy)), scale=scale)
    sub = SubEdit(kind, f"{kind} the {obj.label}", obj.label, [obj.id], p)
    try:
        sub.mask = region_of(sub, sample.objects, sample.source.shape, donor, index=0)
    except ValueError:
        return None
    sub.box = bbox(sub.mask)
    if donor is not None:
        donors[id(sub)] = donor
    return sub


def edit(sample: EditSample) -> EditSample | None:
    sample = copy.deepcopy(sample)
    PhotoEditor(defect_rate=0.0)([sample])
    return None if sample.failed else sample


def _reported(sample: EditSample, target: np.ndarray) -> EditSample | None:
    """`sample` with `target`, its mask the pixels that changed (what an editor reports)."""
    changed = (target != sample.source).any(axis=2)
    if not changed.any():
        return None
    sample.target = target
    sample.sub_edits[0].mask = changed
    sample.sub_edits[0].box = bbox(changed)
    sample.background_mask = ~changed
    return sample


def _object(sample: EditSample, k: int = 0) -> np.ndarray:
    oid = sample.sub_edits[0].object_ids[k]
    return next(o for o in sample.objects if o.id == oid).mask.astype(bool)


def _landed(sample: EditSample) -> np.ndarray:
    """Where the moved / resized / swapped objects land (their feathered edge included)."""
    sub = sample.sub_edits[0]
    p = sub.params
    if sub.type == "move":
        out = shift(_object(sample), p["dx"], p["dy"])
    elif sub.type == "resize":
        m = _object(sample)
        x0, y0, x1, y1 = bbox(m)
        out = scale_about(m, float(p["scale"]), (x0 + x1 - 1) / 2, (y0 + y1 - 1) / 2)
    elif sub.type == "swap":
        out = np.zeros(sample.source.shape[:2], bool)
        for k, (dx, dy) in enumerate(p["offsets"]):
            out |= shift(_object(sample, k), dx, dy)
    else:
        return np.zeros(sample.source.shape[:2], bool)
    return dilate(out, 2)


def _emptied(sample: EditSample, clean: EditSample) -> np.ndarray:
    sub = sample.sub_edits[0]
    objects = np.zeros(sample.source.shape[:2], bool)
    for k in range(2 if sub.type == "swap" else 1):
        objects |= _object(sample, k)
    return dilate(objects, 2) & clean.sub_edits[0].mask & ~_landed(sample)


def _rerun(sample: EditSample, objects=None, donor=None, region=None) -> EditSample | None:
    s = copy.deepcopy(sample)
    if objects is not None:
        s.objects = objects
    if donor is not None:
        s.private["donors"] = {"0": donor}
    s.sub_edits[0].mask = region if region is not None else \
        region_of(s.sub_edits[0], s.objects, s.source.shape, s.private.get("donors"), index=0)
    return edit(s)


def crude(kind: str, sample: EditSample, clean: EditSample, rng: np.random.Generator
          ) -> EditSample | None:
    sub = sample.sub_edits[0]
    if kind in ("jagged_paste", "donor_ring"):
        donor = copy.deepcopy(sample.private["donors"]["0"])
        alpha = donor["alpha"].astype(np.float32)
        if kind == "jagged_paste":
            soft = cv2.GaussianBlur(alpha, (0, 0), sigmaX=2.0)
            donor["alpha"] = (soft + rng.uniform(-0.45, 0.45, alpha.shape)) > 0.5
        else:
            donor["alpha"] = dilate(alpha > 0.5, 3)
        return _rerun(sample, donor=donor)
    if kind == "flat_fill":
        hole = _emptied(sample, clean) if sub.type != "remove" else clean.sub_edits[0].mask
        ring = dilate(hole, 6) & ~clean.sub_edits[0].mask
        if np.count_nonzero(hole) < 40 or not ring.any():
            return None
        target = clean.target.copy()
        target[hole] = np.rint(clean.target[ring].mean(axis=0)).astype(np.uint8)
        return _reported(copy.deepcopy(clean), target)
    if kind == "leftover":
        objects = copy.deepcopy(sample.objects)
        obj = next(o for o in objects if o.id == sub.object_ids[0])
        ys, xs = np.nonzero(obj.mask)
        keep = xs >= np.quantile(xs, 0.4)  # the left 40% is not in the mask: it stays behind
        mask = np.zeros_like(obj.mask, dtype=bool)
        mask[ys[keep], xs[keep]] = True
        obj.mask = mask
        obj.box = bbox(mask)
        return _rerun(sample, objects=objects)
    if kind == "ghost":
        hole = _emptied(sample, clean)
        if np.count_nonzero(hole) < 40:
            return None
        grey = cv2.cvtColor(sample.source, cv2.COLOR_RGB2GRAY).astype(np.float32)
        detail = grey - cv2.GaussianBlur(grey, (0, 0), sigmaX=1.5)
        target = clean.target.astype(np.float32)
        target[hole] += 0.8 * detail[hole][:, None]
        return _reported(copy.deepcopy(clean), np.clip(np.rint(target), 0, 255).astype(np.uint8))
    if kind == "seam_tint":
        kept = [o for o in sample.objects if o.id in sub.object_ids and o.mask is not None]
        if not kept:
            return None
        big = max(kept, key=lambda o: int(np.count_nonzero(o.mask)))
        x0, y0, x1, y1 = bbox(big.mask)
        cut = big.mask.astype(bool).copy()  # a straight cut at 30-70% across, either way
        share = rng.uniform(0.3, 0.7)
        if rng.random() < 0.5:
            cut[:, :int(x0 + share * (x1 - x0))] = False
        else:
            cut[:int(y0 + share * (y1 - y0)), :] = False
        region = sub.mask.astype(bool) | cut  # that part of the subject is tinted too
        s = copy.deepcopy(sample)
        s.sub_edits[0].params = {**sub.params, "op": "tint", "to_color": "purple",
                                 "to_rgb": [128, 0, 128]}
        return _rerun(s, region=region)
    if kind == "spill":
        return _rerun(sample, region=dilate(_object(sample), 6))
    raise ValueError(kind)


def route(judge, policy: RoutingPolicy, sample: EditSample) -> tuple[str, str]:
    scores = judge.score(sample.judge_view())
    return policy.route(scores), scores["sub_edit_reasons"][0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--resolution", type=int, default=384)
    parser.add_argument("--sheet", type=Path, help="write the flagged credible pairs (source | "
                        "target | mask) to this PNG, to look at")
    parser.add_argument("--measures", action="store_true",
                        help="print each check's measures per row (for calibrating its levels)")
    parser.add_argument("--show", action="store_true", help="print every flagged credible pair "
                        "and every missed crude pair with its reason")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    images = photos(args.resolution)
    gated, plain = make_judge("pixel"), make_judge("pixel", plausibility=False)
    policy = RoutingPolicy.for_judge(gated)
    # rows: "credible <type>" and crude kinds; per row the verdicts with and without the gate,
    # and how many pairs each check flagged (score < 1)
    verdicts: dict[str, Counter] = defaultdict(Counter)
    before: dict[str, Counter] = defaultdict(Counter)
    flags: dict[str, Counter] = defaultdict(Counter)
    measures: dict[tuple[str, str], list[float]] = defaultdict(list)
    grounded: dict = {}
    sheet: list = []
    for seed in args.seeds:
        rng = np.random.default_rng(seed)
        for sample in singles(images, seed, grounded):
            clean = edit(sample)
            if clean is None:
                continue
            vetted = "unvetted" if sample.private.get("unvetted") else "credible"
            pairs = [(f"{vetted} {sample.sub_edits[0].type}", clean)]
            for kind in CRUDE_OF.get(sample.sub_edits[0].type, ()):
                made = crude(kind, sample, clean, rng)
                if made is not None:
                    pairs.append((f"{kind} ({sample.sub_edits[0].type})", made))
            for row, pair in pairs:
                verdict, reason = route(gated, policy, pair)
                verdicts[row][verdict] += 1
                before[row][route(plain, policy, pair)[0]] += 1
                for f in assess(pair.judge_view(), 0):
                    measures[row, f.check].append(f.measure)
                    if f.score < 1.0:
                        flags[row][f.check] += 1
                credible = row.split()[0] in ("credible", "unvetted")  # the editor's own
                if args.sheet and credible and verdict != "accept":
                    sheet.append((row, pair, reason))
                if args.show and ((credible and verdict != "accept") or
                                  (not credible and verdict == "accept")):
                    print(f"  {row:22s} {pair.source_key:18s} {verdict:10s} {reason}")
    if args.sheet and sheet:
        rows_ = []
        sheet.sort(key=lambda item: item[0].startswith("unvetted"))  # credible first
        for row, pair, reason in sheet[:24]:
            mask = np.repeat(pair.sub_edits[0].mask[..., None].astype(np.uint8) * 255, 3, axis=2)
            row_ = np.concatenate([pair.source, pair.target, mask], axis=1)
            rows_.append(cv2.resize(row_, (768, 768 * row_.shape[0] // row_.shape[1])))
            print(f"  sheet row {len(rows_)}: {row}: {pair.source_key}: {reason}")
        cv2.imwrite(str(args.sheet), cv2.cvtColor(np.concatenate(rows_, axis=0), cv2.COLOR_RGB2BGR))
    if args.measures:
        for (row, check), values in sorted(measures.items()):
            q = np.quantile(values, [0, 0.1, 0.25, 0.5, 0.75, 0.9, 1])
            print(f"  {row:22s} {check:9s} n={len(values):3d} " + " ".join(f"{v:.2f}" for v in q))
    print(f"command: .venv/bin/python bench/plausibility.py --seeds {' '.join(map(str, args.seeds))}"
          f" --resolution {args.resolution}")
    print("\n| pairs | n | rejected | borderline | flagged (rej+bord) | flagged without gate | "
          + " | ".join(CHECKS) + " |")
    print("|---" * (6 + len(CHECKS)) + "|")
    groups = {"credible": "credible (all)", "unvetted": "unvetted (all)"}
    totals: dict[str, tuple[Counter, Counter, Counter]] = defaultdict(lambda: (Counter(), Counter(), Counter()))
    order = []
    for group in ("credible", "unvetted", None):
        names = sorted(r for r in verdicts if (r.split()[0] == group) if group) if group else \
            sorted(r for r in verdicts if r.split()[0] not in groups)
        total = groups.get(group, "crude (all)")
        for row in names:
            for acc, part in zip(totals[total], (verdicts[row], before[row], flags[row])):
                acc.update(part)
        order += names + ([total] if names else [])
    for row in order:
        v, b, f = totals[row] if row in totals else (verdicts[row], before[row], flags[row])
        n = sum(v.values())
        flagged = v["reject"] + v["borderline"]
        flagged_before = b["reject"] + b["borderline"]
        cells = " | ".join(f"{f[c]}" if f[c] else "·" for c in CHECKS)
        name = f"**{row}**" if row in totals else row
        print(f"| {name} | {n} | {v['reject']} ({v['reject'] / n:.0%}) | {v['borderline']} "
              f"({v['borderline'] / n:.0%}) | {flagged / n:.0%} | {flagged_before / n:.0%} | {cells} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
