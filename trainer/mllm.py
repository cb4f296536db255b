"""The multimodal LLM side of MCIE-E1: a Qwen2.5-VL (or Qwen2-VL) that reads the source image and
the sub-instructions, and returns its hidden states with each sub-instruction's token span.

`tiny` builds the model from a small config, a byte-level tokenizer and the PIL image processor
(no torchvision, nothing downloaded), seeded so every build is the same model. `base` loads all
three from a local directory. The prompt is laid out by hand — `<|vision_start|>`, the image pads
expanded to the processor's grid, `<|vision_end|>`, then each sub-instruction encoded on its own —
so the span of sub-instruction i is known exactly (no processor class, which needs torchvision). Each
sub-instruction is read against the image prefix alone, as a continuation of its cached keys and
values (see `MLLMEncoder.encode`).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from trainer.config import ModelConfig

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ["<|endoftext|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                  "<|video_pad|>"]
SPLIT_PROMPT = (
    "Split this image-editing instruction into its separate edits, in order, each a short imperative "
    "phrase that keeps the instruction's own words. Answer with a JSON list of strings and nothing "
    "else.\nInstruction: {instruction}"
)


def _image_processor_class():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil


def byte_tokenizer():
    """A byte-level BPE tokenizer with no merges: 256 byte tokens + the Qwen-VL special tokens."""
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {char: i for i, char in enumerate(bytes_to_unicode().values())}
    for token in SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    return Qwen2Tokenizer(vocab=vocab, merges=[], unk_token=None, pad_token="<|endoftext|>",
                          eos_token="<|endoftext|>", additional_special_tokens=SPECIAL_TOKENS[1:])


def build_tiny_mllm(spec: dict[str, Any], seed: int):
    """(model, tokenizer, image processor), random-initialised from `spec`, same for a same seed."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    spec = copy.deepcopy(spec)  # transformers fills in nested dicts (rope_scaling): not the config's
    tokenizer = byte_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text = dict(spec["text"], vocab_size=len(tokenizer), bos_token_id=ids["<|endoftext|>"],
                eos_token_id=ids["<|endoftext|>"], pad_token_id=ids["<|endoftext|>"])
    config = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=dict(spec["vision"]),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config)
    patch = spec["vision"]["patch_size"]
    processor = _image_processor_class()(patch_size=patch,
                                         merge_size=spec["vision"]["spatial_merge_size"],
                                         temporal_patch_size=spec["vision"]["temporal_patch_size"])
    return model, tokenizer, processor


def load_mllm(path: str, dtype: torch.dtype):
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoTokenizer

    if not Path(path).is_dir():
        raise FileNotFoundError(f"MLLM weight directory {path!r} does not exist")
    config = AutoConfig.from_pretrained(path)
    if config.model_type not in ("qwen2_5_vl", "qwen2_vl"):
        raise ValueError(f"{path}: expected a Qwen2.5-VL or Qwen2-VL model, found {config.model_type!r}")
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(_beside(path, "tokenizer_config.json", "tokenizer"))
    # a processor saved by transformers >= 5 keeps the image processor's config in processor_config.json
    folder = _beside(path, "preprocessor_config.json", "processor")
    if folder == path:
        folder = _beside(path, "processor_config.json", "processor")
    processor = _image_processor_class().from_pretrained(folder)
    return model, tokenizer, processor


def _beside(path: str, marker: str, sibling: str) -> str:
    """`path` when it holds `marker`, else its sibling folder `sibling`: a diffusers pipeline
    (Qwen-Image-Edit) keeps the MLLM's weights in text_encoder/, its tokenizer and image
    processor in tokenizer/ and processor/ beside it."""
    other = Path(path).parent / sibling
    return str(other) if not (Path(path) / marker).is_file() and (other / marker).is_file() else path


@dataclass
class Encoded:
    """The MLLM's reading of a batch, laid out per sample as [image prefix | span 0 | span 1 | ...].

    The prefix (`<|vision_start|>`, the image tokens, `<|vision_end|>`) depends on the image alone;
    span s holds the hidden states of sub-instruction s read right after that prefix, in its own
    sequence — so no span depends on another span's text, and the prefix on none."""

    hidden: torch.Tensor  # (B, L, D) last hidden states
    valid: torch.Tensor  # (B, L) bool: real (not padding) tokens
    spans: torch.Tensor  # (B, S, L) bool: token l belongs to sub-instruction s
    sub_valid: torch.Tensor  # (B, S) bool: sub-instruction s exists

    @property
    def prefix(self) -> torch.Tensor:
        """(B, L) bool: the image prefix (real tokens of no span)."""
        return self.valid & ~self.spans.any(1)


class MLLMEncoder:
    """Runs the MLLM over (source image, sub-instructions) and reports per-sub-instruction spans."""

    def __init__(self, model, tokenizer, image_processor, image_size: int, max_sub_edits: int):
        self.model = model.eval()
        self.model.requires_grad_(False)
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.image_size = image_size
        self.max_sub_edits = max_sub_edits
        config = model.config
        self.image_token = config.image_token_id
        self.vision_start = config.vision_start_token_id
        self.vision_end = config.vision_end_token_id
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.merge = getattr(image_processor, "merge_size", 2)

    @classmethod
    def from_config(cls, config: ModelConfig, dtype: torch.dtype = torch.float32) -> "MLLMEncoder":
        if config.mllm_path is not None:
            model, tokenizer, processor = load_mllm(config.mllm_path, dtype)
        else:
            model, tokenizer, processor = build_tiny_mllm(config.mllm, config.seed)
        return cls(model, tokenizer, processor, config.mllm_image_size, config.max_sub_edits)

    @property
    def hidden_size(self) -> int:
        config = self.model.config
        return getattr(config, "text_config", config).hidden_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def token_grid(self) -> tuple[int, int]:
        """(rows, cols) of the image tokens (Qwen-VL: patches merged `merge`x`merge`); in the
        prompt they follow `<|vision_start|>` (position 0) in row-major order."""
        side = self.image_size // (self.image_processor.patch_size * self.merge)
        return side, side

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "MLLMEncoder":
        self.model.to(device=device, dtype=dtype)
        return self

    def _pixels(self, images: np.ndarray) -> dict[str, torch.Tensor]:
        from PIL import Image

        size = self.image_size
        if isinstance(images, torch.Tensor):  # a DataLoader turns arrays into tensors
            images = images.cpu().numpy()
        resized = [np.asarray(Image.fromarray(im).resize((size, size), Image.BICUBIC)) for im in images]
        return self.image_processor(images=resized, do_resize=False, return_tensors="pt")

    def _prefix(self, image_tokens: int) -> list[int]:
        return [self.vision_start] + [self.image_token] * image_tokens + [self.vision_end]

    def _piece(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] or [self.pad]

    def encode(self, images: np.ndarray, sub_texts: list[list[str]]) -> Encoded:
        """images: uint8 (B, H, W, 3); sub_texts: per sample, its sub-instructions in order.

        The image prefix is read once per image (its keys and values cached), then every
        sub-instruction is read as its own continuation of that cache, so the hidden states of
        sub-instruction s depend on the image and on its own text only — the spatial restriction
        downstream would otherwise leak another sub-instruction's words into s's region."""
        if len(images) != len(sub_texts):
            raise ValueError(f"{len(images)} images but {len(sub_texts)} instruction lists")
        device = self.device
        dtype = next(self.model.parameters()).dtype
        pixels = self._pixels(images)
        grid = pixels["image_grid_thw"]
        batch = len(sub_texts)
        # every image is shown at image_size², so every prefix has the same length
        prefix = torch.tensor([self._prefix(int(grid[0].prod()) // self.merge**2)] * batch, device=device)
        model = self.model.model
        read = model(input_ids=prefix, attention_mask=torch.ones_like(prefix),
                     pixel_values=pixels["pixel_values"].to(device, dtype), image_grid_thw=grid.to(device),
                     mm_token_type_ids=(prefix == self.image_token).long(), use_cache=True)
        texts = [t[: self.max_sub_edits] for t in sub_texts]
        slots = max(1, max(len(t) for t in texts))
        # rows b·slots + s; a missing sub-instruction reads one padding token (and is dropped)
        pieces = [self._piece(t[s]) if s < len(t) else [self.pad] for t in texts for s in range(slots)]
        length = max(len(piece) for piece in pieces)
        input_ids = torch.full((len(pieces), length), self.pad, dtype=torch.long)
        mask = torch.zeros(len(pieces), length, dtype=torch.long)
        for r, piece in enumerate(pieces):
            input_ids[r, : len(piece)] = torch.tensor(piece)  # right padding: positions stay aligned
            mask[r, : len(piece)] = 1
        cache = read.past_key_values
        cache.batch_repeat_interleave(slots)
        # text after the image: M-RoPE's three axes all count on from the prefix (its rope delta)
        positions = torch.arange(length, device=device)[None] + prefix.shape[1]
        positions = positions + model.rope_deltas.to(device).repeat_interleave(slots, 0)
        spans_hidden = model(input_ids=input_ids.to(device),
                             attention_mask=torch.cat([torch.ones_like(prefix).repeat_interleave(slots, 0),
                                                       mask.to(device)], 1),
                             position_ids=positions[None].expand(3, -1, -1), cache=cache,
                             use_cache=False).last_hidden_state
        # lay out [prefix | span 0 | span 1 | ...] per sample
        prefix_hidden = read.last_hidden_state
        lengths = [prefix.shape[1] + sum(len(pieces[b * slots + s]) for s in range(len(t)))
                   for b, t in enumerate(texts)]
        total = max(lengths)
        out = prefix_hidden.new_zeros(batch, total, prefix_hidden.shape[-1])
        valid = torch.zeros(batch, total, dtype=torch.bool)
        spans = torch.zeros(batch, self.max_sub_edits, total, dtype=torch.bool)
        for b, t in enumerate(texts):
            joined = [prefix_hidden[b]]
            start = prefix.shape[1]
            for s in range(len(t)):
                n = len(pieces[b * slots + s])
                joined.append(spans_hidden[b * slots + s, :n])
                spans[b, s, start:start + n] = True
                start += n
            out[b, :start] = torch.cat(joined)
            valid[b, :start] = True
        return Encoded(hidden=out, valid=valid.to(device), spans=spans.to(device),
                       sub_valid=spans.any(-1).to(device))

    @torch.no_grad()
    def answer_split(self, instruction: str, max_new_tokens: int = 256) -> str:
        """The MLLM's own answer (greedy, text only) to SPLIT_PROMPT for `instruction`."""
        content = SPLIT_PROMPT.format(instruction=instruction)
        if getattr(self.tokenizer, "chat_template", None):
            prompt = self.tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                                        tokenize=False, add_generation_prompt=True)
        else:  # a tokenizer without a template (the tiny model's): Qwen's chat layout by hand
            prompt = f"<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n"
        input_ids = torch.tensor([self.tokenizer(prompt, add_special_tokens=False)["input_ids"]],
                                 device=self.device)
        output = self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                     max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=self.pad)
        return self.tokenizer.decode(output[0, input_ids.shape[1]:], skip_special_tokens=True)


def attach_lora(encoder: MLLMEncoder, rank: int, targets: tuple[str, ...] = ("q_proj", "v_proj")) -> nn.ModuleDict:
    """LoRA (peft) on the language model's attention projections.

    peft wraps the target linears in place (`lora_B` starts at zero: the MLLM's output is unchanged
    at step 0). The adapters' modules are returned in a ModuleDict so the trained model owns,
    optimises and saves them; the MLLM's own weights stay frozen and out of checkpoints."""
    from peft import LoraConfig, inject_adapter_in_model

    language = encoder.model.model.language_model
    config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=list(targets), bias="none")
    inject_adapter_in_model(config, language)
    adapters = nn.ModuleDict()
    for name, module in language.named_modules():
        if hasattr(module, "lora_A") and name.rsplit(".", 1)[-1] in targets:
            adapters[name.replace(".", "__")] = nn.ModuleDict({"A": module.lora_A, "B": module.lora_B})
    if not adapters:
        raise ValueError(f"no linear layers named {targets} in the MLLM's language model")
    for adapter in adapters.values():
        adapter.requires_grad_(True)
    log.info("attached %d peft LoRA adapters (rank %d) to the MLLM", len(adapters), rank)
    return adapters
