"""MCIE-E1's two modules as diffusers attention processors for a DiT's joint attention.

diffusers style: the attention module keeps its weights, a processor does the arithmetic and is
swapped in with `set_attn_processor`; the background module's weights live in the processor (an
`nn.Module`, as IP-Adapter's do), so they travel with the transformer's state dict.

- **Spatial-aware joint attention**: the label-set rule of condition.py on the joint
  `[text, target, source]` attention, in the form `JointCondition.attention` names:
  "sdpa" — the dense `attention_mask` through diffusers' `dispatch_attention_fn`. Both processors
  repeat diffusers' arithmetic (`FluxAttnProcessor`, `QwenDoubleStreamAttnProcessor2_0`, 0.42)
  line for line with the mask added and the injection placed before the output projection.
  "flex" — `block_mask` through `flex_attention`: no N² mask, masked-out blocks skipped, flash-like
  fused kernels (what the dense mask costs SDPA); on CUDA `flex_attention` is `torch.compile`d
  once, lazily (uncompiled it is a slow reference that materialises the scores; CPU runs that).
  With nothing to restrict (`cond.restricts` false) both forms
  fall back to the unmasked (or, for Qwen's padding, diffusers' own) attention.
- **Background-consistent injection**: for target tokens at background positions the attention
  output (before the output projection: that map is affine, so mixing before it equals mixing
  after it with the source projected too, one matmul fewer) is mixed with a projection of the
  source image's token at the same position: `out·(1 - g·b) + proj(source)·g·b`, `b` the token's
  background flag, `g` the gate, as the UNet's (trainer/attention.py): a free scalar, 0 at init,
  never clamped, the projection a default-initialised (non-zero) Linear. At `g = 0` the model is
  the pretrained one exactly; the gate's gradient is `Σ b·(proj(source) - out)·∂L/∂mixed`, non-zero
  from the first step (the projection is not zero), and the projection's is `g·b·…`, non-zero from
  the second step on (exact neutrality forces one factor of the product to start at 0, and it is
  the gate). Nothing clamps, so no value of the gate stops gradient: the branch cannot die (the
  earlier `clamp(gate, 0, 1)` with a zero start sent the gates that first stepped below 0 to a
  zero-gradient state for the gate and the projection, for good). The source features are the
  packed source latents, instruction-free, so at `g = 1` a background token's attention output no
  longer depends on any text.
"""

from __future__ import annotations

import warnings

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxTransformer2DModel, _get_qkv_projections
from diffusers.models.transformers.transformer_qwenimage import (
    QwenImageTransformer2DModel,
    apply_rotary_emb_qwen,
)
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from trainer.dit.condition import JointCondition

PROCESSOR_PREFIX = ".processor."  # how the new modules' parameters are named in the transformer
_compiled_flex = None  # torch.compile(flex_attention), made on the first CUDA call


def flex_joint_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         block_mask: BlockMask) -> torch.Tensor:
    """`dispatch_attention_fn`'s layout, (B, N, heads, D) in and out, through `flex_attention`
    (which wants (B, heads, N, D)). Compiled on CUDA; eager elsewhere, its warning silenced there
    (eager is the intended reference on CPU, and compiling for CPU costs more than tiny models run)."""
    global _compiled_flex
    query, key, value = (t.transpose(1, 2) for t in (query, key, value))
    if query.device.type == "cuda":
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention, dynamic=False)
        out = _compiled_flex(query, key, value, block_mask=block_mask)
    else:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
            out = flex_attention(query, key, value, block_mask=block_mask)
    return out.transpose(1, 2)


class SourceInjection(nn.Module):
    """Gated same-position injection of source features into background target tokens."""

    def __init__(self, source_dim: int, inner_dim: int):
        super().__init__()
        self.proj = nn.Linear(source_dim, inner_dim)  # default (non-zero) init: the gate's gradient
        self.gate = nn.Parameter(torch.zeros(()))  # 0: exactly the pretrained output; never clamped

    def mix(self, out: torch.Tensor, cond: JointCondition, offset: int) -> torch.Tensor:
        """`out` (B, L, D), the attention's output before its output projection, with the target
        tokens at rows [offset, offset + h·w). Mixing before the (affine) output projection equals
        mixing after it with the source projected too, and costs no second projection."""
        if cond.source is None:
            raise ValueError("the background injection needs JointCondition.source (packed source latents)")
        length = cond.target_length
        # unclamped, as the UNet's gate: a clamp passes no gradient outside [0, 1], and a gate
        # that steps below 0 there (half of them, from a zero start) never learns again
        weight = self.gate.to(out.dtype) * cond.background_tokens(out.dtype)
        source = self.proj(cond.source.to(self.proj.weight.dtype)).to(out.dtype)
        rows = out[:, offset: offset + length]
        # a·(1-w) + s·w rather than lerp: at w = 1 the result is s exactly, whatever a holds
        mixed = rows * (1.0 - weight) + source * weight
        return torch.cat([out[:, :offset], mixed, out[:, offset + length:]], 1)


def _condition(mcie: JointCondition | None, processor: nn.Module) -> JointCondition:
    if not isinstance(mcie, JointCondition):
        raise ValueError(f"{type(processor).__name__} needs the transformer's joint_attention_kwargs / "
                         "attention_kwargs to hold {'mcie': JointCondition}")
    return mcie


class FluxMCIEAttnProcessor(nn.Module):
    """FLUX (Kontext) joint attention with the spatial mask and the background injection, for
    both the double-stream blocks (text and image given apart) and the single-stream blocks (one
    `[text, image]` sequence, no output projection): `FluxAttnProcessor.__call__` (diffusers 0.42),
    same operations in the same order, with the mask (dense for SDPA, or a flex BlockMask) and
    the injection before the output projection."""

    _attention_backend = None  # diffusers' dispatch settings, as on FluxAttnProcessor
    _parallel_config = None

    def __init__(self, source_dim: int, inner_dim: int):
        super().__init__()
        self.injection = SourceInjection(source_dim, inner_dim)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None, mcie: JointCondition | None = None):
        cond = _condition(mcie, self)
        if attention_mask is not None:
            raise ValueError("FluxMCIEAttnProcessor builds its own mask; pass none")
        text = cond.text_length
        if encoder_hidden_states is not None and encoder_hidden_states.shape[1] != text:
            raise ValueError(f"condition has {text} text tokens, the block {encoder_hidden_states.shape[1]}")
        image_length = hidden_states.shape[1] - (0 if encoder_hidden_states is not None else text)

        query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states)
        query, key, value = (t.unflatten(-1, (-1, attn.head_dim)) for t in (query, key, value))
        query = attn.norm_q(query)
        key = attn.norm_k(key)
        if attn.added_kv_proj_dim is not None:
            encoder_query, encoder_key, encoder_value = (t.unflatten(-1, (-1, attn.head_dim))
                                                         for t in (encoder_query, encoder_key, encoder_value))
            encoder_query = attn.norm_added_q(encoder_query)
            encoder_key = attn.norm_added_k(encoder_key)
            query = torch.cat([encoder_query, query], dim=1)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        if cond.restricts and cond.attention == "flex":
            hidden_states = flex_joint_attention(query, key, value, cond.block_mask(image_length))
        else:
            mask = cond.attention_mask(image_length) if cond.restricts else None
            hidden_states = dispatch_attention_fn(query, key, value, attn_mask=mask, backend=self._attention_backend,
                                                  parallel_config=self._parallel_config)
        hidden_states = hidden_states.flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is None:  # single-stream: rows are [text, image], projected by the block
            return self.injection.mix(hidden_states, cond, offset=text)
        encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
            [text, hidden_states.shape[1] - text], dim=1)
        hidden_states = self.injection.mix(hidden_states, cond, offset=0)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.contiguous()))
        return hidden_states, attn.to_add_out(encoder_hidden_states.contiguous())


class QwenMCIEAttnProcessor(nn.Module):
    """Qwen-Image(-Edit) double-stream joint attention (diffusers' `QwenDoubleStreamAttnProcessor2_0`,
    same operations in the same order) with the spatial mask and the background injection."""

    _attention_backend = None  # diffusers' dispatch settings (set_attention_backend, context parallel)
    _parallel_config = None

    def __init__(self, source_dim: int, inner_dim: int):
        super().__init__()
        self.injection = SourceInjection(source_dim, inner_dim)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, encoder_hidden_states_mask=None,
                 attention_mask=None, image_rotary_emb=None, mcie: JointCondition | None = None):
        cond = _condition(mcie, self)
        if encoder_hidden_states is None:
            raise ValueError("QwenMCIEAttnProcessor requires encoder_hidden_states (text stream)")
        if attention_mask is not None:
            raise ValueError("QwenMCIEAttnProcessor builds its own mask; pass encoder_hidden_states_mask")
        seq_txt, seq_img = encoder_hidden_states.shape[1], hidden_states.shape[1]
        if seq_txt != cond.text_length:
            raise ValueError(f"condition has {cond.text_length} text tokens, the block {seq_txt}")
        block_mask = None
        if cond.restricts and cond.attention == "flex":
            block_mask = cond.block_mask(seq_img, key_valid=encoder_hidden_states_mask)
        elif cond.restricts:
            attention_mask = cond.attention_mask(seq_img, key_valid=encoder_hidden_states_mask)
        elif encoder_hidden_states_mask is not None:  # diffusers' own mask, as it builds it
            image_mask = torch.ones((hidden_states.shape[0], seq_img), dtype=torch.bool, device=hidden_states.device)
            attention_mask = torch.cat([encoder_hidden_states_mask, image_mask], dim=1)[:, None, None, :]

        head_dim = attn.inner_dim // attn.heads
        img_query, img_key, img_value = (p(hidden_states).unflatten(-1, (-1, head_dim))
                                         for p in (attn.to_q, attn.to_k, attn.to_v))
        txt_query, txt_key, txt_value = (p(encoder_hidden_states).unflatten(-1, (-1, head_dim))
                                         for p in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
        if attn.norm_q is not None:
            img_query = attn.norm_q(img_query)
        if attn.norm_k is not None:
            img_key = attn.norm_k(img_key)
        if attn.norm_added_q is not None:
            txt_query = attn.norm_added_q(txt_query)
        if attn.norm_added_k is not None:
            txt_key = attn.norm_added_k(txt_key)
        if image_rotary_emb is not None:
            img_freqs, txt_freqs = image_rotary_emb
            img_query = apply_rotary_emb_qwen(img_query, img_freqs, use_real=False)
            img_key = apply_rotary_emb_qwen(img_key, img_freqs, use_real=False)
            txt_query = apply_rotary_emb_qwen(txt_query, txt_freqs, use_real=False)
            txt_key = apply_rotary_emb_qwen(txt_key, txt_freqs, use_real=False)

        joint_query = torch.cat([txt_query, img_query], dim=1)
        joint_key, joint_value = torch.cat([txt_key, img_key], dim=1), torch.cat([txt_value, img_value], dim=1)
        if block_mask is not None:
            joint = flex_joint_attention(joint_query, joint_key, joint_value, block_mask)
        else:
            joint = dispatch_attention_fn(joint_query, joint_key, joint_value, attn_mask=attention_mask,
                                          dropout_p=0.0, is_causal=False, backend=self._attention_backend,
                                          parallel_config=self._parallel_config)
        joint = joint.flatten(2, 3).to(joint_query.dtype)
        image = self.injection.mix(joint[:, seq_txt:, :], cond, offset=0)  # before the output projection
        img_out = attn.to_out[0](image.contiguous())
        if len(attn.to_out) > 1:
            img_out = attn.to_out[1](img_out)
        txt_out = attn.to_add_out(joint[:, :seq_txt, :].contiguous())
        return img_out, txt_out


def install_mcie_processors(transformer: nn.Module, source_dim: int | None = None) -> dict[str, nn.Module]:
    """Swap every joint attention of a FLUX or Qwen-Image transformer for its MCIE processor, on
    the transformer's device and dtype. `source_dim` is the width of `JointCondition.source`
    (default: the packed latent width, `config.in_channels`). Returns {module path: processor}."""
    if isinstance(transformer, FluxTransformer2DModel):
        make = FluxMCIEAttnProcessor
    elif isinstance(transformer, QwenImageTransformer2DModel):
        make = QwenMCIEAttnProcessor
    else:
        raise ValueError(f"no MCIE processor for {type(transformer).__name__} "
                         "(FluxTransformer2DModel or QwenImageTransformer2DModel)")
    source_dim = source_dim or transformer.config.in_channels
    parameter = next(transformer.parameters())
    processors = {}
    for name in transformer.attn_processors:
        attn = transformer.get_submodule(name.removesuffix(".processor"))
        processors[name] = make(source_dim, attn.inner_dim).to(device=parameter.device, dtype=parameter.dtype)
    transformer.set_attn_processor(dict(processors))  # set_attn_processor pops from the dict it gets
    return processors


def mcie_parameters(transformer: nn.Module) -> dict[str, nn.Parameter]:
    """The new modules' parameters (trained in full), by name."""
    return {name: p for name, p in transformer.named_parameters() if PROCESSOR_PREFIX in f".{name}"}
