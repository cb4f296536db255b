"""Tiny random-init FLUX.1 Kontext and Qwen-Image-Edit transformers (CPU, tests), and the inputs
their diffusers pipelines feed them.

The configs keep each architecture's structure (double- and single-stream blocks, 3-axis RoPE,
guidance embedding for Kontext; double-stream blocks, complex RoPE for Qwen) at toy widths. The
input builders follow the pipelines' packing: the image sequence is `[target tokens, source
tokens]` (`pipeline_flux_kontext`: source ids carry 1 on the first axis; `pipeline_qwenimage_edit`:
`img_shapes = [(1, h, w), (1, h, w)]`).
"""

from __future__ import annotations

import torch
from diffusers import FluxTransformer2DModel, QwenImageTransformer2DModel

from trainer.config import TINY_FLUX_KONTEXT, TINY_QWEN_IMAGE_EDIT  # noqa: F401  (re-exported)


def tiny_flux_kontext(seed: int = 0) -> FluxTransformer2DModel:
    torch.manual_seed(seed)
    return FluxTransformer2DModel(**TINY_FLUX_KONTEXT).eval()


def tiny_qwen_image_edit(seed: int = 0) -> QwenImageTransformer2DModel:
    torch.manual_seed(seed)
    return QwenImageTransformer2DModel(**TINY_QWEN_IMAGE_EDIT).eval()


def kontext_inputs(model: FluxTransformer2DModel, target: torch.Tensor, source: torch.Tensor,
                   text: torch.Tensor, pooled: torch.Tensor, sigma: torch.Tensor,
                   guidance: float = 2.5, grid: tuple[int, int] | None = None) -> dict:
    """Forward kwargs for a Kontext transformer: `target`/`source` packed (B, h·w, C), `text`
    (B, T, joint_attention_dim), `pooled` (B, pooled_projection_dim), `sigma` (B,) in [0, 1]
    (the pipeline passes t / 1000); `grid` (h, w), square when not given."""
    batch, length, _ = target.shape
    h, w = grid if grid is not None else _grid(length)
    target_ids = _ids(h, w, first=0, device=target.device)
    source_ids = _ids(h, w, first=1, device=target.device)
    kwargs = dict(hidden_states=torch.cat([target, source], 1), encoder_hidden_states=text,
                  pooled_projections=pooled, timestep=sigma, img_ids=torch.cat([target_ids, source_ids], 0),
                  txt_ids=torch.zeros(text.shape[1], 3, device=target.device), return_dict=False)
    if model.config.guidance_embeds:
        kwargs["guidance"] = torch.full((batch,), guidance, device=target.device)
    return kwargs


def qwen_edit_inputs(target: torch.Tensor, source: torch.Tensor, text: torch.Tensor, sigma: torch.Tensor,
                     grid: tuple[int, int], text_mask: torch.Tensor | None = None) -> dict:
    """Forward kwargs for a Qwen-Image-Edit transformer (packed latents as for Kontext)."""
    shapes = [[(1, *grid), (1, *grid)]] * target.shape[0]
    return dict(hidden_states=torch.cat([target, source], 1), encoder_hidden_states=text,
                encoder_hidden_states_mask=text_mask, timestep=sigma, img_shapes=shapes, return_dict=False)


def _grid(length: int) -> tuple[int, int]:
    side = int(round(length ** 0.5))
    if side * side != length:
        raise ValueError(f"kontext_inputs builds square grids; {length} tokens is not a square")
    return side, side


def _ids(h: int, w: int, first: int, device) -> torch.Tensor:
    ids = torch.zeros(h, w, 3, device=device)
    ids[..., 0] = first
    ids[..., 1] = torch.arange(h, device=device)[:, None]
    ids[..., 2] = torch.arange(w, device=device)[None, :]
    return ids.reshape(h * w, 3)
