"""MCIE-E1 on the config's backbone: the one place that knows both model modules, so neither
`trainer.model` (UNet) nor `trainer.dit.model` (DiT) imports the other's dispatch back."""

from __future__ import annotations

import logging

import torch

from trainer.config import ModelConfig
from trainer.dit.model import DiTFrozen, build_dit_model
from trainer.model import MCIEE1, Frozen
from trainer.model import build_frozen as build_frozen_as

log = logging.getLogger(__name__)


def build_frozen(config: ModelConfig, dtype: torch.dtype = torch.float32) -> Frozen:
    """The frozen VAE and MLLM in the backbone's latent space (a DiT's: `DiTFrozen`)."""
    return build_frozen_as(config, dtype, DiTFrozen if config.is_dit else Frozen)


def build_model(config: ModelConfig, dtype: torch.dtype = torch.float32) -> MCIEE1:
    """MCIE-E1 on the config's backbone; `dtype` is the frozen parts' (and a LoRA-tuned DiT's base)."""
    if config.is_dit:
        return build_dit_model(config, dtype)
    model = MCIEE1(config, build_frozen(config, dtype))
    log.info("MCIE-E1 %s: %.1f M trained parameters", config.name,
             sum(p.numel() for _, p in model.trained_named_parameters()) / 1e6)
    return model
