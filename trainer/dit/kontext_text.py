"""FLUX.1 Kontext's own text conditioning for MCIE-E1 (`text_tokens: released`).

The released Kontext transformer was trained on T5-XXL's states of the prompt (512 tokens, padded,
the padding NOT masked) as its text tokens and CLIP-L's pooled output as its pooled vector. This
module computes both exactly as `FluxKontextPipeline.encode_prompt` does — it calls the
pipeline's own `_get_t5_prompt_embeds` / `_get_clip_prompt_embeds` on the pipeline folder's
encoders — for the instruction written from the sub-instructions (`released_prompt`), and labels
T5's tokens for MCIE-E1's spatial attention: a token made of sub-instruction i's characters
carries i; the connectives, EOS and the padding are global (padding stays readable, as the
pipeline feeds all 512 states).

Locality is weaker than with the MLLM's leak-free reading: T5 is a bidirectional encoder, so the
state of sub-instruction i's tokens already depends on every other sub-instruction's words, and
CLIP's pooled vector (of the whole instruction) modulates every token of the DiT. The label mask
still keeps each sub-instruction's tokens out of the other regions, but what they carry is not
theirs alone (docs/trainer.md, "Released conditioning (FLUX.1 Kontext)", measures how much).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trainer.config import ModelConfig, tokenizer_dir
from trainer.dit.condition import GLOBAL_TOKEN
from trainer.model import Conditioning

T5_LENGTH = 512  # FluxKontextPipeline.__call__'s max_sequence_length default (tested equal)
JOINER = ", then "  # between sub-instructions; the first is capitalised and a full stop ends it


def released_prompt(sub_texts: list[str]) -> tuple[str, list[tuple[int, int]]]:
    """The instruction the pipeline is given — sub-instructions in order, joined by ", then ", the
    first letter upper-cased, a final full stop — and each sub-instruction's character span
    [start, end) in it. No sub-instructions: the empty prompt (the pipeline's "no instruction")."""
    if not sub_texts:
        return "", []
    spans, parts, start = [], [], 0
    for i, text in enumerate(sub_texts):
        if i:
            parts.append(JOINER)
            start += len(JOINER)
        parts.append(text[:1].upper() + text[1:] if i == 0 else text)
        spans.append((start, start + len(text)))
        start += len(text)
    return "".join(parts) + ".", spans


def span_labels(offsets: torch.Tensor, spans: list[tuple[int, int]]) -> torch.Tensor:
    """(T,) labels of T tokens from their character offsets (T, 2): i where the token's characters
    overlap sub-instruction i's span, else GLOBAL_TOKEN (empty offsets: EOS and padding)."""
    labels = torch.full((offsets.shape[0],), GLOBAL_TOKEN, dtype=torch.long)
    start, end = offsets[:, 0], offsets[:, 1]
    for i, (a, b) in enumerate(spans):
        labels[(end > start) & (start < b) & (end > a)] = i
    return labels


@dataclass
class KontextConditioning(Conditioning):
    """A Kontext "released" condition: `context` is T5's states, `pooled` CLIP's pooled output (B, P)."""

    pooled: torch.Tensor | None = None


class KontextText:
    """The pipeline's CLIP (`text_encoder`, `tokenizer`) and T5 (`text_encoder_2`, `tokenizer_2`),
    frozen. Attribute names are the pipeline's, so its methods run with this object as `self`."""

    def __init__(self, text_encoder, tokenizer, text_encoder_2, tokenizer_2):
        self.text_encoder = text_encoder.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.text_encoder_2 = text_encoder_2.eval().requires_grad_(False)
        self.tokenizer_2 = tokenizer_2
        self.tokenizer_max_length = tokenizer.model_max_length  # as FluxKontextPipeline.__init__ sets it

    @classmethod
    def from_config(cls, config: ModelConfig, dtype: torch.dtype = torch.float32) -> "KontextText":
        from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        config.check_paths()
        return cls(CLIPTextModel.from_pretrained(config.text_encoder_path, dtype=dtype),
                   CLIPTokenizer.from_pretrained(str(tokenizer_dir(config.text_encoder_path, "tokenizer"))),
                   T5EncoderModel.from_pretrained(config.text_encoder_2_path, dtype=dtype),
                   T5TokenizerFast.from_pretrained(str(tokenizer_dir(config.text_encoder_2_path, "tokenizer_2"))))

    @property
    def widths(self) -> tuple[int, int]:
        """(T5's d_model, CLIP's pooled width): the transformer's joint_attention_dim and
        pooled_projection_dim."""
        return self.text_encoder_2.config.d_model, self.text_encoder.config.hidden_size

    @property
    def device(self) -> torch.device:
        return next(self.text_encoder_2.parameters()).device

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "KontextText":
        self.text_encoder.to(device=device, dtype=dtype)
        self.text_encoder_2.to(device=device, dtype=dtype)
        return self

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(T5 states (B, 512, d_model), CLIP pooled (B, hidden)): `FluxKontextPipeline.encode_prompt`."""
        from diffusers import FluxKontextPipeline

        device = self.device
        pooled = FluxKontextPipeline._get_clip_prompt_embeds(self, prompt=prompts, device=device)
        states = FluxKontextPipeline._get_t5_prompt_embeds(self, prompt=prompts, max_sequence_length=T5_LENGTH,
                                                           device=device)
        return states, pooled

    def encode(self, sub_texts: list[list[str]],
               drop: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per sample its sub-instructions → (T5 states (B, 512, D), CLIP pooled (B, P), labels (B, 512)).
        Rows in `drop` (B,) bool read the empty prompt, every token global (classifier-free
        guidance's "no instruction", the pipeline's negative prompt "")."""
        dropped = [False] * len(sub_texts) if drop is None else drop.tolist()
        written = [released_prompt([] if off else texts) for texts, off in zip(sub_texts, dropped)]
        states, pooled = self.encode_prompts([prompt for prompt, _ in written])
        # the tokenizer call of `_get_t5_prompt_embeds`, with the character offsets of its tokens
        offsets = self.tokenizer_2([prompt for prompt, _ in written], padding="max_length", max_length=T5_LENGTH,
                                   truncation=True, return_offsets_mapping=True,
                                   return_tensors="pt")["offset_mapping"]
        labels = torch.stack([span_labels(offsets[b], spans) for b, (_, spans) in enumerate(written)])
        return states, pooled, labels.to(states.device)

