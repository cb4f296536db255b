"""The MCIE-E1 training loop (accelerate) and the `mcie train` subcommand.

`OUT_CKPT/checkpoint-{step}/` holds accelerate's state (trained weights, optimiser, RNG states),
`ema.safetensors` (with `train.ema_decay`), `config.json` and, written last as the completion mark,
`trainer_state.json` (step, every rank's loader position, the EMA's step); beside them the model
in diffusers layout (`unet/` or `transformer/` / `transformer_lora/`, `scheduler/`, `connector/`, ...,
see `trainer.export`), with the
weights inference uses (the EMA's when kept). The learning-rate
schedule is a function of the step, so it needs no state. Re-running with the same
`--out` resumes from the newest checkpoint and trains up to `--steps` in total; only the newest
`checkpoint_limit` checkpoints are kept. The loader resumes by position (see `trainer.data`).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import storage
from trainer import kernels
from trainer.cache import check_cache
from trainer.checkpoints import CONFIG_FILE, EMA_FILE, STATE_FILE, checkpoints, latest_checkpoint
from trainer.config import Config, ConfigError
from trainer.data import LoaderState, find_shards, make_loader

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"  # one line per logged step; after a resume a step may appear again


@dataclass
class TrainResult:
    step: int
    losses: dict[int, float] = field(default_factory=dict)  # step → loss, for steps run now
    resumed_from: int | None = None
    samples_per_s: float = 0.0  # from the second step of this run on (the first compiles); 0 for one
    main_process: bool = True  # False on the other ranks of a multi-process run


def _mixed_precision(setting: str) -> str:
    if setting == "auto":
        return "bf16" if torch.cuda.is_available() else "no"
    return setting


def accumulate_gradients(accelerator, model, micro_batches, loss_of) -> tuple[torch.Tensor, dict]:
    """Backward over one optimiser step's micro-batches inside `accelerator.accumulate`, which
    skips DDP's all-reduce on all but the last and divides each loss by the number of micro-batches
    (so the loss is not divided by hand as well: k micro-batches give the gradient of one k times
    larger batch). Returns their mean loss as a tensor (no host sync) and the last one's losses."""
    total, count, losses = None, 0, {}
    for batch in micro_batches:
        with accelerator.accumulate(model):
            losses = loss_of(batch)
            accelerator.backward(losses["loss"])
        loss = losses["loss"].detach().float()
        total = loss if total is None else total + loss
        count += 1
    return total / count, losses


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Tensors (and the cached encodings) to the device, except the uint8 source that the MLLM's
    image processor reads on CPU."""
    moved = {}
    for key, value in batch.items():
        if isinstance(value, dict):
            value = _to_device(value, device)
        elif isinstance(value, torch.Tensor) and key != "source_uint8":
            value = value.to(device, non_blocking=True)
        moved[key] = value
    return moved


class Trainer:
    def __init__(self, data: str | Path, config: Config, out: str | Path,
                 val_data: str | Path | None = None, val_bench: str | Path | None = None):
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState

        # weight directories as absolute paths: the checkpoint's config.json loads from anywhere
        config = Config(config.model.resolved(), config.train)
        self.data = storage.location(data)  # a folder or a bucket prefix (pipeline/storage.py)
        self.val_data = storage.location(val_data) if val_data is not None else None
        if self.val_data is not None:
            find_shards(self.val_data)  # a wrong --val-data fails now, not at the first evaluation
        self.val_bench = Path(val_bench) if val_bench is not None else None
        if self.val_bench is not None:
            from pipeline.ciebench.cases import read_index

            read_index(self.val_bench)  # a wrong --val-bench fails now (BenchError), not at step 0
        self.config = config
        self.out = Path(out)
        train = config.train
        # accelerate keeps one AcceleratorState per process and refuses an Accelerator with another
        # mixed precision; a process that trains twice (a notebook, a sweep) starts it anew. The
        # process group (PartialState) is kept.
        AcceleratorState._reset_state()
        self.accelerator = Accelerator(mixed_precision=_mixed_precision(train.mixed_precision),
                                       gradient_accumulation_steps=train.grad_accum)
        frozen_dtype = torch.bfloat16 if self.accelerator.mixed_precision == "bf16" else torch.float32
        # check_cache refuses a cache made for another model or dtype; with every input cached,
        # the frozen VAE and MLLM never run and stay off the GPU
        inputs = [folder for folder in (self.data, self.val_data) if folder is not None]
        self.cached = all([check_cache(folder, config, frozen_dtype) for folder in inputs])
        if self.cached:
            log.info("training on cached frozen encodings: the VAE and the MLLM are skipped")
        from accelerate.utils import set_seed

        from trainer.build import build_model

        # noise, timesteps and dropout draws, different on each rank (else every rank of a DDP run
        # draws the same noise for its own samples); resume restores the RNG states
        set_seed(train.seed, device_specific=True)

        model = build_model(config.model, frozen_dtype)
        self._speed_up(model)
        fused = self.accelerator.device.type == "cuda"
        optimizer = torch.optim.AdamW(model.parameter_groups(train.learning_rate, train.new_learning_rate),
                                      lr=train.learning_rate, weight_decay=train.weight_decay, fused=fused)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.raw_model = self.accelerator.unwrap_model(self.model)
        if not self.cached:
            self.raw_model.frozen.to(self.accelerator.device, frozen_dtype)
        self.step = 0
        self.loader_state: LoaderState | None = None
        self.resumed_from: int | None = None
        self.ema = None  # set up by fit: the schedule needs the run's steps, the EMA the resumed weights
        self.lr_schedule = None

    def _speed_up(self, model) -> None:
        """The kernel settings `bench/train.py` (UNet) and `bench/dit_train.py` (DiT) measure (see
        `trainer.kernels`)."""
        train = self.config.train
        vae = model.frozen.vae  # frozen, but it encodes 2 images per sample (≈ 1.1 TFLOP each at 512 px)
        if hasattr(model, "flow_timesteps"):
            model.flow_timesteps = train.flow_timesteps
        if train.gradient_checkpointing:
            model.denoiser.enable_gradient_checkpointing()
        if train.channels_last and not self.config.model.is_dit:  # a DiT has no convolution to speak of
            kernels.to_channels_last(model.unet, model.source_encoder, model.region_decoder, vae)
        if self.accelerator.device.type == "cuda":
            kernels.set_conv_autotune(True)  # fixed shapes: every batch has the same size
            torch.backends.cuda.matmul.allow_tf32 = True  # the parts autocast leaves in float32
            torch.backends.cudnn.allow_tf32 = True
        kernels.compile_modules(train.compile, model.denoiser, model.source_encoder, vae.encoder)

    # ---- checkpoints --------------------------------------------------------------------------

    def resume(self) -> dict | None:
        """Load the newest checkpoint, if any; returns its trainer state."""
        path = latest_checkpoint(self.out)
        if path is None:
            return None
        # through the dataclass: a checkpoint written before a model field existed has its default
        saved = Config.from_json(json.loads((path / CONFIG_FILE).read_text())).to_json()
        if saved["model"] != self.config.to_json()["model"]:
            raise ConfigError(f"{path} was trained with a different model config; use another --out")
        self.accelerator.load_state(str(path))
        state = json.loads((path / STATE_FILE).read_text())
        self.step = int(state["step"])
        self.loader_state = LoaderState.from_json(state["loader"][self.accelerator.process_index])
        self.resumed_from = self.step
        state["path"] = str(path)
        log.info("resumed from %s (step %d)", path, self.step)
        return state

    def save(self, loader_state: LoaderState) -> Path:
        acc = self.accelerator
        path = self.out / f"checkpoint-{self.step}"
        acc.save_state(str(path))
        # every rank's loader position, gathered so any rank can resume its own
        positions = [loader_state.to_json()]
        if acc.num_processes > 1:
            from accelerate.utils import gather_object

            positions = gather_object(positions)
        if acc.is_main_process:
            from trainer.export import save_pretrained

            state = {"step": self.step, "loader": positions}
            weights = None
            if self.ema is not None:
                weights = self._save_ema_weights(path)
                state["ema_step"] = self.ema.optimization_step
            save_pretrained(self.raw_model, path, weights, "ema" if weights is not None else "trained")
            (path / CONFIG_FILE).write_text(json.dumps(self.config.to_json(), indent=2))
            (path / STATE_FILE).write_text(json.dumps(state))  # last: marks the checkpoint complete
            (self.out / CONFIG_FILE).write_text(json.dumps(self.config.to_json(), indent=2))
            for _, old in checkpoints(self.out)[: -self.config.train.checkpoint_limit]:
                shutil.rmtree(old)
        acc.wait_for_everyone()
        log.info("saved %s", path)
        return path

    # ---- the loop -------------------------------------------------------------------------------

    def fit(self, steps: int) -> TrainResult:
        from tqdm.auto import tqdm

        acc, train = self.accelerator, self.config.train
        self.out.mkdir(parents=True, exist_ok=True)
        self.lr_schedule = self._lr_schedule(steps)
        resumed = self.resume()
        self._fast_forward_schedule()
        self.ema = self._ema(resumed)
        result = TrainResult(step=self.step, resumed_from=self.resumed_from,
                             main_process=acc.is_main_process)
        if self.step >= steps:
            log.info("already at step %d >= %d: nothing to do", self.step, steps)
            return result
        loader, state = make_loader(self.data, train, self.config.model, self.loader_state,
                                    acc.process_index, acc.num_processes)
        batches = iter(loader)
        drops = (train.text_drop, train.image_drop, train.both_drop)
        regions = (train.box_region_prob, train.predicted_region_prob)
        if self.val_bench is not None and self.step == 0:
            self.validate_edits()  # the "before" figures
        self.model.train()
        bar = tqdm(total=steps, initial=self.step, disable=not acc.is_local_main_process, desc="train")
        # Throughput counts from the end of this run's first step, which compiles and autotunes.
        started, samples, first = time.perf_counter(), 0, True

        def micro_batches():
            nonlocal samples
            for _ in range(train.grad_accum):
                batch = next(batches)
                state.advance(batch)
                samples += batch["source"].shape[0] * acc.num_processes
                yield _to_device(batch, acc.device)

        def loss_of(batch):
            with acc.autocast(), kernels.attention_backends(train.cudnn_attention):
                return self.model(batch, edit_weight=train.edit_weight, mask_loss_weight=train.mask_loss_weight,
                                  drops=drops, regions=regions)

        while self.step < steps:
            mean_loss, losses = accumulate_gradients(acc, self.model, micro_batches(), loss_of)
            if train.max_grad_norm > 0:
                acc.clip_grad_norm_(self.model.parameters(), train.max_grad_norm)
            self.optimizer.step()
            self.lr_schedule.step()
            if self.ema is not None:
                self.ema.step(dict(self.raw_model.trained_named_parameters()))
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            total = mean_loss.item()  # the one host sync of a step
            if not math.isfinite(total):
                raise FloatingPointError(f"loss is {total} at step {self.step}")
            result.losses[self.step] = total
            if first:
                started, samples, first = time.perf_counter(), 0, False
            throughput = samples / max(time.perf_counter() - started, 1e-9)
            bar.update(1)
            bar.set_postfix(loss=f"{total:.4f}", samples_s=f"{throughput:.1f}")
            if self.step % train.log_every == 0 or self.step == steps:
                self._log_metrics(total, losses, throughput)
            if self.val_data is not None and self.step % (train.eval_every or train.checkpoint_every) == 0:
                self.validate()
            every = train.bench_every or train.eval_every or train.checkpoint_every
            if self.val_bench is not None and (self.step % every == 0 or self.step == steps):
                self.validate_edits()
            if self.step % train.checkpoint_every == 0 or self.step == steps:
                self.save(state)
        bar.close()
        result.step = self.step
        result.samples_per_s = samples / max(time.perf_counter() - started, 1e-9)
        return result

    @torch.no_grad()
    def validate(self) -> dict[str, float] | None:
        """Mean losses over the first `eval_batches` batches of --val-data, on the main process.
        Every evaluation sees the same samples, noise and timesteps (a fixed seed, no dropout), in
        a forked RNG, so the figures are comparable across steps and training's own draws — hence
        an exact resume — are untouched."""
        acc, train = self.accelerator, self.config.train
        figures = None
        if acc.is_main_process:
            loader, _ = make_loader(self.val_data, replace(train, num_workers=0), self.config.model)
            devices = [acc.device] if acc.device.type == "cuda" else []
            sums = {"loss": 0.0, "diffusion": 0.0, "regions": 0.0}
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(train.seed)
                for batch, _ in zip(loader, range(train.eval_batches)):
                    with acc.autocast(), kernels.attention_backends(train.cudnn_attention):
                        losses = self.raw_model(_to_device(batch, acc.device), edit_weight=train.edit_weight,
                                                mask_loss_weight=train.mask_loss_weight)
                    for key in sums:
                        sums[key] += losses[key].float().item() / train.eval_batches
            figures = {"step": self.step, **{f"val_{k}": round(v, 6) for k, v in sums.items()}}
            log.info("step %(step)d validation loss %(val_loss).5f (diffusion %(val_diffusion).5f, "
                     "regions %(val_regions).5f)", figures)
            self._append_metrics(figures)
        acc.wait_for_everyone()
        return figures

    @torch.no_grad()
    def validate_edits(self) -> dict[str, Any] | None:
        """Edits sampled on the first `bench_cases` cases of --val-bench (a CIE-Bench directory),
        scored by `trainer.evaluate` with the pixel judge: instruction compliance (IC) and
        background consistency (BC) logged beside the loss, the report kept under
        OUT/val-bench/step-N. The same cases and seed every time, in a forked RNG (training's draws,
        hence an exact resume, are untouched), with the current trained weights."""
        from trainer.edit import edit_image
        from trainer.evaluate import evaluate

        acc, train = self.accelerator, self.config.train
        figures = None
        if acc.is_main_process:
            model = self.raw_model
            model.eval()

            def editor(image, instruction):
                from PIL import Image

                with acc.autocast():
                    result, _ = edit_image(model, Image.fromarray(image, "RGB"), instruction,
                                           steps=train.bench_steps, seed=train.seed)
                return np.asarray(result.convert("RGB"))

            devices = [acc.device] if acc.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                summary, report = evaluate(self.val_bench, editor=editor, limit=train.bench_cases, examples=4,
                                           out=self.out / "val-bench" / f"step-{self.step}")
            model.train()
            bc = summary["background_consistency"]
            figures = {"step": self.step, "val_ic": round(summary["instruction_compliance"], 6),
                       "val_bc": None if bc is None else round(bc, 6), "val_cases": summary["cases"],
                       "val_failed_cases": summary["failed_cases"]}
            log.info("step %(step)d edits on the validation bench: IC %(val_ic)s BC %(val_bc)s", figures)
            self._append_metrics(figures)
        acc.wait_for_everyone()
        return figures

    def _trained_names(self) -> list[str]:
        """The names of the trained weights (what the EMA holds)."""
        return [name for name, _ in self.raw_model.trained_named_parameters()]

    def _ema(self, resumed: dict | None):
        """The EMA of the trained weights (`trainer.ema`: diffusers' EMAModel for the weights
        trained in full, its decay warming up as (1+n)/(10+n); for each LoRA adapter the EMA of
        B·A, kept factored at the adapter's rank), None when train.ema_decay is 0. It resumes from
        the checkpoint's `ema.safetensors` (by parameter name) and `ema_step`; a checkpoint without
        them (EMA switched on later) starts it from the resumed weights."""
        if self.config.train.ema_decay <= 0:
            return None
        from safetensors.torch import load_file

        from trainer.ema import TrainedWeightsEMA

        ema = TrainedWeightsEMA(list(self.raw_model.trained_named_parameters()), self.config.train.ema_decay)
        ema.to(self.accelerator.device)
        saved = Path(resumed["path"]) / EMA_FILE if resumed else None
        if saved is not None and saved.is_file() and "ema_step" in resumed:
            weights = load_file(str(saved), device=str(self.accelerator.device))
            if set(self._trained_names()) != set(weights):
                raise ConfigError(f"{saved} does not hold this model's trained weights")
            ema.load_state_dict(weights)
            ema.optimization_step = int(resumed["ema_step"])
        elif resumed:
            log.info("no EMA in %s: the EMA starts from the resumed weights", resumed["path"])
        return ema

    def _save_ema_weights(self, path: Path) -> dict[str, torch.Tensor]:
        from safetensors.torch import save_file

        weights = {name: shadow.detach().cpu().contiguous() for name, shadow in self.ema.state_dict().items()}
        save_file(weights, str(path / EMA_FILE))
        return weights

    def _lr_schedule(self, steps: int):
        """diffusers' schedule (warm-up, then constant, or cosine / linear down to 0 at
        `lr_decay_steps`, else at this run's `steps`), stepped once per optimiser step. Set
        `lr_decay_steps` to extend a decaying run later with a larger --steps and keep its schedule."""
        from diffusers.optimization import get_scheduler

        train = self.config.train
        return get_scheduler(train.lr_schedule, self.optimizer, num_warmup_steps=train.lr_warmup_steps,
                             num_training_steps=train.lr_decay_steps or steps)

    def _fast_forward_schedule(self) -> None:
        """The schedule is a function of the step alone: after a resume, set it to the step (the
        config's learning rate and schedule apply, whatever the checkpoint was trained with)."""
        if self.step:
            self.lr_schedule.last_epoch = self.step - 1
            with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": intended
                warnings.simplefilter("ignore", UserWarning)
                self.lr_schedule.step()

    def _log_metrics(self, total: float, losses: dict, throughput: float) -> None:
        figures = {"step": self.step, "loss": round(total, 6),
                   "diffusion": round(losses["diffusion"].item(), 6),
                   "regions": round(losses["regions"].item(), 6),
                   "lr": self.lr_schedule.get_last_lr()[0], "samples_per_s": round(throughput, 2)}
        log.info("step %(step)d loss %(loss).5f (diffusion %(diffusion).5f, regions %(regions).5f) "
                 "lr %(lr).3g %(samples_per_s).1f samples/s", figures)
        if self.accelerator.is_main_process:
            self._append_metrics(figures)

    def _append_metrics(self, figures: dict) -> None:
        with open(self.out / METRICS_FILE, "a") as metrics:
            metrics.write(json.dumps(figures) + "\n")


def train(data: str | Path, config: Config, out: str | Path, steps: int,
          val_data: str | Path | None = None, val_bench: str | Path | None = None) -> TrainResult:
    return Trainer(data, config, out, val_data, val_bench).fit(steps)
