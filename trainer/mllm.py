"""The multimodal LLM side of MCIE-E1: a Qwen2.5-VL (or Qwen2-VL) that reads the source image and
the sub-instructions, and returns its hidden states with each sub-instruction's token span.

`tiny` builds the model from a small config, a byte-level tokenizer and the PIL image processor
(no torchvision, nothing downloaded), seeded so every build is the same model. `base` loads all
three from a local directory. The prompt is laid out by hand — `<|vision_start|>`, the image pads
expanded to the processor's grid, `<|vision_end|>`, then each sub-instruction encoded on its own —
so the span of sub-instruction i is known exactly (no processor class, which needs torchvision).
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
SEPARATOR = " ; "  # between sub-instructions in the prompt (belongs to no span)
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
    tokenizer = AutoTokenizer.from_pretrained(path)
    processor = _image_processor_class().from_pretrained(path)
    return model, tokenizer, processor


@dataclass
class Encoded:
    hidden: torch.Tensor  # (B, L, D) last hidden states
    valid: torch.Tensor  # (B, L) bool: real (not padding) tokens
    spans: torch.Tensor  # (B, S, L) bool: token l belongs to sub-instruction s
    sub_valid: torch.Tensor  # (B, S) bool: sub-instruction s exists


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

    def _prompt(self, image_tokens: int, texts: list[str]) -> tuple[list[int], list[tuple[int, int]]]:
        ids = [self.vision_start] + [self.image_token] * image_tokens + [self.vision_end]
        spans = []
        for i, text in enumerate(texts[: self.max_sub_edits]):
            if i:
                ids += self.tokenizer(SEPARATOR, add_special_tokens=False)["input_ids"]
            piece = self.tokenizer(text, add_special_tokens=False)["input_ids"] or [self.pad]
            spans.append((len(ids), len(ids) + len(piece)))
            ids += piece
        return ids, spans

    def encode(self, images: np.ndarray, sub_texts: list[list[str]]) -> Encoded:
        """images: uint8 (B, H, W, 3); sub_texts: per sample, its sub-instructions in order."""
        if len(images) != len(sub_texts):
            raise ValueError(f"{len(images)} images but {len(sub_texts)} instruction lists")
        device = self.device
        pixels = self._pixels(images)
        grid = pixels["image_grid_thw"]
        prompts = [self._prompt(int(g.prod()) // self.merge**2, texts) for g, texts in zip(grid, sub_texts)]
        length = max(len(ids) for ids, _ in prompts)
        batch, subs = len(prompts), self.max_sub_edits
        input_ids = torch.full((batch, length), self.pad, dtype=torch.long)
        valid = torch.zeros(batch, length, dtype=torch.bool)
        spans = torch.zeros(batch, subs, length, dtype=torch.bool)
        for b, (ids, sub_spans) in enumerate(prompts):
            input_ids[b, : len(ids)] = torch.tensor(ids)  # right padding: positions stay aligned
            valid[b, : len(ids)] = True
            for s, (start, end) in enumerate(sub_spans):
                spans[b, s, start:end] = True
        input_ids, valid = input_ids.to(device), valid.to(device)
        dtype = next(self.model.parameters()).dtype
        outputs = self.model.model(
            input_ids=input_ids,
            attention_mask=valid.long(),
            pixel_values=pixels["pixel_values"].to(device, dtype),
            image_grid_thw=grid.to(device),
            mm_token_type_ids=(input_ids == self.image_token).long(),
        )
        return Encoded(hidden=outputs.last_hidden_state, valid=valid, spans=spans.to(device),
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


class LoRA(nn.Module):
    """A low-rank update `B(A(x))` added to a frozen linear layer's output (B starts at zero)."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float | None = None):
        super().__init__()
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=False)
        nn.init.kaiming_uniform_(self.down.weight, a=5**0.5)
        nn.init.zeros_(self.up.weight)
        self.scale = (alpha or rank) / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x.to(self.down.weight.dtype))) * self.scale


def attach_lora(encoder: MLLMEncoder, rank: int, targets: tuple[str, ...] = ("q_proj", "v_proj")) -> nn.ModuleDict:
    """LoRA on the language model's attention projections, through forward hooks.

    The adapters are returned (to be owned and saved by the trained model); the MLLM's own weights
    stay frozen and are never written into checkpoints.
    """
    adapters = nn.ModuleDict()
    language = encoder.model.model.language_model
    for name, module in language.named_modules():
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in targets:
            adapter = LoRA(module.in_features, module.out_features, rank)
            adapters[name.replace(".", "__")] = adapter
            module.register_forward_hook(lambda _m, inputs, output, a=adapter: output + a(inputs[0]).to(output.dtype))
    if not adapters:
        raise ValueError(f"no linear layers named {targets} in the MLLM's language model")
    log.info("attached %d LoRA adapters (rank %d) to the MLLM", len(adapters), rank)
    return adapters
