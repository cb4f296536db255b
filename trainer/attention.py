"""MCIE-E1's two added attention mechanisms, as diffusers attention processors.

diffusers style: the UNet's `Attention` modules keep their weights (`to_q`, `to_k`, `to_v`,
`to_out`); a processor only does the arithmetic, and is swapped in with `set_attn_processor`.
The extra weights of the background branch live in the processor itself (an `nn.Module`, the way
diffusers' IP-Adapter processors hold `to_k_ip`/`to_v_ip`), so they are saved with the UNet.

- **Spatial-aware cross-attention**: every context token is labelled with the sub-instruction it
  came from (`token_regions`: -1 global, i >= 0 sub-instruction i, -2 padding). A latent position
  may attend to a sub-instruction's tokens only if it lies in that sub-instruction's region (the
  shards' per-sub-edit masks, max-pooled to the attention's own resolution); every position sees the
  global tokens, so no row of the mask is empty.
- **Background-consistent cross-attention**: the same queries attend to features of the source
  image; per position the two results are mixed as `(1 - g·b)·text + g·b·source`, where `b` is the
  background mask at that resolution and `g` a learned gate. The branch is position-aware: the
  source keys carry a fixed 2-D sinusoidal encoding of where they lie, and the queries a learned
  (zero-initialised) projection of the same encoding at their own position, so the branch can read
  "the source at my position" — shuffling the source's positions changes what it returns.
- **Nothing new disturbs a pretrained UNet at step 0**: `g` starts at 0 (the mix is then exactly
  the text branch) and is a plain coefficient (1 = the background hears only the source), the way
  ControlNet's zero convolutions start.

Conditions reach the processors through the UNet's `cross_attention_kwargs={"mcie": condition}`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import nn

GLOBAL_TOKEN = -1
PADDING_TOKEN = -2
_BIAS_ALIGN = 16  # the memory-efficient SDPA kernel wants bias rows aligned to 16 elements


@dataclass
class CrossAttnCondition:
    """What the MCIE processors need besides the hidden states, for one UNet call."""

    region_masks: torch.Tensor  # (B, S, H, W) 0/1: region of each sub-instruction
    token_regions: torch.Tensor  # (B, T) long: GLOBAL_TOKEN, sub-instruction index, PADDING_TOKEN
    background: torch.Tensor  # (B, 1, H, W) 0/1: positions no sub-edit may change
    source_features: torch.Tensor | None = None  # (B, C, H, W) features of the source image
    _cache: dict = field(default_factory=dict, repr=False)

    def grid(self, length: int) -> tuple[int, int]:
        """(h, w) of a hidden-state sequence of `length` positions (the UNet halves sizes, ceil)."""
        height, width = self.region_masks.shape[-2:]
        factor = 1
        while factor <= max(height, width):
            h, w = math.ceil(height / factor), math.ceil(width / factor)
            if h * w == length:
                return h, w
            factor *= 2
        raise ValueError(f"sequence of {length} positions matches no downsampling of {height}x{width}")

    def regions_at(self, length: int) -> torch.Tensor:
        """(B, S, length) bool: a position is in a region if any pixel of its cell is."""
        key = ("regions", length)
        if key not in self._cache:
            h, w = self.grid(length)
            pooled = F.adaptive_max_pool2d(self.region_masks.float(), (h, w))
            self._cache[key] = pooled.flatten(2) > 0.5
        return self._cache[key]

    def background_at(self, length: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(B, 1, length, 1) 0/1: 1 only where the whole cell is background (conservative).
        Shaped to broadcast over per-head attention outputs (B, heads, length, dim)."""
        key = ("background", length, dtype)
        if key not in self._cache:
            h, w = self.grid(length)
            edited = F.adaptive_max_pool2d(1.0 - self.background.float(), (h, w))
            self._cache[key] = (1.0 - edited).flatten(1)[:, None, :, None].to(dtype)
        return self._cache[key]

    def token_mask(self, length: int) -> torch.Tensor:
        """(B, 1, length, T) bool: may position p attend to token t?"""
        key = ("tokens", length)
        if key not in self._cache:
            regions = self.regions_at(length)  # (B, S, N)
            labels = self.token_regions
            index = labels.clamp(min=0)[:, :, None].expand(-1, -1, length)  # (B, T, N)
            in_region = regions.gather(1, index).transpose(1, 2)  # (B, N, T)
            is_sub = (labels >= 0)[:, None, :]
            is_global = (labels == GLOBAL_TOKEN)[:, None, :]
            self._cache[key] = (is_global | (is_sub & in_region))[:, None]
        return self._cache[key]

    def token_bias(self, length: int, dtype: torch.dtype) -> torch.Tensor:
        """`token_mask` as the additive SDPA bias (0 / -inf) in the attention's dtype.

        SDPA would turn a bool mask into exactly this tensor on every call (each attention layer,
        forward and again for backward); here it is built once per resolution. Its storage is
        padded to a multiple of 16 tokens so the memory-efficient kernel (the one CUDA picks for a
        masked attention) takes it as it is instead of padding a copy per call. Every row keeps
        the global tokens, so no row is all -inf."""
        key = ("bias", length, dtype)
        if key not in self._cache:
            allowed = self.token_mask(length)
            tokens = allowed.shape[-1]
            padded = -(-tokens // _BIAS_ALIGN) * _BIAS_ALIGN
            bias = torch.full((*allowed.shape[:-1], padded), -math.inf, dtype=dtype, device=allowed.device)
            bias[..., :tokens].masked_fill_(allowed, 0.0)
            self._cache[key] = bias[..., :tokens]
        return self._cache[key]

    def source_tokens(self, length: int, grid: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """(B, M, C) source features average-pooled to this attention's grid (at most grid²), plus
        the 2-D position encoding of each pooled cell."""
        key = ("source", length, grid, dtype)
        if key in self._cache:
            return self._cache[key]
        h, w = self.grid(length)
        size = (min(h, grid), min(w, grid))
        pooled = F.adaptive_avg_pool2d(self.source_features, size)
        pooled = pooled.flatten(2).transpose(1, 2) + position_encoding(*size, pooled.shape[1], pooled.device)
        pooled = pooled if dtype is None else pooled.to(dtype)
        # Not cached while it carries a gradient: under gradient checkpointing the recomputation
        # must run (and save for backward) the same ops as the forward did.
        if not (torch.is_grad_enabled() and pooled.requires_grad):
            self._cache[key] = pooled
        return pooled

    def query_positions(self, length: int, dim: int, dtype: torch.dtype) -> torch.Tensor:
        """(length, dim) position encoding of this attention's own grid (for the source branch's queries)."""
        key = ("positions", length, dim, dtype)
        if key not in self._cache:
            h, w = self.grid(length)
            self._cache[key] = position_encoding(h, w, dim, self.region_masks.device).to(dtype)
        return self._cache[key]


def position_encoding(height: int, width: int, dim: int, device: torch.device | None = None) -> torch.Tensor:
    """(height·width, dim) fixed 2-D sinusoidal encoding of each cell's centre in [0, 1]² (so the
    same place gets the same code at every resolution): dim/4 frequencies per axis, sin and cos;
    zero in the channels left over when dim is not a multiple of 4."""
    freqs = dim // 4
    out = torch.zeros(height * width, dim, device=device)
    if freqs == 0:
        return out
    ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height
    xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    scales = math.pi * 2.0 ** torch.arange(freqs, device=device, dtype=torch.float32)  # π … π·2^(f-1)
    angles = torch.cat([y.reshape(-1, 1) * scales, x.reshape(-1, 1) * scales], 1)  # (N, 2f)
    out[:, : 4 * freqs] = torch.cat([angles.sin(), angles.cos()], 1)
    return out


def _heads(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    batch, length, _ = x.shape
    return x.view(batch, length, attn.heads, -1).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    batch, heads, length, dim = x.shape
    return x.transpose(1, 2).reshape(batch, length, heads * dim)


class SelfAttnProcessor(AttnProcessor2_0):
    """Plain SDPA self-attention that accepts (and ignores) the MCIE condition."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, mcie: CrossAttnCondition | None = None):
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


class MCIECrossAttnProcessor(nn.Module):
    """Spatial-aware cross-attention over the instruction context, mixed per position with a
    background-consistent cross-attention over source-image features.

    Written for throughput (the math is `reference_mcie_attention`'s): the text mask is a cached
    additive bias in the compute dtype, the source keys and values come from one fused projection,
    and the per-position mix is a single `lerp` on the heads' outputs in the compute dtype (no
    float32 (B, N, C) temporaries, no dtype round-trips)."""

    def __init__(self, inner_dim: int, source_dim: int, grid: int, gate_init: float = 0.0):
        super().__init__()
        self.grid = grid
        self.source_dim = source_dim
        self.to_kv_source = nn.Linear(source_dim, 2 * inner_dim, bias=False)  # [K; V] stacked
        self.to_q_position = nn.Linear(source_dim, inner_dim, bias=False)  # where the query is
        nn.init.zeros_(self.to_q_position.weight)
        self.gate = nn.Parameter(torch.tensor(float(gate_init)))  # the mix coefficient, 0 at init
        self.register_load_state_dict_pre_hook(_fuse_split_source_projections)

    def __call__(self, attn: Attention, hidden_states: torch.Tensor,
                 encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 mcie: CrossAttnCondition | None = None) -> torch.Tensor:
        if mcie is None:
            raise ValueError("MCIECrossAttnProcessor needs cross_attention_kwargs={'mcie': condition}")
        if hidden_states.ndim != 3 or encoder_hidden_states is None:
            raise ValueError("MCIE cross-attention expects (B, N, C) hidden states and a context")
        residual = hidden_states
        length = hidden_states.shape[1]
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)

        query = _heads(attn, attn.to_q(hidden_states))
        key = _heads(attn, attn.to_k(encoder_hidden_states))
        value = _heads(attn, attn.to_v(encoder_hidden_states))
        # (B, heads, N, d); a mask rules out flash, CUDA runs the memory-efficient kernel here
        text = F.scaled_dot_product_attention(query, key, value,
                                              attn_mask=mcie.token_bias(length, query.dtype))
        if mcie.source_features is not None:
            source = mcie.source_tokens(length, self.grid, query.dtype)
            k_src, v_src = self.to_kv_source(source).chunk(2, dim=-1)
            where = self.to_q_position(mcie.query_positions(length, self.source_dim, query.dtype))
            q_src = query + _heads(attn, where[None].expand(query.shape[0], -1, -1))
            # no mask: the flash kernel on CUDA
            from_source = F.scaled_dot_product_attention(q_src, _heads(attn, k_src), _heads(attn, v_src))
            closed = mcie.background_at(length, text.dtype) * self.gate.to(text.dtype)
            text = torch.lerp(text, from_source, closed)  # (1 - closed)·text + closed·source

        out = attn.to_out[1](attn.to_out[0](_merge(text)))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def _fuse_split_source_projections(module, state_dict, prefix, *args) -> None:
    """Load weights saved with separate `to_k_source` / `to_v_source` into `to_kv_source`."""
    k, v = prefix + "to_k_source.weight", prefix + "to_v_source.weight"
    if k in state_dict and v in state_dict:
        state_dict[prefix + "to_kv_source.weight"] = torch.cat([state_dict.pop(k), state_dict.pop(v)])


def reference_mcie_attention(attn: Attention, processor: MCIECrossAttnProcessor,
                             hidden_states: torch.Tensor, context: torch.Tensor,
                             condition: CrossAttnCondition) -> torch.Tensor:
    """The MCIE cross-attention written out plainly (explicit softmax, boolean mask, float32 mix):
    what the optimised processor must equal. Tests compare against it; not used in training."""
    length = hidden_states.shape[1]
    if attn.norm_cross:
        context = attn.norm_encoder_hidden_states(context)
    query = _heads(attn, attn.to_q(hidden_states))
    scale = query.shape[-1] ** -0.5

    def attend(keys, values, allowed=None, queries=query):
        scores = queries @ keys.transpose(-1, -2) * scale
        if allowed is not None:
            scores = scores.masked_fill(~allowed, float("-inf"))
        return _merge(scores.softmax(-1) @ values)

    text = attend(_heads(attn, attn.to_k(context)), _heads(attn, attn.to_v(context)),
                  condition.token_mask(length))
    mixed = text
    if condition.source_features is not None:
        h, w = condition.grid(length)
        grid = (min(h, processor.grid), min(w, processor.grid))
        source = F.adaptive_avg_pool2d(condition.source_features, grid).flatten(2).transpose(1, 2)
        source = source + position_encoding(*grid, source.shape[-1], source.device)
        k_weight, v_weight = processor.to_kv_source.weight.chunk(2)
        where = position_encoding(h, w, processor.source_dim, query.device) @ processor.to_q_position.weight.T
        from_source = attend(_heads(attn, source @ k_weight.T), _heads(attn, source @ v_weight.T),
                             queries=query + _heads(attn, where[None].expand(query.shape[0], -1, -1)))
        background = 1.0 - F.adaptive_max_pool2d(1.0 - condition.background.float(), (h, w))
        closed = processor.gate * background.flatten(2).transpose(1, 2)  # (B, N, 1)
        mixed = (1 - closed) * text.float() + closed * from_source.float()
    out = attn.to_out[1](attn.to_out[0](mixed.to(query.dtype)))
    if attn.residual_connection:
        out = out + hidden_states
    return out / attn.rescale_output_factor


def install_mcie_processors(unet: nn.Module, source_dim: int, grid: int) -> None:
    """Swap every cross-attention (`attn2`) for MCIE's and every self-attention for SDPA."""
    processors = {}
    for name in unet.attn_processors:
        module = unet.get_submodule(name.removesuffix(".processor"))
        if module.is_cross_attention:
            processors[name] = MCIECrossAttnProcessor(module.inner_dim, source_dim, grid)
        else:
            processors[name] = SelfAttnProcessor()
    unet.set_attn_processor(processors)


def mcie_processors(unet: nn.Module) -> list[MCIECrossAttnProcessor]:
    return [p for p in unet.attn_processors.values() if isinstance(p, MCIECrossAttnProcessor)]


def set_background_gate(unet: nn.Module, closed: float) -> None:
    """Force every background gate: 1.0 = fully closed (background sees only the source)."""
    with torch.no_grad():
        for processor in mcie_processors(unet):
            processor.gate.fill_(float(closed))
