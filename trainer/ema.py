"""The EMA of MCIE-E1's trained weights (`train.ema_decay`): diffusers' `EMAModel` for the weights
trained in full, and for each LoRA adapter the EMA of the weight change it applies, ΔW = B·A.

Why not `EMAModel` over the LoRA factors: the model applies B·A, and EMA(B)·EMA(A) is not EMA(B·A)
(the average of products is not the product of averages; a pair can also drift to (B·R, R⁻¹·A)
with the same ΔW, which averaging the factors apart would blur). The dense EMA of ΔW is exact but
is the size of the base weight for every adapted layer (Qwen-Image's 20 B transformer: 80 GB in
float32, on top of the base) — not affordable. So the EMA of ΔW is kept factored at the adapter's
own rank r:

    ΔE_t = best rank-r approximation of  d·ΔE_{t-1} + (1 - d)·B_t·A_t,

computed from the factors alone — the sum is [d·B_E, (1-d)·B_t] @ [A_E; A_t], rank ≤ 2r; two thin
QRs and the SVD of a 2r × 2r core truncate it — O((in + out)·r²) per layer per step (batched over
layers of one shape), and the state is a LoRA pair of the adapter's shapes (the same memory as
EMAModel of the factors). It is exact while the EMA stays within rank r (adapters moving in a fixed
r-dimensional subspace; decay 0); otherwise each step drops its update's spectral tail beyond r,
the least a rank-r adapter can drop. The EMA pair (B_E, A_E) = (U_r·√S_r, √S_r·V_rᵀ) is saved in
`ema.safetensors` under the adapter's own names, so inference, export and plain diffusers load it
as they load the trained adapter (the adapter's scaling multiplies both sides alike).
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

LORA_A, LORA_B = ".lora_A.", ".lora_B."  # peft's names of the factors (ΔW = B·A·scaling)


def lora_pairs(names: list[str]) -> list[tuple[str, str]]:
    """(A, B) parameter names of every LoRA adapter among `names`."""
    present = set(names)
    return [(name, name.replace(LORA_A, LORA_B)) for name in names
            if LORA_A in name and name.replace(LORA_A, LORA_B) in present]


@torch.no_grad()
def ema_of_product(ema_a: torch.Tensor, ema_b: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                   decay: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (A', B') of the best rank-r approximation of d·B_E·A_E + (1-d)·B·A, for stacks
    of adapters: A (G, r, in), B (G, out, r), float32."""
    rank = a.shape[-2]
    left = torch.cat([decay * ema_b, (1.0 - decay) * b], -1)  # (G, out, 2r)
    right = torch.cat([ema_a, a], -2)  # (G, 2r, in)
    q_left, r_left = torch.linalg.qr(left)  # reduced: (G, out, k), (G, k, 2r)
    q_right, r_right = torch.linalg.qr(right.transpose(-1, -2))  # (G, in, k'), (G, k', 2r)
    u, s, vh = torch.linalg.svd(r_left @ r_right.transpose(-1, -2), full_matrices=False)
    keep = min(rank, s.shape[-1])
    root = s[..., :keep].sqrt()
    new_b = q_left @ (u[..., :keep] * root[..., None, :])
    new_a = (root[..., :, None] * vh[..., :keep, :]) @ q_right.transpose(-1, -2)
    if keep < rank:  # a layer narrower than 2r: the rest of the rank holds nothing
        new_b = torch.cat([new_b, new_b.new_zeros(*new_b.shape[:-1], rank - keep)], -1)
        new_a = torch.cat([new_a, new_a.new_zeros(*new_a.shape[:-2], rank - keep, new_a.shape[-1])], -2)
    return new_a, new_b


class TrainedWeightsEMA:
    """The EMA of every trained weight, by name (module docstring). `step` after each optimiser
    step; `state_dict` / `load_state_dict` by parameter name (`ema.safetensors`)."""

    def __init__(self, named: list[tuple[str, nn.Parameter]], decay: float):
        from diffusers.training_utils import EMAModel

        names = [name for name, _ in named]
        params = dict(named)
        pairs = lora_pairs(names)
        factors = {name for pair in pairs for name in pair}
        self.full_names = [name for name in names if name not in factors]
        # diffusers' EMA (and its decay warm-up, (1+n)/(10+n)) for the weights trained in full
        self.full = EMAModel([params[name] for name in self.full_names] or [torch.zeros(())], decay=decay,
                             foreach=True)
        grouped = defaultdict(list)
        for a, b in pairs:  # one batched update per adapter shape
            grouped[(params[a].shape, params[b].shape, params[a].device)].append((a, b))
        self.groups = [{"pairs": group, "shapes": (params[group[0][0]].shape, params[group[0][1]].shape),
                        "a": torch.stack([_matrix(params[a]) for a, _ in group]).float(),
                        "b": torch.stack([_matrix(params[b]) for _, b in group]).float()}
                       for group in grouped.values()]

    @property
    def optimization_step(self) -> int:
        return self.full.optimization_step

    @optimization_step.setter
    def optimization_step(self, value: int) -> None:
        self.full.optimization_step = value

    def to(self, device) -> None:
        self.full.to(device)
        for group in self.groups:
            group["a"], group["b"] = group["a"].to(device), group["b"].to(device)

    @torch.no_grad()
    def step(self, params: dict[str, nn.Parameter]) -> None:
        if self.full_names:
            self.full.step([params[name] for name in self.full_names])
        else:
            self.full.optimization_step += 1
        decay = self.full.get_decay(self.full.optimization_step)
        for group in self.groups:
            a = torch.stack([_matrix(params[name]) for name, _ in group["pairs"]]).float()
            b = torch.stack([_matrix(params[name]) for _, name in group["pairs"]]).float()
            group["a"], group["b"] = ema_of_product(group["a"], group["b"], a, b, decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        weights = dict(zip(self.full_names, self.full.shadow_params))
        for group in self.groups:
            shape_a, shape_b = group["shapes"]
            for (a, b), ema_a, ema_b in zip(group["pairs"], group["a"], group["b"]):
                weights[a], weights[b] = ema_a.reshape(shape_a), ema_b.reshape(shape_b)
        return weights

    def load_state_dict(self, weights: dict[str, torch.Tensor]) -> None:
        """`weights` by name; LoRA factors as (r, in…) and (out, r…), as the adapters hold them."""
        self.full.shadow_params = [weights[name].to(shadow) for name, shadow in
                                   zip(self.full_names, self.full.shadow_params)]
        for group in self.groups:
            group["a"] = torch.stack([_matrix(weights[a]) for a, _ in group["pairs"]]).to(group["a"])
            group["b"] = torch.stack([_matrix(weights[b]) for _, b in group["pairs"]]).to(group["b"])


def _matrix(factor: torch.Tensor) -> torch.Tensor:
    """A LoRA factor as a matrix: A (r, in, k…) → (r, in·k…), B (out, r, 1…) → (out, r)."""
    return factor.detach().reshape(factor.shape[0], -1)
