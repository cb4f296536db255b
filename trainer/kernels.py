"""How the denoiser runs fast: channels-last memory, cuDNN's conv algorithm search, cuDNN attention,
`torch.compile`. The trainer applies what `TrainConfig` asks for and `bench/train.py` measures
these same functions, so the benchmark's figures are the trainer's.

Compilation is per module (`nn.Module.compile`): the parameter names, and so the checkpoints,
stay those of the eager model, and a checkpoint trained compiled loads for an eager `mcie edit`.
The trainer compiles the UNet, the source encoder and the frozen VAE's encoder; not the MLLM (its
prompts vary in length from batch to batch, so it would recompile).
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn

from trainer.config import COMPILE_MODES

log = logging.getLogger(__name__)


def configure_compiler() -> None:
    """Inductor settings for a diffusion UNet: the transformer blocks' 1x1 `proj_in`/`proj_out`
    convolutions become GEMMs, and a few more graph variants are allowed (train/eval, CFG batch)."""
    import torch._dynamo.config as dynamo
    import torch._inductor.config as inductor

    inductor.conv_1x1_as_mm = True
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo, name):
            setattr(dynamo, name, max(getattr(dynamo, name), 16))


def compile_modules(mode: str, *modules: nn.Module) -> None:
    """Compile each module in place (static shapes: the loader's batches all have one size)."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode must be one of {COMPILE_MODES}, got {mode!r}")
    if mode == "off":
        return
    configure_compiler()
    for module in modules:
        log.info("torch.compile %s (mode %s): the first steps compile", type(module).__name__, mode)
        module.compile(mode=None if mode == "default" else mode, dynamic=False)


def to_channels_last(*modules: nn.Module) -> None:
    """NHWC weights: cuDNN's tensor-core convolutions then run without layout transposes (a conv
    whose weight is channels-last produces a channels-last output)."""
    for module in modules:
        module.to(memory_format=torch.channels_last)


def set_conv_autotune(enabled: bool) -> None:
    """cuDNN benchmarks the conv algorithms once per shape (worth it: training shapes are fixed)."""
    torch.backends.cudnn.benchmark = enabled


def attention_backends(prefer_cudnn: bool) -> contextlib.AbstractContextManager:
    """SDPA with cuDNN attention tried first (on Hopper it is faster than flash attention for the
    UNet's head sizes); the other kernels stay as fall-backs, so CPU and older GPUs are unaffected."""
    if not prefer_cudnn:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
             SDPBackend.MATH]
    return sdpa_kernel(order, set_priority=True)
