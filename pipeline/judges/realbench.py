"""The judge on real pairs, measured: `mcie judge-bench --real DIR`.

Real edit datasets carry no defect log, so the judge is measured per *class* of pair, each with
what must never happen to it:

- the real pairs: every generic jsonl under DIR (`mcie import --format generic`'s layout), one
  class per dataset folder and edit type ("real instructpix2pix: global");
- realistic variants of exact pairs (unless `perturb=False`): pairs made by the build's own
  front half on scikit-image's bundled photographs with no defects — the photo editor by default,
  or any editor the build can name (`editor`, `editor_options`: a generative one from local
  weights, whose pairs are composited so their background is exact too) — written to disk as an
  edit dataset would ship them and imported through the same importer, in classes
  - "keep": the edit is faithful and the background differs from the source only by what a
    dataset's pipeline does to it: JPEG at quality 70 or 95, resampling (down to 70 % and back),
    a VAE-like round trip (a 0.8 px blur, grain, JPEG 90), a 3 % global colour shift, all three
    at once, with the editor's masks; and a local edit (no background restyle) at JPEG 90
    without any mask (the region then comes from the difference). Such a pair must never be
    rejected;
  - "changed": the background's content changed: one of the editor's sub-edits left out of the
    declared edits (its object moved, resized or swapped; replaced, added or removed; recoloured
    or retextured; the whole background blurred, tinted or desaturated), the background shifted
    by 8 px (regenerated out of register) or another photo behind the edit (a new scene). Such a
    pair must never be accepted. A left-out sub-edit smaller than `MIN_UNDECLARED` of the frame
    is not used (too small to call the background changed).

Every pair goes through the importer (decode, crop to the size grid, region from the mask or the
difference), the configured judge and routing, as `mcie import` runs them; the table counts the
verdicts per class and says whether the class held its rule.
"""

from __future__ import annotations

import importlib.resources
import io
import json
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np
from PIL import Image

from pipeline.config import BuildConfig
from pipeline.dataset.source_index import make_index
from pipeline.judges.base import JudgeStage, make_judge
from pipeline.record import EditSample
from pipeline.routing import RouteStage, RoutingPolicy
from pipeline.unit import front_stages, make_source, read_sample

PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
          "hubble_deep_field.jpg", "retina.jpg", "ihc.png")
MIN_UNDECLARED = 0.003  # share of the frame a left-out sub-edit must change
PER_CLASS = 12  # pairs per perturbed class at most
KEEP, CHANGED = "never rejected", "never accepted"

Pair = tuple[np.ndarray, np.ndarray, np.ndarray | None, str]  # source, target, mask, instruction


def _jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "JPEG", quality=quality)
    return np.asarray(Image.open(buffer).convert("RGB"))


def _resampled(image: np.ndarray, scale: float = 0.7) -> np.ndarray:
    h, w = image.shape[:2]
    small = cv2.resize(image, (int(w * scale), int(h * scale)), interpolation=cv2.INTER_AREA)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)


def _vae_like(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    soft = cv2.GaussianBlur(image.astype(np.float32), (0, 0), 0.8) + rng.normal(0, 2, image.shape)
    return _jpeg(np.clip(soft, 0, 255).astype(np.uint8), 90)


def _shifted_colour(image: np.ndarray) -> np.ndarray:
    gain = np.array([1.03, 1.0, 0.975], dtype=np.float32)
    return np.clip(image.astype(np.float32) * gain + 2, 0, 255).astype(np.uint8)


def _keep_classes(rng: np.random.Generator) -> dict[str, Callable[[np.ndarray, np.ndarray], tuple]]:
    return {
        "jpeg 70": lambda s, t: (_jpeg(s, 70), _jpeg(t, 70)),
        "jpeg 95": lambda s, t: (_jpeg(s, 95), _jpeg(t, 95)),
        "resampled": lambda s, t: (s, _resampled(t)),
        "vae-like round trip": lambda s, t: (_jpeg(s, 90), _vae_like(t, rng)),
        "colour shift 3 %": lambda s, t: (_jpeg(s, 90), _jpeg(_shifted_colour(t), 90)),
        "jpeg 70 + resampled + shift": lambda s, t: (_jpeg(s, 70), _jpeg(_shifted_colour(_resampled(t)), 70)),
    }


UNDECLARED = {  # class of a left-out sub-edit, by its type
    "move": "moved", "resize": "moved", "swap": "moved",
    "replace": "replaced", "add": "replaced", "remove": "replaced",
    "recolor": "recoloured", "texture": "recoloured", "add_text": "recoloured",
    "background": "restyled",
}


def exact_pairs(resolution: int, seed: int, edits_per_image: int = 6, editor: str = "photo",
                editor_options: dict[str, Any] | None = None) -> list[EditSample]:
    """Clean pairs of `editor` on the bundled photographs (the build's own front half)."""
    folder = importlib.resources.files("skimage") / "data"
    with tempfile.TemporaryDirectory() as tmp:
        listing = Path(tmp) / "photos.txt"
        listing.write_text("\n".join(str(folder / name) for name in PHOTOS) + "\n")
        config = BuildConfig(count=None, seed=seed, resolution=resolution, shard_size=64,
                             defect_rate=0.0, source="list",
                             source_options={"path": str(listing), "allow_outside_root": True},
                             edits_per_image=edits_per_image, editor=editor,
                             editor_options=dict(editor_options or {}))
        return [s for s in run_units(config, front_stages(config)) if not s.failed]


def run_units(config: BuildConfig, stages: list[Any]) -> list[EditSample]:
    """Every sample of the build `config` describes, read and passed through `stages`, one work
    unit at a time as a build does (in process: no Ray, no output)."""
    reader = make_source(config)
    index, _ = make_index(reader)
    total = config.total_samples(index.size)
    done: list[EditSample] = []
    for unit in range(config.num_units(total)):
        batch = [read_sample(reader, config, index, n) for n in config.unit_indices(unit, total)]
        for stage in stages:
            batch = stage(batch)
        done += batch
    return done


def perturbed_pairs(samples: list[EditSample], seed: int,
                    per_class: int = PER_CLASS) -> dict[str, tuple[str, list[Pair]]]:
    """{class: (rule, pairs)}, `per_class` pairs at most each, made from clean exact pairs (see
    the module docstring)."""
    rng = np.random.default_rng(seed)
    out: dict[str, tuple[str, list[Pair]]] = {}
    for name, perturb in _keep_classes(rng).items():
        pairs = []
        for sample in samples[:per_class]:
            s, t = perturb(sample.source, sample.target)
            pairs.append((s, t, ~sample.background_mask, sample.instruction))
        out[f"keep: {name}"] = (KEEP, pairs)
    local = [s for s in samples if all(e.type != "background" for e in s.sub_edits)]
    out["keep: jpeg 90, local edit, no mask"] = (KEEP, [
        (_jpeg(s.source, 90), _jpeg(s.target, 90), None, s.instruction) for s in local[:per_class]])
    undeclared: dict[str, list[Pair]] = defaultdict(list)
    for sample in samples:
        subs = sample.sub_edits
        if len(subs) < 2:
            continue
        for left_out in range(len(subs)):
            declared = np.logical_or.reduce([e.mask for j, e in enumerate(subs) if j != left_out])
            if np.count_nonzero(subs[left_out].mask & ~declared) < MIN_UNDECLARED * declared.size:
                continue
            group = UNDECLARED[subs[left_out].type]
            if len(undeclared[group]) < per_class:
                texts = [e.text for j, e in enumerate(subs) if j != left_out]
                undeclared[group].append((_jpeg(sample.source, 90), _jpeg(sample.target, 90),
                                          declared, ", then ".join(texts)))
    for group in ("moved", "replaced", "recoloured", "restyled"):
        label = {"moved": "an object moved, resized or swapped",
                 "replaced": "an object replaced, added or removed",
                 "recoloured": "an object recoloured, retextured or written on",
                 "restyled": "the background blurred, tinted or desaturated"}[group]
        out[f"changed: {label}"] = (CHANGED, undeclared.get(group, []))
    shifted, scenes = [], []
    for i, sample in enumerate(samples[:per_class]):
        edit = ~sample.background_mask
        moved = np.roll(sample.source, (8, 8), axis=(0, 1))
        shifted.append((_jpeg(sample.source, 90), _jpeg(np.where(edit[..., None], sample.target, moved), 90),
                        edit, sample.instruction))
        other = samples[(i + len(samples) // 2) % len(samples)].source
        other = cv2.resize(other, sample.source.shape[1::-1], interpolation=cv2.INTER_AREA)
        scenes.append((_jpeg(sample.source, 90), _jpeg(np.where(edit[..., None], sample.target, other), 90),
                       edit, sample.instruction))
    out["changed: background regenerated 8 px out of register"] = (CHANGED, shifted)
    out["changed: a new scene behind the edit"] = (CHANGED, scenes)
    return out


def write_dataset(folder: Path, classes: dict[str, tuple[str, list[Pair]]]) -> dict[str, str]:
    """The pairs as a generic edit dataset (JPEG/PNG files + generic.jsonl) under `folder`;
    returns {session id: class}."""
    folder.mkdir(parents=True, exist_ok=True)
    lines, of_session = [], {}
    for c, (name, (_, pairs)) in enumerate(classes.items()):
        for i, (source, target, mask, instruction) in enumerate(pairs):
            session = f"c{c:02d}-{i:03d}"
            of_session[session] = name
            Image.fromarray(source).save(folder / f"{session}_0.png")
            Image.fromarray(target).save(folder / f"{session}_1.png")
            line: dict[str, Any] = {"session": session, "turn": 1, "instruction": instruction,
                                    "source": f"{session}_0.png", "target": f"{session}_1.png",
                                    "license": "scikit-image data (BSD-3-Clause)"}
            if mask is not None:
                Image.fromarray(mask.astype(np.uint8) * 255).save(folder / f"{session}_mask.png")
                line["mask"] = f"{session}_mask.png"
            lines.append(json.dumps(line))
    (folder / "generic.jsonl").write_text("\n".join(lines) + "\n")
    return of_session


def judge_imported(path: Path, judge: str, judge_options: dict[str, Any], resolution: int,
                   seed: int, policy: RoutingPolicy | None = None) -> list[EditSample]:
    """Import every session of the generic dataset at `path` (min edits 1), judge and route it."""
    config = BuildConfig(seed=seed, resolution=resolution, shard_size=64, defect_rate=0.0,
                         min_edits=1, max_edits=8, judge=judge, judge_options=dict(judge_options),
                         source="import", source_options={"format": "generic", "path": str(path)},
                         grounder="imported", composer="imported", editor="imported")
    judge_impl = make_judge(judge, **config.judge_options)
    return run_units(config, [*front_stages(config), JudgeStage(judge_impl),
                              RouteStage(policy or RoutingPolicy.for_judge(judge_impl))])


def _tally(rows: dict[str, dict[str, Any]], name: str, rule: str, sample: EditSample) -> None:
    row = rows.setdefault(name, {"rule": rule, "pairs": 0, "accept": 0, "borderline": 0,
                                 "reject": 0, "error": 0, "examples": []})
    row["pairs"] += 1
    verdict = sample.verdict if sample.verdict in ("accept", "borderline", "reject") else "error"
    row[verdict] += 1
    broke = (rule == KEEP and verdict == "reject") or (rule == CHANGED and verdict == "accept")
    if (broke or verdict == "error") and len(row["examples"]) < 3:
        row["examples"].append({"id": sample.id, "verdict": verdict, "error": sample.error,
                                "background": sample.scores.get("background"),
                                "reason": sample.scores.get("background_reason")})


def real_bench(real: Path | None, *, judge: str = "pixel", judge_options: dict[str, Any] | None = None,
               resolution: int = 512, seed: int = 0, perturb: bool = True,
               per_class: int = PER_CLASS, editor: str = "photo",
               editor_options: dict[str, Any] | None = None,
               edits_per_image: int = 6) -> dict[str, Any]:
    """Verdict counts per class (see the module docstring) and whether each class held its rule."""
    rows: dict[str, dict[str, Any]] = {}
    options = dict(judge_options or {})
    if real is not None:
        files = sorted(Path(real).rglob("*.jsonl")) if Path(real).is_dir() else [Path(real)]
        if not files:
            raise ValueError(f"no generic .jsonl dataset under {real}")
        for file in files:
            for sample in judge_imported(file, judge, options, resolution, seed):
                types = ", ".join(sorted({e.type for e in sample.sub_edits})) or "unreadable"
                _tally(rows, f"real {file.parent.name}: {types}", "", sample)
    if perturb:
        pairs = exact_pairs(resolution, seed, edits_per_image, editor, editor_options)
        classes = perturbed_pairs(pairs, seed, per_class)
        with tempfile.TemporaryDirectory() as tmp:
            of_session = write_dataset(Path(tmp), classes)
            for sample in judge_imported(Path(tmp) / "generic.jsonl", judge, options, resolution, seed):
                name = of_session[str(sample.provenance.get("source_id"))]
                _tally(rows, name, classes[name][0], sample)
    for row in rows.values():
        row["held"] = None if not row["rule"] else (
            row["reject"] == 0 if row["rule"] == KEEP else row["accept"] == 0)
    return {"judge": judge, "resolution": resolution, "seed": seed,
            "editor": editor if perturb else None, "classes": rows,
            "held": all(r["held"] is not False for r in rows.values())}


def table(report: dict[str, Any]) -> str:
    """The report as a fixed-width table, one class a line."""
    head = f"{'class':<58} {'rule':<15} {'pairs':>5} {'accept':>6} {'review':>6} {'reject':>6} {'error':>5}  held"
    lines = [head, "-" * len(head)]
    for name, row in report["classes"].items():
        held = {True: "yes", False: "NO", None: "-"}[row["held"]]
        lines.append(f"{name[:58]:<58} {row['rule'] or '-':<15} {row['pairs']:>5} {row['accept']:>6} "
                     f"{row['borderline']:>6} {row['reject']:>6} {row['error']:>5}  {held}")
    return "\n".join(lines)
