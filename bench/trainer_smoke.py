"""The trainer's own GPU path in about a minute: tiny MCIE-E1 with bf16 autocast, fused AdamW,
channels-last, torch.compile, cuDNN attention and an EMA, trained 3 steps, checkpointed, resumed to
6, the checkpoint loaded back for inference; then `mcie train-cache` and 2 steps on the cache.

    python bench/trainer_smoke.py                 # cuda when available, else the CPU (float32)
    python bench/trainer_smoke.py --backbone qwen-image-edit   # the same on a tiny DiT (flex on CUDA)
    python bench/trainer_smoke.py --ic-bc 400     # tiny MCIE-E1 on the CPU: IC/BC before and after

    python bench/trainer_smoke.py --regions 2000  # the region decoder learns "in the top left"

    python bench/trainer_smoke.py --speed base 20 # GPU: `base`, random weights, samples/s with and without train-cache

`--speed SIZE STEPS` runs `trainer.train` itself for STEPS steps twice — on shards of random
shapes at the model's resolution, then on their `mcie train-cache` — and prints the samples/s of a
full step (from the second step on) of each, and the cache's time. `base` is built randomly: the
SD-1.5-size UNet and VAE from configs, and a Qwen2.5-VL shaped like the 3B (36 layers, width 2048;
a 32-block vision tower) with the byte-level tokenizer, built on the GPU; eager unless
`--compile MODE`; `--batch N` (default `base`'s 32). `tiny` is the CPU dry run of the same path.

`--regions STEPS` trains only the region path of tiny MCIE-E1 (MLLM frozen and random; connector,
source encoder, region decoder) on scenes of two identical red squares in two different quadrants,
told "remove the square in the top left" (or another quadrant), and prints the share of the
predicted probability mass on the named square and on the other one, and how much of each the
predicted region (what the UNet is shown) covers, on 64 new scenes, before and after (`--lr`,
default 1e-3; `--seed` of the training scenes).

`--ic-bc STEPS` trains the tiny model for STEPS steps on procedural train shards made by the
factory's own source, composer, editor and shard writer, with a CIE-Bench slice as --val-bench:
edits are sampled on it before training and every 100 steps, and the IC/BC figures printed (one
JSON line per evaluation, from the run's metrics.jsonl).

`--backbone flux-kontext | qwen-image-edit` runs the default check on the tiny DiT instead, with
gradient checkpointing and, on CUDA, the compiled flex_attention mask (`model.attention = flex`),
and first compares one bf16 prediction of the flex and the dense-mask model (`flex_vs_sdpa`).

`bench/train.py` measures the denoiser alone; this runs `trainer.train` itself, with the loader on
spec-conformant shards written to a temp dir. Prints one JSON line; exit 1 when a loss is not
finite or the resume did not continue.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _bench_train():
    spec = importlib.util.spec_from_file_location("bench_train", Path(__file__).with_name("train.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ic_bc(steps: int, samples: int = 512, cases: int = 16, out: str | None = None) -> int:
    from pipeline.ciebench.cases import BenchConfig, build_bench
    from pipeline.compose.procedural import Composer
    from pipeline.dataset.shards import write_tar
    from pipeline.editors.procedural import ProceduralEditor
    from pipeline.sources.procedural import ProceduralSource
    from trainer.config import preset, with_train
    from trainer.train import METRICS_FILE, train

    torch.set_num_threads(1)  # two shared cores: intra-op threads spin against each other
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(out or tmp)
        (root / "build" / "shards").mkdir(parents=True, exist_ok=True)
        source, composer, editor = ProceduralSource(64), Composer(1, 4), ProceduralEditor(defect_rate=0.0)
        for unit in range(samples // 32):
            made = editor(composer([source.make(7, i) for i in range(unit * 32, (unit + 1) * 32)]))
            kept = [s for s in made if not s.failed]
            for sample in kept:
                sample.verdict, sample.verdict_by = "accept", "judge"
            write_tar(root / "build" / "shards" / f"train-{unit:06d}.tar", kept)
        build_bench(root / "bench", BenchConfig(count=cases, resolution=64))
        config = with_train(preset("tiny"), batch_size=8, checkpoint_every=steps, bench_every=100,
                            bench_cases=cases, bench_steps=10, mixed_precision="no")
        started = time.perf_counter()
        result = train(root / "build", config, root / "ckpt", steps, val_bench=root / "bench")
        seconds = time.perf_counter() - started
        for line in (root / "ckpt" / METRICS_FILE).read_text().splitlines():
            figures = json.loads(line)
            if "val_ic" in figures:
                print(json.dumps({"check": "ic_bc", **figures}))
        print(json.dumps({"check": "ic_bc", "steps": steps, "train_samples": samples, "bench_cases": cases,
                          "last_loss": result.losses[max(result.losses)], "seconds": round(seconds, 1)}))
    return 0


CORNERS = {"top left": (0, 0), "top right": (0, 1), "bottom left": (1, 0), "bottom right": (1, 1)}


def _two_squares(rng, count: int, size: int = 32, side: int = 6):
    """`count` scenes of two identical squares in two different quadrants; the instruction names one."""
    import numpy as np

    from trainer.data import to_tensor

    images, texts, masks = [], [], torch.zeros(count, 4, size, size)
    names = list(CORNERS)
    for n in range(count):
        image = np.full((size, size, 3), 90, np.uint8)
        picked = rng.choice(4, 2, replace=False)
        which = int(rng.integers(2))
        for k, corner in enumerate(picked):
            row, col = CORNERS[names[corner]]
            y = row * size // 2 + int(rng.integers(1, size // 2 - side - 1))
            x = col * size // 2 + int(rng.integers(1, size // 2 - side - 1))
            image[y:y + side, x:x + side] = (230, 60, 40)
            masks[n, 0 if k == which else 1, y:y + side, x:x + side] = 1  # slot 1: the other square
        images.append(image)
        texts.append([f"remove the square in the {names[picked[which]]}"])
    images = np.stack(images)
    return images, torch.stack([to_tensor(im) for im in images]), texts, masks


def regions(steps: int, batch: int = 16) -> int:
    import numpy as np
    import torch.nn.functional as F

    from trainer.config import preset
    from trainer.build import build_model

    torch.set_num_threads(1)
    model = build_model(preset("tiny").model)
    params = [p for name, p in model.trained_named_parameters() if not name.startswith("unet.")]
    lr, seed = float(_option("--lr", "1e-3")), int(_option("--seed", "0"))
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    held_out = _two_squares(np.random.default_rng(1), 64)

    @torch.no_grad()
    def on_target() -> float:
        images, source, texts, masks = held_out
        cond = model.condition(source, texts, images, background=None, region_masks=None)
        predicted = cond.condition.region_masks[:, 0]  # what the UNet would be shown (dilated)
        named, other = F.adaptive_avg_pool2d(masks, predicted.shape[-2:])[:, :2].unbind(1)
        probability = cond.region_logits[:, 0].sigmoid()

        def share(weights, of):
            return round(float(((weights * of).sum((1, 2)) / of.sum((1, 2))).mean()), 4)

        return {"probability_on_named_square": share(named, probability),
                "probability_on_other_square": share(other, probability),
                "named_square_covered": share(predicted, named),
                "other_square_covered": share(predicted, other)}

    before = on_target()
    rng, started = np.random.default_rng([seed, 0]) if seed else np.random.default_rng(0), time.perf_counter()
    for _ in range(steps):
        images, source, texts, masks = _two_squares(rng, batch)
        cond = model.condition(source, texts, images, background=None, region_masks=masks)
        masks[:, 1] = 0  # only the named square is a region
        target = F.adaptive_max_pool2d(masks, cond.region_logits.shape[-2:])[:, :1]
        loss = F.binary_cross_entropy_with_logits(cond.region_logits[:, :1], target, pos_weight=torch.tensor(4.0))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    print(json.dumps({"check": "regions", "steps": steps, "batch": batch, "lr": lr, "seed": seed, "before": before, "after": on_target(),
                      "last_loss": round(loss.item(), 5), "seconds": round(time.perf_counter() - started, 1)}))
    return 0


QWEN25_VL_3B_SHAPE = {  # random weights of the 3B's shapes (its config.json), the byte tokenizer's vocabulary
    "text": {"hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36, "num_attention_heads": 16,
             "num_key_value_heads": 2, "max_position_embeddings": 32768, "rope_theta": 1000000.0,
             "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}},
    "vision": {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "out_hidden_size": 2048,
               "fullatt_block_indexes": [7, 15, 23, 31], "window_size": 112, "patch_size": 14,
               "spatial_merge_size": 2, "temporal_patch_size": 2},
}


def _option(name: str, default: str | None) -> str | None:
    return sys.argv[sys.argv.index(name) + 1] if name in sys.argv else default


def speed(size: str, steps: int) -> int:
    from dataclasses import replace

    import trainer.mllm
    from trainer.cache import encode_build
    from trainer.config import Config, preset, sd_vae, with_train
    from trainer.train import train

    cuda = torch.cuda.is_available()
    if size == "base":
        base = preset("base")
        model = replace(base.model, unet_path=None, vae=sd_vae(), vae_path=None, mllm=QWEN25_VL_3B_SHAPE,
                        mllm_path=None)
        config = Config(model, base.train)
        if cuda:  # a 3.8 G-parameter random init is minutes on the CPU, seconds on the GPU
            build = trainer.mllm.build_tiny_mllm

            def on_gpu(spec, seed):
                with torch.device("cuda"):
                    return build(spec, seed)

            trainer.mllm.build_tiny_mllm = on_gpu
    elif size == "tiny":
        config = preset("tiny")
    else:
        raise SystemExit(f"--speed: size must be base or tiny, got {size!r}")
    batch = int(_option("--batch", str(config.train.batch_size)))
    config = with_train(config, batch_size=batch, ema_decay=0.0, checkpoint_every=steps, num_workers=2,
                        compile=_option("--compile", "off"), mixed_precision="bf16" if cuda else "no")
    figures = {"check": "train_speed", "size": size, "device": torch.cuda.get_device_name() if cuda else "cpu",
               "batch": batch, "steps": steps, "compile": config.train.compile,
               "resolution": config.model.resolution}
    with tempfile.TemporaryDirectory() as tmp:
        per_shard = -(-batch * (steps + 1) // 2)
        _bench_train().write_bench_shards(Path(tmp) / "shards", 2, per_shard, config.model.resolution)
        started = time.perf_counter()
        plain = train(tmp, config, Path(tmp) / "ckpt", steps)
        figures["train_s"] = round(time.perf_counter() - started, 1)
        figures["samples_per_s"] = round(plain.samples_per_s, 2)
        started = time.perf_counter()
        encode_build(tmp, config, Path(tmp) / "cache", batch_size=batch)
        figures["train_cache_s"] = round(time.perf_counter() - started, 1)
        cached = train(Path(tmp) / "cache", config, Path(tmp) / "ckpt-cached", steps)
        figures["cached_samples_per_s"] = round(cached.samples_per_s, 2)
        figures["losses_finite"] = all(map(math.isfinite, [*plain.losses.values(), *cached.losses.values()]))
        if cuda:
            figures["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
    print(json.dumps(figures))
    return 0 if figures["losses_finite"] else 1


def _flex_vs_sdpa(backbone: str, device: str) -> dict:
    """Largest difference between the flex and the dense-mask prediction of one tiny DiT (same
    weights, gates 0.5, two sub-instructions with regions), under bf16 autocast on CUDA."""
    import numpy as np

    from trainer.config import preset, with_model
    from trainer.dit.processors import mcie_parameters
    from trainer.build import build_model

    out = {}
    source = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    uint8 = ((source.permute(0, 2, 3, 1) + 1) * 127.5).round().byte().numpy()
    regions = torch.zeros(2, 4, 32, 32)
    regions[:, 0, 4:20, 4:20] = regions[:, 1, 16:, 8:30] = 1
    noisy = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    texts = [["make the circle blue", "remove the star"], ["turn the square green"]]
    for attention in ("sdpa", "flex"):
        model = build_model(with_model(preset("tiny", backbone), attention=attention).model).to(device).eval()
        model.frozen.to(torch.device(device))
        with torch.no_grad():
            for name, p in mcie_parameters(model.transformer).items():
                if name.endswith("gate"):
                    p.fill_(0.5)
            with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
                cond = model.condition(source.to(device), texts, uint8, background=None,
                                       region_masks=regions.to(device))
                out[attention] = model.denoise(noisy.to(device), torch.tensor([0.3, 0.8], device=device),
                                               cond).float().cpu()
    difference = (out["flex"] - out["sdpa"]).abs()
    return {"max_abs": round(float(difference.max()), 6), "mean_abs": round(float(difference.mean()), 6),
            "scale": round(float(out["sdpa"].abs().mean()), 4), "finite": bool(np.isfinite(out["flex"].numpy()).all())}


def _gates_moved(config, trained) -> dict:
    """Issue 26: how many background gates and projections (`injection.gate` / `.proj.weight`) of
    the trained DiT differ from the same model untrained (the same seed): all of them, or a gate
    died (a clamped one that stepped below 0 took no gradient again, nor did its projection)."""
    from trainer.build import build_model
    from trainer.dit.processors import mcie_parameters

    fresh = mcie_parameters(build_model(config).transformer)
    moved = {name: not torch.equal(p.detach().float().cpu(), fresh[name].detach().float())
             for name, p in mcie_parameters(trained.transformer).items()
             if name.endswith(("injection.gate", "injection.proj.weight"))}
    return {"moved": sum(moved.values()), "of": len(moved)}


def main() -> int:
    if "--speed" in sys.argv:
        at = sys.argv.index("--speed")
        return speed(sys.argv[at + 1], int(sys.argv[at + 2]))
    if "--regions" in sys.argv:
        return regions(int(sys.argv[sys.argv.index("--regions") + 1]))
    if "--ic-bc" in sys.argv:
        return ic_bc(int(sys.argv[sys.argv.index("--ic-bc") + 1]))
    from trainer.cache import encode_build
    from trainer.config import preset, with_model, with_train
    from trainer.edit import load_model
    from trainer.train import train

    cuda = torch.cuda.is_available()
    backbone = _option("--backbone", "unet")
    dit = backbone != "unet"
    config = with_train(preset("tiny", backbone), batch_size=4, checkpoint_every=3, compile="default",
                        channels_last=not dit, cudnn_attention=True, ema_decay=0.99, gradient_checkpointing=dit,
                        mixed_precision="bf16" if cuda else "no")
    extra = {}
    if dit:
        config = with_model(config, attention="flex" if cuda else "sdpa")
        extra["flex_vs_sdpa"] = _flex_vs_sdpa(backbone, "cuda" if cuda else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        _bench_train().write_bench_shards(Path(tmp) / "shards", 2, 16, 64)
        started = time.perf_counter()
        first = train(tmp, config, Path(tmp) / "ckpt", 3)
        first_s = time.perf_counter() - started
        started = time.perf_counter()
        resumed = train(tmp, config, Path(tmp) / "ckpt", 6)
        resumed_s = time.perf_counter() - started
        model = load_model(Path(tmp) / "ckpt", "cuda" if cuda else "cpu")
        if dit:
            extra["gates_moved"] = _gates_moved(config.model, load_model(Path(tmp) / "ckpt", "cpu", weights="trained"))
        started = time.perf_counter()
        cache = encode_build(tmp, config, Path(tmp) / "cache", batch_size=8)
        on_cache = train(Path(tmp) / "cache", config, Path(tmp) / "ckpt-cached", 2)
        cached_s = time.perf_counter() - started
    losses = {**first.losses, **resumed.losses}
    gates = extra.get("gates_moved", {"moved": 0, "of": 0})
    ok = sorted(losses) == list(range(1, 7)) and all(map(math.isfinite, losses.values())) \
        and gates["moved"] == gates["of"] \
        and resumed.resumed_from == 3 and model.weights_used == "ema" \
        and cache["samples"] == 32 and all(map(math.isfinite, on_cache.losses.values()))
    print(json.dumps({"check": "trainer_smoke", "backbone": backbone, **extra, "ok": ok, "device": torch.cuda.get_device_name() if cuda else "cpu",
                      "torch": torch.__version__, "losses": losses, "first_run_s": round(first_s, 1),
                      "resumed_run_s": round(resumed_s, 1), "weights_loaded": model.weights_used,
                      "cached_samples": cache["samples"], "cache_and_2_steps_s": round(cached_s, 1)}))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
