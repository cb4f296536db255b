"""Flow-matching training of MCIE-E1 on a Kontext-style DiT: LoRA through `peft` on the
transformer, MCIE's new modules trained in full, diffusers' SD3/FLUX timestep sampling and loss
weighting (`diffusers.training_utils`, as in `examples/dreambooth/train_dreambooth_lora_flux.py`).

Rectified flow: x_σ = (1 - σ)·x0 + σ·ε, the transformer predicts the velocity ε - x0 for the
target tokens (the source tokens ride along as context and are not scored).
"""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3
from peft import LoraConfig
from torch import nn

from trainer.config import DIT_LORA_TARGETS
from trainer.dit.condition import JointCondition
from trainer.dit.processors import mcie_parameters
from trainer.dit.tiny import kontext_inputs

LORA_TARGETS = tuple(DIT_LORA_TARGETS)  # the joint attention's image and text projections


def add_lora(transformer: nn.Module, rank: int = 4, alpha: float | None = None,
             targets: tuple[str, ...] = LORA_TARGETS) -> dict[str, list[nn.Parameter]]:
    """Add a LoRA adapter (B zero-initialised: the model is unchanged until it trains), freeze the
    base weights, keep LoRA and MCIE's modules trainable. Install the MCIE processors first.
    Returns the trainable parameters as {"lora": [...], "mcie": [...]}."""
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, init_lora_weights=True,
                        target_modules=list(targets))
    transformer.add_adapter(config)
    new = set(mcie_parameters(transformer))
    groups = {"lora": [], "mcie": []}
    for name, parameter in transformer.named_parameters():
        if name in new:  # peft froze them with the base: MCIE's modules train in full
            groups["mcie"].append(parameter.requires_grad_(True))
        elif "lora_" in name:
            groups["lora"].append(parameter.requires_grad_(True))
        else:
            parameter.requires_grad_(False)
    if not groups["lora"]:
        raise ValueError(f"LoRA targets {list(targets)} matched no module of {type(transformer).__name__}")
    return groups


def make_optimizer(groups: dict[str, list[nn.Parameter]], lr: float, mcie_lr: float,
                   weight_decay: float = 0.0) -> torch.optim.AdamW:
    """AdamW with its own learning rate for the new modules (they start from zero, LoRA from the
    pretrained weights)."""
    return torch.optim.AdamW([{"params": groups["lora"], "lr": lr}, {"params": groups["mcie"], "lr": mcie_lr}],
                             weight_decay=weight_decay)


def sample_sigmas(scheduler: FlowMatchEulerDiscreteScheduler, batch: int, weighting_scheme: str = "logit_normal",
                  logit_mean: float = 0.0, logit_std: float = 1.0, mode_scale: float = 1.29,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigmas, timesteps) for a batch, drawn from the training schedule's discrete grid."""
    u = compute_density_for_timestep_sampling(weighting_scheme=weighting_scheme, batch_size=batch,
                                              logit_mean=logit_mean, logit_std=logit_std,
                                              mode_scale=mode_scale, generator=generator)
    steps = scheduler.config.num_train_timesteps
    indices = (u * steps).long().clamp(0, steps - 1)
    return scheduler.sigmas[indices], scheduler.timesteps[indices]


def flow_matching_loss(prediction: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor,
                       weighting_scheme: str = "logit_normal", weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error against the velocity ε - x0, in float32, weighted per sample as the
    scheme says (diffusers' `compute_loss_weighting_for_sd3`: 1 for logit_normal / mode / uniform)
    and, with `weight` (x0's shape with 1 channel on axis 1, e.g. (B, 1, h, w) for latents), per
    position: Σ w·e / (Σ w · channels) — the plain mean when w is 1."""
    scheme = compute_loss_weighting_for_sd3(weighting_scheme=weighting_scheme, sigmas=sigmas)
    scheme = scheme.float().reshape(-1, *([1] * (x0.ndim - 1)))
    error = scheme * (prediction.float() - (noise - x0).float()) ** 2
    if weight is None:
        return error.reshape(x0.shape[0], -1).mean(1).mean()
    weight = weight.float()
    return (weight * error).sum() / (weight.sum() * error.shape[1])


def kontext_training_step(transformer: nn.Module, optimizer: torch.optim.Optimizer,
                          scheduler: FlowMatchEulerDiscreteScheduler, target: torch.Tensor, source: torch.Tensor,
                          text: torch.Tensor, pooled: torch.Tensor, condition: JointCondition,
                          weighting_scheme: str = "logit_normal",
                          generator: torch.Generator | None = None) -> torch.Tensor:
    """One optimizer step on packed target/source latents (B, h·w, C); returns the loss (detached,
    no host sync). Latents, noise and the interpolation stay float32 (issue 18, defect 3)."""
    x0 = target.float()
    noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
    sigmas, timesteps = sample_sigmas(scheduler, x0.shape[0], weighting_scheme, generator=generator)
    sigmas = sigmas.to(x0.device)
    noisy = (1.0 - sigmas[:, None, None]) * x0 + sigmas[:, None, None] * noise
    inputs = kontext_inputs(transformer, noisy, source, text, pooled, (timesteps / 1000).to(x0.device))
    prediction = transformer(**inputs, joint_attention_kwargs={"mcie": condition})[0][:, : x0.shape[1]]
    loss = flow_matching_loss(prediction, x0, noise, sigmas, weighting_scheme)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()
