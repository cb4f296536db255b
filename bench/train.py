"""Training throughput of MCIE-E1's denoiser vs a plain InstructPix2Pix UNet, and the shard loader's.

    python bench/train.py --device cuda --steps 10      # base size, batch 32 at 512 px, bf16
    python bench/train.py --device cpu --steps 2        # tiny smoke run

Prints one JSON line per figure. The denoiser benchmark is random-init (throughput needs no
weights) with a precomputed instruction context of the connector's shape, so it needs only torch
and diffusers (no transformers, no VAE): both models get the same 8-channel latents, timesteps,
bf16 autocast and fused AdamW. MFU = counted FLOPs per step (torch's FlopCounterMode, forward +
backward) × steps/s ÷ the device's dense bf16 peak. The loader benchmark writes spec-conformant
shards to a temp dir and streams them with `trainer.data` (webdataset) using every core.

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

def make_models(size: str):
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0

    from trainer.attention import install_mcie_processors
    from trainer.config import preset
    from trainer.model import SourceEncoder, build_unet

    model_cfg = replace(preset(size).model, unet_path=None)
    plain = UNet2DConditionModel(**model_cfg.unet)
    plain.set_attn_processor(AttnProcessor2_0())
    mcie = build_unet(model_cfg)
    install_mcie_processors(mcie, model_cfg.source_feature_dim, model_cfg.background_grid)
    source_encoder = SourceEncoder(4, model_cfg.source_feature_dim)
    return model_cfg, plain, mcie, source_encoder


def mcie_inputs(cfg, batch: int, latent: int, device):
    from trainer.attention import GLOBAL_TOKEN, CrossAttnCondition

    tokens = cfg.global_queries + cfg.max_sub_edits * cfg.sub_queries
    labels = torch.full((batch, tokens), GLOBAL_TOKEN, device=device)
    labels[:, cfg.global_queries:] = torch.arange(cfg.max_sub_edits, device=device).repeat_interleave(cfg.sub_queries)
    regions = torch.zeros(batch, cfg.max_sub_edits, latent, latent, device=device)
    quarter = latent // 4
    for s in range(cfg.max_sub_edits):  # one box per sub-instruction
        regions[:, s, s * quarter:(s + 2) * quarter, quarter:3 * quarter] = 1
    background = 1 - regions.amax(1, keepdim=True)
    context = torch.randn(batch, tokens, cfg.unet["cross_attention_dim"], device=device)

    def condition(features):
        return CrossAttnCondition(region_masks=regions, token_regions=labels, background=background,
                                  source_features=features)

    return context, condition


def bench_denoiser(args, device) -> None:
    from torch.utils.flop_counter import FlopCounterMode

    size = "base" if device.type == "cuda" or args.size == "base" else "tiny"
    cfg, plain, mcie, source_encoder = make_models(size)
    batch = args.batch or (32 if size == "base" else 2)
    resolution = args.resolution or cfg.resolution
    latent = resolution // (8 if size == "base" else 2)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    fused = device.type == "cuda"
    mcie_context, condition = mcie_inputs(cfg, batch, latent, device)
    plain_context = torch.randn(batch, 77, cfg.unet["cross_attention_dim"], device=device)
    peak = peak_tflops(device, args.peak_tflops)

    def runner(name):
        if name == "ip2p":
            unet, extra = plain.to(device), []

            def forward(x, t, src):
                return unet(x, t, encoder_hidden_states=plain_context).sample
        else:
            unet, extra = mcie.to(device), list(source_encoder.to(device).parameters())

            def forward(x, t, src):
                features = source_encoder(src)
                return unet(x, t, encoder_hidden_states=mcie_context,
                            cross_attention_kwargs={"mcie": condition(features)}).sample
        params = list(unet.parameters()) + extra
        optimizer = torch.optim.AdamW(params, lr=1e-5, fused=fused)
        generator = torch.Generator(device=device).manual_seed(0)

        def step():
            latents = torch.randn(batch, 4, latent, latent, device=device, generator=generator)
            src = torch.randn(batch, 4, latent, latent, device=device, generator=generator)
            t = torch.randint(0, 1000, (batch,), device=device, generator=generator)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                pred = forward(torch.cat([latents, src], 1), t, src)
                loss = torch.nn.functional.mse_loss(pred.float(), latents)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return unet, params, step

    for name in ("ip2p", "mcie-e1"):
        unet, params, step = runner(name)
        unet.train()
        for _ in range(args.warmup):
            step()
        with FlopCounterMode(display=False) as counter:
            step()
        flops = counter.get_total_flops()
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        for _ in range(args.steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - started
        step_s = elapsed / args.steps
        achieved = flops / step_s / 1e12
        emit(bench="denoiser", model=name, size=size, device=str(device),
             device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
             batch=batch, resolution=resolution, dtype=str(dtype).removeprefix("torch."),
             params_m=round(sum(p.numel() for p in params) / 1e6, 1), steps=args.steps,
             step_ms=round(step_s * 1000, 1), samples_per_s=round(batch / step_s, 2),
             tflops_per_step=round(flops / 1e12, 4), achieved_tflops=round(achieved, 1),
             mfu=round(achieved / peak, 4) if peak else None,
             peak_mem_gib=round(torch.cuda.max_memory_allocated(device) / 2**30, 1)
             if device.type == "cuda" else None)
        unet.to("cpu")
        del step, params
        if device.type == "cuda":
            torch.cuda.empty_cache()


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
    parser.add_argument("--skip", choices=["denoiser", "loader"], action="append", default=[])
    args = parser.parse_args(argv)
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
