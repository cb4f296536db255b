"""Training throughput, MFU and memory of MCIE-E1 on a flow-matching DiT editor (issue 19).

    python bench/dit_train.py --device cpu --size tiny --steps 2    # dry run: tiny configs, CPU, ≈ 10 s
    python bench/dit_train.py --flops-only --size tiny               # counted FLOPs per sample only

Issue 19 GPU figures: one run on one H100/H200 (CUDA torch there; diffusers, peft and their
dependencies as wheels in .whl/, made with the `pip download` line in bench/device_check.sh and
passed in the device tool's `carry`). Every figure is printed as one JSON line as soon as it is
measured; what the deadline leaves out is printed as `dit_skip`:

    python3 -m pip install -q --no-index --no-deps --target /tmp/mcie-site .whl/*.whl
    PYTHONPATH=/tmp/mcie-site:$PWD python3 bench/dit_train.py --budget-s 400 | tee out/dit_train.jsonl
    # the 20B figures alone (≈ 5 min): add --backbone qwen-image-edit; MCIE's memory with flex: --attention flex,sdpa
    DEVICE=cuda bash bench/device_check.sh   # its last step runs this within ≤ 240 s of its budget

What one backbone's run measures, in this order: (1) counted FLOPs per training sample of both
variants at each resolution; (2) training samples/s, MFU and peak memory at 512 and 1024 px for
`plain-lora` (the diffusers transformer, its own attention processors, LoRA) and `mcie-lora` (the
SAME transformer with MCIE-E1's processors installed: spatial mask + background injection with
the gates at `--gate`, LoRA + the new modules trained), once per `--attention` kind ("sdpa" dense
mask, "flex" BlockMask, when `JointCondition` has an `attention` field); each `mcie-lora` line
carries `vs_plain` (its samples/s over plain's, target ≥ 0.95) and `mfu` (target ≥ 0.40);
(3) for `--fit` backbones (default the 20B Qwen-Image-Edit): the largest batch whose training
step fits on this card at each resolution (predicted from two measured peaks, then tried; a CUDA
out-of-memory is caught, freed and reported).

Settings, identical for both variants (what the DiT trainer does with a released 20B/12B base):
random-init full-size configs built directly on the device in bf16 (never float32 on the host);
frozen base in bf16; LoRA rank `--rank` (alpha = rank) on the attention projections
(`trainer.dit.flow.LORA_TARGETS`) and MCIE's modules as float32 master weights
(diffusers' `cast_training_params`); forward under bf16 autocast; flow-matching loss in float32
(`trainer.dit.flow`); gradient checkpointing of every block (`--no-gradient-checkpointing` to
drop it); AdamW, fused on CUDA. Inputs: packed latents of px/16 × px/16 tokens per image (8× VAE,
2×2 packing), target then source; `--text-tokens` text tokens, a global head (¼), `--spans`
sub-instruction spans (⅝) and a global tail, no padding; `--spans` rectangular regions covering
`--region-fraction` of the image, background the rest.
MFU = model FLOPs per step (torch's FlopCounterMode over one eager forward + backward, attention
counted dense whatever the mask) × steps/s ÷ the card's dense bf16 peak (`bench/train.py`'s
table; null without a known peak). The count runs at batch 1 on 1- and 2-layer copies of the
config and is extrapolated per layer (exact: blocks of one kind are identical), so it needs
neither the full model's activations nor checkpointing; `hfu` adds the recomputed forward of
the checkpointed blocks. `sdpa` names the attention kernels seen in the counted step.

Imports: torch, diffusers, peft, trainer.dit.*, bench/train.py (emit, the peak table).
"""

from __future__ import annotations

import os

if __name__ == "__main__":  # before torch starts CUDA: one allocator setting for every run
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import argparse
import dataclasses
import functools
import gc
import importlib
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.train import emit, peak_tflops  # noqa: E402  (after the path insert)

BACKBONES = ("qwen-image-edit", "flux-kontext")  # Qwen first: its 20B memory figure is asked for
# Released configs (transformer/config.json of Qwen/Qwen-Image-Edit and of FLUX.1-dev, whose
# architecture FLUX.1-Kontext-dev keeps): 20.43 B and 11.90 B parameters.
FULL_CONFIGS = {
    "qwen-image-edit": dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
                            num_attention_heads=24, joint_attention_dim=3584, guidance_embeds=False,
                            axes_dims_rope=(16, 56, 56)),
    "flux-kontext": dict(patch_size=1, in_channels=64, out_channels=None, num_layers=19, num_single_layers=38,
                         attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                         pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56)),
}
DEFAULTS = {  # per size: resolutions, batch per resolution, text tokens, timed steps
    "full": dict(resolutions=(512, 1024), batch={512: 8, 1024: 2}, text_tokens=512, steps=2),
    "tiny": dict(resolutions=(64, 128), batch={64: 2, 128: 2}, text_tokens=32, steps=2),
}
PIXELS_PER_TOKEN = 16  # 8× VAE, then 2×2 latent cells packed into one token
MFU_TARGET, RATIO_TARGET = 0.40, 0.95


def is_oom(exc: BaseException) -> bool:
    """The caching allocator's OutOfMemoryError, or a library's failed workspace allocation."""
    text = str(exc)
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in text.lower() or "ALLOC_FAILED" in text


@functools.cache
def attention_kinds() -> tuple[str, ...]:
    """The attention forms `JointCondition` offers: ("sdpa", "flex") once it has an `attention`
    field, ("sdpa",) before (feature-detected, so the benchmark runs on either)."""
    from trainer.dit.condition import JointCondition

    fields = {f.name: f for f in dataclasses.fields(JointCondition)}
    if "attention" not in fields:
        return ("sdpa",)
    from trainer.dit import condition

    return tuple(getattr(condition, "ATTENTION_KINDS", ("sdpa", "flex")))


class Budget:
    """An overall deadline (None: none); what does not fit in it is skipped and said so."""

    def __init__(self, seconds: float | None):
        self.end = time.monotonic() + seconds if seconds else math.inf

    def left(self) -> float:
        return self.end - time.monotonic()

    def allows(self, needed_s: float) -> bool:
        return self.left() > needed_s

    def skipped(self, needed_s: float = 0.0) -> str:
        return f"budget: {max(self.left(), 0):.0f} s left" + (f", ≈ {needed_s:.0f} s needed" if needed_s else "")


# ---- the inputs of one batch ------------------------------------------------------------------

def span_labels(text_tokens: int, spans: int) -> list[int]:
    """Per text token: GLOBAL (-1) or its sub-instruction. A global head (¼: system prompt and
    the whole edit), `spans` equal spans over the next ⅝, a global tail (joiners, end tokens)."""
    from trainer.dit import GLOBAL_TOKEN

    head = text_tokens // 4
    length = max(1, (text_tokens * 5 // 8) // max(spans, 1))
    labels = [GLOBAL_TOKEN] * head + [s for s in range(spans) for _ in range(length)]
    if len(labels) > text_tokens:
        raise ValueError(f"{text_tokens} text tokens cannot hold {spans} spans")
    return labels + [GLOBAL_TOKEN] * (text_tokens - len(labels))


def region_masks(batch: int, spans: int, side: int, fraction: float, device) -> torch.Tensor:
    """(B, S, side, side) 0/1 at the token grid: region s is the s-th horizontal band of the
    image, `fraction` of its width, shifted per sample, so the regions cover ≈ `fraction`."""
    masks = torch.zeros(batch, spans, side, side, device=device)
    width = max(1, round(fraction * side))
    for b in range(batch):
        left = (b * side // 7) % max(1, side - width + 1)
        for s in range(spans):
            masks[b, s, s * side // spans:(s + 1) * side // spans, left:left + width] = 1
    return masks


class Batch:
    """One batch's tensors, fixed for a configuration; the noise and σ change every step."""

    def __init__(self, net: "Backbone", batch: int, px: int, text_tokens: int, spans: int, fraction: float,
                 seed: int = 0):
        config, backbone, device = net.model.config, net.name, net.device
        self.backbone, self.side = backbone, px // PIXELS_PER_TOKEN
        if self.side < 1 or px % PIXELS_PER_TOKEN:
            raise ValueError(f"resolution {px} is not a multiple of {PIXELS_PER_TOKEN}")
        self.generator = torch.Generator(device=device).manual_seed(seed)
        tokens, channels = self.side * self.side, config.in_channels
        self.target = torch.randn(batch, tokens, channels, device=device, generator=self.generator)
        self.source = torch.randn(batch, tokens, channels, device=device, generator=self.generator)
        self.text = torch.randn(batch, text_tokens, config.joint_attention_dim, device=device,
                                generator=self.generator).to(net.dtype)  # a text encoder's output
        pooled_dim = getattr(config, "pooled_projection_dim", None)
        self.pooled = (torch.randn(batch, pooled_dim, device=device, generator=self.generator)
                       if backbone == "flux-kontext" else None)
        self.labels = torch.tensor([span_labels(text_tokens, spans)] * batch, device=device)
        self.regions = region_masks(batch, spans, self.side, fraction, device)
        self.background = 1 - self.regions.amax(1, keepdim=True)
        self.batch, self.text_tokens = batch, text_tokens

    @property
    def tokens(self) -> dict:
        image = self.side * self.side
        return {"text": self.text_tokens, "target": image, "source": image, "joint": self.text_tokens + 2 * image}

    def condition(self, attention: str):
        """A fresh JointCondition per step, as a trainer builds one per batch (its masks are
        computed, and cached for the step, by the first attention that reads them)."""
        from trainer.dit import JointCondition

        extra = {} if attention == "sdpa" and attention_kinds() == ("sdpa",) else {"attention": attention}
        return JointCondition(self.labels, self.regions, self.background, (self.side, self.side),
                              source=self.source, **extra)

    def sigmas(self, count: int, device) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(σ, t/1000) for `count` steps, drawn from diffusers' logit-normal density on the host
        and moved to the device up front (no host round trip inside the timed steps)."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        from trainer.dit.flow import sample_sigmas

        scheduler = FlowMatchEulerDiscreteScheduler()
        host = torch.Generator().manual_seed(1)
        draws = [sample_sigmas(scheduler, self.batch, generator=host) for _ in range(count)]
        return [(s.to(device, torch.float32), (t / 1000).to(device, torch.float32)) for s, t in draws]


# ---- one transformer, two variants ------------------------------------------------------------

def model_class(backbone: str):
    from diffusers import FluxTransformer2DModel, QwenImageTransformer2DModel

    return FluxTransformer2DModel if backbone == "flux-kontext" else QwenImageTransformer2DModel


def backbone_config(backbone: str, size: str, **layers) -> dict:
    from trainer.dit.tiny import TINY_FLUX_KONTEXT, TINY_QWEN_IMAGE_EDIT

    tiny = {"flux-kontext": TINY_FLUX_KONTEXT, "qwen-image-edit": TINY_QWEN_IMAGE_EDIT}
    config = dict(FULL_CONFIGS[backbone] if size == "full" else tiny[backbone])
    return {**config, **layers}


def layer_counts(backbone: str, config: dict) -> tuple[int, ...]:
    """(double-stream layers,) for Qwen; (double, single) for FLUX."""
    if backbone == "flux-kontext":
        return config["num_layers"], config["num_single_layers"]
    return (config["num_layers"],)


class Backbone:
    """A random-init transformer built on `device` in bf16, with MCIE-E1's processors installed,
    LoRA added and the trainable parameters in float32; `use(variant)` swaps the attention
    processors, so plain and MCIE runs share the same weights and the same memory."""

    def __init__(self, backbone: str, config: dict, device, rank: int, gate: float, checkpointing: bool):
        from diffusers.training_utils import cast_training_params

        from trainer.dit import install_mcie_processors, mcie_parameters
        from trainer.dit.flow import add_lora

        self.name, self.device = backbone, device
        self.dtype = torch.bfloat16  # on the CPU too: the dry run takes the GPU's dtype path
        previous = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)  # built in bf16 where it lives: 20B × 4 B never exists
        try:
            with torch.device(device):
                torch.manual_seed(0)
                self.model = model_class(backbone)(**config)
        finally:
            torch.set_default_dtype(previous)
        self.plain_processors = dict(self.model.attn_processors)
        self.mcie_processors = install_mcie_processors(self.model)
        self.groups = add_lora(self.model, rank=rank, alpha=rank)
        cast_training_params(self.model, torch.float32)  # LoRA + MCIE: float32 master weights
        with torch.no_grad():
            for name, parameter in mcie_parameters(self.model).items():
                if name.endswith("gate"):
                    parameter.fill_(gate)  # injection on: its arithmetic is in every timed step
        if checkpointing:
            self.model.enable_gradient_checkpointing()
        self.model.train()
        self.variant = "mcie-lora"

    def use(self, variant: str) -> None:
        processors = self.plain_processors if variant == "plain-lora" else self.mcie_processors
        self.model.set_attn_processor(dict(processors))  # it pops from the dict it gets
        self.variant = variant

    def trainable(self) -> list[dict]:
        groups = [{"params": self.groups["lora"], "lr": 1e-6}]
        if self.variant == "mcie-lora":
            groups.append({"params": self.groups["mcie"], "lr": 1e-5})
        return groups

    def optimizer(self) -> torch.optim.AdamW:
        return torch.optim.AdamW(self.trainable(), fused=self.device.type == "cuda")

    def params(self) -> tuple[int, int]:
        """(all parameters, trainable ones) of the current variant."""
        total = sum(p.numel() for p in self.model.parameters())
        return total, sum(p.numel() for group in self.trainable() for p in group["params"])

    def forward(self, data: Batch, noisy: torch.Tensor, sigma: torch.Tensor, attention: str) -> torch.Tensor:
        """The velocity prediction for the target tokens (B, h·w, C)."""
        from trainer.dit import kontext_inputs, qwen_edit_inputs

        mcie = {"mcie": data.condition(attention)} if self.variant == "mcie-lora" else None
        if self.name == "flux-kontext":
            inputs = kontext_inputs(self.model, noisy, data.source, data.text, data.pooled, sigma)
            extra = {"joint_attention_kwargs": mcie} if mcie else {}
        else:
            inputs = qwen_edit_inputs(noisy, data.source, data.text, sigma, (data.side, data.side))
            extra = {"attention_kwargs": mcie} if mcie else {}
        return self.model(**inputs, **extra)[0][:, : noisy.shape[1]]

    def loss(self, data: Batch, sigma_t: tuple[torch.Tensor, torch.Tensor], attention: str) -> torch.Tensor:
        from trainer.dit.flow import flow_matching_loss

        sigmas, t = sigma_t
        x0 = data.target
        noise = torch.randn(x0.shape, device=x0.device, generator=data.generator)
        noisy = (1.0 - sigmas[:, None, None]) * x0 + sigmas[:, None, None] * noise  # float32
        with torch.autocast(self.device.type, dtype=torch.bfloat16):
            prediction = self.forward(data, noisy, t, attention)
        return flow_matching_loss(prediction, x0, noise, sigmas)

    def close(self) -> None:
        self.model = self.plain_processors = self.mcie_processors = self.groups = None


def free(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- counted FLOPs ----------------------------------------------------------------------------

class AttentionKernels:
    """Context manager: the attention kernels dispatched (`efficient_attention+mask`,
    `flash_attention`, ...; `math` when SDPA decomposed into matmuls), as bench/train.py's
    SDPARecorder names them."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        seen = self.seen = set()

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                name = str(func.overloadpacket)
                if "_scaled_dot_product_" in name and not name.endswith("_backward"):
                    masked = (len(args) > 3 and isinstance(args[3], torch.Tensor)) or any(
                        kwargs.get(k) is not None for k in ("attn_mask", "attn_bias"))
                    seen.add(name.split("_scaled_dot_product_", 1)[1] + ("+mask" if masked else ""))
                return func(*args, **kwargs)

        self.mode = Mode()

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)

    def names(self) -> list[str]:
        return sorted(self.seen) or ["math"]


def cpu_attention_formulas() -> dict:
    """torch's FlopCounterMode has formulas for the CUDA SDPA kernels, not for the CPU's fused
    one: the same dense formulas for it, so the CPU dry run counts attention too (a no-op on
    CUDA; empty where this torch lacks the op or the formulas' unwrapped forms)."""
    from torch.utils import flop_counter

    aten = torch.ops.aten
    pairs = (("_scaled_dot_product_flash_attention_for_cpu", "sdpa_flop"),
             ("_scaled_dot_product_flash_attention_for_cpu_backward", "sdpa_backward_flop"))
    mapping = {}
    for op, formula in pairs:
        raw = getattr(getattr(flop_counter, formula, None), "__wrapped__", None)  # before shape_wrapper
        if hasattr(aten, op) and raw is not None:
            mapping[getattr(aten, op)] = raw
    return mapping


def count_once(net: Backbone, data: Batch, attention: str) -> tuple[int, int, list[str]]:
    """(forward FLOPs, backward FLOPs, attention kernels) of one eager step of `net`'s variant."""
    from torch.utils.flop_counter import FlopCounterMode

    formulas = cpu_attention_formulas()
    sigma_t = data.sigmas(1, net.device)[0]
    with FlopCounterMode(display=False, custom_mapping=formulas) as forward, AttentionKernels() as kernels:
        loss = net.loss(data, sigma_t, attention)
    with FlopCounterMode(display=False, custom_mapping=formulas) as backward:
        loss.backward()
    net.model.zero_grad(set_to_none=True)
    return forward.get_total_flops(), backward.get_total_flops(), kernels.names()


def layer_probes(backbone: str) -> list[tuple[int, ...]]:
    """Layer counts whose FLOPs fix the per-layer slopes: base, +1 of each block kind."""
    return [(1, 1), (2, 1), (1, 2)] if backbone == "flux-kontext" else [(1,), (2,)]


def extrapolate(counts: dict[tuple[int, ...], int], layers: tuple[int, ...]) -> tuple[int, int]:
    """(total, blocks only) FLOPs at `layers` from the counts at `layer_probes`: FLOPs are
    affine in each block count (blocks of one kind have identical shapes)."""
    base = counts[(1,) * len(layers)]
    slopes = [counts[tuple(2 if j == i else 1 for j in range(len(layers)))] - base for i in range(len(layers))]
    total = base + sum((n - 1) * slope for n, slope in zip(layers, slopes))
    return total, sum(n * slope for n, slope in zip(layers, slopes))


def count_flops(backbone: str, config: dict, device, resolutions: list[int], args,
                variants: list[tuple[str, str]]) -> dict[int, dict]:
    """{px: {(variant, attention): figures}} per training sample at batch 1: `model` = forward +
    backward (no recompute), `forward`, `recompute` = the forward of the checkpointed blocks
    again, `kernels`. Counted on 1- and 2-layer copies of `config`, extrapolated to its depth."""
    layers = layer_counts(backbone, config)
    keys = ("num_layers", "num_single_layers")[: len(layers)]
    forward: dict = {}
    backward: dict = {}
    kernels: dict = {}
    for probe in layer_probes(backbone):
        net = Backbone(backbone, {**config, **dict(zip(keys, probe))}, device, args.rank, args.gate,
                       checkpointing=False)
        try:
            for px in resolutions:
                data = Batch(net, 1, px, args.text_tokens, args.spans, args.region_fraction)
                for variant, attention in variants:
                    net.use(variant)
                    f, b, k = count_once(net, data, attention)
                    forward.setdefault((px, variant, attention), {})[probe] = f
                    backward.setdefault((px, variant, attention), {})[probe] = b
                    kernels[(px, variant, attention)] = k
        finally:
            net.close()
            free(device)
    result: dict[int, dict] = {}
    for (px, variant, attention), counts in forward.items():
        fwd, fwd_blocks = extrapolate(counts, layers)
        bwd, _ = extrapolate(backward[(px, variant, attention)], layers)
        result.setdefault(px, {})[(variant, attention)] = {
            "forward": fwd, "model": fwd + bwd, "recompute": fwd_blocks, "kernels": kernels[(px, variant, attention)]}
    return result


# ---- timed training steps ---------------------------------------------------------------------

def device_name(device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def gib(n: int | None) -> float | None:
    return None if n is None else round(n / 2**30, 2)


def train_run(net: Backbone, data: Batch, attention: str, steps: int, warmup: int, budget: Budget) -> dict:
    """Warm-up steps (lazy optimizer state; for flex at least 2, its kernels compile), then timed
    steps; the timed loop stops early at the deadline (`steps_done` says how many ran), and
    `graphs_compiled_in_timing` says if torch.compile was still at work there."""
    from torch._dynamo.utils import counters

    device = net.device
    warmup = max(warmup, 2) if attention == "flex" else warmup
    optimizer = net.optimizer()
    draws = data.sigmas(warmup + steps, device)

    def step(i: int) -> torch.Tensor:
        loss = net.loss(data, draws[i], attention)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    try:
        started = time.perf_counter()
        for i in range(warmup):
            step(i)
        sync(device)
        warmup_s = time.perf_counter() - started
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        graphs = counters["stats"]["unique_graphs"]
        started, done = time.perf_counter(), 0
        for i in range(warmup, warmup + steps):
            loss = step(i)
            done += 1
            if budget.left() <= 0 and done < steps:
                break
        sync(device)
        elapsed = time.perf_counter() - started
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        return dict(warmup_steps=warmup, warmup_s=round(warmup_s, 2), steps_done=done, step_s=elapsed / done,
                    graphs_compiled_in_timing=counters["stats"]["unique_graphs"] - graphs, loss=round(float(loss), 4),
                    peak_bytes=peak, peak_mem_gib=gib(peak),
                    peak_reserved_gib=gib(torch.cuda.max_memory_reserved(device)) if device.type == "cuda" else None)
    finally:
        optimizer.zero_grad(set_to_none=True)


def peak_of_step(net: Backbone, data: Batch, attention: str, optimizer) -> int | None:
    """Peak allocated bytes of one training step, or None when it runs out of device memory
    (caught, freed: the next try starts clean)."""
    device = net.device
    sigma_t = data.sigmas(1, device)[0]
    oom, loss = False, None
    try:
        torch.cuda.reset_peak_memory_stats(device)
        loss = net.loss(data, sigma_t, attention)
        loss.backward()
        optimizer.step()
        sync(device)
    except Exception as exc:  # noqa: BLE001  only running out of memory is an answer here
        if not is_oom(exc):
            raise
        oom = True  # freed below, outside the except block: its traceback holds the step's tensors
    loss = None  # a backward cut short keeps its graph through `loss`
    optimizer.zero_grad(set_to_none=True)
    peak = None if oom else torch.cuda.max_memory_allocated(device)
    free(device)
    return peak


def largest_batch(try_batch, points: dict[int, int], capacity: int, can_try, max_tries: int = 4) -> dict:
    """The largest batch whose step fits in `capacity` bytes. `points` {batch: peak bytes} are
    measured steps (two at least); peak memory is affine in the batch, so the line through them
    predicts the limit, which is then tried (`try_batch(b)` → peak bytes, or None when out of
    memory) and corrected: after a fit the refitted prediction (at least the next batch up, at
    most 16× the largest measured), after an out-of-memory 10 % lower, until the limit is
    bracketed, `max_tries` run out or `can_try(batch)` says no."""
    points = dict(points)
    lo, hi, tries = max(points), None, []

    def predict() -> tuple[int, float, float]:
        (b1, p1), (b2, p2) = sorted(points.items())[-2:]
        per_sample = max((p2 - p1) / (b2 - b1), 1.0)
        fixed = p2 - b2 * per_sample
        return int((capacity - fixed) // per_sample), fixed, per_sample

    predicted, fixed, per_sample = predict()
    cap = 16 * lo  # a bad fit (noise in two close peaks) must not try an absurd batch
    candidate = min(max(predicted, lo + 1), cap)
    while len(tries) < max_tries and candidate > lo and (hi is None or lo + 1 < hi) and can_try(candidate):
        peak = try_batch(candidate)
        tries.append({"batch": candidate, "fits": peak is not None, "peak_gib": gib(peak)})
        if peak is not None:
            points[candidate] = peak
            lo = candidate
            refit, _, _ = predict()
            candidate = min(max(refit, lo + 1), cap)
        else:
            hi = candidate
            candidate = max(lo + 1, min(hi - 1, int(hi * 0.9)))
        if hi is not None:
            candidate = min(candidate, hi - 1)
    return dict(largest_fitting_batch=lo, smallest_failing_batch=hi, exact=hi is not None and lo + 1 == hi,
                predicted_max_batch=predicted, fixed_gib=gib(int(fixed)), per_sample_gib=round(per_sample / 2**30, 3),
                tries=tries)


# ---- one backbone -----------------------------------------------------------------------------

def batch_for(args, px: int) -> int:
    return args.batch.get(px) or args.batch.get(0) or DEFAULTS[args.size]["batch"].get(px) or 1


def measure(net: Backbone, data: Batch, px: int, variant: str, attention: str, figures: dict | None, args,
            budget: Budget, peak: float | None, stats: dict, label: dict) -> dict | None:
    """One configuration's training figures (its line, plus `step_s` and `peak_bytes` for the
    caller), or None when it was skipped or failed (its line is printed here)."""
    device, batch = net.device, data.batch
    what = f"train {px} px {variant}" + (f"/{attention}" if variant != "plain-lora" else "")
    hardware = hardware_flops(figures, args.gradient_checkpointing)
    needed = estimate_s(hardware, batch, args.warmup + args.steps, stats, peak)
    if not budget.allows(needed):
        emit(bench="dit_skip", **label, what=what, reason=budget.skipped(needed))
        return None
    if attention == "flex" and device.type == "cpu":
        emit(bench="dit_skip", **label, what=what, reason="flex_attention has no backward on the CPU")
        return None
    net.use(variant)
    error = None
    try:
        run = train_run(net, data, attention, args.steps, args.warmup, budget)
    except Exception as exc:  # noqa: BLE001  an OOM or a kernel error costs this configuration only
        error, oom = f"{type(exc).__name__}: {exc}"[:2000], is_oom(exc)
    if error is not None:  # outside the except block, whose traceback holds the step's tensors
        free(device)
        emit(bench="dit_train", **label, px=px, variant=variant, attention=attention, batch=batch, error=error, oom=oom)
        return None
    step_s = run["step_s"]
    total, trainable = net.params()
    line = dict(bench="dit_train", **label, px=px, variant=variant, attention=attention,
                device_name=device_name(device), latent_grid=data.side, tokens=data.tokens, batch=batch,
                region_share=round(float(data.regions.amax(1).mean()), 3), params_b=round(total / 1e9, 3),
                trainable_m=round(trainable / 1e6, 3), steps=args.steps, step_ms=round(step_s * 1000, 1),
                samples_per_s=round(batch / step_s, 3), **run)
    if figures is not None:
        achieved = figures["model"] * batch / step_s / 1e12
        stats["tflops"] = max(stats.get("tflops", 0.0), hardware * batch / step_s / 1e12)
        line.update(tflops_per_step=round(figures["model"] * batch / 1e12, 3), achieved_tflops=round(achieved, 1),
                    mfu=round(achieved / peak, 4) if peak else None,
                    hfu=round(hardware * batch / step_s / 1e12 / peak, 4) if peak else None,
                    sdpa=figures["kernels"] if attention == "sdpa" else ["flex_attention"])
        if peak:
            line["meets_mfu"] = line["mfu"] >= MFU_TARGET
    return line


def run_backbone(backbone: str, args, device, budget: Budget, peak: float | None, stats: dict) -> None:
    config = backbone_config(backbone, args.size)
    mcie_variants = [("mcie-lora", kind) for kind in args.attention]
    variants = [("plain-lora", "sdpa")] + mcie_variants
    label = dict(backbone=backbone, size=args.size)

    # (1) counted FLOPs: flex is counted as its dense equivalent (same FLOPs by construction),
    # never under FlopCounterMode, which a compiled flex_attention would not run under.
    counted = [(v, a) for v, a in variants if a == "sdpa"]
    flops: dict[int, dict] = {}
    if budget.allows(15 if device.type == "cuda" else 0):
        try:
            flops = count_flops(backbone, config, device, args.resolutions, args, counted)
        except Exception as exc:  # noqa: BLE001  a failed count must not cost the timed figures
            emit(bench="dit_flops", **label, error=f"{type(exc).__name__}: {exc}"[:2000])
            free(device)
    else:
        emit(bench="dit_skip", **label, what="flops", reason=budget.skipped())
    for px in flops:
        for variant, attention in variants:
            figures = flops[px].get((variant, attention)) or flops[px][(variant, "sdpa")]
            emit(bench="dit_flops", **label, px=px, variant=variant, attention=attention,
                 gflops_per_sample=round(figures["model"] / 1e9, 3),
                 gflops_forward_per_sample=round(figures["forward"] / 1e9, 3),
                 gflops_recompute_per_sample=round(figures["recompute"] / 1e9, 3),
                 sdpa=figures["kernels"] if attention == "sdpa" else ["flex_attention"])
    if args.flops_only:
        return

    # (2) throughput, MFU, peak memory
    if not budget.allows(30 if device.type == "cuda" else 0):
        emit(bench="dit_skip", **label, what="training runs", reason=budget.skipped())
        return
    started = time.perf_counter()
    net = Backbone(backbone, config, device, args.rank, args.gate, args.gradient_checkpointing)
    sync(device)
    total, _ = net.params()
    emit(bench="dit_config", **label, model=type(net.model).__name__, config=config,
         params_b=round(total / 1e9, 3), build_s=round(time.perf_counter() - started, 1),
         device=str(device), device_name=device_name(device), peak_tflops=peak,
         capacity_gib=gib(torch.cuda.get_device_properties(device).total_memory) if device.type == "cuda" else None,
         dtype="bf16 base, float32 LoRA + MCIE modules, bf16 autocast", lora_rank=args.rank,
         gradient_checkpointing=args.gradient_checkpointing, gate=args.gate, attention=list(args.attention),
         alloc_conf=os.environ.get("PYTORCH_CUDA_ALLOC_CONF"), torch=torch.__version__)
    measured: dict[tuple, dict] = {}
    try:
        for px in args.resolutions:
            batch = batch_for(args, px)
            data = Batch(net, batch, px, args.text_tokens, args.spans, args.region_fraction)
            for variant, attention in variants:
                figures = flops.get(px, {}).get((variant, attention)) or flops.get(px, {}).get((variant, "sdpa"))
                line = measure(net, data, px, variant, attention, figures, args, budget, peak, stats, label)
                if line is None:
                    continue
                plain = measured.get((px, "plain-lora", "sdpa"))
                if variant != "plain-lora" and plain:
                    line["vs_plain"] = round(line["samples_per_s"] / plain["samples_per_s"], 3)
                    line["meets_ratio"] = line["vs_plain"] >= RATIO_TARGET
                measured[(px, variant, attention)] = line
                emit(**{k: v for k, v in line.items() if k not in ("step_s", "peak_bytes")})
            del data
            free(device)
        emit(bench="dit_summary", **label, figures=summary(measured))

        # (3) the largest batch that fits (CUDA only: the CPU has no bounded device memory)
        if backbone in args.fit:
            attention = args.attention[0]
            if device.type != "cuda":
                emit(bench="dit_skip", **label, what="fit", reason="the largest batch is a device-memory figure (CUDA)")
                return
            net.use("mcie-lora")
            for px in args.resolutions:
                fit(net, backbone, px, attention, args, budget, measured, flops, stats, peak, label)
    finally:
        net.close()
        free(device)


def summary(measured: dict) -> list[dict]:
    """The headline figures of one backbone, one entry per (px, variant, attention) measured."""
    keys = ("px", "variant", "attention", "batch", "samples_per_s", "vs_plain", "mfu", "hfu", "peak_mem_gib")
    return [{k: line.get(k) for k in keys if k in line} for line in measured.values()]


def hardware_flops(figures: dict | None, checkpointing: bool) -> int | None:
    """FLOPs a training sample costs the hardware: the model's, plus the recomputed forward of
    the checkpointed blocks."""
    return None if figures is None else figures["model"] + (figures["recompute"] if checkpointing else 0)


def estimate_s(flops_per_sample: float | None, batch: int, steps: int, stats: dict, peak: float | None) -> float:
    """Seconds `steps` steps should take: at the best rate seen so far, else at 30 % of the peak;
    0 when neither is known (the CPU dry run: bounded by its work)."""
    rate = stats.get("tflops") or (0.3 * peak if peak else None)
    if flops_per_sample is None or not rate:
        return 0.0
    return flops_per_sample * batch * steps / (rate * 1e12)


def fit(net: Backbone, backbone: str, px: int, attention: str, args, budget: Budget, measured: dict, flops: dict,
        stats: dict, peak: float | None, label: dict) -> None:
    device = net.device
    figures = flops.get(px, {}).get(("mcie-lora", "sdpa"))
    per_sample = hardware_flops(figures, args.gradient_checkpointing)
    what = f"fit {px} px"
    if not budget.allows(estimate_s(per_sample, 2, 3, stats, peak) + 5):
        emit(bench="dit_skip", **label, what=what, reason=budget.skipped())
        return
    optimizer = net.optimizer()
    try:
        def try_batch(batch: int) -> int | None:
            data = Batch(net, batch, px, args.text_tokens, args.spans, args.region_fraction)
            try:
                result = peak_of_step(net, data, attention, optimizer)
            finally:
                del data
                free(device)
            emit(bench="dit_fit_try", **label, px=px, attention=attention, batch=batch, fits=result is not None,
                 peak_mem_gib=gib(result))
            return result

        # optimizer state exists from here on, as in training
        peak_of_step(net, Batch(net, 1, px, args.text_tokens, args.spans, args.region_fraction), attention, optimizer)
        timed = measured.get((px, "mcie-lora", attention))
        points = {}
        # two measured peaks fix the line: batch 1 and the timed run's batch (same variant, same
        # optimizer state), or batch 2 when the timed run is missing or was at batch 1
        wide = timed["batch"] if timed and timed["batch"] > 1 and timed["peak_bytes"] else None
        for batch in (1,) if wide else (1, 2):
            result = try_batch(batch)
            if result is None:
                emit(bench="dit_fit", **label, px=px, attention=attention, largest_fitting_batch=batch - 1,
                     smallest_failing_batch=batch, exact=True)
                return
            points[batch] = result
        if wide:
            points[wide] = timed["peak_bytes"]
        free_bytes, total_bytes = torch.cuda.mem_get_info(device)
        capacity = free_bytes + torch.cuda.memory_reserved(device)  # what the allocator could hold
        result = largest_batch(try_batch, points, capacity,
                               lambda b: budget.allows(estimate_s(per_sample, b, 1, stats, peak) + 5),
                               max_tries=args.fit_tries)
        emit(bench="dit_fit", **label, px=px, attention=attention, capacity_gib=gib(capacity),
             card_gib=gib(total_bytes), timed_batch=timed and timed["batch"],
             timed_peak_mem_gib=timed and timed["peak_mem_gib"], **result)
    finally:
        optimizer.zero_grad(set_to_none=True)
        free(device)


# ---- command line -----------------------------------------------------------------------------

def parse_batch(text: str) -> dict[int, int]:
    """`8` (every resolution) or `512:8,1024:2` → {px: batch} ({0: b} for every resolution)."""
    batches = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        px, _, batch = item.rpartition(":")
        batches[int(px) if px else 0] = int(batch)
        if batches[int(px) if px else 0] < 1:
            raise ValueError("batch sizes must be >= 1")
    return batches


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", choices=["full", "tiny"], help="default: full on CUDA, tiny elsewhere")
    parser.add_argument("--backbone", default=",".join(BACKBONES), help=f"comma list of {', '.join(BACKBONES)}")
    parser.add_argument("--resolutions", help="comma list of pixel sides (default 512,1024; tiny 64,128)")
    parser.add_argument("--batch", help="per-resolution batch, e.g. 512:8,1024:2, or one number (default 512:8,1024:2)")
    parser.add_argument("--text-tokens", type=int, help="text tokens per sample (default 512; tiny 32)")
    parser.add_argument("--spans", type=int, default=3, help="sub-instruction spans and regions per sample")
    parser.add_argument("--region-fraction", type=float, default=0.3, help="share of the image the regions cover")
    parser.add_argument("--rank", type=int, default=64, help="LoRA rank on the attention projections")
    parser.add_argument("--gate", type=float, default=0.5, help="background-injection gate (0 = off)")
    parser.add_argument("--attention", help="comma list of sdpa, flex (default: every kind JointCondition offers)")
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--steps", type=int, help="timed steps per configuration (default 2)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (flex: at least 2, it compiles)")
    parser.add_argument("--fit", default="qwen-image-edit",
                        help="backbones whose largest fitting batch is searched (comma list, or none)")
    parser.add_argument("--fit-tries", type=int, default=3, help="batches tried beyond the two measured per resolution")
    parser.add_argument("--budget-s", type=float, default=480.0,
                        help="overall deadline in seconds; what does not fit is skipped and said so (0: none)")
    parser.add_argument("--peak-tflops", type=float, help="dense bf16 peak for MFU (auto for H100/H200/A100)")
    parser.add_argument("--flops-only", action="store_true", help="only the counted FLOPs per sample")
    args = parser.parse_args(argv)
    if args.size is None:
        args.size = "full" if args.device.startswith("cuda") else "tiny"
    defaults = DEFAULTS[args.size]
    try:
        args.backbone = [b.strip() for b in args.backbone.split(",") if b.strip()]
        if not args.backbone or set(args.backbone) - set(BACKBONES):
            raise ValueError(f"--backbone takes a comma list of {', '.join(BACKBONES)}")
        args.fit = [] if args.fit.strip() == "none" else [b.strip() for b in args.fit.split(",") if b.strip()]
        if set(args.fit) - set(BACKBONES):
            raise ValueError(f"--fit takes a comma list of {', '.join(BACKBONES)}, or none")
        args.resolutions = ([int(r) for r in args.resolutions.split(",") if r.strip()] if args.resolutions
                            else list(defaults["resolutions"]))
        if not args.resolutions or any(r < PIXELS_PER_TOKEN or r % PIXELS_PER_TOKEN for r in args.resolutions):
            raise ValueError(f"--resolutions must be multiples of {PIXELS_PER_TOKEN}")
        args.batch = parse_batch(args.batch) if args.batch else {}
        kinds = attention_kinds()
        args.attention = [a.strip() for a in args.attention.split(",") if a.strip()] if args.attention else list(kinds)
        if not args.attention or set(args.attention) - set(kinds):
            raise ValueError(f"--attention takes a comma list of {', '.join(kinds)} (what JointCondition offers here)")
        args.text_tokens = args.text_tokens or defaults["text_tokens"]
        args.steps = args.steps or defaults["steps"]
        span_labels(args.text_tokens, args.spans)
        if not 0 < args.region_fraction < 1 or args.spans < 1 or args.rank < 1 or args.warmup < 0 or args.steps < 1:
            raise ValueError("--region-fraction in (0, 1); --spans, --rank, --steps >= 1; --warmup >= 0")
    except ValueError as exc:
        parser.error(str(exc))
    return args


def main(argv: list[str] | None = None) -> int:
    try:  # before the arguments: checking --attention already imports trainer.dit (diffusers)
        for name in ("diffusers", "peft"):
            importlib.import_module(name)
    except ImportError as exc:
        emit(bench="dit_config", error=f"{exc} (bench/device_check.sh names the wheels to carry)")
        return 1
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench/dit_train.py: error: --device cuda but no GPU is available", file=sys.stderr)
        return 2
    if device.type != "cuda" and args.size == "full" and not args.flops_only:  # --flops-only builds 1-2 layers
        print("bench/dit_train.py: error: --size full needs a GPU (20B parameters); use --size tiny "
              "(or --flops-only: counted on 1- and 2-layer copies)", file=sys.stderr)
        return 2
    if device.type == "cpu" and args.size == "tiny":
        torch.set_num_threads(1)  # toy-sized ops gain nothing from threads, and lose a lot on a busy machine
    budget = Budget(args.budget_s)
    peak = peak_tflops(device, args.peak_tflops)
    stats: dict = {}
    started = time.perf_counter()
    for backbone in args.backbone:
        try:
            run_backbone(backbone, args, device, budget, peak, stats)
        except Exception as exc:  # noqa: BLE001  e.g. the model build out of memory: the next backbone still runs
            free(device)
            emit(bench="dit_config", backbone=backbone, size=args.size, error=f"{type(exc).__name__}: {exc}"[:2000])
    emit(bench="dit_done", elapsed_s=round(time.perf_counter() - started, 1),
         budget_left_s=None if math.isinf(budget.left()) else round(budget.left(), 1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
