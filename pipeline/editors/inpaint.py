"""Generative editors from diffusers pipelines saved with `save_pretrained` (`--editor inpaint`).

`DiffusersModel` loads any diffusers pipeline from a local directory, the class read from its
`model_index.json` (`StableDiffusionInpaintPipeline`, `StableDiffusionXLInpaintPipeline`,
`FluxFillPipeline`, `StableDiffusionInstructPix2PixPipeline`, ...), with `local_files_only`:
nothing downloads. Backends call it through one method, `generate(seeds, **pipeline_kwargs)`; in a
Ray build that call goes to the build's model actor, which loads the pipeline once for all unit
workers (`pipeline.model_actors`), elsewhere (tests, benches, a bare `UnitPipeline`) to the
in-process model, with the same bytes. A model actor's death (`ModelUnavailable`) fails the unit,
not the batch's samples, so the unit is retried with the same batches.

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

Batching: a unit's samples are edited in lock-step (`GenerativeEditor.__call__`): sub-edit i of
every sample that has one, its K candidates included, goes to the model grouped by (backend,
working size) in chunks of `batch_size` (bounded by GPU memory): list prompts, stacked images and
masks, one generator per item, so an item's noise is its own seed's whatever shares its batch.
An item's pixels can still move by a rounding step with its batch: the matmul and convolution
kernels (MKL/oneDNN on the CPU, cuBLAS/cuDNN on a GPU) sum in an order that depends on the
batch's shape and on the item's row (measured here: up to 4e-6 of the [0, 1] output, i.e. at
most a uint8 level on a few pixels; the background stays exact). A unit always forms the same
batches, so a resumed build still equals an uninterrupted one. A failing call is retried item by
item, so a failure fails its own sample only.

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
from dataclasses import dataclass, field
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

    def generate(self, seeds: list[int], **pipeline_kwargs) -> list[np.ndarray]:
        """The model interface every backend calls (`pipeline.model_actors`): one float [0, 1]
        HxWx3 frame per seed, each item's generator made here from its own seed."""
        return list(self.pipe(**pipeline_kwargs, generator=[self.generator(s) for s in seeds],
                              output_type="np").images)

    def describe(self) -> str:
        return f"{self.class_name}:{self.path.name}"


def to_uint8(images: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(np.asarray(images, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)


def resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if (image.shape[1], image.shape[0]) == size:
        return image
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA if size[0] < image.shape[1]
                      else cv2.INTER_CUBIC)


class ModelUnavailable(RuntimeError):
    """The model actor serving a batch died (`pipeline.model_actors`). Not a failure of the
    batch's samples: it fails the whole unit, which `flows.execute` retries (item by item would
    change the batches, hence the bytes)."""


class GenerativeEditor(RecordStage):
    """The editing loop of generative backends (see the module docstring); a backend implements
    `generate_batch(requests) -> full frames`, `work_size(image)` and `settings()`."""

    name = "edit"
    backend = "generative"

    def __init__(self, candidates: int = 1, feather: int = FEATHER_PX, seed: int = 0,
                 judge: str = "pixel", judge_options: dict[str, Any] | None = None,
                 batch_size: int = 8):
        if not isinstance(candidates, int) or not 1 <= candidates <= 16:
            raise ValueError(f"candidates must be within 1..16, got {candidates!r}")
        if not isinstance(feather, int) or feather < 0:
            raise ValueError(f"feather must be a non-negative number of px, got {feather!r}")
        if not isinstance(batch_size, int) or not 1 <= batch_size <= 256:
            raise ValueError(f"batch_size must be within 1..256, got {batch_size!r}")
        self.candidates, self.feather, self.seed = candidates, feather, seed
        self.batch_size = batch_size
        self.judge_name, self.judge_options = judge, dict(judge_options or {})
        self._judge = None

    @property
    def judge(self):
        if self._judge is None:
            from pipeline.judges.base import make_judge

            self._judge = make_judge(self.judge_name, **self.judge_options)
        return self._judge

    # -- what a backend provides ----------------------------------------------------------------------

    def generate_batch(self, requests: list[Request]) -> list[np.ndarray]:
        """One full uint8 frame per request, in order; the requests share `work_size`. Raising
        fails the whole call (the loop then retries its requests one by one)."""
        raise NotImplementedError

    def work_size(self, image: np.ndarray) -> tuple[int, int]:
        """(width, height) the model works at for this image: requests batch by it."""
        raise NotImplementedError

    def settings(self) -> str:
        raise NotImplementedError

    def provenance(self) -> str:
        return f"{self.backend}@{__version__}:{self.settings()},batch_size={self.batch_size}" + (
            f",candidates={self.candidates}" if self.candidates > 1 else "")

    def models(self) -> list:
        """The models this editor calls (`DiffusersModel`s, or clients of model actors): what a
        build serves from model actors (`pipeline.model_actors`)."""
        return []

    def backend_for(self, sub: SubEdit):
        """Who applies this sub-edit: a generative backend (batched here) or an exact one with
        `edit_exact(sample, i, previous, region) -> (image, changed)` (the routed editor's)."""
        return self

    # -- the loop -------------------------------------------------------------------------------------

    def __call__(self, batch: list[EditSample]) -> list[EditSample]:
        live = [s for s in batch if not s.failed]
        errors = self.edit_all(live)
        for sample in live:
            exc = errors.get(id(sample))
            if exc is not None:  # this sample alone fails; the others of the batch go on
                log.warning("stage %s failed on %s: %s", self.name, sample.id, exc)
                sample.fail(self.name, exc)
        return batch

    def process(self, sample: EditSample) -> None:
        """One sample alone (a batch of one); raises its failure."""
        exc = self.edit_all([sample]).get(id(sample))
        if exc is not None:
            raise exc

    def edit_all(self, samples: list[EditSample]) -> dict[int, Exception]:
        """Edit the samples in lock-step: sub-edit i of every sample that has one, then i+1.
        Fills the successful samples; returns the failures as {id(sample): exception}."""
        errors: dict[int, Exception] = {}
        jobs = []
        for sample in samples:
            try:
                self._check(sample)
                jobs.append(_Job(sample, sample.source))
            except Exception as exc:
                errors[id(sample)] = exc
        step = 0
        while live := [j for j in jobs if id(j.sample) not in errors
                       and step < len(j.sample.sub_edits)]:
            self._step(live, step, errors)
            step += 1
        for job in jobs:
            if id(job.sample) not in errors:
                self._finish(job)
        return errors

    def _check(self, sample: EditSample) -> None:
        source = sample.source
        if source is None or source.ndim != 3 or source.shape[2] != 3 or source.dtype != np.uint8:
            raise ValueError(f"the {self.backend} editor needs an RGB uint8 source image")
        if not sample.sub_edits:
            raise ValueError("no sub-edits to apply (run the composer first)")
        for i, sub in enumerate(sample.sub_edits):
            if sub.mask is None or sub.mask.shape != source.shape[:2]:
                raise ValueError(f"sub-edit {i} ({sub.type}) has no region of the image's size")

    def _step(self, live: list[_Job], i: int, errors: dict[int, Exception]) -> None:
        """Sub-edit i of every live job: exact ones at once, generative ones batched by (backend,
        work size) in chunks of `batch_size`, every candidate its own seeded item."""
        requests = []
        for job in live:
            sub = job.sample.sub_edits[i]
            region, backend = sub.mask.astype(bool), self.backend_for(sub)
            if isinstance(backend, GenerativeEditor):
                seed = job.sample.seed, job.sample.index
                requests += [Request(job, backend, i, k, step_seed(*seed, i, k), region)
                             for k in range(self.candidates)]
                continue
            try:
                image, changed = backend.edit_exact(job.sample, i, job.image, region)
                self._advance(job, i, image, changed)
            except Exception as exc:
                errors[id(job.sample)] = exc
        groups: dict[tuple, list[Request]] = {}
        for r in requests:
            groups.setdefault((id(r.backend), r.backend.work_size(r.previous)), []).append(r)
        for group in groups.values():
            for start in range(0, len(group), self.batch_size):
                self._generate(group[start:start + self.batch_size], errors)
        by_job: dict[int, list[Request]] = {}
        for r in requests:
            if id(r.sample) not in errors:
                by_job.setdefault(id(r.job), []).append(r)
        self._choose([rs for rs in by_job.values()], i, errors)

    def _generate(self, chunk: list[Request], errors: dict[int, Exception]) -> None:
        """Frames for a chunk in one model call; if the call fails, each request alone, so a
        failing item fails its own sample only."""
        chunk = [r for r in chunk if id(r.sample) not in errors]
        if not chunk:
            return
        try:
            frames = chunk[0].backend.generate_batch(chunk)
            if len(frames) != len(chunk):
                raise ValueError(f"the model gave {len(frames)} frames for {len(chunk)} requests")
        except ModelUnavailable:
            raise  # the model actor died: the unit is retried whole, so its batches stay the same
        except Exception as exc:
            if len(chunk) == 1:
                errors[id(chunk[0].job.sample)] = exc
                return
            log.warning("a batch of %d failed (%s); retrying its items one by one", len(chunk), exc)
            for r in chunk:
                self._generate([r], errors)
            return
        for r, frame in zip(chunk, frames):
            if frame.shape != r.previous.shape or frame.dtype != np.uint8:
                errors[id(r.sample)] = ValueError(f"the model gave a {frame.dtype} {frame.shape} "
                                                  f"frame for a {r.previous.shape} image")
                continue
            r.result = composite(r.previous, frame, r.region, self.feather)
            r.changed = (r.result != r.previous).any(axis=2) & r.region

    def _choose(self, per_job: list[list[Request]], i: int, errors: dict[int, Exception]) -> None:
        """The candidate each job continues with; with K > 1 the judge scores all candidates of
        the step in one batch."""
        if self.candidates == 1:
            for (r,) in per_job:
                self._advance(r.job, i, r.result, r.changed, errors)
            return
        views = []
        for rs in per_job:
            sub = rs[0].job.sample.sub_edits[i]
            for r in rs:
                one = copy.copy(sub)
                one.mask, one.box = r.changed, bbox(r.changed)
                views.append(JudgeView(id=f"{r.sample.id}-e{i}-c{r.candidate}",
                                       source=r.previous, target=r.result, instruction=sub.text,
                                       sub_edits=[one], background_mask=~r.changed))
        scores = iter(self._score(views, len(per_job[0]) if per_job else 1))
        for rs in per_job:
            job_scores = [next(scores) for _ in rs]
            if any(isinstance(s, Exception) for s in job_scores):
                errors[id(rs[0].sample)] = next(s for s in job_scores if isinstance(s, Exception))
                continue
            best, record, negatives = self._rank(rs, job_scores, i)
            self._advance(rs[0].job, i, rs[best].result, rs[best].changed, errors, record,
                          negatives)

    def _score(self, views: list[JudgeView], per_job: int) -> list[dict[str, Any] | Exception]:
        """The judge's scores of the views in one batch; if that call raises, job by job (so a
        raising judge fails the samples it could not score, not the batch)."""
        if not views:
            return []
        try:
            scored = self.judge.score_batch(views)
        except Exception as exc:
            if len(views) <= per_job:
                return [exc] * len(views)
            return [s for start in range(0, len(views), per_job)
                    for s in self._score(views[start:start + per_job], per_job)]
        return [s if isinstance(s, dict) else {"error": str(s)[:200]} for s in scored]

    def _rank(self, rs: list[Request], scores: list[dict[str, Any]], i: int):
        def rank(k: int) -> tuple[float, float, int]:
            s = scores[k]
            sub_score = (s.get("sub_edits") or [None])[0]
            overall = s.get("overall")
            return (-1.0 if sub_score is None else float(sub_score),
                    -1.0 if overall is None else float(overall), -k)

        best = max(range(len(rs)), key=rank)
        job = rs[0].job
        record = {"sub_edit": i, "chosen": best, "judge": f"{self.judge.name}@{self.judge.version}",
                  "candidates": [{"candidate": r.candidate, "seed": r.seed,
                                  "scores": _brief(scores[k])} for k, r in enumerate(rs)]}
        negatives = [{"sub_edit": i, "candidate": r.candidate, "chosen_candidate": best,
                      "seed": r.seed, "scores": _brief(scores[k]),
                      "chosen_scores": _brief(scores[best]), "text": job.sample.sub_edits[i].text,
                      "source": r.previous, "chosen": rs[best].result, "rejected": r.result}
                     for k, r in enumerate(rs) if k != best]
        return best, record, negatives

    @staticmethod
    def _advance(job: _Job, i: int, image: np.ndarray, changed: np.ndarray,
                 errors: dict[int, Exception] | None = None, record=None, negatives=()) -> None:
        if not changed.any():
            exc = ValueError(f"sub-edit {i} ({job.sample.sub_edits[i].text!r}) changes no pixel")
            if errors is None:
                raise exc
            errors[id(job.sample)] = exc
            return
        job.image = image
        job.masks.append(changed)
        if record is not None:
            job.log.append(record)
            job.preference.extend(negatives)

    def _finish(self, job: _Job) -> None:
        sample = job.sample
        for sub, changed in zip(sample.sub_edits, job.masks):
            sub.mask = changed
            sub.box = bbox(changed)
        sample.target = job.image
        sample.background_mask = ~np.logical_or.reduce(job.masks)
        sample.defects = []
        sample.provenance["editor"] = self.provenance()
        sample.provenance["pair"] = "generative"  # composited: outside the regions, exact
        if job.log:
            sample.provenance["candidates"] = job.log
            sample.private["preference"] = job.preference


@dataclass(eq=False)
class _Job:
    """One sample being edited: the image so far and what each applied sub-edit left."""

    sample: EditSample
    image: np.ndarray
    masks: list[np.ndarray] = field(default_factory=list)
    log: list[dict[str, Any]] = field(default_factory=list)
    preference: list[dict[str, Any]] = field(default_factory=list)


@dataclass(eq=False)
class Request:
    """One candidate of sub-edit `i` of one sample: an item of a backend's batch."""

    job: _Job
    backend: GenerativeEditor
    i: int
    candidate: int
    seed: int
    region: np.ndarray
    result: np.ndarray | None = None  # the candidate: the frame composited onto `previous`
    changed: np.ndarray | None = None  # its changed pixels (within the region)

    @property
    def sample(self) -> EditSample:
        return self.job.sample

    @property
    def previous(self) -> np.ndarray:
        """The image before this sub-edit."""
        return self.job.image


def _brief(scores: dict[str, Any]) -> dict[str, Any]:
    keys = ("sub_edits", "background", "quality", "overall", "error")
    return {k: scores[k] for k in keys if k in scores}


class PipelineEditor(GenerativeEditor):
    """A generative backend around one diffusers pipeline from a local directory: the settings
    every such backend shares (steps, guidance, device and dtype, working size, negative prompt),
    checked once, and the working size they all use."""

    def __init__(self, path: str, steps: int, guidance: float, device: str, dtype: str, max_side: int,
                 negative_prompt: str, candidates: int, feather: int, seed: int, judge: str,
                 judge_options: dict[str, Any] | None, batch_size: int):
        super().__init__(candidates, feather, seed, judge, judge_options, batch_size)
        _check_common(steps, guidance, max_side)
        from pipeline.model_actors import open_model  # (it imports this module)

        # in-process, or a client of the build's model actor serving this model (flows.execute)
        self.model = open_model(path, device, dtype)
        self.steps, self.guidance, self.max_side = steps, float(guidance), max_side
        self.negative_prompt = negative_prompt

    def work_size(self, image: np.ndarray) -> tuple[int, int]:
        return work_size(image.shape[1], image.shape[0], self.max_side)

    def models(self) -> list:
        return [self.model]


class InpaintEditor(PipelineEditor):
    backend = "inpaint"

    def __init__(self, path: str, steps: int = 30, guidance: float = 7.5, device: str = "cpu",
                 dtype: str = "float32", max_side: int = 1024, grow: int = FEATHER_PX,
                 strength: float = 1.0, negative_prompt: str = "", candidates: int = 1,
                 feather: int = FEATHER_PX, seed: int = 0, judge: str = "pixel",
                 judge_options: dict[str, Any] | None = None, batch_size: int = 8):
        if not 0 < strength <= 1:
            raise ValueError(f"strength must be within (0, 1], got {strength!r}")
        super().__init__(path, steps, guidance, device, dtype, max_side, negative_prompt,
                         candidates, feather, seed, judge, judge_options, batch_size)
        self.grow, self.strength = grow, float(strength)

    def settings(self) -> str:
        return (f"{self.model.describe()}:steps={self.steps},guidance={self.guidance:g},"
                f"strength={self.strength:g},dtype={self.model.dtype},max_side={self.max_side},"
                f"grow={self.grow},feather={self.feather}")

    def generate_batch(self, requests: list[Request]) -> list[np.ndarray]:
        from PIL import Image

        size = self.work_size(requests[0].previous)
        masks = [dilate(r.region, self.grow) if self.grow > 0 else r.region for r in requests]
        out = self.model.generate(
            [r.seed for r in requests],
            prompt=[prompt_for(r.sample, r.sample.sub_edits[r.i]) for r in requests],
            negative_prompt=[self.negative_prompt] * len(requests) if self.negative_prompt else None,
            image=[Image.fromarray(resize(r.previous, size)) for r in requests],
            mask_image=[Image.fromarray(resize(m.astype(np.uint8) * 255, size)) for m in masks],
            height=size[1], width=size[0], num_inference_steps=self.steps,
            guidance_scale=self.guidance, strength=self.strength,
        )
        return [resize(to_uint8(o), (r.previous.shape[1], r.previous.shape[0]))
                for o, r in zip(out, requests)]


def _check_common(steps: int, guidance: float, max_side: int) -> None:
    if not isinstance(steps, int) or not 1 <= steps <= 1000:
        raise ValueError(f"steps must be within 1..1000, got {steps!r}")
    if not isinstance(guidance, (int, float)) or not 0 <= guidance <= 100:
        raise ValueError(f"guidance must be within 0..100, got {guidance!r}")
    if not isinstance(max_side, int) or not 64 <= max_side <= 8192:
        raise ValueError(f"max_side must be within 64..8192, got {max_side!r}")


EDITORS.register("inpaint")(InpaintEditor)
