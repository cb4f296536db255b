"""How far a sub-instruction's words reach in MCIE-E1's UNet (issue 26 item 5), on the CPU.

    .venv/bin/python bench/unet_locality.py                  # tiny preset, seeds 0 1: ≈ 10 s of CPU
    .venv/bin/python bench/unet_locality.py --control --what-if masked-self-attention,frozen-groupnorm
    .venv/bin/python bench/unet_locality.py --unet wide --control   # a wider 3-level UNet: ≈ 45 s of CPU

The spatial-aware cross-attention is exact at its own output: sub-instruction j's tokens reach only
the positions of region j. The UNet's other layers then spread what those positions hold: 3×3
convolutions (one cell per conv, and more per cell at the coarser levels), the down/up-sampling,
the GroupNorm statistics (computed over all positions) and the self-attention. So the noise
prediction ε moves outside region j too. This measures by how much.

Per model seed (the UNet's random init and the image / noise draw), timestep and sub-instruction j
(of two: region 0 the left half, region 1 the top-right quadrant, background the bottom-right
quadrant), j's words are changed (same token count) and ε is predicted again from the same noisy
latents. From |Δε| per latent element: max and mean inside region j, in the other sub-edit's
region k (its cells outside region j) and in the background; `other_ratio` / `background_ratio`
are those means over the mean inside j. `--control` repeats everything with the restriction
removed (every position reads every sub-instruction's tokens): what the ratios would be if the
cross-attention did not confine anything. `--what-if` measures changes that are NOT in the model,
to see which layers carry the leak: `masked-self-attention` (every attn1 under the DiT's label-set
rule, `trainer/dit/condition.py`) and `frozen-groupnorm` (the changed run normalised with the base
run's GroupNorm statistics); '+' joins them. One JSON line per measurement (`unet_locality`), then
per UNet and variant a summary (`unet_locality_summary`) and the mean |Δε| on each ring of
cells at Chebyshev distance d from region j over the mean inside it (`unet_locality_distance`).
"""

from __future__ import annotations

import contextlib
import json
import statistics
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flows.cli import Parser, UsageError  # noqa: E402  (after the path insert)
from trainer.attention import PADDING_TOKEN, CrossAttnCondition, SelfAttnProcessor  # noqa: E402
from trainer.build import build_model  # noqa: E402
from trainer.config import ModelConfig, preset  # noqa: E402

TEXTS = ["make the red cup blue", "remove the star"]
CHANGED = {0: ["make the big cup gold", "remove the star"],  # same token count as TEXTS
           1: ["make the red cup blue", "remove the tree"]}
TIMESTEPS = (10, 250, 500, 750, 990)


def unet_config(name: str) -> ModelConfig:
    """`tiny`: the preset (2 levels, 16×16 latents). `wide`: 3 levels of 64/128/256 channels,
    2 layers per block, 32×32 latents (the same random-init path, ≈ 15 s per seed on the CPU)."""
    config = preset("tiny").model
    if name == "tiny":
        return config
    unet = dict(config.unet, block_out_channels=[64, 128, 256], layers_per_block=2, sample_size=32,
                down_block_types=["CrossAttnDownBlock2D"] * 3, up_block_types=["CrossAttnUpBlock2D"] * 3,
                norm_num_groups=32)
    return replace(config, unet=unet, resolution=64)


UNETS = ("tiny", "wide")


@contextlib.contextmanager
def unrestricted() -> Iterator[None]:
    """The control: every position may read every sub-instruction's tokens (padding still not)."""
    original = CrossAttnCondition.token_mask

    def everywhere(self: CrossAttnCondition, length: int) -> torch.Tensor:
        return (self.token_regions != PADDING_TOKEN)[:, None, None, :].expand(-1, 1, length, -1)

    CrossAttnCondition.token_mask = everywhere
    try:
        yield
    finally:
        CrossAttnCondition.token_mask = original


@contextlib.contextmanager
def masked_self_attention(model) -> Iterator[None]:
    """What-if (not in the model): every self-attention (attn1) under the DiT's label-set rule —
    an image position reads a position only if the latter's regions are a subset of its own."""
    class LabelSetSelfAttention(SelfAttnProcessor):
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                     temb=None, mcie: CrossAttnCondition | None = None):
            regions = mcie.regions_at(hidden_states.shape[1]).long()  # (B, S, N)
            bits = (regions << torch.arange(regions.shape[1])[None, :, None]).sum(1)  # (B, N) label sets
            allowed = (bits[:, None, :] & ~bits[:, :, None]) == 0  # [b, query, key]: L(key) ⊆ L(query)
            return super().__call__(attn, hidden_states, None, allowed[:, None], temb)

    original = dict(model.unet.attn_processors)
    model.unet.set_attn_processor({name: LabelSetSelfAttention() if ".attn1." in name else processor
                                   for name, processor in original.items()})
    try:
        yield
    finally:
        model.unet.set_attn_processor(original)


@contextlib.contextmanager
def frozen_groupnorm(model) -> Iterator[None]:
    """What-if (not in the model): each GroupNorm normalises the changed run with the statistics
    of the base run (`measure` calls base, then changed), so no change travels through them."""
    stats, hooks = {}, []

    def renormalise(module, inputs, output):
        x = inputs[0]
        grouped = x.reshape(x.shape[0], module.num_groups, -1)
        if module not in stats:  # the base run: record
            stats[module] = grouped.mean(-1, keepdim=True), grouped.var(-1, unbiased=False, keepdim=True)
            return output
        mean, var = stats.pop(module)  # the changed run: normalise with the base run's statistics
        shape = (1, -1) + (1,) * (x.ndim - 2)
        normed = ((grouped - mean) / (var + module.eps).sqrt()).reshape(x.shape)
        return normed * module.weight.reshape(shape) + module.bias.reshape(shape)

    for module in model.unet.modules():
        if isinstance(module, torch.nn.GroupNorm):
            hooks.append(module.register_forward_hook(renormalise))
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


WHAT_IFS = {"masked-self-attention": masked_self_attention, "frozen-groupnorm": frozen_groupnorm}


def _rings(region: torch.Tensor, delta: torch.Tensor) -> dict[int, float]:
    """Mean of `delta` (h, w) on each ring of cells at Chebyshev distance d from `region` (h, w bool)."""
    rings, reached = {}, region.float()
    for distance in range(1, max(region.shape)):
        grown = F.max_pool2d(reached[None, None], 3, stride=1, padding=1)[0, 0]
        ring = (grown > 0) & (reached == 0)
        if not ring.any():
            break
        rings[distance] = delta[ring].mean().item()
        reached = grown
    return rings


def measure(model, seed: int, timesteps=TIMESTEPS) -> Iterator[dict]:
    """One dict per (timestep, changed sub-instruction j): |Δε| inside j, in k, in the background."""
    size = model.config.resolution
    image = np.random.default_rng(seed).integers(0, 255, (1, size, size, 3), dtype=np.uint8)
    source = torch.tensor(image).permute(0, 3, 1, 2).float() / 127.5 - 1
    regions = torch.zeros(1, model.config.max_sub_edits, size, size)
    regions[0, 0, :, : size // 2] = 1  # left half
    regions[0, 1, : size // 2, size // 2:] = 1  # top-right quadrant; the bottom-right is background
    with torch.no_grad():
        base = model.condition(source, [TEXTS], image, background=None, region_masks=regions)
        shown = base.condition.region_masks[0, : len(TEXTS)] > 0  # at latent resolution
        background = base.condition.background[0, 0] > 0
        noisy = torch.randn(base.source_latents.shape, generator=torch.Generator().manual_seed(seed))
        for j, texts in CHANGED.items():
            changed = model.condition(source, [texts], image, background=None, region_masks=regions)
            inside, other = shown[j], shown[1 - j] & ~shown[j]
            for t in timesteps:
                step = torch.tensor([t])
                reference = model.denoise(noisy, step, base)  # first: `frozen_groupnorm` records it
                delta = (model.denoise(noisy, step, changed) - reference).abs()[0]
                row = {"t": t, "changed": j}
                for name, where in (("inside", inside), ("other", other), ("background", background)):
                    row[f"{name}_max"] = delta[:, where].max().item()
                    row[f"{name}_mean"] = delta[:, where].mean().item()
                row["other_ratio"] = row["other_mean"] / row["inside_mean"]
                row["background_ratio"] = row["background_mean"] / row["inside_mean"]
                row["rings"] = {d: v / row["inside_mean"] for d, v in _rings(inside, delta.mean(0)).items()}
                yield row


def run(unet: str, seeds: list[int], timesteps=TIMESTEPS, control: bool = False,
        gate: float = 0.0, what_ifs: tuple[str, ...] = ()) -> list[dict]:
    """Every measurement of one UNet, the model rebuilt (and re-seeded) per seed, tagged with its
    `variant`: "restricted" (the model as it is); with `control` also "unrestricted"; and each
    what-if (a '+' join of `WHAT_IFS` names), applied to the model as it is."""
    rows = []
    for seed in seeds:
        model = build_model(replace(unet_config(unet), seed=seed)).eval()
        with torch.no_grad():
            for processor in model.unet.attn_processors.values():
                if hasattr(processor, "gate"):
                    processor.gate.fill_(gate)
        variants = ["restricted", *(["unrestricted"] if control else []), *what_ifs]
        for variant in variants:
            with contextlib.ExitStack() as stack:
                if variant == "unrestricted":
                    stack.enter_context(unrestricted())
                elif variant != "restricted":
                    for name in variant.split("+"):
                        stack.enter_context(WHAT_IFS[name](model))
                rows += [dict(seed=seed, variant=variant, **row) for row in measure(model, seed, timesteps)]
    return rows


def summary(rows: list[dict]) -> dict:
    figures = {"cases": len(rows)}
    for key in ("other_ratio", "background_ratio"):
        values = [row[key] for row in rows]
        figures[f"{key}_mean"] = statistics.mean(values)
        figures[f"{key}_min"], figures[f"{key}_max"] = min(values), max(values)
    for key in ("inside_max", "other_max", "background_max"):
        figures[key] = max(row[key] for row in rows)
    return figures


def _ints(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UsageError(f"expected a comma list of integers, got {text!r}") from None
    if not values:
        raise UsageError(f"expected a comma list of integers, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="bench/unet_locality.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--unet", default="tiny", help=f"comma list of {', '.join(UNETS)}")
    parser.add_argument("--seeds", default="0,1", help="comma list of model / draw seeds")
    parser.add_argument("--timesteps", default=",".join(map(str, TIMESTEPS)))
    parser.add_argument("--gate", type=float, default=0.0, help="every background gate (0 = step 0)")
    parser.add_argument("--control", action="store_true", help="also measure without the restriction")
    parser.add_argument("--what-if", default="", help="comma list of changes not in the model, each a '+' "
                                                      f"join of {', '.join(WHAT_IFS)}")
    try:
        args = parser.parse_args(argv)
        unets = [name.strip() for name in args.unet.split(",") if name.strip()]
        if not unets or set(unets) - set(UNETS):
            raise UsageError(f"{parser.prog}: error: --unet takes a comma list of {', '.join(UNETS)}")
        seeds, timesteps = _ints(args.seeds), _ints(args.timesteps)
        what_ifs = tuple(part.strip() for part in args.what_if.split(",") if part.strip())
        if any(set(part.split("+")) - set(WHAT_IFS) for part in what_ifs):
            raise UsageError(f"{parser.prog}: error: --what-if takes a comma list of '+' joins of "
                             f"{', '.join(WHAT_IFS)}")
        if any(not 0 <= t < 1000 for t in timesteps):
            raise UsageError(f"{parser.prog}: error: --timesteps must lie in [0, 1000)")
    except UsageError as exc:
        print(str(exc) if str(exc).startswith(parser.prog) else f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    torch.set_num_threads(1)  # tiny models: extra intra-op threads only contend
    for unet in unets:
        rows = run(unet, seeds, timesteps, args.control, args.gate, what_ifs)
        for row in rows:
            print(json.dumps({"bench": "unet_locality", "unet": unet, "gate": args.gate,
                              **{k: v for k, v in row.items() if k != "rings"}}))
        for variant in dict.fromkeys(row["variant"] for row in rows):
            chosen = [row for row in rows if row["variant"] == variant]
            tags = {"unet": unet, "variant": variant, "gate": args.gate}
            print(json.dumps({"bench": "unet_locality_summary", **tags, **summary(chosen)}))
            rings = {d: statistics.mean(row["rings"][d] for row in chosen if d in row["rings"])
                     for d in sorted({d for row in chosen for d in row["rings"]})}
            print(json.dumps({"bench": "unet_locality_distance", **tags, "ratio_by_distance": rings}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
