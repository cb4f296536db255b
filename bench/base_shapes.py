"""The `base` model's shapes end to end without weights: 2 training steps and a 1-step `mcie edit`.

    python bench/base_shapes.py --data OUT

`base` needs local SD-1.5 and Qwen2.5-VL weights; this check keeps everything of `base` (512 px,
the SD-1.5-size UNet with both MCIE modules, connector, region head, channels-last) but builds the
UNet and an SD-size VAE randomly from configs and uses the tiny random MLLM (its width only sets
the connector's input). Batch 1. On the 2-core CPU machine: training ≈ 80 s, edit ≈ 40 s, peak RSS 15.8 GiB (fp32
weights, gradients and AdamW state of an 860 M-parameter UNet) — too heavy for the test suite.
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="a build OUT with train shards (any resolution)")
    args = parser.parse_args(argv)

    import numpy as np
    from PIL import Image

    from trainer.config import Config, preset, sd_vae, with_train
    from trainer.edit import edit_image, load_model
    from trainer.train import train

    base, tiny = preset("base"), preset("tiny")
    model = replace(base.model, unet_path=None, vae=sd_vae(), vae_path=None, mllm=tiny.model.mllm,
                    mllm_path=None)
    # no EMA: its fp32 copy of the UNet (3.4 GiB) would not leave room on a 24 GiB machine
    config = with_train(Config(model, base.train), batch_size=1, num_workers=0, compile="off",
                        checkpoint_every=2, shuffle_buffer=8, ema_decay=0.0)
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        result = train(args.data, config, Path(tmp) / "ckpt", 2)
        train_s = time.perf_counter() - started
        image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 400, 3), dtype=np.uint8))
        started = time.perf_counter()
        edited, info = edit_image(load_model(str(Path(tmp) / "ckpt"), "cpu"), image,
                                  "Make the red cup blue, then remove the star.", None, 1, 7.5, 1.5, 0)
        edit_s = time.perf_counter() - started
    print(json.dumps({"check": "base_shapes", "losses": result.losses, "train_2_steps_s": round(train_s, 1),
                      "edit_1_step_s": round(edit_s, 1), "edit_size": list(edited.size),
                      "sub_instructions": info["sub_instructions"],
                      "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 1)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
