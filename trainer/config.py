"""MCIE-E1 configuration: small frozen dataclasses, presets and JSON files.

Two presets (`tiny`, `base`) for each of three denoising backbones (`model.backbone`):
`unet` — an InstructPix2Pix-style SD-1.5-size UNet (ε-prediction, `attn2` cross-attention); and
the flow-matching DiT editors `flux-kontext` (FLUX.1 Kontext) and `qwen-image-edit`, whose joint
attention carries MCIE-E1's two modules (`trainer.dit`). `tiny` builds every component randomly
from small configs (CPU, seconds); `base` is the real model read from local weight directories.
A config file is JSON: `{"preset": "base", "model": {"backbone": ..., ...overrides}, "train":
{...overrides}}`; its backbone picks that backbone's preset before the overrides apply.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

MLLM_TUNING = ("frozen", "lora")
MIXED_PRECISION = ("auto", "no", "bf16", "fp16")
COMPILE_MODES = ("off", "default", "max-autotune-no-cudagraphs", "max-autotune")  # torch.compile modes
LR_SCHEDULES = ("constant", "constant_with_warmup", "cosine", "linear")  # diffusers' get_scheduler names
FLOW_TIMESTEPS = ("logit_normal", "mode", "uniform")  # DiT training σ density (diffusers' SD3 / FLUX schemes)
BACKBONES = ("unet", "flux-kontext", "qwen-image-edit")
DIT_BACKBONES = BACKBONES[1:]
# the DiT's text tokens: connector queries; the MLLM's own states (each sub-instruction read alone);
# or "released": the base model's own text encoder reads the whole instruction as its pipeline does
# (Qwen-Image-Edit: Qwen2.5-VL with the pipeline's template; FLUX.1 Kontext: T5 + CLIP's pooled
# vector), the sub-instructions' spans located inside that reading
TEXT_TOKENS = ("connector", "mllm", "released")
DIT_ATTENTION = ("sdpa", "flex")  # the spatial mask as a dense SDPA mask or a flex_attention BlockMask
# peft target modules of both DiTs' joint attentions (image and text projections)
DIT_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


class ConfigError(ValueError):
    """A config that cannot work (bad value, unknown key, missing weight directory)."""


def _tiny_unet() -> dict[str, Any]:
    return {
        "sample_size": 16,
        "in_channels": 8,  # noisy target latents + source latents (InstructPix2Pix)
        "out_channels": 4,
        "layers_per_block": 1,
        "block_out_channels": [32, 64],
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "cross_attention_dim": 32,
        "attention_head_dim": 8,
        "norm_num_groups": 8,
    }


def base_unet() -> dict[str, Any]:
    """Stable Diffusion 1.5's UNet with the InstructPix2Pix 8-channel input."""
    return {
        "sample_size": 64,
        "in_channels": 8,
        "out_channels": 4,
        "layers_per_block": 2,
        "block_out_channels": [320, 640, 1280, 1280],
        "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
        "cross_attention_dim": 768,
        "attention_head_dim": 8,
        "norm_num_groups": 32,
    }


def sd_vae() -> dict[str, Any]:
    """Stable Diffusion 1.5's VAE architecture (`base` loads its weights from `vae_path`)."""
    return {
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 4,
        "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "sample_size": 512,
    }


def _tiny_vae() -> dict[str, Any]:
    return {
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 4,
        "block_out_channels": [16, 32],
        "down_block_types": ["DownEncoderBlock2D"] * 2,
        "up_block_types": ["UpDecoderBlock2D"] * 2,
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "sample_size": 32,
    }


# Toy-width DiTs of each backbone's own class (same block structure, 3-axis RoPE, Kontext's
# guidance embedding): 2 heads × 16 = 32 wide; RoPE axes 4 + 6 + 6 = head_dim; they read the tiny
# VAE's 4 latent channels packed 2×2 (16 per token); text width = the tiny connector's output.
TINY_FLUX_KONTEXT = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=24,
                         pooled_projection_dim=20, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
TINY_QWEN_IMAGE_EDIT = dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                            attention_head_dim=16, num_attention_heads=2, joint_attention_dim=24,
                            axes_dims_rope=(4, 6, 6))


def _tiny_qwen_vae() -> dict[str, Any]:
    """Qwen-Image's video VAE at toy width (one-frame videos; latents normalised by mean / std)."""
    return {"_class_name": "AutoencoderKLQwenImage", "base_dim": 16, "z_dim": 4, "dim_mult": [1, 2],
            "num_res_blocks": 1, "attn_scales": [], "temperal_downsample": [False],
            "latents_mean": [0.1, -0.2, 0.05, 0.0], "latents_std": [1.2, 0.8, 1.0, 1.5]}


def tiny_transformer(backbone: str) -> dict[str, Any]:
    spec = TINY_FLUX_KONTEXT if backbone == "flux-kontext" else TINY_QWEN_IMAGE_EDIT
    return {key: list(value) if isinstance(value, tuple) else value for key, value in spec.items()}


def _tiny_mllm() -> dict[str, Any]:
    return {
        "text": {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 1024,
            "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
        },
        "vision": {
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": 64,
            "fullatt_block_indexes": [1],
            "window_size": 56,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
    }


@dataclass(frozen=True)
class ModelConfig:
    name: str = "tiny"
    backbone: str = "unet"  # unet | flux-kontext | qwen-image-edit
    resolution: int = 32  # training / inference square size in pixels
    unet: dict[str, Any] | None = field(default_factory=_tiny_unet)  # UNet2DConditionModel kwargs (unet)
    unet_path: str | None = None  # optional pretrained UNet dir (4-ch input is widened to 8)
    transformer: dict[str, Any] | None = None  # random-init DiT kwargs (Flux / QwenImage Transformer2DModel)
    transformer_path: str | None = None  # local DiT dir (config.json + weights; replaces `transformer`)
    scheduler_path: str | None = None  # local FlowMatchEulerDiscreteScheduler dir (DiT; None = shift 1)
    transformer_lora_rank: int = 4  # LoRA (peft) on the DiT's attention; 0 = train the DiT in full
    transformer_lora_targets: list[str] = field(default_factory=lambda: list(DIT_LORA_TARGETS))
    attention: str = "sdpa"  # DiT: spatial mask as a dense SDPA mask (sdpa) or a flex_attention BlockMask
    guidance: float = 2.5  # FLUX.1 Kontext's distilled guidance embedding (training and editing)
    text_tokens: str = "connector"  # DiT: connector queries, "mllm" (the MLLM's own states) or "released" (TEXT_TOKENS)
    vae: dict[str, Any] | None = field(default_factory=_tiny_vae)  # random-init VAE config
    vae_path: str | None = None  # local AutoencoderKL dir (replaces `vae`)
    vae_scaling: float | None = None  # latent scale; None = the VAE's own config (scaling_factor)
    mllm: dict[str, Any] | None = field(default_factory=_tiny_mllm)  # random-init Qwen2.5-VL
    mllm_path: str | None = None  # local Qwen2.5-VL / Qwen2-VL dir (replaces `mllm`)
    # flux-kontext with text_tokens "released": the pipeline folder's CLIPTextModel (pooled vector)
    # and T5EncoderModel (text tokens); their tokenizers in tokenizer/ and tokenizer_2/ beside them
    text_encoder_path: str | None = None
    text_encoder_2_path: str | None = None
    mllm_image_size: int = 56  # the source is shown to the MLLM at this square size (multiple of 28)
    mllm_tuning: str = "frozen"  # frozen | lora
    lora_rank: int = 4
    max_sub_edits: int = 4  # sub-instructions per sample the model attends to separately
    global_queries: int = 4  # connector queries over the whole instruction
    sub_queries: int = 2  # connector queries per sub-instruction
    connector_layers: int = 1
    connector_heads: int = 4
    source_feature_dim: int = 32  # width of the source features the background branch reads
    background_grid: int = 16  # source features are pooled to at most this grid per attention
    mask_head_dim: int = 32
    region_dilation: int = 1  # latent cells added around a region the UNet is conditioned on
    scheduler_steps: int = 1000
    seed: int = 0  # seeds the random init of components built from configs

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise ConfigError(f"backbone must be one of {BACKBONES}, got {self.backbone!r}")
        step = 16 if self.is_dit else 8  # a DiT packs 2×2 latent cells into one token
        if self.resolution < 16 or self.resolution % step:
            raise ConfigError(f"resolution must be a multiple of {step} and >= 16, got {self.resolution}")
        if self.mllm_image_size < 28 or self.mllm_image_size % 28:
            raise ConfigError(f"mllm_image_size must be a positive multiple of 28, got {self.mllm_image_size}")
        if self.mllm_tuning not in MLLM_TUNING:
            raise ConfigError(f"mllm_tuning must be one of {MLLM_TUNING}, got {self.mllm_tuning!r}")
        if self.is_dit:
            if (self.transformer is None) == (self.transformer_path is None):
                raise ConfigError(f"backbone {self.backbone}: give exactly one of model.transformer (config) "
                                  "and model.transformer_path (weights)")
            if self.unet is not None or self.unet_path is not None:
                raise ConfigError(f"backbone {self.backbone} has no UNet: model.unet and model.unet_path must be null")
            if self.transformer_lora_rank < 0:
                raise ConfigError(f"transformer_lora_rank must be >= 0, got {self.transformer_lora_rank}")
            if self.transformer_lora_rank and not self.transformer_lora_targets:
                raise ConfigError("transformer_lora_targets must name at least one module")
            if self.attention not in DIT_ATTENTION:
                raise ConfigError(f"attention must be one of {DIT_ATTENTION}, got {self.attention!r}")
            if self.text_tokens not in TEXT_TOKENS:
                raise ConfigError(f"text_tokens must be one of {TEXT_TOKENS}, got {self.text_tokens!r}")
        else:
            if self.unet is None or self.unet.get("in_channels") != 8:
                raise ConfigError("the UNet must take 8 input channels (noisy latents + source latents)")
            if self.transformer is not None or self.transformer_path is not None:
                raise ConfigError("backbone unet: model.transformer and model.transformer_path must be null")
            if self.text_tokens != "connector":
                raise ConfigError("backbone unet reads the connector's tokens (text_tokens must be connector)")
        if self.backbone == "qwen-image-edit" and self.text_tokens == "released" and self.transformer and self.mllm:
            width = self.mllm["text"]["hidden_size"]  # the released states go to the DiT as they are
            if self.transformer.get("joint_attention_dim") != width:
                raise ConfigError(f"qwen-image-edit with text_tokens released feeds the MLLM's states to the DiT: "
                                  f"transformer joint_attention_dim must be the MLLM's width {width}")
        kontext_released = self.backbone == "flux-kontext" and self.text_tokens == "released"
        encoders = (self.text_encoder_path, self.text_encoder_2_path)
        if kontext_released and None in encoders:
            raise ConfigError("flux-kontext with text_tokens released reads the pipeline's CLIP and T5: set "
                              "model.text_encoder_path and model.text_encoder_2_path")
        if not kontext_released and encoders != (None, None):
            raise ConfigError("model.text_encoder_path / text_encoder_2_path are read only by flux-kontext "
                              f"with text_tokens released: set them to null with text_tokens {self.text_tokens}")
        if (self.vae is None) == (self.vae_path is None):
            raise ConfigError("give exactly one of model.vae (config) and model.vae_path (weights)")
        if (self.mllm is None) == (self.mllm_path is None):
            raise ConfigError("give exactly one of model.mllm (config) and model.mllm_path (weights)")
        for name in ("max_sub_edits", "global_queries", "sub_queries", "connector_layers", "lora_rank"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.region_dilation < 0:
            raise ConfigError(f"region_dilation must be >= 0, got {self.region_dilation}")
        if self.vae_scaling is not None and self.vae_scaling <= 0:
            raise ConfigError(f"vae_scaling must be > 0 (or null: the VAE's own), got {self.vae_scaling}")

    @property
    def is_dit(self) -> bool:
        return self.backbone in DIT_BACKBONES

    def resolved(self) -> "ModelConfig":
        """The same config with its weight directories as absolute paths, so a checkpoint's
        config.json loads from any working directory."""
        paths = {key: str(Path(getattr(self, key)).expanduser().resolve())
                 for key in WEIGHT_PATHS if getattr(self, key) is not None}
        return replace(self, **paths)

    def check_paths(self) -> None:
        """Fail with the missing directory's name before anything heavy loads."""
        for key in WEIGHT_PATHS:
            path = getattr(self, key)
            if path is not None and not Path(path).is_dir():
                raise ConfigError(
                    f"model.{key}: weight directory {path!r} does not exist "
                    f"(set it in the config file; nothing is downloaded)"
                )
        for key, sibling in TOKENIZER_DIRS.items():
            path = getattr(self, key)
            if path is not None and not tokenizer_dir(path, sibling).is_dir():
                raise ConfigError(f"model.{key}: tokenizer directory {str(Path(path).parent / sibling)!r} "
                                  f"does not exist (the pipeline folder's {sibling}/ beside {path!r})")


WEIGHT_PATHS = ("unet_path", "transformer_path", "scheduler_path", "vae_path", "mllm_path", "text_encoder_path",
                "text_encoder_2_path")
TOKENIZER_DIRS = {"text_encoder_path": "tokenizer", "text_encoder_2_path": "tokenizer_2"}  # diffusers' layout


def tokenizer_dir(encoder_path: str, sibling: str) -> Path:
    """A text encoder's tokenizer: in its own dir when that holds tokenizer_config.json, else the
    pipeline folder's `sibling` dir beside it (text_encoder/ → tokenizer/, text_encoder_2/ → tokenizer_2/)."""
    own = Path(encoder_path)
    return own if (own / "tokenizer_config.json").is_file() else own.parent / sibling


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 4
    grad_accum: int = 1
    learning_rate: float = 1e-3
    new_learning_rate: float = 0.0  # modules not in a pretrained UNet (connector, regions, source branch); 0 = learning_rate
    lr_schedule: str = "constant"  # cosine / linear decay to 0 at lr_decay_steps
    lr_warmup_steps: int = 0  # linear warm-up (constant_with_warmup, cosine, linear)
    lr_decay_steps: int = 0  # where cosine / linear reach 0; 0 = the run's --steps
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    checkpoint_every: int = 50
    checkpoint_limit: int = 3  # keep the newest N checkpoint-{step} dirs
    shuffle_buffer: int = 64  # samples shuffled together (block shuffle, resumable by position)
    num_workers: int = 0
    crop_min_scale: float = 0.8  # paired random crop covers at least this fraction of each side
    edit_weight: float = 2.0  # extra loss weight on edited pixels (0 = plain MSE)
    mask_loss_weight: float = 0.5  # weight of the region decoder's loss
    box_region_prob: float = 0.5  # a sub-edit's region shown to the UNet as its box (else its dilated mask)
    predicted_region_prob: float = 0.25  # ... as the region decoder's own (detached) prediction instead
    text_drop: float = 0.05  # classifier-free guidance dropout of the instruction
    image_drop: float = 0.05  # ... of the source image
    both_drop: float = 0.05  # ... of both together
    mixed_precision: str = "auto"  # auto = bf16 on GPU, none on CPU
    ema_decay: float = 0.0  # > 0: keep an EMA of the trained weights (what `mcie edit` uses)
    channels_last: bool = False  # NHWC convolution weights (tensor-core convs without transposes)
    compile: str = "off"  # torch.compile the denoiser (UNet / DiT) and source encoder: off or a compile mode
    flow_timesteps: str = "logit_normal"  # DiT backbones: how training draws σ
    gradient_checkpointing: bool = False  # recompute the UNet's activations in backward (memory)
    cudnn_attention: bool = False  # try cuDNN's SDPA kernel first (Hopper)
    log_every: int = 10
    eval_every: int = 0  # validation loss on --val-data every N steps; 0 = at each checkpoint
    eval_batches: int = 4  # validation batches (the same ones every time)
    bench_every: int = 0  # with --val-bench: sample edits on it every N steps (0 = when validating)
    bench_cases: int = 8  # the first N cases of --val-bench (the same ones every time)
    bench_steps: int = 10  # sampling steps of those edits
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("batch_size", "grad_accum", "checkpoint_every", "checkpoint_limit",
                     "shuffle_buffer", "log_every", "eval_batches"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_every", "bench_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("bench_cases", "bench_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.new_learning_rate < 0:
            raise ConfigError(f"train.new_learning_rate must be >= 0, got {self.new_learning_rate}")
        if not (0 <= self.box_region_prob and 0 <= self.predicted_region_prob
                and self.box_region_prob + self.predicted_region_prob <= 1):
            raise ConfigError("train.box_region_prob and train.predicted_region_prob must be >= 0 "
                              "and sum to at most 1")
        if self.num_workers < 0:
            raise ConfigError(f"train.num_workers must be >= 0, got {self.num_workers}")
        if not 0 < self.crop_min_scale <= 1:
            raise ConfigError(f"train.crop_min_scale must be in (0, 1], got {self.crop_min_scale}")
        drops = (self.text_drop, self.image_drop, self.both_drop)
        if any(p < 0 for p in drops) or sum(drops) > 1:
            raise ConfigError("train.*_drop must be >= 0 and sum to at most 1")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ConfigError(f"train.mixed_precision must be one of {MIXED_PRECISION}")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"train.ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"train.lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        for name in ("lr_warmup_steps", "lr_decay_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if self.compile not in COMPILE_MODES:
            raise ConfigError(f"train.compile must be one of {COMPILE_MODES}, got {self.compile!r}")
        if self.flow_timesteps not in FLOW_TIMESTEPS:
            raise ConfigError(f"train.flow_timesteps must be one of {FLOW_TIMESTEPS}, got {self.flow_timesteps!r}")


@dataclass(frozen=True)
class Config:
    model: ModelConfig
    train: TrainConfig

    def to_json(self) -> dict[str, Any]:
        return {"model": asdict(self.model), "train": asdict(self.train)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Config":
        return cls(model=_build(ModelConfig, data.get("model", {})),
                   train=_build(TrainConfig, data.get("train", {})))


def _check_keys(kind: type, values: dict[str, Any]) -> None:
    """Known keys only, each value of its field's type (read off the field's default: a JSON
    config with `"learning_rate": "fast"` is one clear error, not a traceback mid-training)."""
    fields = kind.__dataclass_fields__
    unknown = set(values) - set(fields)
    if unknown:
        raise ConfigError(f"unknown {kind.__name__} keys: {sorted(unknown)}")
    for key, value in values.items():
        field_ = fields[key]
        default = field_.default if field_.default is not MISSING else (
            field_.default_factory() if field_.default_factory is not MISSING else None)
        if default is None or value is None:
            continue  # optional fields: None or a value of any type their validation accepts
        expected = (int, float) if type(default) is float else type(default)
        if not isinstance(value, expected) or (isinstance(value, bool) and type(default) is not bool):
            raise ConfigError(f"{kind.__name__}.{key} must be {type(default).__name__}, "
                              f"got {value!r}")


def _build(kind: type, values: dict[str, Any]) -> Any:
    _check_keys(kind, values)
    return kind(**values)


PRESETS = ("tiny", "base")

# `base` DiT backbones: the diffusers pipeline folders of FLUX.1-Kontext-dev / Qwen-Image-Edit
# (their transformer/, vae/, scheduler/) and the Qwen2.5-VL that reads the instruction.
# Qwen-Image-Edit is conditioned as QwenImageEditPipeline conditions it (`text_tokens: released`,
# `trainer.dit.qwen_text`): its own Qwen2.5-VL-7B (text_encoder/, processor/) reads the pipeline's
# template with the source at ≈ 1024² pixels and the whole instruction (the sub-instructions joined),
# the first 64 states dropped; those 3584-wide states (= its joint_attention_dim) are the text
# tokens, so at step 0 with MCIE neutral it is the released editor. The sub-instructions' spans
# inside that reading carry the spatial labels, but the MLLM is causal: a sub-instruction's tokens
# (and the connective / template suffix after it, labelled with it) have read the earlier
# sub-instructions, so sub-instruction j's words reach regions j, j+1, ... — never an earlier
# region nor the background (docs/trainer.md). `text_tokens: mllm` keeps the leak-free reading
# (each sub-instruction read alone, no template). FLUX.1 Kontext is
# conditioned as FluxKontextPipeline conditions it (`text_tokens: released`): its text tokens are
# T5-XXL's 512 states of the instruction (the sub-instructions joined, `trainer.dit.kontext_text`),
# its pooled vector CLIP-L's pooled output, both from the pipeline folder's text_encoder_2/ and
# text_encoder/ (tokenizers in tokenizer_2/ and tokenizer/), so at step 0 with MCIE neutral (every
# token global, no region, gate 0) it is the released editor, tested against the pipeline. The
# spans of the sub-instructions inside T5's reading carry the spatial labels (once labelled, the
# global and source tokens no longer read those spans: a change at step 0), but T5 reads the whole
# instruction bidirectionally and CLIP's pooled vector modulates every token: each
# sub-instruction's words reach every region and the background through them (docs/trainer.md).
# The Qwen2.5-VL-3B still reads the source and each sub-instruction alone for the region decoder.
_BASE_DIT = {
    "flux-kontext": dict(root="weights/flux1-kontext-dev", mllm_path="weights/qwen2.5-vl-3b", text_tokens="released",
                         text_encoder_path="weights/flux1-kontext-dev/text_encoder",
                         text_encoder_2_path="weights/flux1-kontext-dev/text_encoder_2"),
    "qwen-image-edit": dict(root="weights/qwen-image-edit", mllm_path="weights/qwen-image-edit/text_encoder",
                            text_tokens="released"),
}


def preset(name: str, backbone: str = "unet") -> Config:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r} (tiny, base, or a JSON file)")
    if backbone not in BACKBONES:
        raise ConfigError(f"backbone must be one of {BACKBONES}, got {backbone!r}")
    if backbone != "unet":
        return _dit_preset(name, backbone)
    if name == "tiny":
        return Config(ModelConfig(), TrainConfig())
    model = ModelConfig(
        name="base",
        resolution=512,
        unet=base_unet(),
        vae=None,
        vae_path="weights/sd15/vae",
        mllm=None,
        mllm_path="weights/qwen2.5-vl-3b",
        mllm_image_size=448,
        global_queries=32,
        sub_queries=8,
        connector_layers=2,
        connector_heads=12,
        source_feature_dim=128,
        background_grid=32,
        mask_head_dim=128,
        unet_path="weights/sd15/unet",
    )
    train = TrainConfig(batch_size=32, learning_rate=5e-5, new_learning_rate=1e-4,
                        lr_schedule="constant_with_warmup",
                        lr_warmup_steps=500, ema_decay=0.9999, checkpoint_every=1000,
                        shuffle_buffer=1000, num_workers=4, channels_last=True, compile="default")
    return Config(model, train)


def _dit_preset(name: str, backbone: str) -> Config:
    """`tiny`: toy transformer of the backbone's class, tiny VAE and MLLM (CPU). `base`: the
    released transformer, VAE and scheduler from local dirs, LoRA rank 64 on the joint attention,
    the new modules in full, bf16 and gradient checkpointing (the 20B Qwen-Image transformer's
    weights alone take 41 GB in bf16)."""
    if name == "tiny":
        # FLUX's VAE normalises by shift and scale, Qwen-Image's by per-channel mean and std
        vae = _tiny_qwen_vae() if backbone == "qwen-image-edit" else dict(_tiny_vae(), shift_factor=0.1159,
                                                                          scaling_factor=0.3611)
        return Config(ModelConfig(name="tiny", backbone=backbone, unet=None, transformer=tiny_transformer(backbone),
                                  vae=vae), TrainConfig())
    spec = _BASE_DIT[backbone]
    root = spec["root"]
    model = ModelConfig(
        # both released editors work near 1 Mpx (Qwen-Image-Edit resizes to 1024², Kontext's
        # preferred resolutions are ≈ 1 Mpx): training or editing them at 512² is off their distribution
        name="base", backbone=backbone, resolution=1024, unet=None, transformer=None,
        transformer_path=f"{root}/transformer", scheduler_path=f"{root}/scheduler", vae=None,
        vae_path=f"{root}/vae", mllm=None, mllm_path=spec["mllm_path"], mllm_image_size=448,
        text_tokens=spec["text_tokens"], text_encoder_path=spec.get("text_encoder_path"),
        text_encoder_2_path=spec.get("text_encoder_2_path"),
        transformer_lora_rank=64, global_queries=32, sub_queries=8, connector_layers=2, connector_heads=16,
        source_feature_dim=128, mask_head_dim=128,
    )
    train = TrainConfig(batch_size=8, learning_rate=1e-4, new_learning_rate=1e-4, lr_schedule="constant_with_warmup",
                        lr_warmup_steps=200, checkpoint_every=500, shuffle_buffer=1000, num_workers=4,
                        gradient_checkpointing=True, mixed_precision="bf16")
    return Config(model, train)


def load_config(spec: str, backbone: str | None = None) -> Config:
    """`tiny`, `base`, or a JSON file `{"preset": ..., "model": {...}, "train": {...}}`; `backbone`
    (the CLI's --backbone) picks the preset's backbone, and must agree with a file's own."""
    if spec in PRESETS:
        return preset(spec, backbone or "unet")
    path = Path(spec)
    if not path.is_file():
        raise ConfigError(f"config {spec!r} is neither a preset (tiny, base) nor a file")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"config file {spec}: invalid JSON ({exc})") from exc
    model_over = data.get("model", {})
    if not isinstance(model_over, dict):
        raise ConfigError(f"config file {spec}: \"model\" must be an object")
    own = model_over.get("backbone")
    if backbone is not None and own is not None and own != backbone:
        raise ConfigError(f"config file {spec} sets backbone {own!r} but --backbone is {backbone!r}")
    base = preset(data.get("preset", "tiny"), backbone or own or "unet")
    train_over = data.get("train", {})
    unknown = set(data) - {"preset", "model", "train"}
    if unknown:
        raise ConfigError(f"config file {spec}: unknown top-level keys {sorted(unknown)}")
    _check_keys(ModelConfig, model_over)  # values are validated by the dataclasses on replace
    _check_keys(TrainConfig, train_over)
    return Config(replace(base.model, **model_over), replace(base.train, **train_over))


def with_model(config: Config, **overrides: Any) -> Config:
    return Config(replace(config.model, **{k: v for k, v in overrides.items() if v is not None}), config.train)


def with_train(config: Config, **overrides: Any) -> Config:
    return Config(config.model, replace(config.train, **{k: v for k, v in overrides.items() if v is not None}))
