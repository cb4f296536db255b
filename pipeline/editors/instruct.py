"""Instruction-following generative editor (`--editor instruct`): an InstructPix2Pix-style
diffusers pipeline (`StableDiffusionInstructPix2PixPipeline`, or any pipeline taking `prompt` and
`image`: FLUX Kontext, Qwen-Image-Edit ...) from a local directory, for edits a mask cannot frame
(background, style). Each sub-edit's instruction is applied to the whole previous image, and the
result is composited onto it inside the sub-edit's region only (feathered), exactly as the
inpainting editor does: outside every region the target is the source, bit for bit. The loop,
seeds, best-of-N and provenance are `pipeline.editors.inpaint.GenerativeEditor`'s, the shared
pipeline settings `PipelineEditor`'s."""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.compose.regions import FEATHER_PX
from pipeline.editors.base import EDITORS
from pipeline.editors.inpaint import PipelineEditor, Request, resize, to_uint8


class InstructEditor(PipelineEditor):
    backend = "instruct"

    def __init__(self, path: str, steps: int = 20, guidance: float = 7.5,
                 image_guidance: float = 1.5, device: str = "cpu", dtype: str = "float32",
                 max_side: int = 1024, negative_prompt: str = "", candidates: int = 1,
                 feather: int = FEATHER_PX, seed: int = 0, judge: str = "pixel",
                 judge_options: dict[str, Any] | None = None, batch_size: int = 8):
        if not isinstance(image_guidance, (int, float)) or not 0 <= image_guidance <= 100:
            raise ValueError(f"image_guidance must be within 0..100, got {image_guidance!r}")
        super().__init__(path, steps, guidance, device, dtype, max_side, negative_prompt,
                         candidates, feather, seed, judge, judge_options, batch_size)
        self.image_guidance = float(image_guidance)

    def settings(self) -> str:
        return (f"{self.model.describe()}:steps={self.steps},guidance={self.guidance:g},"
                f"image_guidance={self.image_guidance:g},dtype={self.model.dtype},"
                f"max_side={self.max_side},feather={self.feather}")

    def generate_batch(self, requests: list[Request]) -> list[np.ndarray]:
        from PIL import Image

        size = self.work_size(requests[0].previous)
        out = self.model.generate(
            [r.seed for r in requests],
            prompt=[r.sample.sub_edits[r.i].text for r in requests],
            negative_prompt=[self.negative_prompt] * len(requests) if self.negative_prompt else None,
            image=[Image.fromarray(resize(r.previous, size)) for r in requests],
            num_inference_steps=self.steps, guidance_scale=self.guidance,
            image_guidance_scale=self.image_guidance,
        )
        return [resize(to_uint8(np.asarray(o)), (r.previous.shape[1], r.previous.shape[0]))
                for o, r in zip(out, requests)]


EDITORS.register("instruct")(InstructEditor)
