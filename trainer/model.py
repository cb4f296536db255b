"""MCIE-E1: an InstructPix2Pix-style UNet conditioned on an MLLM through a query connector, with
the spatial-aware and background-consistent cross-attentions (see `trainer.attention`) and a light
region head that predicts each sub-instruction's mask.

`MCIEE1` owns what is trained (UNet + processors, connector, source encoder, region head, null
context, LoRA adapters). The frozen parts (VAE, MLLM) are held beside it in `Frozen`, outside the
module tree, so checkpoints carry only trained weights; `forward(batch)` is the training loss, so
a DDP-wrapped model runs the whole step inside its forward.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from trainer.attention import GLOBAL_TOKEN, PADDING_TOKEN, CrossAttnCondition, install_mcie_processors
from trainer.config import ModelConfig
from trainer.mllm import Encoded, MLLMEncoder, attach_lora

log = logging.getLogger(__name__)


class Connector(nn.Module):
    """Learnable queries over the MLLM's hidden states → the UNet's cross-attention context.

    `global_queries` read the whole prompt; each sub-instruction slot has `sub_queries` that read
    only that sub-instruction's tokens. Output tokens are labelled for the spatial-aware attention.
    """

    def __init__(self, hidden_size: int, out_dim: int, config: ModelConfig):
        super().__init__()
        dim = out_dim
        self.heads = config.connector_heads if dim % config.connector_heads == 0 else 1
        self.globals = config.global_queries
        self.per_sub = config.sub_queries
        self.slots = config.max_sub_edits
        self.proj_in = nn.Linear(hidden_size, dim)
        self.global_queries = nn.Parameter(torch.randn(self.globals, dim) * 0.02)
        self.sub_queries = nn.Parameter(torch.randn(self.per_sub, dim) * 0.02)
        self.slot_embedding = nn.Parameter(torch.randn(self.slots, dim) * 0.02)
        self.layers = nn.ModuleList(
            nn.ModuleDict({
                "norm_q": nn.LayerNorm(dim),
                "norm_kv": nn.LayerNorm(dim),
                "attn": nn.MultiheadAttention(dim, self.heads, batch_first=True),
                "norm_mlp": nn.LayerNorm(dim),
                "mlp": nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)),
            })
            for _ in range(config.connector_layers)
        )
        self.norm_out = nn.LayerNorm(dim)

    @property
    def length(self) -> int:
        return self.globals + self.slots * self.per_sub

    def forward(self, encoded: Encoded) -> tuple[torch.Tensor, torch.Tensor]:
        """→ context (B, T, D), token_regions (B, T)."""
        hidden = self.proj_in(encoded.hidden.to(self.proj_in.weight.dtype))
        batch, length = hidden.shape[:2]
        subs = (self.sub_queries[None] + self.slot_embedding[:, None]).reshape(-1, hidden.shape[-1])
        queries = torch.cat([self.global_queries, subs])[None].expand(batch, -1, -1)
        # Which keys each query may read: globals all real tokens, slot s only its span.
        slot_of_query = torch.arange(self.slots, device=hidden.device).repeat_interleave(self.per_sub)
        sub_keys = encoded.spans[:, slot_of_query]  # (B, S*K, L)
        sub_keys = sub_keys | ~encoded.sub_valid[:, slot_of_query, None]  # empty slots read all (unused)
        sub_keys = sub_keys & encoded.valid[:, None]
        allowed = torch.cat([encoded.valid[:, None].expand(-1, self.globals, -1), sub_keys], 1)
        blocked = (~allowed).repeat_interleave(self.heads, 0)  # MHA wants (B*heads, Q, L)
        x = queries
        for layer in self.layers:
            kv = layer["norm_kv"](hidden)
            attended, _ = layer["attn"](layer["norm_q"](x), kv, kv, attn_mask=blocked, need_weights=False)
            x = x + attended
            x = x + layer["mlp"](layer["norm_mlp"](x))
        labels = torch.cat([
            torch.full((batch, self.globals), GLOBAL_TOKEN, device=hidden.device),
            torch.where(encoded.sub_valid[:, slot_of_query], slot_of_query[None], PADDING_TOKEN),
        ], 1)
        return self.norm_out(x), labels

    def sub_embeddings(self, context: torch.Tensor) -> torch.Tensor:
        """(B, S, D): mean of each slot's tokens."""
        subs = context[:, self.globals:]
        return subs.reshape(subs.shape[0], self.slots, self.per_sub, -1).mean(2)


class SourceEncoder(nn.Module):
    """Features of the source image at latent resolution, read by the background branch and the
    region head."""

    def __init__(self, latent_channels: int, dim: int):
        super().__init__()
        groups = 8 if dim % 8 == 0 else 1
        self.net = nn.Sequential(
            nn.Conv2d(latent_channels, dim, 3, padding=1), nn.GroupNorm(groups, dim), nn.SiLU(),
            nn.Conv2d(dim, dim, 3, padding=1), nn.GroupNorm(groups, dim), nn.SiLU(),
            nn.Conv2d(dim, dim, 3, padding=1),
        )

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.net(latents)


class RegionHead(nn.Module):
    """Predicts each sub-instruction's region: dot product of source features with the slot's
    embedding, per latent position (logits at latent resolution)."""

    def __init__(self, feature_dim: int, context_dim: int, dim: int):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(feature_dim, dim, 3, padding=1), nn.SiLU(),
                                      nn.Conv2d(dim, dim, 1))
        self.query = nn.Linear(context_dim, dim)
        self.bias = nn.Parameter(torch.tensor(-1.0))

    def forward(self, features: torch.Tensor, sub_embeddings: torch.Tensor) -> torch.Tensor:
        maps = self.features(features)
        queries = self.query(sub_embeddings)
        return torch.einsum("bchw,bsc->bshw", maps, queries) / math.sqrt(maps.shape[1]) + self.bias


def predicted_regions(logits: torch.Tensor,
                      token_regions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, S, h, w) 0/1 regions from the region head's logits: probability > 0.5. A sub-instruction
    with no such position takes the positions at >= half its peak probability instead — an empty
    region would keep its tokens from every position, so it could not act at all; those are marked
    in the (B, S) bool returned beside. Slots without a sub-instruction (no token in
    `token_regions` names them) stay empty."""
    probs = logits.detach().float().sigmoid()
    slots = torch.arange(probs.shape[1], device=probs.device)
    valid = (token_regions[:, :, None] == slots).any(1)  # (B, S)
    strict = probs > 0.5
    relaxed = valid & ~strict.flatten(2).any(-1)
    half_peak = probs >= probs.amax((-2, -1), keepdim=True) / 2
    regions = torch.where(relaxed[..., None, None], half_peak, strict) & valid[..., None, None]
    return regions.float(), relaxed


@dataclass
class Frozen:
    """The parts that are loaded (or seeded) and never trained."""

    vae: nn.Module
    mllm: MLLMEncoder
    scaling: float

    def to(self, device: torch.device, dtype: torch.dtype | None = None) -> None:
        self.vae.to(device)
        self.mllm.to(device, dtype)

    @torch.no_grad()
    def latents(self, images: torch.Tensor) -> torch.Tensor:
        vae_dtype = next(self.vae.parameters()).dtype
        return self.vae.encode(images.to(vae_dtype)).latent_dist.mode() * self.scaling

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae_dtype = next(self.vae.parameters()).dtype
        return self.vae.decode(latents.to(vae_dtype) / self.scaling).sample


def _seeded(seed: int, build):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def build_frozen(config: ModelConfig, dtype: torch.dtype = torch.float32) -> Frozen:
    from diffusers import AutoencoderKL

    config.check_paths()
    if config.vae_path is not None:
        vae = AutoencoderKL.from_pretrained(config.vae_path, torch_dtype=dtype)
    else:
        vae = _seeded(config.seed + 1, lambda: AutoencoderKL(**config.vae))
    vae.requires_grad_(False).eval()
    return Frozen(vae=vae, mllm=MLLMEncoder.from_config(config, dtype), scaling=config.vae_scaling)


def build_unet(config: ModelConfig) -> nn.Module:
    """A UNet2DConditionModel with 8 input channels: from config, or from a pretrained 4-channel
    UNet whose first conv is widened with zero weights for the source latents (InstructPix2Pix)."""
    from diffusers import UNet2DConditionModel

    if config.unet_path is None:
        return _seeded(config.seed + 2, lambda: UNet2DConditionModel(**config.unet))
    unet = UNet2DConditionModel.from_pretrained(config.unet_path)
    if unet.config.in_channels == 4:
        old = unet.conv_in
        new = nn.Conv2d(8, old.out_channels, old.kernel_size, old.stride, old.padding)
        with torch.no_grad():
            new.weight.zero_()
            new.weight[:, :4] = old.weight
            new.bias.copy_(old.bias)
        unet.conv_in = new
        unet.register_to_config(in_channels=8)
    if unet.config.cross_attention_dim != config.unet["cross_attention_dim"]:
        raise ValueError(f"{config.unet_path}: cross_attention_dim {unet.config.cross_attention_dim} "
                         f"!= config's {config.unet['cross_attention_dim']}")
    return unet


@dataclass
class Conditioning:
    context: torch.Tensor  # (B, T, D)
    condition: CrossAttnCondition
    source_latents: torch.Tensor
    region_logits: torch.Tensor  # (B, S, h, w)
    relaxed_regions: torch.Tensor | None = None  # (B, S) bool, see predicted_regions; None if given


class MCIEE1(nn.Module):
    weights_used = "trained"  # which weights `trainer.edit.load_model` put in: trained or ema

    def __init__(self, config: ModelConfig, frozen: Frozen):
        super().__init__()
        self.config = config
        self.__dict__["frozen"] = frozen  # not a submodule: never saved, never wrapped by DDP
        from diffusers import DDPMScheduler

        self.scheduler = DDPMScheduler(num_train_timesteps=config.scheduler_steps,
                                       beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
        context_dim = config.unet["cross_attention_dim"]

        def build():
            self.unet = build_unet(config)
            install_mcie_processors(self.unet, config.source_feature_dim, config.background_grid)
            latent_channels = self.unet.config.out_channels
            self.connector = Connector(frozen.mllm.hidden_size, context_dim, config)
            self.source_encoder = SourceEncoder(latent_channels, config.source_feature_dim)
            self.region_head = RegionHead(config.source_feature_dim, context_dim, config.mask_head_dim)
            self.null_context = nn.Parameter(torch.randn(config.global_queries, context_dim) * 0.02)
            self.lora = attach_lora(frozen.mllm, config.lora_rank) if config.mllm_tuning == "lora" else None

        _seeded(config.seed + 3, build)

    def trained_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The weights training updates (everything but the frozen parts), in a fixed order: the
        optimiser's, the EMA's, and the names of a checkpoint's `ema.safetensors`."""
        return [(name, p) for name, p in self.named_parameters() if p.requires_grad]

    # ---- conditioning -----------------------------------------------------------------------

    def encode_instruction(self, source_uint8: np.ndarray, sub_texts: list[list[str]],
                           cached: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if cached is not None:  # the MLLM's encodings from `mcie train-cache`
            encoded = Encoded(hidden=cached["hidden"], valid=cached["valid"], spans=cached["spans"],
                              sub_valid=cached["spans"].any(-1))
        else:
            with torch.set_grad_enabled(self.lora is not None and self.training):
                encoded = self.frozen.mllm.encode(source_uint8, sub_texts)
        return self.connector(encoded)

    def condition(self, source: torch.Tensor, sub_texts: list[list[str]], source_uint8: np.ndarray,
                  background: torch.Tensor | None, region_masks: torch.Tensor | None,
                  drop_text: torch.Tensor | None = None, drop_image: torch.Tensor | None = None,
                  cached: dict | None = None) -> Conditioning:
        """Everything the UNet is conditioned on. `background`/`region_masks` at any resolution;
        None = predicted by the region head. `drop_*`: (B,) bool for classifier-free guidance.
        `cached`: the frozen encoders' outputs from `mcie train-cache`, used instead of running them."""
        source_latents = cached["source_latents"] if cached is not None else self.frozen.latents(source)
        if drop_image is not None:
            source_latents = source_latents * (~drop_image).to(source_latents.dtype)[:, None, None, None]
        context, labels = self.encode_instruction(source_uint8, sub_texts, cached)
        # Always built when training, even if no sample drops its text this step: null_context
        # must be in every step's graph (DDP expects a gradient for every parameter), and
        # `drop_text.any()` would wait for the GPU.
        if drop_text is not None:
            null = torch.full_like(labels, PADDING_TOKEN)
            null[:, : self.config.global_queries] = GLOBAL_TOKEN
            null_context = torch.zeros_like(context)
            null_context[:, : self.config.global_queries] = self.null_context.to(context.dtype)
            keep = ~drop_text[:, None]
            context = torch.where(keep[..., None], context, null_context)
            labels = torch.where(keep, labels, null)
        features = self.source_encoder(source_latents)
        logits = self.region_head(features, self.connector.sub_embeddings(context))
        latent_size = source_latents.shape[-2:]
        relaxed = None
        if region_masks is None:
            region_masks, relaxed = predicted_regions(logits, labels)
        else:
            region_masks = F.adaptive_max_pool2d(region_masks.float(), latent_size)
        if background is None:
            background = 1.0 - region_masks.amax(1, keepdim=True)
        else:
            background = 1.0 - F.adaptive_max_pool2d(1.0 - background.float(), latent_size)
        condition = CrossAttnCondition(region_masks=region_masks, token_regions=labels,
                                       background=background, source_features=features)
        return Conditioning(context, condition, source_latents, logits, relaxed)

    def denoise(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        sample = torch.cat([noisy, cond.source_latents.to(noisy.dtype)], 1)
        return self.unet(sample, timesteps, encoder_hidden_states=cond.context,
                         cross_attention_kwargs={"mcie": cond.condition}).sample

    # ---- training ---------------------------------------------------------------------------

    def forward(self, batch: dict, edit_weight: float = 0.0, mask_loss_weight: float = 0.0,
                drops: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> dict[str, torch.Tensor]:
        """Training losses of one batch: noise-prediction MSE (extra weight on edited pixels) plus
        the region head's BCE on the per-sub-edit masks."""
        source, target = batch["source"], batch["target"]
        device, size = source.device, source.shape[0]
        draw = torch.rand(size, device=device)
        p_text, p_image, p_both = drops
        drop_text = (draw < p_text) | ((draw >= p_text + p_image) & (draw < p_text + p_image + p_both))
        drop_image = (draw >= p_text) & (draw < p_text + p_image + p_both)
        cached = batch.get("frozen")
        cond = self.condition(source, batch["sub_texts"], batch["source_uint8"],
                              background=1.0 - batch["edit_mask"], region_masks=batch["sub_masks"],
                              drop_text=drop_text, drop_image=drop_image, cached=cached)
        latents = cached["target_latents"] if cached is not None else self.frozen.latents(target)
        # drawn contiguous: randn_like would follow the latents' memory layout (the VAE's output
        # may be channels-last), and the same seed would give other noise per layout
        noise = torch.randn(latents.shape, device=latents.device, dtype=latents.dtype)
        timesteps = torch.randint(0, self.scheduler.config.num_train_timesteps, (size,), device=device)
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        prediction = self.denoise(noisy, timesteps, cond)
        weight = 1.0 + edit_weight * (1.0 - cond.condition.background)
        error = (prediction.float() - noise.float()) ** 2
        diffusion = (weight * error).sum() / (weight.sum() * error.shape[1])
        # A dropped instruction has no sub-instructions to locate: no region loss for it.
        valid = (batch["sub_valid"] & ~drop_text[:, None]).float()[:, :, None, None]
        target_regions = cond.condition.region_masks
        bce = F.binary_cross_entropy_with_logits(cond.region_logits.float(), target_regions, reduction="none")
        regions = (bce * valid).sum() / (valid.sum() * bce.shape[-1] * bce.shape[-2]).clamp(min=1)
        loss = diffusion + mask_loss_weight * regions
        return {"loss": loss, "diffusion": diffusion.detach(), "regions": regions.detach()}


def build_model(config: ModelConfig, dtype: torch.dtype = torch.float32) -> MCIEE1:
    frozen = build_frozen(config, dtype)
    model = MCIEE1(config, frozen)
    log.info("MCIE-E1 %s: %.1f M trained parameters", config.name,
             sum(p.numel() for _, p in model.trained_named_parameters()) / 1e6)
    return model
