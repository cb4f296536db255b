"""What MCIE-E1's joint-attention processors need besides the hidden states, for one DiT call.

A flow-matching DiT editor (FLUX.1 Kontext, Qwen-Image-Edit) runs ONE attention over the joint
sequence `[text tokens, target image tokens, source image tokens]`. MCIE-E1's spatial guidance is
a mask on that attention, built from one rule so that it holds through any number of layers:

  every token carries a *label set* L — the sub-instructions whose information it may hold:
  a global text token ∅, a token of sub-instruction i {i}, a target image token the set of
  regions its cell touches, a source (reference) image token ∅.
  A query q may read a key k only if L(k) ⊆ L(q).

So the tokens of sub-instruction i and the image tokens of region i see each other; image tokens
outside region i never see sub-instruction i, nor (which a one-layer mask would miss) image or
text tokens that have already read it; global tokens and the source are seen everywhere. By
induction over layers, the information of sub-instruction j stays inside region j. With no
sub-instructions every label set is ∅ and the mask is dropped: the pretrained attention, exactly.

Label sets are int64 bitsets (≤ 62 sub-instructions), so the mask is `(bits_k & ~bits_q) == 0`.
The rule reaches the attention in one of two forms, chosen by `JointCondition.attention`:

- "sdpa" (default): a dense (B, 1, N, N) bool mask for `scaled_dot_product_attention`. Simple and
  exact, but a mask keeps SDPA off its flash kernels and costs N² memory (N ≈ 8.3k joint tokens
  per sample at 1024 px).
- "flex": the same test as a `flex_attention` `mask_mod` in a `BlockMask`. Only per-block summaries
  of the mask are stored (N²/128² entries), blocks no query may read (source rows × region
  columns, region i × region j) are skipped, all-true blocks run without evaluating the mask, and
  the rule is evaluated inside a fused kernel. On CUDA the block mask is built with
  `create_block_mask(_compile=True)` (never materialising N²) and the processors call a
  `torch.compile`d `flex_attention`; elsewhere both run eagerly (a reference implementation that
  materialises the scores — fine for the tiny CPU models of the tests).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask

GLOBAL_TOKEN = -1  # same labels as trainer/attention.py (the UNet path)
PADDING_TOKEN = -2
MAX_SPANS = 62  # label sets are int64 bitsets
MASK_ROWS = 1024  # query rows per block while the dense mask is built
ATTENTION_KINDS = ("sdpa", "flex")  # how the processors apply the mask (module docstring)


@dataclass
class JointCondition:
    """Spans, regions and background for one batch, at the DiT's token grid.

    token_spans:  (B, T) long — GLOBAL_TOKEN, sub-instruction index i >= 0, or PADDING_TOKEN per
                  text token (T = the transformer's text length).
    region_masks: (B, S, H, W) 0/1 — region of each sub-instruction, any resolution (pixels or
                  latents); max-pooled to the token grid (a token touching the region is in it).
    background:   (B, 1, H, W) 0/1 — where no sub-edit may change anything; a token is background
                  only if its whole cell is (conservative: edges of an edit stay editable).
    grid:         (h, w) — the target image's token grid (target tokens come first in the image
                  sequence, h·w of them; any tokens after them are the source/reference image).
    source:       (B, h·w, C) — instruction-free features of the source image at the same token
                  positions (the packed source latents), read by the background injection.
    attention:    "sdpa" (dense mask, `attention_mask`) or "flex" (`block_mask` + flex_attention):
                  the same rule, the same outputs; "flex" is the one that scales (module docstring).
    """

    token_spans: torch.Tensor
    region_masks: torch.Tensor
    background: torch.Tensor
    grid: tuple[int, int]
    source: torch.Tensor | None = None
    attention: str = "sdpa"
    _cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {self.attention!r}")
        if self.token_spans.ndim != 2:
            raise ValueError(f"token_spans must be (B, T), got shape {tuple(self.token_spans.shape)}")
        batch, spans = self.region_masks.shape[:2]
        if self.region_masks.ndim != 4 or batch != self.token_spans.shape[0]:
            raise ValueError(f"region_masks must be (B, S, H, W) with B={self.token_spans.shape[0]}, "
                             f"got {tuple(self.region_masks.shape)}")
        if spans > MAX_SPANS:
            raise ValueError(f"at most {MAX_SPANS} sub-instructions per sample, got {spans}")
        if self.token_spans.numel() and int(self.token_spans.max()) >= spans:
            raise ValueError(f"token_spans names sub-instruction {int(self.token_spans.max())} "
                             f"but region_masks has only {spans}")
        if self.token_spans.numel() and int(self.token_spans.min()) < PADDING_TOKEN:
            raise ValueError("token_spans labels must be >= -2 (-1 global, -2 padding)")
        if self.background.ndim != 4 or self.background.shape[:2] != (batch, 1):
            raise ValueError(f"background must be (B, 1, H, W), got {tuple(self.background.shape)}")
        h, w = self.grid
        if self.source is not None and self.source.shape[:2] != (batch, h * w):
            raise ValueError(f"source must be (B, {h * w}, C) for grid {self.grid}, "
                             f"got {tuple(self.source.shape)}")

    @property
    def text_length(self) -> int:
        return self.token_spans.shape[1]

    @property
    def target_length(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def restricts(self) -> bool:
        """False when every label set is ∅ and nothing is padding: the mask would be all-true.
        Computed once per condition (it waits for the device; every attention call asks)."""
        if "restricts" not in self._cache:
            self._cache["restricts"] = bool((self.token_spans != GLOBAL_TOKEN).any()) or bool(self.regions().any())
        return self._cache["restricts"]

    def regions(self) -> torch.Tensor:
        """(B, S, h·w) bool: is target token p in the region of sub-instruction s?"""
        if "regions" not in self._cache:
            if self.region_masks.shape[1] == 0:  # no sub-instructions (pooling refuses 0 channels)
                batch = self.region_masks.shape[0]
                self._cache["regions"] = torch.zeros(batch, 0, self.target_length, dtype=torch.bool,
                                                     device=self.region_masks.device)
                return self._cache["regions"]
            pooled = F.adaptive_max_pool2d(self.region_masks.float(), self.grid)
            self._cache["regions"] = pooled.flatten(2) > 0.5
        return self._cache["regions"]

    def background_tokens(self, dtype: torch.dtype) -> torch.Tensor:
        """(B, h·w, 1) 0/1 in `dtype`: 1 where the target token's whole cell is background."""
        key = ("background", dtype)
        if key not in self._cache:
            edited = F.adaptive_max_pool2d(1.0 - self.background.float(), self.grid)
            self._cache[key] = (1.0 - edited).flatten(1)[:, :, None].to(dtype)
        return self._cache[key]

    def bits(self, image_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Label-set bitsets (B, T + image_length) int64 of the joint sequence, and which of its
        tokens may be read at all (B, T + image_length) bool (padding may not)."""
        key = ("bits", image_length)
        if key in self._cache:
            return self._cache[key]
        if image_length < self.target_length:
            raise ValueError(f"{image_length} image tokens cannot hold the {self.grid} target grid")
        labels = self.token_spans
        weights = torch.ones(1, dtype=torch.int64, device=labels.device) << torch.arange(
            self.region_masks.shape[1], device=labels.device)  # 2**s
        text_bits = torch.where(labels >= 0, torch.ones_like(labels) << labels.clamp(min=0), 0)
        target_bits = (self.regions().long() * weights[None, :, None]).sum(1)  # disjoint bits: sum == or
        source_bits = target_bits.new_zeros(labels.shape[0], image_length - self.target_length)
        bits = torch.cat([text_bits, target_bits, source_bits], 1)
        readable = torch.cat([labels != PADDING_TOKEN, torch.ones_like(target_bits, dtype=torch.bool),
                              torch.ones_like(source_bits, dtype=torch.bool)], 1)
        self._cache[key] = (bits, readable)
        return bits, readable

    def _readable(self, image_length: int, key_valid: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """`bits(image_length)` with the model's own text mask folded into "readable"."""
        bits, readable = self.bits(image_length)
        if key_valid is not None:
            readable = readable.clone()
            readable[:, : self.text_length] &= key_valid.bool()
        return bits, readable

    def attention_mask(self, image_length: int, key_valid: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 1, N, N) bool SDPA mask over the joint sequence (N = T + image_length): query q may
        read key k iff L(k) ⊆ L(q) and k is readable; every token also reads itself, so no row is
        empty (a padding query then reads only itself; nothing reads it back).
        `key_valid` (B, T) bool: the model's own text mask (Qwen's `encoder_hidden_states_mask`)."""
        return self._per_text_mask("mask", image_length, key_valid, self._dense_mask)

    def _per_text_mask(self, kind: str, image_length: int, key_valid: torch.Tensor | None, build: Callable):
        """One cached mask per (kind, image_length, key_valid *content*). The model hands every
        layer of one forward the same `key_valid` object, but a new one each sampling step: an
        identity check serves the layers without a device sync, a value check (once per new
        object) the steps. (A key on `data_ptr()` grew one N² mask per step, and a freed pointer
        reused by a different mask could have returned a wrong one.)"""
        entries = self._cache.setdefault((kind, image_length), [])
        for entry in entries:
            if entry["seen"] is key_valid or _same_text_mask(entry["content"], key_valid):
                entry["seen"] = key_valid  # held, so its identity cannot be reused by another tensor
                return entry["value"]
        content = None if key_valid is None else key_valid.detach().bool().clone()
        value = build(image_length, key_valid)
        entries.append({"content": content, "seen": key_valid, "value": value})
        return value

    def _dense_mask(self, image_length: int, key_valid: torch.Tensor | None) -> torch.Tensor:
        bits, readable = self._readable(image_length, key_valid)
        n = bits.shape[1]
        # [b, q, k]: L(k) ⊆ L(q), a block of queries at a time: the int64 intermediate of all N²
        # pairs at once would be 8× the bool mask (≈ 0.6 GB per sample at 1024 px)
        subset = torch.cat([(bits[:, None, :] & ~bits[:, start: start + MASK_ROWS, None]) == 0
                            for start in range(0, n, MASK_ROWS)], 1)
        allowed = (subset & readable[:, None, :]) | torch.eye(n, dtype=torch.bool, device=bits.device)
        return allowed[:, None]

    def mask_mod(self, image_length: int, key_valid: torch.Tensor | None = None) -> Callable:
        """`attention_mask`'s rule as a flex_attention `mask_mod(b, h, q, k) -> bool` (all heads alike)."""
        bits, readable = self._readable(image_length, key_valid)

        def mask_mod(b, h, q, k):
            return (((bits[b, k] & ~bits[b, q]) == 0) & readable[b, k]) | (q == k)

        return mask_mod

    def block_mask(self, image_length: int, key_valid: torch.Tensor | None = None) -> BlockMask:
        """`attention_mask` as a flex_attention `BlockMask` (B, 1, N, N), cached the same way.
        On CUDA it is built compiled, so the N × N mask is never materialised."""
        return self._per_text_mask("block", image_length, key_valid, self._block_mask)

    def _block_mask(self, image_length: int, key_valid: torch.Tensor | None) -> BlockMask:
        device = self.token_spans.device
        n = self.text_length + image_length
        return create_block_mask(self.mask_mod(image_length, key_valid), self.token_spans.shape[0],
                                 None, n, n, device=device, _compile=device.type == "cuda")


def _same_text_mask(stored: torch.Tensor | None, key_valid: torch.Tensor | None) -> bool:
    if stored is None or key_valid is None:
        return stored is None and key_valid is None
    return stored.shape == key_valid.shape and torch.equal(stored, key_valid.to(stored.device).bool())
