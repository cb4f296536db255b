"""Generative editors from diffusers pipelines saved with `save_pretrained` (`--editor inpaint`).

`DiffusersModel` loads any diffusers pipeline from a local directory, the class read from its
`model_index.json` (`StableDiffusionInpaintPipeline`, `StableDiffusionXLInpaintPipeline`,
`FluxFillPipeline`, `StableDiffusionInstructPix2PixPipeline`, ...), with `local_files_only`:
nothing downloads. It is built once per editor, i.e. once per Ray actor (the `UnitPipeline` is).

`GenerativeEditor` is the editing loop both generative backends share. Sub-edits are applied in
order, sub-edit i acting on the result of i-1:

1. the backend generates a full frame for the sub-edit (inpainting: the composer's region grown
   by `grow` px is the model's mask and the prompt says what must appear there, `prompt_for`;
   instruct: the sub-instruction itself), at a working size whose long side is at most
   `max_side` and whose sides are multiples of 8, then resized back;
2. the frame is composited onto the previous image with a feathered alpha that is 0 outside the
   composer's region and rises to 1 `feather` px inside it, so **every pixel outside every region
   stays exactly the source's** (bit for bit), whatever the model did;
3. the sub-edit's mask becomes the pixels that changed (within its region); a sub-edit that
   changed nothing fails the sample.

Best of N (`candidates` K > 1): K candidates per sub-edit with distinct seeds; the build's judge
(`judge`, `judge_options`: the configured one) scores each as a one-sub-edit pair (the previous
image, the candidate, the sub-instruction, its changed pixels); the best (sub-edit score, then
overall; ties to the lower candidate) continues. The others are preference negatives: their
seeds and scores go to `sample.provenance["candidates"]` (shard JSON and manifest-side record), and
their pixels with the chosen one's to `sample.private["preference"]`, which the unit writes to
`OUT/preference/preference-<unit>.tar` before its shards (see `pipeline.unit`).

Seeds derive from (build seed, sample index, sub-edit, candidate) (`step_seed`): the same
parameters give the same bytes on the same hardware, so a resumed build equals an uninterrupted
one. `provenance["editor"]` names the backend, the pipeline class, the weights directory's name and
the settings. Generative editors inject no defects (the judge sees their natural failures).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from pipeline import __version__
from pipeline.compose.regions import FEATHER_PX, dilate
from pipeline.editors.base import EDITORS
from pipeline.record import EditSample, JudgeView, SubEdit
from pipeline.sources.scene import bbox
from pipeline.stage import RecordStage

log = logging.getLogger(__name__)

DTYPES = ("float32", "float16", "bfloat16")
REMOVE_PROMPT = "empty background, the surroundings continued seamlessly, nothing there"


def step_seed(seed: int, index: int, sub_edit: int, candidate: int) -> int:
    """The generator seed of one candidate of one sub-edit of one sample (63 bits)."""
    digest = hashlib.sha256(f"mcie-edit:{seed}:{index}:{sub_edit}:{candidate}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def work_size(width: int, height: int, max_side: int, multiple: int = 8) -> tuple[int, int]:
    scale = min(1.0, max_side / max(width, height))
    return (max(multiple, int(width * scale) // multiple * multiple),
            max(multiple, int(height * scale) // multiple * multiple))


def feather_alpha(region: np.ndarray, feather: int) -> np.ndarray:
    """0 outside the region, rising to 1 `feather` px inside it (float32 HxW)."""
    if feather <= 0:
        return region.astype(np.float32)
    padded = np.pad(region.astype(np.uint8), 1)  # the frame edge is not a region edge to feather
    distance = cv2.distanceTransform(padded, cv2.DIST_L2, 5)[1:-1, 1:-1]
    return np.clip(distance / feather, 0.0, 1.0).astype(np.float32) * region


def composite(previous: np.ndarray, generated: np.ndarray, region: np.ndarray, feather: int
              ) -> np.ndarray:
    """`generated` over `previous` inside the region only; outside it, `previous` exactly."""
    alpha = feather_alpha(region, feather)[..., None]
    mixed = previous.astype(np.float32) * (1 - alpha) + generated.astype(np.float32) * alpha
    out = np.clip(np.rint(mixed), 0, 255).astype(np.uint8)
    out[~region] = previous[~region]  # exact, not merely close: alpha is 0 there
    return out


def _label(sample: EditSample, sub: SubEdit, k: int = 0) -> str:
    objects = {o.id: o for o in sample.objects}
    obj = objects.get(sub.object_ids[k]) if len(sub.object_ids) > k else None
    return "object" if obj is None or obj.label == "region" else obj.label


def prompt_for(sample: EditSample, sub: SubEdit) -> str:
    """What must appear in the sub-edit's region, for an inpainting model."""
    p = sub.params
    kind = sub.type
    if kind == "add":
        return f"a {p.get('color', '')} {p.get('label', 'object')}".replace("  ", " ")
    if kind == "replace":
        return f"a {p.get('to_color', '')} {p.get('to_label', 'object')}".replace("  ", " ")
    if kind == "recolor":
        return f"a {p.get('to_color', '')} {_label(sample, sub)}".replace("  ", " ")
    if kind == "remove":
        return REMOVE_PROMPT
    if kind == "texture":
        return f"a {_label(sample, sub)} with a {p.get('to_pattern', '')} pattern"
    if kind == "add_text":
        return f"the word \"{p.get('text', '')}\" written in {p.get('color', 'black')}"
    if kind in ("move", "resize", "swap"):
        # an inpainting model cannot carry an object over: route these to the photo editor
        return f"a {_label(sample, sub)}"
    return sub.text  # background: the instruction says what the new background is


class DiffusersModel:
    """One diffusers pipeline from a local directory, loaded on first use."""

    def __init__(self, path: str, device: str = "cpu", dtype: str = "float32"):
        self.path = Path(path)
        index = self.path / "model_index.json"
        if not index.is_file():
            raise ValueError(f"editor path {path}: no model_index.json "
                             "(save the pipeline with save_pretrained)")
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        self.class_name = json.loads(index.read_text()).get("_class_name", "")
        if not self.class_name.endswith("Pipeline"):
            raise ValueError(f"editor path {path}: model_index.json names no pipeline class")
        self.device, self.dtype = device, dtype
        self._pipe = None

    @property
    def pipe(self):
        if self._pipe is None:
            import diffusers
            import torch

            cls = getattr(diffusers, self.class_name, None)
            if cls is None:
                raise ValueError(f"diffusers has no {self.class_name} (editor path {self.path})")
            pipe = cls.from_pretrained(self.path, dtype=getattr(torch, self.dtype),
                                       local_files_only=True)
            pipe.set_progress_bar_config(disable=True)
            self._pipe = pipe.to(self.device)
        return self._pipe

    def generator(self, seed: int):
        import torch

        return torch.Generator(device="cpu" if self.device.startswith("mps") else self.device
                               ).manual_seed(seed)

    def describe(self) -> str:
        return f"{self.class_name}:{self.path.name}"


def to_uint8(images: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(np.asarray(images, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)


def resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if (image.shape[1], image.shape[0]) == size:
        return image
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA if size[0] < image.shape[1]
                      else cv2.INTER_CUBIC)


class GenerativeEditor(RecordStage):
    """The editing loop of generative backends (see the module docstring); a backend implements
    `generate(sample, i, image, region, seed) -> full frame` and `settings()`."""

    name = "edit"
    backend = "generative"

    def __init__(self, candidates: int = 1, feather: int = FEATHER_PX, seed: int = 0,
                 judge: str = "pixel", judge_options: dict[str, Any] | None = None):
        if not isinstance(candidates, int) or not 1 <= candidates <= 16:
            raise ValueError(f"candidates must be within 1..16, got {candidates!r}")
        if not isinstance(feather, int) or feather < 0:
            raise ValueError(f"feather must be a non-negative number of px, got {feather!r}")
        self.candidates, self.feather, self.seed = candidates, feather, seed
        self.judge_name, self.judge_options = judge, dict(judge_options or {})
        self._judge = None

    @property
    def judge(self):
        if self._judge is None:
            from pipeline.judges.base import make_judge

            self._judge = make_judge(self.judge_name, **self.judge_options)
        return self._judge

    # -- what a backend provides ----------------------------------------------------------------------

    def generate(self, sample: EditSample, i: int, image: np.ndarray, region: np.ndarray,
                 seed: int) -> np.ndarray:
        raise NotImplementedError

    def settings(self) -> str:
        raise NotImplementedError

    def provenance(self) -> str:
        return f"{self.backend}@{__version__}:{self.settings()}" + (
            f",candidates={self.candidates}" if self.candidates > 1 else "")

    # -- the loop -------------------------------------------------------------------------------------

    def process(self, sample: EditSample) -> None:
        source = sample.source
        if source is None or source.ndim != 3 or source.shape[2] != 3 or source.dtype != np.uint8:
            raise ValueError(f"the {self.backend} editor needs an RGB uint8 source image")
        if not sample.sub_edits:
            raise ValueError("no sub-edits to apply (run the composer first)")
        shape = source.shape[:2]
        for i, sub in enumerate(sample.sub_edits):
            if sub.mask is None or sub.mask.shape != shape:
                raise ValueError(f"sub-edit {i} ({sub.type}) has no region of the image's size")
        image = source
        masks, chosen_log, preference = [], [], []
        for i, sub in enumerate(sample.sub_edits):
            region = sub.mask.astype(bool)
            image, changed, record, negatives = self.edit_step(sample, i, image, region)
            if not changed.any():
                raise ValueError(f"sub-edit {i} ({sub.text!r}) changes no pixel")
            masks.append(changed)
            if record is not None:
                chosen_log.append(record)
                preference.extend(negatives)
        for sub, changed in zip(sample.sub_edits, masks):
            sub.mask = changed
            sub.box = bbox(changed)
        sample.target = image
        sample.background_mask = ~np.logical_or.reduce(masks)
        sample.defects = []
        sample.provenance["editor"] = self.provenance()
        if chosen_log:
            sample.provenance["candidates"] = chosen_log
            sample.private["preference"] = preference

    def edit_step(self, sample: EditSample, i: int, previous: np.ndarray, region: np.ndarray):
        """(image after sub-edit i, its changed pixels, best-of-N record or None, negatives)."""
        sub = sample.sub_edits[i]
        results = []
        for k in range(self.candidates):
            seed = step_seed(sample.seed, sample.index, i, k)
            frame = self.generate(sample, i, previous, region, seed)
            if frame.shape != previous.shape or frame.dtype != np.uint8:
                raise ValueError(f"the model gave a {frame.dtype} {frame.shape} frame for a "
                                 f"{previous.shape} image")
            image = composite(previous, frame, region, self.feather)
            changed = (image != previous).any(axis=2) & region
            results.append((seed, image, changed))
        if self.candidates == 1:
            return results[0][1], results[0][2], None, []
        views = []
        for k, (_, image, changed) in enumerate(results):
            one = copy.copy(sub)
            one.mask, one.box = changed, bbox(changed)
            views.append(JudgeView(id=f"{sample.id}-e{i}-c{k}", source=previous, target=image,
                                   instruction=sub.text, sub_edits=[one],
                                   background_mask=~changed))
        scored = self.judge.score_batch(views)
        scores = [s if isinstance(s, dict) else {"error": str(s)[:200]} for s in scored]

        def rank(k: int) -> tuple[float, float, int]:
            s = scores[k]
            sub_score = (s.get("sub_edits") or [None])[0]
            overall = s.get("overall")
            return (-1.0 if sub_score is None else float(sub_score),
                    -1.0 if overall is None else float(overall), -k)

        best = max(range(self.candidates), key=rank)
        record = {"sub_edit": i, "chosen": best, "judge": f"{self.judge.name}@{self.judge.version}",
                  "candidates": [{"candidate": k, "seed": seed, "scores": _brief(scores[k])}
                                 for k, (seed, _, _) in enumerate(results)]}
        negatives = [{"sub_edit": i, "candidate": k, "chosen_candidate": best, "seed": seed,
                      "scores": _brief(scores[k]), "chosen_scores": _brief(scores[best]),
                      "text": sub.text, "source": previous, "chosen": results[best][1],
                      "rejected": image}
                     for k, (seed, image, _) in enumerate(results) if k != best]
        return results[best][1], results[best][2], record, negatives


def _brief(scores: dict[str, Any]) -> dict[str, Any]:
    keys = ("sub_edits", "background", "quality", "overall", "error")
    return {k: scores[k] for k in keys if k in scores}


class InpaintEditor(GenerativeEditor):
    backend = "inpaint"

    def __init__(self, path: str, steps: int = 30, guidance: float = 7.5, device: str = "cpu",
                 dtype: str = "float32", max_side: int = 1024, grow: int = FEATHER_PX,
                 strength: float = 1.0, negative_prompt: str = "", candidates: int = 1,
                 feather: int = FEATHER_PX, seed: int = 0, judge: str = "pixel",
                 judge_options: dict[str, Any] | None = None):
        super().__init__(candidates, feather, seed, judge, judge_options)
        _check_common(steps, guidance, max_side)
        if not 0 < strength <= 1:
            raise ValueError(f"strength must be within (0, 1], got {strength!r}")
        self.model = DiffusersModel(path, device, dtype)
        self.steps, self.guidance, self.max_side = steps, float(guidance), max_side
        self.grow, self.strength, self.negative_prompt = grow, float(strength), negative_prompt

    def settings(self) -> str:
        return (f"{self.model.describe()}:steps={self.steps},guidance={self.guidance:g},"
                f"strength={self.strength:g},dtype={self.model.dtype},max_side={self.max_side},"
                f"grow={self.grow},feather={self.feather}")

    def generate(self, sample, i, image, region, seed):
        height, width = image.shape[:2]
        size = work_size(width, height, self.max_side)
        mask = dilate(region, self.grow) if self.grow > 0 else region
        from PIL import Image

        out = self.model.pipe(
            prompt=prompt_for(sample, sample.sub_edits[i]),
            negative_prompt=self.negative_prompt or None,
            image=Image.fromarray(resize(image, size)),
            mask_image=Image.fromarray(resize(mask.astype(np.uint8) * 255, size)),
            height=size[1], width=size[0], num_inference_steps=self.steps,
            guidance_scale=self.guidance, strength=self.strength,
            generator=self.model.generator(seed), output_type="np",
        ).images[0]
        return resize(to_uint8(out), (width, height))


def _check_common(steps: int, guidance: float, max_side: int) -> None:
    if not isinstance(steps, int) or not 1 <= steps <= 1000:
        raise ValueError(f"steps must be within 1..1000, got {steps!r}")
    if not isinstance(guidance, (int, float)) or not 0 <= guidance <= 100:
        raise ValueError(f"guidance must be within 0..100, got {guidance!r}")
    if not isinstance(max_side, int) or not 64 <= max_side <= 8192:
        raise ValueError(f"max_side must be within 64..8192, got {max_side!r}")


EDITORS.register("inpaint")(InpaintEditor)
