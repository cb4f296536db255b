"""The `mcie train` and `mcie edit` subcommands. Torch and diffusers load only when one runs,
so the rest of the `mcie` CLI starts fast."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from trainer.config import BACKBONES, COMPILE_MODES, LR_SCHEDULES  # trainer.config imports no torch

BACKBONE_HELP = ("the denoiser: unet (InstructPix2Pix-style UNet), flux-kontext or qwen-image-edit "
                 "(flow-matching DiTs; MCIE-E1's modules in their joint attention); default: the "
                 "config file's, else unet")


def register(subparsers: argparse._SubParsersAction) -> None:
    from trainer.evaluate import add_inference_arguments  # numpy and PIL, no torch

    train = subparsers.add_parser("train", help="train MCIE-E1 on a build's train shards")
    train.add_argument("--data", required=True, help="a build OUT (reads OUT/shards/train-*.tar), a folder "
                                                      "or a URL (s3://bucket/out: streamed, no local copy)")
    train.add_argument("--val-data", help="a build OUT whose train shards give the validation loss "
                                          "(every train.eval_every steps, else at each checkpoint)")
    train.add_argument("--val-bench", help="a CIE-Bench directory: edits sampled on its first "
                                           "train.bench_cases cases, IC/BC logged (at step 0, then "
                                           "every train.bench_every steps)")
    train.add_argument("--config", default="tiny", help="tiny | base | a JSON config file")
    train.add_argument("--backbone", choices=BACKBONES, help=BACKBONE_HELP)
    train.add_argument("--init-unet", help="start from this UNet dir (an InstructPix2Pix UNet, or a "
                                            "4-channel one widened with zeros); sets model.unet_path")
    train.add_argument("--steps", type=int, default=100, help="train up to this many steps in total")
    train.add_argument("--out", default="checkpoints", help="checkpoint dir (re-run to resume)")
    train.add_argument("--batch-size", type=int,
                       help="samples per optimizer step and device (before accumulation)")
    train.add_argument("--grad-accum", type=int,
                       help="micro-batches accumulated into one optimizer step")
    train.add_argument("--lr", type=float, dest="learning_rate",
                       help="AdamW learning rate")
    train.add_argument("--new-lr", type=float, dest="new_learning_rate",
                       help="learning rate of the modules a pretrained UNet lacks (default: --lr)")
    train.add_argument("--gradient-checkpointing", action="store_true", default=None,
                       help="recompute activations in the backward pass (less memory)")
    train.add_argument("--lr-schedule", choices=LR_SCHEDULES,
                       help="learning-rate schedule over --steps")
    train.add_argument("--lr-warmup-steps", type=int,
                       help="steps of linear warm-up of the learning rate")
    train.add_argument("--checkpoint-every", type=int,
                       help="save checkpoint-{step} every this many steps")
    train.add_argument("--checkpoint-limit", type=int,
                       help="checkpoints kept (older ones are deleted)")
    train.add_argument("--num-workers", type=int,
                       help="data loader worker processes")
    train.add_argument("--mixed-precision", choices=["auto", "no", "bf16", "fp16"],
                       help="accelerate mixed precision (auto: bf16 on a GPU that has it)")
    train.add_argument("--seed", type=int,
                       help="seed of initialisation, data order and noise")
    train.add_argument("--compile", choices=COMPILE_MODES, help="torch.compile the UNet (base: default)")
    train.add_argument("--channels-last", action="store_true", default=None,
                       help="channels-last convolution weights (base: on)")
    train.set_defaults(func=run_train)

    cache = subparsers.add_parser("train-cache", help="run the frozen VAE and MLLM over a build's train "
                                                       "shards once, so `mcie train` skips them")
    cache.add_argument("--data", required=True, help="a build OUT (reads OUT/shards/train-*.tar), a folder or a URL")
    cache.add_argument("--out", required=True, help="the cache: train on it with mcie train --data OUT")
    cache.add_argument("--config", default="tiny", help="the config training will use (tiny | base | FILE)")
    cache.add_argument("--backbone", choices=BACKBONES, help=BACKBONE_HELP)
    cache.add_argument("--batch-size", type=int, default=16,
                       help="samples encoded per batch")
    cache.add_argument("--device", default=None, help="cuda when available, else cpu")
    cache.set_defaults(func=run_cache)

    edit = subparsers.add_parser("edit", help="edit an image with a trained MCIE-E1 checkpoint")
    edit.add_argument("--checkpoint", required=True, help="checkpoint-N dir or a training --out dir")
    edit.add_argument("--image", required=True,
                      help="the image to edit (PNG, JPEG, ...)")
    edit.add_argument("--instruction", required=True,
                      help="the complex instruction, in words")
    edit.add_argument("--regions", nargs="+", metavar="MASK_OR_BOX",
                      help="one per sub-instruction: a mask image or x0,y0,x1,y1 (overrides prediction)")
    edit.add_argument("--out", required=True, help="output PNG")
    edit.add_argument("--steps", type=int, default=20,
                      help="denoising steps")
    edit.add_argument("--text-guidance", type=float,
                      help="classifier-free guidance scale on the instruction (default: the backbone's, "
                           "UNet 7.5, FLUX.1 Kontext 1.0: the distilled guidance alone, "
                           "Qwen-Image-Edit 4.0: true CFG)")
    edit.add_argument("--image-guidance", type=float,
                      help="guidance scale on the source image (default: UNet 1.5, DiT 1.0)")
    edit.add_argument("--seed", type=int, default=0,
                      help="seed of the initial noise")
    edit.add_argument("--split", choices=["grammar", "mllm"], default="grammar",
                      help="split the instruction by the composer's grammar or by asking the MLLM")
    edit.add_argument("--weights", choices=["ema", "trained"], default="ema",
                      help="the EMA weights where the checkpoint has them (default), or the trained ones")
    edit.add_argument("--no-paste-back", dest="paste_back", action="store_false",
                      help="return the decoded output as it is (default: the unedited pixels of the "
                           "photo are pasted back, so its background is kept exactly)")
    edit.add_argument("--device", default=None, help="cuda when available, else cpu")
    add_inference_arguments(edit)
    edit.set_defaults(func=run_edit)


def run_train(args: argparse.Namespace) -> int:
    from pipeline.ciebench.cases import BenchError
    from trainer.config import ConfigError, load_config, with_model, with_train
    from trainer.checkpoints import latest_checkpoint
    from trainer.train import train

    try:
        if args.steps < 1:
            raise ConfigError("--steps must be >= 1")
        config = with_train(load_config(args.config, args.backbone), batch_size=args.batch_size,
                            grad_accum=args.grad_accum, learning_rate=args.learning_rate,
                            lr_schedule=args.lr_schedule, lr_warmup_steps=args.lr_warmup_steps,
                            checkpoint_every=args.checkpoint_every,
                            checkpoint_limit=args.checkpoint_limit, num_workers=args.num_workers,
                            mixed_precision=args.mixed_precision, seed=args.seed,
                            compile=args.compile, channels_last=args.channels_last,
                            new_learning_rate=args.new_learning_rate,
                            gradient_checkpointing=args.gradient_checkpointing)
        config = with_model(config, unet_path=args.init_unet)
        config.model.check_paths()
        result = train(args.data, config, args.out, args.steps, args.val_data, args.val_bench)
    except (ConfigError, BenchError, FileNotFoundError, ValueError) as exc:
        print(f"mcie train: error: {exc}", file=sys.stderr)
        return 2
    if not result.main_process:
        return 0  # one summary per run, from rank 0
    last = result.losses[max(result.losses)] if result.losses else float("nan")
    print(json.dumps({"step": result.step, "resumed_from": result.resumed_from, "last_loss": last,
                      "samples_per_s": round(result.samples_per_s, 2),
                      "checkpoint": str(latest_checkpoint(Path(args.out)))}))
    return 0


def run_cache(args: argparse.Namespace) -> int:
    from trainer.cache import encode_build
    from trainer.config import ConfigError, load_config

    try:
        if args.batch_size < 1:
            raise ConfigError("--batch-size must be >= 1")
        summary = encode_build(args.data, load_config(args.config, args.backbone), args.out, args.batch_size, args.device)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"mcie train-cache: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"out": args.out, **summary}))
    return 0


def run_edit(args: argparse.Namespace) -> int:
    import torch

    from trainer.config import ConfigError
    from trainer.edit import edit_image, load_model, read_image

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        if args.steps < 1:
            raise ValueError("--steps must be >= 1")
        if not Path(args.image).is_file():
            raise FileNotFoundError(f"image {args.image} does not exist")
        image, notes = read_image(args.image)  # the safe decoder: a refused file fails in one line
        model = load_model(args.checkpoint, device, args.weights, args.dtype, args.offload)
        result, info = edit_image(model, image, args.instruction, args.regions, args.steps,
                                  args.text_guidance, args.image_guidance, args.seed, args.split,
                                  paste_back=args.paste_back)
        info["decode_notes"] = notes
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        result.save(args.out)
    except (ConfigError, FileNotFoundError, ValueError, OSError) as exc:
        print(f"mcie edit: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"out": args.out, **info}))
    return 0
