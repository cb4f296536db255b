"""MCIE-E1: an InstructPix2Pix-style UNet conditioned on an MLLM through a query connector, with
the spatial-aware and background-consistent cross-attentions (see `trainer.attention`) and a mask
decoder that predicts each sub-instruction's region from the MLLM's image tokens, the span's own
reading and 2-D position.

Conventions that keep pretrained weights valid: the source latents the UNet reads are
InstructPix2Pix's (`latent_dist.mode()`, unscaled), the target latents are scaled by the VAE's own
`scaling_factor`, and the forward diffusion runs in float32 whatever the autocast.

`MCIEE1` owns what is trained (UNet + processors, connector, source encoder, region decoder, null
context, LoRA adapters). The frozen parts (VAE, MLLM) are held beside it in `Frozen`, outside the
module tree, so checkpoints carry only trained weights; `forward(batch)` is the training loss, so
a DDP-wrapped model runs the whole step inside its forward.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from trainer.attention import (GLOBAL_TOKEN, PADDING_TOKEN, CrossAttnCondition, install_mcie_processors,
                               position_encoding)
from trainer.config import ModelConfig
from trainer.mllm import Encoded, MLLMEncoder, attach_lora


class Connector(nn.Module):
    """Learnable queries over the MLLM's hidden states → the UNet's cross-attention context.

    `global_queries` read the image prefix only (no sub-instruction's words: they are seen at every
    position); each sub-instruction slot has `sub_queries` that read only that sub-instruction's
    tokens (an empty slot reads the prefix; its tokens are padding). Queries do not attend to each
    other, so slot s's output depends on the image and sub-instruction s alone. Output tokens are
    labelled for the spatial-aware attention.
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
        # Which keys each query may read: globals the image prefix, slot s only its span.
        slot_of_query = torch.arange(self.slots, device=hidden.device).repeat_interleave(self.per_sub)
        prefix = encoded.prefix[:, None]
        sub_keys = encoded.spans[:, slot_of_query]  # (B, S*K, L)
        sub_keys = torch.where(encoded.sub_valid[:, slot_of_query, None], sub_keys, prefix)
        allowed = torch.cat([prefix.expand(-1, self.globals, -1), sub_keys], 1)
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
    region decoder."""

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


class RegionDecoder(nn.Module):
    """Predicts each sub-instruction's region (logits at latent resolution), LISA / SmartEdit style.

    Keys per latent position: the source features, the MLLM's image-token hidden states (upsampled
    from its token grid: what the MLLM sees there) and a 2-D position encoding (where it is). Each
    sub-instruction's embedding (its span read after the image) modulates the keys (FiLM) before a
    nonlinearity, so a region can be a conjunction — "the circle" *and* "in the top left" — which
    a dot product with position-free features (two identical objects, identical logits) cannot."""

    def __init__(self, feature_dim: int, mllm_dim: int, query_dim: int, dim: int, grid: tuple[int, int]):
        super().__init__()
        self.dim, self.grid = dim, grid
        self.image = nn.Linear(mllm_dim, dim)
        self.features = nn.Conv2d(feature_dim, dim, 3, padding=1)
        self.position = nn.Linear(dim, dim)
        self.mix = nn.Sequential(nn.SiLU(), nn.Conv2d(dim, dim, 3, padding=1))
        self.film = nn.Linear(query_dim, 2 * dim)
        self.out = nn.Linear(dim, 1)
        nn.init.constant_(self.out.bias, -1.0)  # regions are small: start mostly "outside"

    def forward(self, features: torch.Tensor, image_tokens: torch.Tensor,
                sub_embeddings: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = features.shape
        dtype = self.image.weight.dtype
        image = self.image(image_tokens.to(dtype)).transpose(1, 2).reshape(batch, self.dim, *self.grid)
        image = F.interpolate(image, size=(height, width), mode="bilinear", align_corners=False)
        where = self.position(position_encoding(height, width, self.dim, features.device).to(dtype))
        keys = self.features(features) + image + where.T.reshape(1, self.dim, height, width)
        keys = self.mix(keys)  # (B, C, h, w)
        scale, shift = self.film(sub_embeddings.to(dtype)).chunk(2, -1)  # (B, S, C) each
        hidden = F.silu(keys[:, None] * (1 + scale[..., None, None]) + shift[..., None, None])
        return torch.einsum("bschw,c->bshw", hidden, self.out.weight[0]) + self.out.bias


def dilate(masks: torch.Tensor, cells: int) -> torch.Tensor:
    """(B, S, h, w) 0/1 masks grown by `cells` positions in every direction (a square element)."""
    if cells <= 0:
        return masks
    return F.max_pool2d(masks, 2 * cells + 1, stride=1, padding=cells)


def boxes(masks: torch.Tensor) -> torch.Tensor:
    """(B, S, h, w) each mask's bounding box, filled (an empty mask stays empty)."""
    def filled(line: torch.Tensor) -> torch.Tensor:  # (..., n) 0/1 → 1 from first to last 1
        return torch.minimum(line.cummax(-1).values, line.flip(-1).cummax(-1).values.flip(-1))

    rows, cols = filled(masks.amax(-1)), filled(masks.amax(-2))
    return rows[..., :, None] * cols[..., None, :]


def predicted_regions(logits: torch.Tensor,
                      token_regions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, S, h, w) 0/1 regions from the region decoder's logits: probability > 0.5. A sub-instruction
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
    scaling: float  # the VAE's scaling_factor unless the config sets one

    def to(self, device: torch.device, dtype: torch.dtype | None = None) -> None:
        self.vae.to(device)
        self.mllm.to(device, dtype)

    @torch.no_grad()
    def source_latents(self, images: torch.Tensor) -> torch.Tensor:
        """InstructPix2Pix's image conditioning: the VAE's mode, unscaled."""
        vae_dtype = next(self.vae.parameters()).dtype
        return self.vae.encode(images.to(vae_dtype)).latent_dist.mode()

    @torch.no_grad()
    def latents(self, images: torch.Tensor) -> torch.Tensor:
        """What is diffused: the VAE's mode times its scaling factor."""
        return self.source_latents(images) * self.scaling

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae_dtype = next(self.vae.parameters()).dtype
        return self.vae.decode(latents.to(vae_dtype) / self.scaling).sample


def _seeded(seed: int, build):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


VAE_CLASSES = ("AutoencoderKL", "AutoencoderKLQwenImage")  # SD / FLUX, Qwen-Image (a video VAE)


def _vae_class(config: ModelConfig) -> type:
    """The VAE's diffusers class: from `vae_path/config.json`'s `_class_name`, or the `vae` config's
    own `_class_name` key (default AutoencoderKL)."""
    import diffusers

    if config.vae_path is not None:
        name = json.loads((Path(config.vae_path) / "config.json").read_text()).get("_class_name", "AutoencoderKL")
    else:
        name = config.vae.get("_class_name", "AutoencoderKL")
    if name not in VAE_CLASSES:
        raise ValueError(f"VAE class {name!r} is not supported (one of {VAE_CLASSES})")
    return getattr(diffusers, name)


def vae_factor(vae: nn.Module) -> int:
    """Pixels per latent cell of a VAE (as its diffusers pipeline computes it)."""
    if hasattr(vae.config, "temperal_downsample"):  # AutoencoderKLQwenImage
        return 2 ** len(vae.config.temperal_downsample)
    return 2 ** (len(vae.config.block_out_channels) - 1)


def build_frozen(config: ModelConfig, dtype: torch.dtype = torch.float32,
                 kind: type[Frozen] = Frozen) -> Frozen:
    """The frozen VAE and MLLM as `kind` (the latent space: a DiT backbone's is
    `trainer.dit.model.DiTFrozen`; `trainer.build.build_frozen` picks it by backbone)."""
    config.check_paths()
    vae_class = _vae_class(config)
    if config.vae_path is not None:
        vae = vae_class.from_pretrained(config.vae_path, torch_dtype=dtype)
    else:
        spec = {key: value for key, value in config.vae.items() if key != "_class_name"}
        vae = _seeded(config.seed + 1, lambda: vae_class(**spec))
    vae.requires_grad_(False).eval()
    own = getattr(vae.config, "scaling_factor", None)  # Qwen-Image's VAE normalises by mean/std instead
    scaling = config.vae_scaling if config.vae_scaling is not None else float(own if own is not None else 1.0)
    return kind(vae=vae, mllm=MLLMEncoder.from_config(config, dtype), scaling=scaling)


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
    source_latents: torch.Tensor  # unscaled (InstructPix2Pix's convention)
    region_logits: torch.Tensor  # (B, S, h, w)
    relaxed_regions: torch.Tensor | None = None  # (B, S) bool, see predicted_regions; None if given


def make_sampler(config: ModelConfig):
    """DDIM as Stable Diffusion samples it: no clamping of the predicted x0 (a third of SD's latent
    values lie outside [-1, 1]), the last step towards alphas_cumprod[0], steps offset by one."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=config.scheduler_steps, beta_schedule="scaled_linear",
                         beta_start=0.00085, beta_end=0.012, clip_sample=False, set_alpha_to_one=False,
                         steps_offset=1)


class MCIEE1(nn.Module):
    """MCIE-E1 on the UNet backbone. `trainer.dit.model.MCIEDiT` is the same model on a DiT: it
    overrides what touches the denoiser (`_build`, `_attention_condition`, `denoise`,
    `diffusion_loss`, `pixel_multiple`, `to_target_space`, `_is_pretrained`) and, for the MLLM's
    own states as text tokens, `text_tokens` / `drop_instruction` / `sub_embeddings`; it shares
    the rest (connector, region decoder and its coarsening, dropout, losses)."""

    weights_used = "trained"  # which weights `trainer.edit.load_model` put in: trained or ema
    inference_dtype = torch.float32  # `trainer.edit.place` sets these two: edit_image's autocast dtype
    offload_device: torch.device | None = None  # and where the MLLM / denoiser wait outside their phase
    guidance = (7.5, 1.5)  # `mcie edit`'s default (text, image) guidance scales: InstructPix2Pix's

    def __init__(self, config: ModelConfig, frozen: Frozen):
        super().__init__()
        self.config = config
        self.__dict__["frozen"] = frozen  # not a submodule: never saved, never wrapped by DDP
        _seeded(config.seed + 3, lambda: self._build(frozen))

    def _build(self, frozen: Frozen) -> None:
        from diffusers import DDPMScheduler

        config = self.config
        self.scheduler = DDPMScheduler(num_train_timesteps=config.scheduler_steps, beta_schedule="scaled_linear",
                                       beta_start=0.00085, beta_end=0.012, clip_sample=False, steps_offset=1)
        self.unet = build_unet(config)
        install_mcie_processors(self.unet, config.source_feature_dim, config.background_grid)
        self._build_conditioning(frozen, config.unet["cross_attention_dim"], self.unet.config.out_channels)

    def _build_conditioning(self, frozen: Frozen, context_dim: int, latent_channels: int,
                            connector: bool = True) -> None:
        """What reads the instruction and the source for any denoiser: the connector to its
        context width (and the null context) unless the MLLM's states are the text tokens, the
        source encoder, the region decoder, the MLLM's LoRA."""
        config = self.config
        if connector:
            self.connector = Connector(frozen.mllm.hidden_size, context_dim, config)
        self.source_encoder = SourceEncoder(latent_channels, config.source_feature_dim)
        self.region_decoder = RegionDecoder(config.source_feature_dim, frozen.mllm.hidden_size, context_dim,
                                            config.mask_head_dim, frozen.mllm.token_grid)
        if connector:
            self.null_context = nn.Parameter(torch.randn(config.global_queries, context_dim) * 0.02)
        self.lora = attach_lora(frozen.mllm, config.lora_rank) if config.mllm_tuning == "lora" else None

    @property
    def denoiser(self) -> nn.Module:
        return self.unet

    @property
    def pixel_multiple(self) -> int:
        """Pixels per latent cell times the UNet's own downsampling: the multiple an image side must be."""
        return vae_factor(self.frozen.vae) * 2 ** (len(self.unet.config.block_out_channels) - 1)

    def to_target_space(self, source_latents: torch.Tensor) -> torch.Tensor:
        """Source latents as the diffused (target) latents are scaled (InstructPix2Pix: times the
        VAE's scaling factor)."""
        return source_latents * self.frozen.scaling

    def trained_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The weights training updates (everything but the frozen parts), in a fixed order: the
        optimiser's, the EMA's, and the names of a checkpoint's `ema.safetensors`."""
        return [(name, p) for name, p in self.named_parameters() if p.requires_grad]

    def parameter_groups(self, learning_rate: float, new_learning_rate: float = 0.0) -> list[dict]:
        """Optimiser groups: a pretrained UNet's own weights at `learning_rate`; what MCIE-E1 adds
        (connector, source encoder, region decoder, the attention processors' source branch, null
        context, LoRA) at `new_learning_rate` (0 = the same). Without a pretrained UNet every
        weight is new."""
        pretrained, new = [], []
        for name, param in self.trained_named_parameters():
            (pretrained if self._is_pretrained(name) else new).append(param)
        groups = [{"params": pretrained, "lr": learning_rate, "name": "pretrained"}] if pretrained else []
        return groups + [{"params": new, "lr": new_learning_rate or learning_rate, "name": "new"}]

    def _is_pretrained(self, name: str) -> bool:
        return self.config.unet_path is not None and name.startswith("unet.") and ".processor." not in name

    # ---- conditioning -----------------------------------------------------------------------

    def read_instruction(self, source_uint8: np.ndarray, sub_texts: list[list[str]],
                         cached: dict | None = None) -> Encoded:
        """The MLLM's leak-free reading of the source and each sub-instruction (or the cached one)."""
        if cached is not None:  # the MLLM's encodings from `mcie train-cache`
            return Encoded(hidden=cached["hidden"], valid=cached["valid"], spans=cached["spans"],
                           sub_valid=cached["spans"].any(-1))
        with torch.set_grad_enabled(self.lora is not None and self.training):
            return self.frozen.mllm.encode(source_uint8, sub_texts)

    def text_tokens(self, encoded: Encoded) -> tuple[torch.Tensor, torch.Tensor]:
        """→ the denoiser's text tokens (B, T, D) and their labels (B, T): the connector's."""
        return self.connector(encoded)

    def encode_instruction(self, source_uint8: np.ndarray, sub_texts: list[list[str]],
                           cached: dict | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """→ context (B, T, D), token labels (B, T), the MLLM's image tokens (B, N, D_mllm)."""
        encoded = self.read_instruction(source_uint8, sub_texts, cached)
        rows, cols = self.region_decoder.grid
        image_tokens = encoded.hidden[:, 1: 1 + rows * cols]  # after <|vision_start|>
        return (*self.text_tokens(encoded), image_tokens)

    def drop_instruction(self, context: torch.Tensor, labels: torch.Tensor,
                         drop_text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Classifier-free guidance's "no instruction" for the rows in `drop_text`: the learned
        null context on the global tokens, the sub-instruction tokens made padding. Always built
        when training, even if no sample drops its text this step: null_context must be in every
        step's graph (DDP expects a gradient for every parameter), and `drop_text.any()` would
        wait for the GPU."""
        null = torch.full_like(labels, PADDING_TOKEN)
        null[:, : self.config.global_queries] = GLOBAL_TOKEN
        null_context = torch.zeros_like(context)
        null_context[:, : self.config.global_queries] = self.null_context.to(context.dtype)
        keep = ~drop_text[:, None]
        return torch.where(keep[..., None], context, null_context), torch.where(keep, labels, null)

    def sub_embeddings(self, context: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(B, S, D): what the region decoder reads of each sub-instruction."""
        return self.connector.sub_embeddings(context)

    def condition(self, source: torch.Tensor, sub_texts: list[list[str]], source_uint8: np.ndarray,
                  background: torch.Tensor | None, region_masks: torch.Tensor | None,
                  drop_text: torch.Tensor | None = None, drop_image: torch.Tensor | None = None,
                  cached: dict | None = None, coarsen: tuple[float, float] | None = None) -> Conditioning:
        """Everything the UNet is conditioned on. `region_masks` at any resolution (None = predicted
        by the region decoder, then dilated by `region_dilation`); `background` likewise (None = all
        but the regions). `coarsen=(p_box, p_predicted)`: `region_masks` are exact silhouettes (a
        training batch's): each is shown dilated, as its box, or replaced by the decoder's own
        prediction — what inference will show — never as the silhouette, which would leak the
        target's shape. `drop_*`: (B,) bool for classifier-free guidance. `cached`: the frozen
        encoders' outputs from `mcie train-cache`, used instead of running them."""
        source_latents = cached["source_latents"] if cached is not None else self.frozen.source_latents(source)
        if drop_image is not None:
            source_latents = source_latents * (~drop_image).to(source_latents.dtype)[:, None, None, None]
        context, labels, image_tokens = self.encode_instruction(source_uint8, sub_texts, cached)
        if drop_text is not None:
            context, labels = self.drop_instruction(context, labels, drop_text)
        features = self.source_encoder(source_latents)
        logits = self.region_decoder(features, image_tokens, self.sub_embeddings(context, labels))
        latent_size = source_latents.shape[-2:]
        relaxed = None
        if region_masks is None:
            region_masks, relaxed = predicted_regions(logits, labels)
            region_masks = dilate(region_masks, self.config.region_dilation)
        else:
            region_masks = F.adaptive_max_pool2d(region_masks.float(), latent_size)
            if coarsen is not None:
                region_masks = self.coarsen(region_masks, logits, labels, *coarsen)
        if background is None:
            background = 1.0 - region_masks.amax(1, keepdim=True)
        else:
            background = 1.0 - F.adaptive_max_pool2d(1.0 - background.float(), latent_size)
        condition = self._attention_condition(region_masks, labels, background, features, source_latents)
        return Conditioning(context, condition, source_latents, logits, relaxed)

    def _attention_condition(self, region_masks, labels, background, features, source_latents):
        """What the denoiser's attention processors read (`trainer.attention`)."""
        return CrossAttnCondition(region_masks=region_masks, token_regions=labels,
                                  background=background, source_features=features)

    def coarsen(self, exact: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor,
                p_box: float, p_predicted: float) -> torch.Tensor:
        """Per sub-edit, one draw: its box (p_box), the decoder's prediction (p_predicted), else its
        mask — each dilated by `region_dilation`, as inference dilates its predictions."""
        cells = self.config.region_dilation
        draw = torch.rand(exact.shape[:2], device=exact.device)[..., None, None]
        predicted, _ = predicted_regions(logits, labels)
        shown = torch.where(draw < p_predicted, predicted, torch.where(draw < p_predicted + p_box,
                                                                       boxes(exact), exact))
        return dilate(shown, cells)

    def noised(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The forward diffusion, in float32 whatever the autocast or the latents' dtype (in bf16,
        sqrt(alphas_cumprod) rounds to 1 at the first timesteps and the noise vanishes)."""
        with torch.autocast(latents.device.type, enabled=False):
            return self.scheduler.add_noise(latents.float(), noise.float(), timesteps)

    def denoise(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        sample = torch.cat([noisy, cond.source_latents.to(noisy.dtype)], 1)
        return self.unet(sample, timesteps, encoder_hidden_states=cond.context,
                         cross_attention_kwargs={"mcie": cond.condition}).sample

    def diffusion_loss(self, latents: torch.Tensor, cond: Conditioning, weight: torch.Tensor) -> torch.Tensor:
        """Noise-prediction MSE, weighted per latent position by `weight` (B, 1, h, w)."""
        size = latents.shape[0]
        # float32 and drawn contiguous: randn_like would follow the latents' dtype and memory
        # layout (the VAE's output may be bf16 and channels-last)
        noise = torch.randn(latents.shape, device=latents.device, dtype=torch.float32)
        timesteps = torch.randint(0, self.scheduler.config.num_train_timesteps, (size,), device=latents.device)
        noisy = self.noised(latents, noise, timesteps)
        prediction = self.denoise(noisy, timesteps, cond)
        error = (prediction.float() - noise) ** 2
        return (weight * error).sum() / (weight.sum() * error.shape[1])

    # ---- training ---------------------------------------------------------------------------

    def forward(self, batch: dict, edit_weight: float = 0.0, mask_loss_weight: float = 0.0,
                drops: tuple[float, float, float] = (0.0, 0.0, 0.0),
                regions: tuple[float, float] = (0.0, 0.0)) -> dict[str, torch.Tensor]:
        """Training losses of one batch: noise-prediction MSE (extra weight on edited pixels) plus
        the region decoder's BCE on the per-sub-edit masks. `regions = (p_box, p_predicted)`: how
        the UNet is shown the sub-edits' regions (see `condition`)."""
        source, target = batch["source"], batch["target"]
        device, size = source.device, source.shape[0]
        draw = torch.rand(size, device=device)
        p_text, p_image, p_both = drops
        drop_text = (draw < p_text) | ((draw >= p_text + p_image) & (draw < p_text + p_image + p_both))
        drop_image = (draw >= p_text) & (draw < p_text + p_image + p_both)
        cached = batch.get("frozen")
        cond = self.condition(source, batch["sub_texts"], batch["source_uint8"], background=None,
                              region_masks=batch["sub_masks"], drop_text=drop_text, drop_image=drop_image,
                              cached=cached, coarsen=regions)
        latents = cached["target_latents"] if cached is not None else self.frozen.latents(target)
        latent_size = latents.shape[-2:]
        edited = F.adaptive_max_pool2d(batch["edit_mask"].float(), latent_size)
        diffusion = self.diffusion_loss(latents, cond, 1.0 + edit_weight * edited)
        # No region loss where there is nothing to locate from: a dropped instruction or image.
        valid = (batch["sub_valid"] & ~drop_text[:, None] & ~drop_image[:, None]).float()[:, :, None, None]
        target_regions = F.adaptive_max_pool2d(batch["sub_masks"].float(), latent_size)
        bce = F.binary_cross_entropy_with_logits(cond.region_logits.float(), target_regions, reduction="none")
        regions_loss = (bce * valid).sum() / (valid.sum() * bce.shape[-1] * bce.shape[-2]).clamp(min=1)
        loss = diffusion + mask_loss_weight * regions_loss
        return {"loss": loss, "diffusion": diffusion.detach(), "regions": regions_loss.detach()}
