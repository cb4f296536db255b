"""Qwen-Image-Edit's own text conditioning for MCIE-E1 (`text_tokens: released`).

The released Qwen-Image-Edit transformer was trained on Qwen2.5-VL's last hidden states of the
pipeline's template — its system prompt, the source image resized to about 1024² pixels at the
image's own aspect, the whole instruction — less the template's first
`prompt_template_encode_start_idx` tokens (`QwenImageEditPipeline._get_qwen_prompt_embeds`).
`QwenReleasedText.read` computes exactly these states and their mask for the instruction written
from the sub-instructions (`kontext_text.released_prompt`: ", then " between them; the empty
prompt for "no instruction", the pipeline's negative prompt ""). The template, the dropped prefix
and the image resizer are the pipeline's own, read off a pipeline built without components; the
1024² area is a literal inside `QwenImageEditPipeline.__call__`, so it is `RELEASED_AREA` here.

Each sub-instruction's tokens are found in that sequence from the tokenizer's character offsets.
Qwen2.5-VL is causal, so a token's state depends on the tokens before it only, and the labels
MCIE-E1's spatial attention reads (`causal_labels`) follow that:
- tokens before the first sub-instruction (the template, the image) read no instruction: global;
- sub-instruction j's tokens, and the connective or template suffix after them up to the next
  sub-instruction, read sub-instructions 0..j: labelled j, they act in region j only.
So sub-instruction j's words reach regions j, j+1, ... (through the later tokens that read them),
never an earlier region and never the background. This is weaker than `text_tokens: mllm`, where
each sub-instruction is read on its own (docs/trainer.md, "Released conditioning (Qwen-Image-Edit)",
measures the leak). Labelling the suffix global instead would carry every sub-instruction to every
position, background included.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from trainer.dit.condition import GLOBAL_TOKEN, PADDING_TOKEN
from trainer.dit.kontext_text import released_prompt, span_labels
from trainer.mllm import Encoded, MLLMEncoder

RELEASED_AREA = 1024 * 1024  # QwenImageEditPipeline.__call__: calculate_dimensions(1024 * 1024, w / h)


@functools.lru_cache(maxsize=1)
def released_pipeline():
    """A QwenImageEditPipeline without components: the template, the dropped prefix and the
    image resizer its `__init__` sets."""
    from diffusers import QwenImageEditPipeline

    return QwenImageEditPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, processor=None,
                                 transformer=None)


def shown_image(image: np.ndarray):
    """The source (uint8 H×W×3) as the pipeline shows it to Qwen2.5-VL: resized by its
    VaeImageProcessor to `calculate_dimensions(1024², width / height)` (the processor then fits
    it to its patch grid, as it does in the pipeline)."""
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit
    from PIL import Image

    picture = Image.fromarray(np.ascontiguousarray(image))
    width, height, _ = pipeline_qwenimage_edit.calculate_dimensions(RELEASED_AREA, picture.width / picture.height)
    return released_pipeline().image_processor.resize(picture, height, width)


def _image_only_processor_class():
    from transformers import Qwen2VLProcessor

    class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
        """Qwen2VLProcessor without its video processor (which needs torchvision); for images and
        text its `__call__` is Qwen2VLProcessor's."""

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    return ImageOnlyQwen2VLProcessor


def load_processor(mllm_path: str | None, encoder: MLLMEncoder):
    """The pipeline folder's processor/ beside `mllm_path` (text_encoder/), else one made of the
    MLLM's own tokenizer and image processor (a plain Qwen2.5-VL dir, or the tiny MLLM)."""
    kind = _image_only_processor_class()
    folder = Path(mllm_path).parent / "processor" if mllm_path is not None else None
    if folder is not None and folder.is_dir():
        return kind.from_pretrained(str(folder))
    return kind(image_processor=encoder.image_processor, tokenizer=encoder.tokenizer)


def causal_labels(spans: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(B, L) labels from exact spans (B, S, L) and real tokens (B, L): each real token takes the
    last sub-instruction that starts at or before it (the latest one a causal LM's state of it
    has read), GLOBAL_TOKEN before the first; padding PADDING_TOKEN."""
    slots = torch.arange(spans.shape[1], device=spans.device)
    started = spans.long().cumsum(-1) > 0  # (B, S, L): sub-instruction s begins at or before l
    latest = (started.long() * (slots[None, :, None] + 1)).amax(1) - 1
    labels = torch.where(latest >= 0, latest, GLOBAL_TOKEN)
    return torch.where(valid, labels, PADDING_TOKEN)


class QwenReleasedText:
    """Reads (source, sub-instructions) with the MLLM as QwenImageEditPipeline reads (source,
    instruction), and locates each sub-instruction in that reading."""

    def __init__(self, encoder: MLLMEncoder, processor, grid: tuple[int, int]):
        self.encoder = encoder
        self.processor = processor
        self.grid = grid  # the region decoder's image-token grid

    def _offsets(self, text: str, input_ids: torch.Tensor) -> torch.Tensor:
        """(L, 2) character offsets in `text` of the processor's tokens `input_ids` (L,): the
        tokenizer's offsets of `text`, its one `<|image_pad|>` expanded to the processor's count
        (empty offsets); the processor tokenises exactly so, which is checked."""
        tokenizer = self.processor.tokenizer
        image = self.processor.image_token_id
        own = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = list(own["input_ids"]), [tuple(o) for o in own["offset_mapping"]]
        if ids.count(image) != 1:
            raise ValueError(f"the template holds {ids.count(image)} image tokens, expected 1")
        at = ids.index(image)
        count = int((input_ids == image).sum())
        ids[at: at + 1] = [image] * count
        offsets[at: at + 1] = [(0, 0)] * count
        if ids != input_ids.tolist():
            raise RuntimeError("the processor's tokens differ from the tokenizer's: the sub-instructions "
                               "cannot be located in the pipeline's reading")
        return torch.tensor(offsets, dtype=torch.long).reshape(-1, 2)

    def read(self, images: np.ndarray, sub_texts: list[list[str]],
             max_sub_edits: int) -> tuple[Encoded, torch.Tensor]:
        """images uint8 (B, H, W, 3), per sample its sub-instructions (an empty list: the empty
        prompt) → (Encoded: `hidden` the pipeline's `prompt_embeds`, `valid` its
        `prompt_embeds_mask`, `spans` each sub-instruction's own tokens; the MLLM's image tokens
        (B, rows·cols of `grid`, D), bilinearly resampled from the image's own token grid)."""
        if len(images) != len(sub_texts):
            raise ValueError(f"{len(images)} images but {len(sub_texts)} instruction lists")
        if isinstance(images, torch.Tensor):  # a DataLoader turns arrays into tensors
            images = images.cpu().numpy()
        pipe = released_pipeline()
        template, dropped = pipe.prompt_template_encode, pipe.prompt_template_encode_start_idx
        marker = "\x00"
        prompt_start = template.format(marker).index(marker)  # where the instruction starts in the text
        written = [released_prompt(list(texts)[:max_sub_edits]) for texts in sub_texts]
        texts = [template.format(prompt) for prompt, _ in written]
        model = self.encoder.model
        device = self.encoder.device
        inputs = self.processor(text=texts, images=[shown_image(image) for image in images], padding=True,
                                return_tensors="pt").to(device)
        # the pipeline's text_encoder call; its hidden_states[-1] is the language model's output
        hidden = model.model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                             pixel_values=inputs.get("pixel_values"),
                             image_grid_thw=inputs.get("image_grid_thw")).last_hidden_state
        real = inputs["attention_mask"].bool()
        rows, labels, image_tokens = [], [], []
        merge = self.processor.image_processor.merge_size
        for b, (_, spans) in enumerate(written):
            ids = inputs["input_ids"][b][real[b]].cpu()
            offsets = self._offsets(texts[b], ids)[dropped:]
            shifted = [(start + prompt_start, end + prompt_start) for start, end in spans]
            labels.append(span_labels(offsets, shifted))
            states = hidden[b][real[b]][dropped:]
            rows.append(states)
            # the image tokens, after the dropped prefix and before the instruction (read by none of it)
            _, height, width = (int(v) for v in inputs["image_grid_thw"][b])
            where = ids[dropped:] == self.processor.image_token_id
            if int(where.sum()) != (height // merge) * (width // merge):
                raise ValueError("the pipeline's dropped prefix reaches into the image tokens")
            grid = states[where.to(states.device)].T.reshape(1, -1, height // merge, width // merge)
            image_tokens.append(F.interpolate(grid.float(), size=self.grid, mode="bilinear",
                                              align_corners=False).to(states.dtype).flatten(2)[0].T)
        length = max(len(row) for row in rows)
        out = hidden.new_zeros(len(rows), length, hidden.shape[-1])
        valid = torch.zeros(len(rows), length, dtype=torch.bool)
        span_mask = torch.zeros(len(rows), max_sub_edits, length, dtype=torch.bool)
        slots = torch.arange(max_sub_edits)
        for b, (row, label) in enumerate(zip(rows, labels)):
            out[b, : len(row)] = row  # zero padding after, as the pipeline pads
            valid[b, : len(row)] = True
            span_mask[b, :, : len(row)] = label[None] == slots[:, None]
        encoded = Encoded(hidden=out, valid=valid.to(device), spans=span_mask.to(device),
                          sub_valid=span_mask.any(-1).to(device))
        return encoded, torch.stack(image_tokens)
