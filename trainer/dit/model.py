"""MCIE-E1 on a flow-matching DiT editor (`model.backbone`: flux-kontext | qwen-image-edit).

The same model as `trainer.model.MCIEE1` — the MLLM reads the source and every sub-instruction
leak-free, the connector turns that reading into labelled text tokens, the region decoder predicts
each sub-instruction's region — with a diffusers DiT as the denoiser in place of the UNet:

- the DiT reads `[text, target tokens, source tokens]` as its pipeline feeds it (VAE latents
  normalised as the pipeline does, packed 2×2 into tokens; Kontext's source ids on axis 0 = 1,
  Qwen-Image-Edit's `img_shapes` listing both images), so a released checkpoint keeps its meaning;
- the DiT's text tokens (`joint_attention_dim` wide) are the connector's (`text_tokens:
  connector`), the MLLM's own hidden states (`text_tokens: mllm`, each sub-instruction read alone)
  or, `text_tokens: released`, the states the released pipeline itself computes of the whole
  instruction (Qwen-Image-Edit: `trainer.dit.qwen_text`; FLUX.1 Kontext: T5's states and CLIP's
  pooled vector, `trainer.dit.kontext_text`), labelled global, sub-instruction i, or padding — the
  labels the spatial-aware joint attention reads; for Kontext without `released` a linear map of
  the global tokens' mean stands in for CLIP's pooled embedding;
- MCIE-E1's two modules are the DiT's attention processors (`trainer.dit.processors`): the label-set
  mask (`trainer.dit.condition`) and the zero-gated background injection of the source tokens;
- rectified flow: x_σ = (1 - σ)·x0 + σ·ε, the DiT predicts ε - x0 on the target tokens, σ drawn as
  `train.flow_timesteps` says from the scheduler's training grid; sampling is Euler on the
  scheduler's sigmas (with the resolution-dependent shift where the scheduler asks for it);
- LoRA (peft) on the DiT's attention projections with the base frozen (`transformer_lora_rank`;
  0 trains the DiT in full); the frozen base weights are left out of state dicts, so checkpoints
  hold what was trained only and the base reloads from `transformer_path` (or its seed).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields, replace

import numpy as np
import torch
from torch import nn
from torch.nn.modules.module import _IncompatibleKeys

from trainer.config import ModelConfig
from trainer.dit.condition import GLOBAL_TOKEN, PADDING_TOKEN, JointCondition
from trainer.dit.flow import add_lora, flow_matching_loss, sample_sigmas
from trainer.dit.kontext_text import KontextConditioning, KontextText
from trainer.dit.processors import PROCESSOR_PREFIX, install_mcie_processors
from trainer.dit.qwen_text import QwenReleasedText, causal_labels, load_processor
from trainer.dit.tiny import kontext_inputs, qwen_edit_inputs
from trainer.model import MCIEE1, Conditioning, Frozen, build_frozen, vae_factor

log = logging.getLogger(__name__)


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) → (B, h/2 · w/2, 4C): the FLUX / Qwen-Image pipelines' 2×2 packing."""
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of `pack` for latents of (height, width)."""
    b, _, packed = tokens.shape
    c = packed // 4
    return tokens.view(b, height // 2, width // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, height, width)


@dataclass
class DiTFrozen(Frozen):
    """The frozen VAE and MLLM of a DiT backbone: source and target latents alike are the VAE's
    mode normalised as the backbone's pipeline does it — `(z - shift_factor) · scaling_factor`
    (FLUX's AutoencoderKL) or `(z - latents_mean) / latents_std` (Qwen-Image's video VAE, which
    takes and returns one-frame videos). `text`: FLUX.1 Kontext's own CLIP and T5 (`text_tokens:
    released`, loaded by `MCIEDiT._build`), else None."""

    text: KontextText | None = None

    def to(self, device: torch.device, dtype: torch.dtype | None = None) -> None:
        super().to(device, dtype)
        if self.text is not None:
            self.text.to(device, dtype)

    def _video(self) -> bool:
        return hasattr(self.vae.config, "temperal_downsample")  # AutoencoderKLQwenImage

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor | float, torch.Tensor | float]:
        """(shift, scale): normalised = (z - shift) · scale."""
        config = self.vae.config
        if self._video():
            mean = torch.tensor(config.latents_mean, device=like.device, dtype=torch.float32).view(1, -1, 1, 1)
            std = torch.tensor(config.latents_std, device=like.device, dtype=torch.float32).view(1, -1, 1, 1)
            return mean, 1.0 / std
        return float(getattr(config, "shift_factor", None) or 0.0), self.scaling

    @torch.no_grad()
    def latents(self, images: torch.Tensor) -> torch.Tensor:
        vae_dtype = next(self.vae.parameters()).dtype
        pixels = images.to(vae_dtype)
        if self._video():
            z = self.vae.encode(pixels[:, :, None]).latent_dist.mode()[:, :, 0]
        else:
            z = self.vae.encode(pixels).latent_dist.mode()
        shift, scale = self._stats(z)
        return ((z.float() - shift) * scale).to(z.dtype)

    source_latents = latents  # Kontext / Qwen-Image-Edit read the source in the target's space

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae_dtype = next(self.vae.parameters()).dtype
        shift, scale = self._stats(latents)
        z = (latents.float() / scale + shift).to(vae_dtype)
        if self._video():
            return self.vae.decode(z[:, :, None]).sample[:, :, 0]
        return self.vae.decode(z).sample


def build_transformer(config: ModelConfig, dtype: torch.dtype) -> nn.Module:
    """The backbone's diffusers transformer: from `transformer_path` (in `dtype` when LoRA-tuned:
    the base is frozen, so a 20B model loads in bf16, not float32) or random-init from `transformer`."""
    from diffusers import FluxTransformer2DModel, QwenImageTransformer2DModel

    kind = FluxTransformer2DModel if config.backbone == "flux-kontext" else QwenImageTransformer2DModel
    if config.transformer_path is not None:
        load_dtype = dtype if config.transformer_lora_rank else torch.float32
        return kind.from_pretrained(config.transformer_path, torch_dtype=load_dtype)
    return kind(**config.transformer)


def make_flow_scheduler(config: ModelConfig):
    """The backbone's FlowMatchEulerDiscreteScheduler (its released config, or shift 1)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if config.scheduler_path is not None:
        return FlowMatchEulerDiscreteScheduler.from_pretrained(config.scheduler_path)
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=config.scheduler_steps)


def resolution_shift(scheduler, tokens: int) -> float:
    """`mu` of the resolution-dependent shift: linear in the image's token count between the
    scheduler's (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift) — the FLUX /
    Qwen-Image pipelines' `calculate_shift`."""
    c = scheduler.config
    slope = (c.max_shift - c.base_shift) / (c.max_image_seq_len - c.base_image_seq_len)
    return tokens * slope + c.base_shift - slope * c.base_image_seq_len


def select_rows(cond: Conditioning | None, rows: list[int]) -> Conditioning | None:
    """The conditioning of batch rows `rows` only: every tensor field of `cond` and of its
    `JointCondition` indexed on axis 0 (a new condition, with its own mask cache)."""
    if cond is None:
        return None

    def take(value):
        return value[torch.as_tensor(rows, device=value.device)] if isinstance(value, torch.Tensor) else value

    condition = cond.condition
    if isinstance(condition, JointCondition):
        # `replace` would hand the new condition the parent's cache dict (an init field): its own
        condition = replace(condition, **{f.name: take(getattr(condition, f.name))
                                          for f in fields(condition) if f.init and f.name != "_cache"}, _cache={})
    return replace(cond, **{f.name: take(getattr(cond, f.name)) for f in fields(cond) if f.name != "condition"},
                   condition=condition)


def rescale_to_conditional(combined: torch.Tensor, conditional: torch.Tensor) -> torch.Tensor:
    """QwenImageEditPipeline's true-CFG rescale: each token's velocity (its 2×2 cell × channels,
    the packed vector) scaled to the conditional prediction's norm,
    `comb_pred * (cond_norm / noise_norm)`. (B, C, h, w) in and out."""
    height, width = combined.shape[-2:]
    packed, reference = pack(combined), pack(conditional)
    ratio = reference.norm(dim=-1, keepdim=True) / packed.norm(dim=-1, keepdim=True).clamp(min=torch.finfo(packed.dtype).tiny)
    return unpack(packed * ratio, height, width)


class MCIEDiT(MCIEE1):
    flow_timesteps = "logit_normal"  # how training draws σ: the trainer sets train.flow_timesteps

    def __init__(self, config: ModelConfig, frozen: Frozen, base_dtype: torch.dtype = torch.float32):
        object.__setattr__(self, "_base_dtype", base_dtype)  # read by _build, before nn.Module exists
        super().__init__(config, frozen)

    @property
    def guidance(self) -> tuple[float, float]:
        """`mcie edit`'s default (text, image) guidance: each released pipeline's own. FLUX.1
        Kontext: one pass per step with the distilled guidance embedding (`config.guidance`), no
        true CFG (FluxKontextPipeline's `true_cfg_scale` is 1.0). Qwen-Image-Edit: true CFG 4.0
        against the image-only row, rescaled per token (QwenImageEditPipeline). The source image
        is not guided (1.0: the "none" row is never computed)."""
        return (1.0, 1.0) if self.config.backbone == "flux-kontext" else (4.0, 1.0)

    def _build(self, frozen: Frozen) -> None:
        config = self.config
        # training reads its σ grid; sampling sets timesteps on a copy (`sample`), never on it
        self.scheduler = make_flow_scheduler(config)
        self.transformer = build_transformer(config, self._base_dtype)
        latent_channels = self.transformer.config.in_channels // 4
        processors = install_mcie_processors(self.transformer)
        for processor in processors.values():  # trained in full: float32 master weights
            processor.float()
        if config.transformer_lora_rank:
            from diffusers.training_utils import cast_training_params

            add_lora(self.transformer, config.transformer_lora_rank, alpha=config.transformer_lora_rank,
                     targets=tuple(config.transformer_lora_targets))
            # peft makes the adapters in the base's dtype; AdamW updates need float32 masters
            # (diffusers' LoRA scripts do the same), autocast runs them in bf16
            cast_training_params(self.transformer, torch.float32)
        context_dim = self.transformer.config.joint_attention_dim
        own_states = config.text_tokens == "mllm"
        # Kontext "released": the DiT reads T5 and CLIP (`kontext_text`); the MLLM's own states,
        # each sub-instruction read leak-free, still give the region decoder its sub-instructions
        kontext_released = config.backbone == "flux-kontext" and config.text_tokens == "released"
        # Qwen-Image-Edit "released": its own MLLM reads the whole instruction as its pipeline does
        # (`qwen_text`); that one reading gives the DiT its text tokens and the region decoder its input
        qwen_released = config.backbone == "qwen-image-edit" and config.text_tokens == "released"
        own_states = own_states or kontext_released or qwen_released
        self._build_conditioning(frozen, context_dim, latent_channels, connector=not own_states)
        # the MLLM's states as text tokens: as they are where the widths agree (Qwen-Image-Edit
        # and its Qwen2.5-VL-7B), else through one linear map
        hidden = frozen.mllm.hidden_size
        self.text_proj = nn.Linear(hidden, context_dim) if own_states and hidden != context_dim else None
        self.__dict__["qwen_text"] = None  # not a submodule: it holds the frozen MLLM
        if qwen_released:
            if hidden != context_dim:  # the released states go in as they are: no map between
                raise ValueError(f"text_tokens released: the MLLM's width {hidden} != the transformer's "
                                 f"joint_attention_dim {context_dim} (Qwen-Image-Edit's own text encoder?)")
            self.__dict__["qwen_text"] = QwenReleasedText(frozen.mllm, load_processor(config.mllm_path, frozen.mllm),
                                                          self.region_decoder.grid)
        pooled = getattr(self.transformer.config, "pooled_projection_dim", None)
        self.pooled = None  # Kontext's pooled vector: CLIP's own (released), else a map of the global tokens
        if kontext_released:
            if frozen.text is None:
                frozen.text = KontextText.from_config(config, self._base_dtype)
            if frozen.text.widths != (context_dim, pooled):
                raise ValueError(f"T5 d_model / CLIP width {frozen.text.widths} != the transformer's "
                                 f"joint_attention_dim / pooled_projection_dim {(context_dim, pooled)}")
        elif config.backbone == "flux-kontext":
            self.pooled = nn.Linear(context_dim, pooled)

    @property
    def denoiser(self) -> nn.Module:
        return self.transformer

    @property
    def pixel_multiple(self) -> int:
        return vae_factor(self.frozen.vae) * 2  # 2×2 latent cells per token

    def to_target_space(self, source_latents: torch.Tensor) -> torch.Tensor:
        return source_latents

    def _is_pretrained(self, name: str) -> bool:
        """LoRA adapters of a released DiT (or its own weights, trained in full) learn at
        `learning_rate`; the new modules at `new_learning_rate`."""
        return (self.config.transformer_path is not None and name.startswith("transformer.")
                and PROCESSOR_PREFIX not in f".{name}")

    # ---- checkpoints hold what is trained, never the frozen base ------------------------------

    def _base_weights(self) -> list[str]:
        if not self.config.transformer_lora_rank:
            return []
        return [f"transformer.{name}" for name, p in self.transformer.named_parameters() if not p.requires_grad]

    def state_dict(self, *args, destination=None, prefix="", keep_vars=False):
        state = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        for name in self._base_weights():
            state.pop(prefix + name, None)
        return state

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        base = set(self._base_weights())
        missing = [key for key in result.missing_keys if key not in base]
        if strict and (missing or result.unexpected_keys):
            raise RuntimeError(f"MCIE-E1 ({self.config.backbone}) state dict: missing {missing[:5]}, "
                               f"unexpected {result.unexpected_keys[:5]}")
        return _IncompatibleKeys(missing, result.unexpected_keys)

    # ---- conditioning and denoising -----------------------------------------------------------

    def text_tokens(self, encoded):
        if self.qwen_text is not None:  # the pipeline's states as they are, labelled as a causal LM read them
            return encoded.hidden, causal_labels(encoded.spans, encoded.valid)
        if self.config.text_tokens == "connector":
            return super().text_tokens(encoded)
        # the MLLM's own states: image prefix global, span s labelled s, padding never read
        hidden = encoded.hidden if self.text_proj is None else self.text_proj(encoded.hidden.to(self.text_proj.weight.dtype))
        slots = torch.arange(encoded.spans.shape[1], device=hidden.device)
        span_of = (encoded.spans.long() * (slots[None, :, None] + 1)).sum(1) - 1  # (B, L): -1 outside spans
        labels = torch.where(span_of >= 0, span_of, GLOBAL_TOKEN)
        labels = torch.where(encoded.valid, labels, PADDING_TOKEN)
        return hidden, labels

    def drop_instruction(self, context, labels, drop_text):
        if self.qwen_text is not None:  # the dropped rows already read the empty prompt (`condition`)
            return context, labels
        if self.config.text_tokens == "connector":
            return super().drop_instruction(context, labels, drop_text)
        # no instruction = the MLLM's reading of the image alone: sub-instruction tokens unread
        return context, torch.where(drop_text[:, None] & (labels >= 0), PADDING_TOKEN, labels)

    def sub_embeddings(self, context, labels):
        if self.config.text_tokens == "connector":
            return super().sub_embeddings(context, labels)
        slots = torch.arange(self.config.max_sub_edits, device=context.device)
        member = (labels[:, None, :] == slots[None, :, None]).to(context.dtype)  # (B, S, T)
        return member @ context / member.sum(-1, keepdim=True).clamp(min=1)

    def encode_instruction(self, source_uint8, sub_texts, cached=None):
        """Qwen-Image-Edit "released": the pipeline's reading (`QwenReleasedText.read`) as text
        tokens, its image tokens for the region decoder; else `MCIEE1.encode_instruction`."""
        if self.qwen_text is None:
            return super().encode_instruction(source_uint8, sub_texts, cached)
        if cached is not None:
            raise ValueError("text_tokens released (qwen-image-edit) reads the pipeline's template each step; "
                             "the train cache holds the per-sub-instruction reading (text_tokens mllm)")
        with torch.set_grad_enabled(self.lora is not None and self.training):
            encoded, image_tokens = self.qwen_text.read(source_uint8, sub_texts, self.config.max_sub_edits)
        return (*self.text_tokens(encoded), image_tokens)

    def condition(self, source, sub_texts, source_uint8, background, region_masks, drop_text=None,
                  drop_image=None, cached=None, coarsen=None) -> Conditioning:
        """`MCIEE1.condition`; for Kontext "released" its text tokens then become T5's states of the
        instruction (the empty prompt where `drop_text`), labelled by the sub-instructions' spans,
        and its pooled vector CLIP's (`trainer.dit.kontext_text`). The MLLM's reading served the
        region decoder above; T5's labels replace its labels in the attention condition. For
        Qwen-Image-Edit "released" the rows in `drop_text` read the empty prompt, the pipeline's
        negative prompt (`trainer.dit.qwen_text`)."""
        if self.qwen_text is not None and drop_text is not None:
            sub_texts = [[] if drop else texts for texts, drop in zip(sub_texts, drop_text.tolist())]
        cond = super().condition(source, sub_texts, source_uint8, background, region_masks, drop_text=drop_text,
                                 drop_image=drop_image, cached=cached, coarsen=coarsen)
        if self.frozen.text is None:
            return cond
        texts = [list(t)[: self.config.max_sub_edits] for t in sub_texts]  # the MLLM's slots
        states, pooled, labels = self.frozen.text.encode(texts, drop_text)
        device = cond.condition.token_spans.device  # the encoders may sit elsewhere (offloading)
        states, pooled = states.to(device), pooled.to(device)
        condition = replace(cond.condition, token_spans=labels.to(device), _cache={})
        kept = {f.name: getattr(cond, f.name) for f in fields(cond) if f.name not in ("context", "condition")}
        return KontextConditioning(context=states, condition=condition, pooled=pooled, **kept)

    @staticmethod
    def _pooled_source(text: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean of the global text tokens (what stands in for Kontext's pooled CLIP embedding)."""
        weight = (labels == GLOBAL_TOKEN).to(text.dtype)[..., None]
        return (text * weight).sum(1) / weight.sum(1).clamp(min=1)

    def _attention_condition(self, region_masks, labels, background, features, source_latents):
        height, width = source_latents.shape[-2:]
        extra = {} if self.config.attention == "sdpa" else {"attention": self.config.attention}
        return JointCondition(token_spans=labels, region_masks=region_masks, background=background,
                              grid=(height // 2, width // 2), source=pack(source_latents.float()), **extra)

    def denoise(self, noisy: torch.Tensor, sigmas: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The velocity (B, C, h, w) at `noisy` (B, C, h, w), σ (B,) in [0, 1]."""
        height, width = noisy.shape[-2:]
        grid = (height // 2, width // 2)
        dtype = next(self.transformer.parameters()).dtype
        # the source tokens were packed once with the condition (the injection reads them too)
        target, source = pack(noisy).to(dtype), cond.condition.source.to(dtype)
        text = cond.context.to(dtype)
        labels = cond.condition.token_spans
        if self.config.backbone == "flux-kontext":
            if self.pooled is None:  # released: CLIP's pooled output of the instruction
                pooled = cond.pooled.to(dtype)
            else:
                globals_ = self._pooled_source(text, labels)
                pooled = self.pooled(globals_.to(self.pooled.weight.dtype)).to(dtype)
            inputs = kontext_inputs(self.transformer, target, source, text, pooled, sigmas.to(dtype),
                                    guidance=self.config.guidance, grid=grid)
            out = self.transformer(**inputs, joint_attention_kwargs={"mcie": cond.condition})[0]
        else:
            inputs = qwen_edit_inputs(target, source, text, sigmas.to(dtype), grid, text_mask=labels != PADDING_TOKEN)
            out = self.transformer(**inputs, attention_kwargs={"mcie": cond.condition})[0]
        return unpack(out[:, : grid[0] * grid[1]], height, width)

    def diffusion_loss(self, latents: torch.Tensor, cond: Conditioning, weight: torch.Tensor) -> torch.Tensor:
        """Flow matching: MSE against the velocity ε - x0, weighted per latent position; σ, the
        noise and the interpolation in float32 whatever the autocast."""
        x0 = latents.float()
        noise = torch.randn(x0.shape, device=x0.device, dtype=torch.float32)
        sigmas, _ = sample_sigmas(self.scheduler, x0.shape[0], self.flow_timesteps)
        sigmas = sigmas.to(x0.device, torch.float32)
        with torch.autocast(x0.device.type, enabled=False):
            noisy = (1.0 - sigmas[:, None, None, None]) * x0 + sigmas[:, None, None, None] * noise
        prediction = self.denoise(noisy, sigmas, cond)
        return flow_matching_loss(prediction, x0, noise, sigmas, self.flow_timesteps, weight)

    # ---- sampling -----------------------------------------------------------------------------

    @torch.no_grad()
    def sample(self, cond: Conditioning, noise: torch.Tensor, steps: int, text_guidance: float,
               image_guidance: float, known: torch.Tensor | None = None,
               keep: torch.Tensor | None = None, rescale: bool | None = None) -> torch.Tensor:
        """Euler from σ = 1 over `steps` on the scheduler's sigmas, with guidance over the three
        conditions of `cond` (full, image only, none) as `trainer.edit.sample_latents` combines
        them — computing only the rows the combination reads: text and image guidance 1.0 read
        the full row alone (one transformer pass per step, FLUX.1 Kontext's default), image
        guidance 1.0 skips the "none" row (its coefficient is 0) and combines as the pipelines'
        true CFG, `image_only + text_guidance·(full - image_only)`. `rescale` (default: on for
        Qwen-Image-Edit, as QwenImageEditPipeline): a combined velocity is scaled per token to
        the full row's norm. `known`/`keep`: latent blending — after every step the kept
        positions are set to `known` at the next σ with the starting noise, `(1 - σ)·known + σ·noise`."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        if rescale is None:
            rescale = self.config.backbone == "qwen-image-edit"
        if text_guidance == 1.0 and image_guidance == 1.0:
            rows = [0]  # full
        elif image_guidance == 1.0:
            rows = [0, 1]  # full, image only
        else:
            rows = [0, 1, 2]  # full, image only, none
        # once, not per step: the selected rows' condition keeps its own mask cache
        used = cond if len(rows) == 3 else select_rows(cond, rows)

        sampler = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler.config)
        sigmas = np.linspace(1.0, 1.0 / steps, steps)
        extra = {}
        if sampler.config.use_dynamic_shifting:
            tokens = noise.shape[-2] * noise.shape[-1] // 4
            extra["mu"] = resolution_shift(sampler, tokens)
        sampler.set_timesteps(sigmas=sigmas, device=noise.device, **extra)
        latents = noise.float()
        for i, t in enumerate(sampler.timesteps):
            sigma = sampler.sigmas[i].to(noise.device)
            out = self.denoise(latents.expand(len(rows), -1, -1, -1), sigma.expand(len(rows)), used).float()
            if len(rows) == 1:
                velocity = out
            else:
                full, image_only = out[:1], out[1:2]
                if len(rows) == 2:
                    velocity = image_only + text_guidance * (full - image_only)
                else:
                    none = out[2:3]
                    velocity = none + image_guidance * (image_only - none) + text_guidance * (full - image_only)
                if rescale:
                    velocity = rescale_to_conditional(velocity, full)
            latents = sampler.step(velocity, t, latents).prev_sample.float()
            if keep is not None:
                following = float(sampler.sigmas[i + 1])
                target = (1.0 - following) * known.float() + following * noise.float()
                latents = torch.lerp(latents, target, keep.float())
        return latents


def build_dit_model(config: ModelConfig, dtype: torch.dtype = torch.float32) -> MCIEDiT:
    frozen = build_frozen(config, dtype, DiTFrozen)
    model = MCIEDiT(config, frozen, base_dtype=dtype)
    log.info("MCIE-E1 %s on %s: %.1f M trained parameters", config.name, config.backbone,
             sum(p.numel() for _, p in model.trained_named_parameters()) / 1e6)
    return model

