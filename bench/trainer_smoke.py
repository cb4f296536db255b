"""The trainer's own GPU path in about a minute: tiny MCIE-E1 with bf16 autocast, fused AdamW,
channels-last, torch.compile, cuDNN attention and an EMA, trained 3 steps, checkpointed, resumed to
6, the checkpoint loaded back for inference; then `mcie train-cache` and 2 steps on the cache.

    python bench/trainer_smoke.py                 # cuda when available, else the CPU (float32)

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


def main() -> int:
    from trainer.cache import encode_build
    from trainer.config import preset, with_train
    from trainer.edit import load_model
    from trainer.train import train

    cuda = torch.cuda.is_available()
    config = with_train(preset("tiny"), batch_size=4, checkpoint_every=3, compile="default",
                        channels_last=True, cudnn_attention=True, ema_decay=0.99,
                        mixed_precision="bf16" if cuda else "no")
    with tempfile.TemporaryDirectory() as tmp:
        _bench_train().write_bench_shards(Path(tmp) / "shards", 2, 16, 64)
        started = time.perf_counter()
        first = train(tmp, config, Path(tmp) / "ckpt", 3)
        first_s = time.perf_counter() - started
        started = time.perf_counter()
        resumed = train(tmp, config, Path(tmp) / "ckpt", 6)
        resumed_s = time.perf_counter() - started
        model = load_model(Path(tmp) / "ckpt", "cuda" if cuda else "cpu")
        started = time.perf_counter()
        cache = encode_build(tmp, config, Path(tmp) / "cache", batch_size=8)
        on_cache = train(Path(tmp) / "cache", config, Path(tmp) / "ckpt-cached", 2)
        cached_s = time.perf_counter() - started
    losses = {**first.losses, **resumed.losses}
    ok = sorted(losses) == list(range(1, 7)) and all(map(math.isfinite, losses.values())) \
        and resumed.resumed_from == 3 and model.weights_used == "ema" \
        and cache["samples"] == 32 and all(map(math.isfinite, on_cache.losses.values()))
    print(json.dumps({"check": "trainer_smoke", "ok": ok, "device": torch.cuda.get_device_name() if cuda else "cpu",
                      "torch": torch.__version__, "losses": losses, "first_run_s": round(first_s, 1),
                      "resumed_run_s": round(resumed_s, 1), "weights_loaded": model.weights_used,
                      "cached_samples": cache["samples"], "cache_and_2_steps_s": round(cached_s, 1)}))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
