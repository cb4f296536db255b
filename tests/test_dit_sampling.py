"""`MCIEDiT.sample` against an independent Euler loop: a velocity that is not a straight line to
one x0 and rows (full, image only, none) that differ, so a wrong σ grid, a wrong `mu` or a wrong
guidance formula changes the result (an exact straight-line oracle reaches x0 under any
schedule, and identical rows cancel any guidance). The released defaults: FLUX.1 Kontext one
transformer pass per step, the "none" row never computed at image guidance 1.0, Qwen-Image-Edit's
per-token rescale of the true-CFG result to the conditional's norm."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from test_trainer import one_thread  # noqa: F401  (fixture: one torch thread)
from trainer.build import build_model
from trainer.config import preset
from trainer.dit.model import MCIEDiT, pack
from trainer.edit import edit_image
from trainer.model import Conditioning

SHIFTED = dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
               max_image_seq_len=4096, shift_terminal=None)
x_a = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(11))
x_b = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(12))


def row_velocity(x: torch.Tensor, sigma: float, row: int) -> torch.Tensor:
    """Row 0 full, 1 image only, 2 none: different, non-linear in x and σ."""
    return (torch.tanh(x) * (1.0 + 0.7 * row) - x_a * math.cos(3.0 * sigma + row)
            + x_b * sigma ** 2 * (row - 1.0))


def oracle(x, sigmas, cond):
    rows = cond.context[:, 0, 0].long().tolist()  # which rows `sample` asked for
    return torch.cat([row_velocity(x[i:i + 1], float(sigmas[i]), row) for i, row in enumerate(rows)])


def three_rows() -> Conditioning:
    return Conditioning(context=torch.arange(3.0)[:, None, None], condition=None,
                        source_latents=torch.zeros(3, 4, 16, 16), region_logits=torch.zeros(3, 1, 16, 16))


def reference(noise, steps, text, image, shifted, rescale):
    """Euler written out: σ_i = 1 - i/steps (for i < steps), shifted as FLUX / Qwen-Image do at
    this token count, then 0; InstructPix2Pix's combination; Qwen's per-token rescale."""
    sigmas = [1.0 - i / steps for i in range(steps)]
    if shifted:
        tokens = noise.shape[-2] * noise.shape[-1] // 4
        mu = 0.5 + (tokens - 256) * (1.15 - 0.5) / (4096 - 256)
        sigmas = [math.exp(mu) / (math.exp(mu) + (1.0 / s - 1.0)) for s in sigmas]
    sigmas = sigmas + [0.0]
    x = noise.clone()
    for i in range(steps):
        full, image_only, none = (row_velocity(x, sigmas[i], r) for r in range(3))
        v = none + image * (image_only - none) + text * (full - image_only)
        if rescale:
            v = v * _cells(pack(full).norm(dim=-1, keepdim=True) / pack(v).norm(dim=-1, keepdim=True))
        x = x + (sigmas[i + 1] - sigmas[i]) * v
    return x


def _cells(ratio: torch.Tensor) -> torch.Tensor:
    """(1, 64, 1) per-token factor → (1, 1, 16, 16) per latent position (2×2 cells)."""
    return ratio.reshape(1, 1, 8, 8).repeat_interleave(2, -2).repeat_interleave(2, -1)


def fake(backbone: str, scheduler) -> SimpleNamespace:
    return SimpleNamespace(scheduler=scheduler, denoise=oracle, config=SimpleNamespace(backbone=backbone))


@pytest.mark.parametrize("shifted", [False, True])
@pytest.mark.parametrize("text,image", [(4.0, 1.0), (3.0, 1.5), (1.0, 1.0)])
@pytest.mark.parametrize("backbone", ["flux-kontext", "qwen-image-edit"])
def test_sample_is_euler_on_the_released_grid_with_the_guidance_formula(backbone, text, image, shifted):
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(4))
    scheduler = FlowMatchEulerDiscreteScheduler(**(SHIFTED if shifted else {}))
    out = MCIEDiT.sample(fake(backbone, scheduler), three_rows(), noise, 6, text, image)
    rescale = backbone == "qwen-image-edit" and (text, image) != (1.0, 1.0)
    expected = reference(noise, 6, text, image, shifted, rescale)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert (out - noise).abs().max() > 0.5  # it moved: the comparison is not vacuous


@pytest.mark.parametrize("shifted", [False, True])
def test_latent_blending_holds_the_kept_positions_on_the_known_path(shifted):
    """`known`/`keep`: every transformer call sees the kept positions at (1 - σ)·known + σ·noise
    for the σ it is given, the result holds `known` there exactly, and the other positions are
    what sampling without blending gives (the velocity here is per position)."""
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(4))
    known = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    keep = torch.zeros(1, 1, 16, 16)
    keep[..., :8] = 1
    seen = []

    def recording(x, sigmas, cond):
        seen.append((x[:1].clone(), float(sigmas[0])))
        return oracle(x, sigmas, cond)

    scheduler = FlowMatchEulerDiscreteScheduler(**(SHIFTED if shifted else {}))
    model = SimpleNamespace(scheduler=scheduler, denoise=recording, config=SimpleNamespace(backbone="flux-kontext"))
    out = MCIEDiT.sample(model, three_rows(), noise, 5, 1.0, 1.0, known=known, keep=keep)
    assert torch.equal(out[..., :8], known[..., :8])
    assert len(seen) == 5 and seen[0][1] == 1.0
    for x, sigma in seen:
        torch.testing.assert_close(x[..., :8], ((1 - sigma) * known + sigma * noise)[..., :8], rtol=1e-5, atol=1e-5)
    free = MCIEDiT.sample(model, three_rows(), noise, 5, 1.0, 1.0)
    torch.testing.assert_close(out[..., 8:], free[..., 8:], rtol=1e-5, atol=1e-5)
    assert (out[..., 8:] - known[..., 8:]).abs().max() > 0.5  # the free positions were not kept


def test_qwen_true_cfg_keeps_the_conditional_norm_per_token():
    """One step from σ = 1 lands at noise - v: v has the full row's per-token norm and the
    combined velocity's direction."""
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    out = MCIEDiT.sample(fake("qwen-image-edit", FlowMatchEulerDiscreteScheduler(**SHIFTED)), three_rows(),
                         noise, 1, 4.0, 1.0)
    v = noise - out
    full, image_only = row_velocity(noise, 1.0, 0), row_velocity(noise, 1.0, 1)
    combined = image_only + 4.0 * (full - image_only)
    torch.testing.assert_close(pack(v).norm(dim=-1), pack(full).norm(dim=-1), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(pack(combined).norm(dim=-1), pack(full).norm(dim=-1), rtol=1e-2)
    cosine = torch.nn.functional.cosine_similarity(pack(v), pack(combined), dim=-1)
    torch.testing.assert_close(cosine, torch.ones_like(cosine), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backbone", ["flux-kontext", "qwen-image-edit"])
def test_released_defaults_run_only_the_rows_they_read(backbone):
    """`mcie edit`'s defaults: Kontext one transformer pass of one row per step (the distilled
    guidance alone); Qwen two rows (full, image only), never the "none" row at image guidance
    1.0; image guidance ≠ 1 reads all three."""
    model = build_model(preset("tiny", backbone).model).eval()
    assert model.guidance == ((1.0, 1.0) if backbone == "flux-kontext" else (4.0, 1.0))
    batches = []
    model.transformer.register_forward_pre_hook(lambda module, args, kwargs: batches.append(
        kwargs["hidden_states"].shape[0]), with_kwargs=True)
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    _, info = edit_image(model, image, "make the circle blue, then remove the star",
                         regions=["0,0,24,24", "30,30,60,50"], steps=3)
    assert info["guidance"] == list(model.guidance)
    assert batches == ([1] * 3 if backbone == "flux-kontext" else [2] * 3)
    batches.clear()
    edit_image(model, image, "make the circle blue", regions=["0,0,24,24"], steps=2, image_guidance=1.5)
    assert batches == [3, 3]
