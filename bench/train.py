"""Training throughput of MCIE-E1's denoiser vs a plain InstructPix2Pix UNet, and the shard loader's.

    python bench/train.py --device cuda --steps 10 --variants eager,cl+tune,cl+tune+compile
    python bench/train.py --device cuda --skip loader --models mcie-e1 --variants cl+tune+compile+cudnn_attn
    python bench/train.py --flops-only --size base     # FLOPs per sample, no GPU needed (meta tensors)
    python bench/train.py --device cpu --steps 2        # tiny smoke run

Prints one JSON line per figure. The denoiser benchmark is random-init (throughput needs no
weights) with a precomputed instruction context of the connector's shape, so it needs only torch
and diffusers (no transformers, no VAE): both models get the same 8-channel latents, timesteps,
bf16 autocast and fused AdamW, and every variant is applied to BOTH models identically, with the
trainer's own functions (`trainer.kernels`): `eager`, `cl` = channels-last weights and inputs,
`tune` = cudnn.benchmark conv algorithm search, `cudnn_attn` = cuDNN's SDPA kernel tried first,
`compile` = `nn.Module.compile` of the UNet (and MCIE-E1's source encoder) as `train.compile`
does, in `--compile-mode`; joined with `+`. Compilation happens in the warm-up steps (reported
as `warmup_s`), never in the timed ones (`recompiled_in_timing` says if it did).
MFU = counted FLOPs per step (torch's FlopCounterMode over one eager step, forward + backward;
the FLOPs are the model's whatever the kernels) × steps/s ÷ the device's dense bf16 peak. `sdpa`
names the SDPA kernel each attention kind ran (attn1 self, attn2 cross; `+mask` = with a bias).
`vs_ip2p_same_variant` / `vs_ip2p_eager`: MCIE-E1 samples/s over the plain UNet's in the same
variant / in plain eager. The loader benchmark writes spec-conformant shards to a temp dir and
streams them with `trainer.data` (webdataset) using every core.

Imports: torch, numpy, PIL, diffusers (denoiser part), webdataset (loader part), trainer.*.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tarfile
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.config import COMPILE_MODES  # noqa: E402  (after the path insert)

PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "H800": 989.4, "A100": 312.0, "L40S": 362.0,
                    "A10": 125.0, "L4": 121.0, "4090": 165.2}


def emit(**figures) -> None:
    print(json.dumps(figures), flush=True)


def peak_tflops(device: torch.device, given: float | None) -> float | None:
    if given:
        return given
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


# ---- denoiser ---------------------------------------------------------------------------------

VARIANT_OPTIONS = {"eager": frozenset(), "compile": frozenset({"compile"}),
                   "cl": frozenset({"channels_last"}), "channels_last": frozenset({"channels_last"}),
                   "tune": frozenset({"cudnn_benchmark"}), "cudnn_benchmark": frozenset({"cudnn_benchmark"}),
                   "cudnn_attn": frozenset({"cudnn_attn"})}
OPTION_ORDER = ("channels_last", "cudnn_benchmark", "cudnn_attn", "compile")
MODELS = ("ip2p", "mcie-e1")


def parse_variants(text: str, compile_all: bool = False, channels_last_all: bool = False) -> list[tuple[str, frozenset]]:
    """`eager,cl,cl+compile` → [(name, options)]; `--compile` / `--channels-last` add to each."""
    variants = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        options = set()
        for token in item.split("+"):
            if token not in VARIANT_OPTIONS:
                raise ValueError(f"unknown variant option {token!r} in {item!r} "
                                 "(eager, cl, tune, cudnn_attn, compile)")
            options |= VARIANT_OPTIONS[token]
        options |= {"compile"} if compile_all else set()
        options |= {"channels_last"} if channels_last_all else set()
        name = "+".join(o for o in OPTION_ORDER if o in options) or "eager"
        if name not in [n for n, _ in variants]:
            variants.append((name, frozenset(options)))
    if not variants:
        raise ValueError("no variants given")
    return variants


def make_models(size: str, **overrides):
    """(model config, plain UNet, MCIE-E1 UNet, source encoder); `overrides` replace model config
    fields (e.g. background_grid, source_feature_dim)."""
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0

    from trainer.attention import install_mcie_processors
    from trainer.config import preset
    from trainer.model import SourceEncoder, build_unet

    model_cfg = replace(preset(size).model, unet_path=None, **overrides)
    plain = UNet2DConditionModel(**model_cfg.unet)
    plain.set_attn_processor(AttnProcessor2_0())
    mcie = build_unet(model_cfg)
    install_mcie_processors(mcie, model_cfg.source_feature_dim, model_cfg.background_grid)
    source_encoder = SourceEncoder(4, model_cfg.source_feature_dim)
    return model_cfg, plain, mcie, source_encoder


def mcie_inputs(cfg, batch: int, latent: int, device):
    """(context, region_masks, token_regions, background) of the connector's shapes."""
    from trainer.attention import GLOBAL_TOKEN

    tokens = cfg.global_queries + cfg.max_sub_edits * cfg.sub_queries
    labels = torch.full((batch, tokens), GLOBAL_TOKEN, device=device)
    labels[:, cfg.global_queries:] = torch.arange(cfg.max_sub_edits, device=device).repeat_interleave(cfg.sub_queries)
    regions = torch.zeros(batch, cfg.max_sub_edits, latent, latent, device=device)
    quarter = latent // 4
    for s in range(cfg.max_sub_edits):  # one box per sub-instruction
        regions[:, s, s * quarter:(s + 2) * quarter, quarter:3 * quarter] = 1
    background = 1 - regions.amax(1, keepdim=True)
    context = torch.randn(batch, tokens, cfg.unet["cross_attention_dim"], device=device)
    return context, regions, labels, background


class PlainDenoiser(torch.nn.Module):
    """InstructPix2Pix: the UNet on [noisy, source] latents with a CLIP-length text context."""

    def __init__(self, unet, context):
        super().__init__()
        self.unet = unet
        self.register_buffer("context", context, persistent=False)

    def compiled_parts(self):
        return (self.unet,)

    def forward(self, noisy, timesteps, source):
        return self.unet(torch.cat([noisy, source], 1), timesteps, encoder_hidden_states=self.context).sample


class MCIEDenoiser(torch.nn.Module):
    """MCIE-E1's denoiser: source encoder + UNet with both MCIE cross-attentions; the condition
    reaches the UNet's processors through `cross_attention_kwargs`, as in `MCIEE1.denoise`."""

    def __init__(self, unet, source_encoder, context, regions, labels, background):
        super().__init__()
        self.unet, self.source_encoder = unet, source_encoder
        for name, tensor in (("context", context), ("regions", regions), ("labels", labels),
                             ("background", background)):
            self.register_buffer(name, tensor, persistent=False)

    def compiled_parts(self):
        return self.unet, self.source_encoder  # what the trainer compiles

    def forward(self, noisy, timesteps, source):
        from trainer.attention import CrossAttnCondition

        condition = CrossAttnCondition(region_masks=self.regions, token_regions=self.labels,
                                       background=self.background,
                                       source_features=self.source_encoder(source))
        return self.unet(torch.cat([noisy, source], 1), timesteps, encoder_hidden_states=self.context,
                         cross_attention_kwargs={"mcie": condition}).sample


class SDPARecorder:
    """Context manager: which SDPA kernel each attention kind ran (`attn1` self-attention, `attn2`
    cross-attention), seen at dispatch, with whether a mask/bias was passed. `math` = no fused
    kernel (decomposed into matmuls)."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils.module_tracker import ModuleTracker

        recorder = self
        self.tracker = ModuleTracker()
        self.kernels: dict[str, set] = {}

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                recorder.record(str(func.overloadpacket), args, kwargs or {})
                return func(*args, **(kwargs or {}))

        self.mode = Mode()

    def record(self, op: str, args, kwargs) -> None:
        kinds = {p.rsplit(".", 1)[-1] for p in self.tracker.parents} & {"attn1", "attn2"}
        if not kinds:
            return
        kernels = self.kernels.setdefault(kinds.pop(), set())
        if "_scaled_dot_product_" in op and not op.endswith("_backward"):
            kernel = op.split("_scaled_dot_product_", 1)[1]
            masked = len(args) > 3 and isinstance(args[3], torch.Tensor) or kwargs.get("attn_bias") is not None \
                or kwargs.get("attn_mask") is not None
            kernels.add(kernel + ("+mask" if masked else ""))

    def __enter__(self):
        self.tracker.__enter__()
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)
        self.tracker.__exit__(*exc)

    def summary(self) -> dict[str, list[str]]:
        return {kind: sorted(k) or ["math"] for kind, k in sorted(self.kernels.items())}


def model_overrides(args) -> dict:
    return {k: v for k, v in (("background_grid", args.background_grid),
                              ("source_feature_dim", args.source_feature_dim)) if v is not None}


def build_denoisers(size: str, batch: int, latent: int, device, overrides: dict):
    cfg, plain, mcie, source_encoder = make_models(size, **overrides)
    context, regions, labels, background = mcie_inputs(cfg, batch, latent, device)
    plain_context = torch.randn(batch, 77, cfg.unet["cross_attention_dim"], device=device)
    return cfg, {"ip2p": PlainDenoiser(plain, plain_context),
                 "mcie-e1": MCIEDenoiser(mcie, source_encoder, context, regions, labels, background)}


def training_step_flops(module, batch: int, latent: int, device) -> int:
    """FLOPs of one forward + backward, counted by torch (shapes only: works on meta tensors)."""
    from torch.utils.flop_counter import FlopCounterMode

    noisy = torch.randn(batch, 4, latent, latent, device=device)
    t = torch.randint(0, 1000, (batch,), device=device)
    with FlopCounterMode(display=False) as counter:
        module(noisy, t, noisy.clone()).float().pow(2).mean().backward()
    return counter.get_total_flops()


def vae_encode_flops(resolution: int) -> int:
    """FLOPs of one SD-1.5 VAE encode (the trainer encodes source and target every step)."""
    from diffusers import AutoencoderKL
    from torch.utils.flop_counter import FlopCounterMode

    from trainer.config import sd_vae

    with torch.device("meta"):
        vae = AutoencoderKL(**sd_vae())
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        vae.encode(torch.randn(1, 3, resolution, resolution, device="meta")).latent_dist.mode()
    return counter.get_total_flops()


def count_flops(args) -> None:
    """FLOPs per training sample of both denoisers, on meta tensors: no memory, no GPU. At the
    base size also the frozen VAE's encode of one image, which the trainer does twice per sample."""
    size = args.size or "base"
    resolution = args.resolution or (512 if size == "base" else 32)
    latent = resolution // (8 if size == "base" else 2)
    device = torch.device("meta")
    _, models = build_denoisers(size, 1, latent, device, model_overrides(args))
    per_sample = {}
    for name in args.models:
        per_sample[name] = training_step_flops(models[name].to(device), 1, latent, device)
        figures = dict(bench="flops", model=name, size=size, resolution=resolution,
                       gflops_per_sample=round(per_sample[name] / 1e9, 3), **model_overrides(args))
        if name != "ip2p" and "ip2p" in per_sample:
            figures["vs_ip2p"] = round(per_sample[name] / per_sample["ip2p"], 4)
        emit(**figures)
    if size == "base":
        emit(bench="flops", model="sd-vae-encode", size=size, resolution=resolution,
             gflops_per_image=round(vae_encode_flops(resolution) / 1e9, 3))


def top_ops(step, sync, device, count: int) -> list[dict]:
    """Where two steps' time goes: the `count` ops (kernels, on a GPU) with the most self time,
    as shares of the total — what to optimise next."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        for _ in range(2):
            step()
        sync()
    events = profiler.key_averages()
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    total = sum(getattr(e, attr) for e in events) or 1
    ranked = sorted(events, key=lambda e: getattr(e, attr), reverse=True)[:count]
    return [{"op": e.key[:100], "share": round(getattr(e, attr) / total, 4), "calls": e.count} for e in ranked]


def bench_denoiser(args, device) -> None:
    import torch._dynamo.utils
    from torch.utils.flop_counter import FlopCounterMode

    from trainer import kernels

    variants = parse_variants(args.variants, args.compile, args.channels_last)
    size = "base" if device.type == "cuda" or args.size == "base" else "tiny"
    batch = args.batch or (32 if size == "base" else 2)
    resolution = args.resolution or (512 if size == "base" else 32)
    latent = resolution // (8 if size == "base" else 2)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    fused = device.type == "cuda"
    _, models = build_denoisers(size, batch, latent, device, model_overrides(args))
    peak = peak_tflops(device, args.peak_tflops)
    flops: dict[str, int] = {}
    speed: dict[tuple[str, str], float] = {}

    def run(name: str, variant: str, options: frozenset) -> None:
        module = models[name]
        layout = torch.channels_last if "channels_last" in options else torch.contiguous_format
        module.to(device=device, memory_format=layout)
        kernels.set_conv_autotune("cudnn_benchmark" in options)
        module.train()
        params = list(module.parameters())
        optimizer = torch.optim.AdamW(params, lr=1e-5, fused=fused)
        generator = torch.Generator(device=device).manual_seed(0)

        def step():
            latents = torch.randn(batch, 4, latent, latent, device=device, generator=generator)
            src = torch.randn(batch, 4, latent, latent, device=device, generator=generator)
            t = torch.randint(0, 1000, (batch,), device=device, generator=generator)
            latents, src = latents.contiguous(memory_format=layout), src.contiguous(memory_format=layout)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32), \
                    kernels.attention_backends("cudnn_attn" in options):
                pred = module(latents, t, src)
                loss = torch.nn.functional.mse_loss(pred.float(), latents)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        def sync():
            if device.type == "cuda":
                torch.cuda.synchronize()

        # One eager step names the attention kernels of this variant; FLOPs are the model's,
        # whatever the kernels, so they are counted once.
        with FlopCounterMode(display=False) as counter, SDPARecorder() as recorder:
            step()
        flops.setdefault(name, counter.get_total_flops())
        kernels_used = recorder.summary()
        if "compile" in options:
            kernels.compile_modules(args.compile_mode, *module.compiled_parts())
        counters = torch._dynamo.utils.counters
        graphs_before, breaks_before = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
        sync()
        started = time.perf_counter()
        for _ in range(args.warmup):  # includes compilation
            step()
        sync()
        warmup_s = time.perf_counter() - started
        graphs_warm = counters["stats"]["unique_graphs"]
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        for _ in range(args.steps):
            step()
        sync()
        step_s = (time.perf_counter() - started) / args.steps
        speed[(name, variant)] = batch / step_s
        achieved = flops[name] / step_s / 1e12
        figures = dict(
            bench="denoiser", model=name, variant=variant, size=size, device=str(device),
            device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            batch=batch, resolution=resolution, dtype=str(dtype).removeprefix("torch."),
            params_m=round(sum(p.numel() for p in params) / 1e6, 1), steps=args.steps,
            step_ms=round(step_s * 1000, 1), samples_per_s=round(batch / step_s, 2),
            tflops_per_step=round(flops[name] / 1e12, 4), achieved_tflops=round(achieved, 1),
            mfu=round(achieved / peak, 4) if peak else None,
            peak_mem_gib=round(torch.cuda.max_memory_allocated(device) / 2**30, 1)
            if device.type == "cuda" else None,
            warmup_s=round(warmup_s, 1), sdpa=kernels_used, **model_overrides(args))
        if "compile" in options:
            figures.update(compile_mode=args.compile_mode, graphs=graphs_warm - graphs_before,
                           recompiled_in_timing=counters["stats"]["unique_graphs"] - graphs_warm,
                           graph_breaks=sum(counters["graph_break"].values()) - breaks_before)
        if name != "ip2p":
            if ("ip2p", variant) in speed:
                figures["vs_ip2p_same_variant"] = round(speed[(name, variant)] / speed[("ip2p", variant)], 3)
            if ("ip2p", "eager") in speed:
                figures["vs_ip2p_eager"] = round(speed[(name, variant)] / speed[("ip2p", "eager")], 3)
        if args.profile:
            figures["top_ops"] = top_ops(step, sync, device, args.profile)
        emit(**figures)

    def reset(name: str) -> None:
        """Back to an eager module on the host, so the next variant starts from the same place."""
        for part in models[name].compiled_parts():
            part._compiled_call_impl = None  # undoes nn.Module.compile (torch keeps it there)
        models[name].to("cpu")
        torch._dynamo.reset()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    for variant, options in variants:
        for name in args.models:
            try:
                run(name, variant, options)
            except Exception as exc:  # noqa: BLE001  a compiler error or an OOM in one variant
                # must not cost the other figures; the error is printed as that variant's figure
                emit(bench="denoiser", model=name, variant=variant, error=f"{type(exc).__name__}: {exc}"[:2000])
            finally:
                reset(name)


# ---- loader -----------------------------------------------------------------------------------

def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def write_bench_shards(folder: Path, shards: int, per_shard: int, size: int, seed: int = 0) -> None:
    """Spec-conformant train shards of random shapes (members KEY.json, .source.png, ...)."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for shard in range(shards):
        with tarfile.open(folder / f"train-{shard:06d}.tar", "w") as tar:
            for i in range(per_shard):
                key = f"b{shard:04d}-{i:06d}"
                background = tuple(int(c) for c in rng.integers(150, 255, 3))
                source = Image.new("RGB", (size, size), background)
                draw = ImageDraw.Draw(source)
                for _ in range(6):
                    x, y, r = rng.integers(0, size, 2).tolist() + [int(rng.integers(size // 20, size // 8))]
                    draw.ellipse([x - r, y - r, x + r, y + r], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
                target, masks = source.copy(), []
                for _ in range(int(rng.integers(1, 4))):
                    x, y, r = rng.integers(size // 8, size - size // 8, 2).tolist() + [size // 10]
                    mask = Image.new("L", (size, size), 0)
                    ImageDraw.Draw(mask).rectangle([x - r, y - r, x + r, y + r], fill=255)
                    target.paste(tuple(int(c) for c in rng.integers(0, 255, 3)), mask=mask)
                    masks.append(np.asarray(mask))
                union = np.max(np.stack(masks), 0)
                meta = {"id": key, "instruction": " then ".join(f"edit {j}" for j in range(len(masks))),
                        "sub_edits": [{"type": "recolor", "text": f"edit {j}", "target": "", "object_ids": [],
                                       "params": {}, "box": None} for j in range(len(masks))],
                        "scores": {}, "verdict": "accept", "provenance": {"source": "bench"}}
                members = {"json": json.dumps(meta).encode(), "source.png": _png(np.asarray(source)),
                           "target.png": _png(np.asarray(target)), "edit_mask.png": _png(union)}
                members.update({f"mask_{j}.png": _png(m) for j, m in enumerate(masks)})
                for suffix, data in members.items():
                    info = tarfile.TarInfo(f"{key}.{suffix}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


def bench_loader(args, device) -> None:
    from trainer.config import preset, with_train
    from trainer.data import make_loader

    size = "base" if device.type == "cuda" or args.size == "base" else "tiny"
    config = preset(size)
    resolution = args.resolution or config.model.resolution
    workers = args.loader_workers if args.loader_workers is not None else (os.cpu_count() or 1)
    batch = args.batch or (32 if size == "base" else 4)
    config = with_train(config, num_workers=workers, batch_size=batch, shuffle_buffer=64)
    model = replace(config.model, resolution=resolution)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "shards"
        shards = max(4, workers)
        started = time.perf_counter()
        write_bench_shards(folder, shards, args.loader_samples // shards + 1, max(resolution, 64))
        written = time.perf_counter() - started
        loader, state = make_loader(Path(tmp), config.train, model)
        batches = iter(loader)
        next(batches)  # worker start-up is not throughput
        started = time.perf_counter()
        count = 0
        for _ in range(args.loader_batches):
            count += next(batches)["source"].shape[0]
        elapsed = time.perf_counter() - started
        del batches
    emit(bench="loader", workers=workers, batch=batch, resolution=resolution,
         samples=count, samples_per_s=round(count / elapsed, 1), shard_write_s=round(written, 1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps per model")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--size", choices=["tiny", "base"], help="default: base on GPU, tiny on CPU")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--resolution", type=int)
    parser.add_argument("--peak-tflops", type=float, help="dense bf16 peak for MFU (auto for H100/H200/A100)")
    parser.add_argument("--loader-workers", type=int, help="default: every core")
    parser.add_argument("--loader-samples", type=int, default=256, help="samples written for the loader run")
    parser.add_argument("--loader-batches", type=int, default=12)
    parser.add_argument("--variants", default="eager",
                        help="comma list of kernel settings run for each model, each a '+' join of "
                             "eager, cl (channels-last), tune (cudnn.benchmark), cudnn_attn, compile; "
                             "e.g. eager,cl+tune,cl+tune+compile")
    parser.add_argument("--compile", action="store_true", help="torch.compile every variant")
    parser.add_argument("--compile-mode", default="default", choices=[m for m in COMPILE_MODES if m != "off"])
    parser.add_argument("--models", default=",".join(MODELS),
                        help=f"comma list of {', '.join(MODELS)} (ip2p first gives the ratios)")
    parser.add_argument("--background-grid", type=int, help="MCIE-E1 model override")
    parser.add_argument("--source-feature-dim", type=int, help="MCIE-E1 model override")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="also list the N ops with the most self time (GPU kernels on a GPU)")
    parser.add_argument("--flops-only", action="store_true",
                        help="only count FLOPs per sample (meta tensors: any machine, no GPU)")
    parser.add_argument("--channels-last", action="store_true", help="channels-last for every variant")
    parser.add_argument("--skip", choices=["denoiser", "loader"], action="append", default=[])
    args = parser.parse_args(argv)
    try:
        parse_variants(args.variants)
    except ValueError as exc:
        parser.error(str(exc))
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not args.models or set(args.models) - set(MODELS):
        parser.error(f"--models takes a comma list of {', '.join(MODELS)}")
    if args.flops_only:
        count_flops(args)
        return 0
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench/train.py: error: --device cuda but no GPU is available", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    if "denoiser" not in args.skip:
        bench_denoiser(args, device)
    if "loader" not in args.skip:
        bench_loader(args, device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
