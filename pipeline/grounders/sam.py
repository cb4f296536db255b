"""Masks from boxes with a transformers SAM-family model loaded from a local directory.

`SamMasker(path)` loads `SamModel` (or the class named by the directory's config, e.g. a newer
SAM variant that keeps SAM's box-prompt interface) with `local_files_only=True`: nothing downloads.
Pre-processing is transformers' PIL image processor (`SamImageProcessorPil`: no torchvision
needed) as saved beside the weights (`preprocessor_config.json`), or, when the directory has
none, one sized from the model's own `image_size`. Per call, the image encoder runs over all the
images of a unit in batches of `batch_size` (the costly part); the prompt encoder and mask decoder
then run once per image with all its boxes. A mask is clipped to its box: SAM is asked about the
object in that box and nothing else.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

import numpy as np

log = logging.getLogger(__name__)

DTYPES = ("float32", "float16", "bfloat16")


def torch_dtype(name: str):
    import torch

    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {name!r}")
    return getattr(torch, name)


class SamMasker:
    def __init__(self, path: str | Path, device: str = "cpu", dtype: str = "float32",
                 batch_size: int = 8):
        import transformers
        from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil

        self.path = Path(path)
        config_file = self.path / "config.json"
        if not config_file.is_file():
            raise ValueError(f"sam_path {path}: no config.json (save the model with save_pretrained)")
        if batch_size < 1:
            raise ValueError(f"sam batch size must be >= 1, got {batch_size}")
        config = json.loads(config_file.read_text())
        architecture = (config.get("architectures") or ["SamModel"])[0]
        model_cls = getattr(transformers, architecture, None)
        if model_cls is None:
            raise ValueError(f"sam_path {path}: unknown architecture {architecture!r}")
        self.model = model_cls.from_pretrained(self.path, local_files_only=True,
                                               dtype=torch_dtype(dtype)).to(device).eval()
        if (self.path / "preprocessor_config.json").is_file():
            self.processor = SamImageProcessorPil.from_pretrained(self.path, local_files_only=True)
        else:
            side = int(self.model.config.vision_config.image_size)
            self.processor = SamImageProcessorPil(size={"longest_edge": side},
                                                  pad_size={"height": side, "width": side})
        self.device, self.dtype, self.batch_size = device, torch_dtype(dtype), batch_size
        self.name = f"{architecture}:{self.path.name}"

    def masks(self, images: Sequence[np.ndarray], boxes: Sequence[Sequence[Sequence[int]]]
              ) -> list[list[tuple[np.ndarray, float]]]:
        """Per image, per box [x0, y0, x1, y1] (pixels, exclusive): (bool HxW mask inside the box,
        SAM's predicted IoU)."""
        import torch

        out: list[list[tuple[np.ndarray, float]]] = [[] for _ in images]
        todo = [i for i, b in enumerate(boxes) if len(b)]
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start:start + self.batch_size]
            inputs = self.processor(images=[images[i] for i in chunk], return_tensors="pt")
            with torch.inference_mode():
                pixels = inputs["pixel_values"].to(self.device, self.dtype)
                embeddings = self.model.get_image_embeddings(pixels)
                for row, i in enumerate(chunk):
                    original = inputs["original_sizes"][row]
                    reshaped = inputs["reshaped_input_sizes"][row]
                    scale = torch.stack([reshaped[1] / original[1], reshaped[0] / original[0]] * 2)
                    prompt = torch.tensor(boxes[i], dtype=torch.float32) * scale.float()
                    result = self.model(image_embeddings=embeddings[row:row + 1],
                                        input_boxes=prompt[None].to(self.device, self.dtype),
                                        multimask_output=False)
                    masks = self.processor.post_process_masks(
                        result.pred_masks.float().cpu(), inputs["original_sizes"][row:row + 1],
                        inputs["reshaped_input_sizes"][row:row + 1])[0][:, 0].numpy()
                    ious = result.iou_scores.float().cpu().numpy().reshape(-1)
                    for k, box in enumerate(boxes[i]):
                        x0, y0, x1, y1 = (int(v) for v in box)
                        inside = np.zeros(masks[k].shape, dtype=bool)
                        inside[y0:y1, x0:x1] = masks[k][y0:y1, x0:x1]
                        out[i].append((inside, float(ious[k])))
        return out
