"""Images/s of the generative editors, and (on a GPU) the share of a build's wall time the GPU
is busy.

CPU (runs here): the tiny random inpainting and InstructPix2Pix pipelines of
tests/model_fixtures.py, and the exact photo editor, editing scikit-image photos through the
real stages (classical grounder, inventory composer, editor) in a bare loop:
    .venv/bin/python bench/editors.py --cpu [--count 6] [--steps 2]
GPU (prepared; needs CUDA): an SD-1.5-size inpainting pipeline (UNet 860 M params, in_channels 9,
the SD VAE and a CLIP-L-size text encoder, all random init) saved with save_pretrained, then
(a) the pipeline alone at 512 px in batches 1/4/8/16: images/s; (b) a bare-loop build of real
photos at resolution 512 with `--editor inpaint --editor-device cuda --editor-dtype float16`:
images/s and the GPU-busy share (CUDA-event time of the pipeline calls / build wall time):
    python bench/editors.py --gpu [--count 64] [--steps 20]
Prints one JSON line per measurement.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def build_loop(out: Path, photos: Path, editor: str, options: dict, count: int, resolution: int):
    """Bare loop over the build's units; returns (seconds, sub-edits applied, samples edited)."""
    from flows.plan import prepare_build
    from pipeline.config import BuildConfig
    from pipeline.unit import UnitPipeline

    config = BuildConfig(count=count, seed=1, resolution=resolution, shard_size=max(1, count // 2),
                         source="folder", source_options={"path": str(photos)}, editor=editor,
                         editor_options=options, edits_per_image=max(1, -(-count // 4)),
                         defect_rate=0.0, min_edits=2, max_edits=3)
    prepare_build(out, config)
    pipeline = UnitPipeline(config, out)
    started = time.perf_counter()
    subs = edited = 0
    for unit in range(config.num_units(pipeline.total)):
        for sample in pipeline.process(unit):
            if sample.target is not None:
                edited += 1
                subs += len(sample.sub_edits)
    return time.perf_counter() - started, subs, edited


def cpu(args) -> None:
    import torch

    from model_fixtures import tiny_inpaint, tiny_instruct
    from photo_fixtures import photo_folder

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        photos = photo_folder(tmp / "photos")
        backends = {
            "photo": ("photo", {}),
            "inpaint": ("inpaint", {"path": str(tiny_inpaint(tmp / "m" / "inpaint")),
                                    "steps": args.steps, "max_side": args.resolution}),
            "instruct": ("instruct", {"path": str(tiny_instruct(tmp / "m2" / "instruct")),
                                      "steps": args.steps, "max_side": args.resolution}),
        }
        for name, (editor, options) in backends.items():
            seconds, subs, edited = build_loop(tmp / f"out-{name}", photos, editor, options,
                                               args.count, args.resolution)
            print(json.dumps({"backend": name, "device": "cpu", "threads": args.threads,
                              "resolution": args.resolution, "steps": args.steps,
                              "samples": edited, "sub_edits": subs, "seconds": round(seconds, 2),
                              "images_per_s": round(edited / seconds, 3),
                              "sub_edits_per_s": round(subs / seconds, 3)}), flush=True)


def sd15_inpaint(path: Path, dtype) -> None:
    import torch
    from diffusers import (AutoencoderKL, DDIMScheduler, StableDiffusionInpaintPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel

    from model_fixtures import byte_tokenizer

    torch.manual_seed(0)
    tokenizer, vocab = byte_tokenizer(path.parent / "tok")
    unet = UNet2DConditionModel(sample_size=64, in_channels=9, out_channels=4,
                                cross_attention_dim=768, attention_head_dim=8)  # SD-1.5 layout
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                        down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4,
                        sample_size=512)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=vocab, hidden_size=768, intermediate_size=3072,
                                        num_hidden_layers=12, num_attention_heads=12,
                                        max_position_embeddings=77, bos_token_id=vocab - 2,
                                        eos_token_id=vocab - 1))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionInpaintPipeline(unet=unet, vae=vae, text_encoder=text, tokenizer=tokenizer,
                                          scheduler=scheduler, safety_checker=None,
                                          feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(path)


def gpu(args) -> None:
    import numpy as np
    import torch
    from PIL import Image

    from photo_fixtures import photo_folder
    from pipeline.editors import inpaint as inpaint_module

    if not torch.cuda.is_available():
        sys.exit("bench/editors.py --gpu: no CUDA device here (run --cpu, or on a GPU machine)")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = tmp / "sd15-inpaint-random"
        sd15_inpaint(model, torch.float16)
        pipe = inpaint_module.DiffusersModel(str(model), "cuda", "float16").pipe
        image = Image.fromarray(np.full((512, 512, 3), 128, np.uint8))
        mask = Image.fromarray(np.pad(np.full((256, 256), 255, np.uint8), 128))
        for batch in (1, 4, 8, 16):
            call = lambda: pipe(prompt=["a red cup"] * batch, image=[image] * batch,  # noqa: E731
                                mask_image=[mask] * batch, height=512, width=512,
                                num_inference_steps=args.steps, guidance_scale=7.5,
                                output_type="np")
            call()  # warm-up
            torch.cuda.synchronize()
            started = time.perf_counter()
            call()
            torch.cuda.synchronize()
            seconds = time.perf_counter() - started
            print(json.dumps({"bench": "pipeline", "batch": batch, "steps": args.steps, "px": 512,
                              "images_per_s": round(batch / seconds, 3)}), flush=True)
        # The build: GPU-busy share = CUDA time inside the pipeline calls / build wall time.
        busy = []
        real_call = type(pipe).__call__

        def timed(self, *a, **k):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            result = real_call(self, *a, **k)
            end.record()
            torch.cuda.synchronize()
            busy.append(start.elapsed_time(end) / 1000)
            return result

        type(pipe).__call__ = timed
        photos = photo_folder(tmp / "photos")
        options = {"path": str(model), "steps": args.steps, "device": "cuda", "dtype": "float16",
                   "max_side": 512}
        seconds, subs, edited = build_loop(tmp / "out", photos, "inpaint", options, args.count, 512)
        print(json.dumps({"bench": "build", "samples": edited, "sub_edits": subs,
                          "seconds": round(seconds, 2), "images_per_s": round(edited / seconds, 3),
                          "gpu_busy_share": round(sum(busy) / seconds, 3)}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--cpu", action="store_true")
    mode.add_argument("--gpu", action="store_true")
    parser.add_argument("--count", type=int, default=6)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.steps is None:
        args.steps = 2 if args.cpu else 20
    cpu(args) if args.cpu else gpu(args)


if __name__ == "__main__":
    main()
