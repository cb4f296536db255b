"""The DiT background gates live (issue 26, item 1): through the real training entry point
(`trainer.train.Trainer`, what `train` / `mcie train` run) on both tiny DiT backbones, every
background gate takes gradient from the first step and its projection from the second, both keep
taking it at every step (a clamped gate that stepped below 0 took none, for good), and both have
moved after 20 steps; at init the model with the background branch engaged is the base model.
Regions are shown exact and undilated so that the tiny 2×2-token grid keeps background tokens
(a step whose batch has none gives the branch no gradient, rightly: those steps are not counted).

Why the projection starts at the second step: the branch adds `g·b·(proj(source) - out)`; for the
model to be the pretrained one exactly at init, one factor must be 0 there, and the gradient of the
other is then 0. The gate starts at 0 (as the UNet's), so the projection's first gradient is 0 and
the gate's is not; after one update the gate is not 0 and both learn."""

from __future__ import annotations

import copy

import pytest
import torch

from test_trainer import build, one_thread  # noqa: F401  (fixtures: the trainer tests' build, one torch thread)
from trainer.config import preset, with_model, with_train
from trainer.dit.condition import GLOBAL_TOKEN, JointCondition
from trainer.dit.processors import mcie_parameters
from trainer.dit.tiny import kontext_inputs, qwen_edit_inputs
from trainer.train import Trainer

BACKBONES = ["flux-kontext", "qwen-image-edit"]
STEPS = 20


def _branch(transformer) -> dict[str, torch.nn.Parameter]:
    """Every background gate and projection (weight and bias: a batch whose source image is
    dropped for guidance feeds the projection zeros, which only its bias sees), by name."""
    return {name: p for name, p in mcie_parameters(transformer).items()
            if name.endswith(("injection.gate", "injection.proj.weight", "injection.proj.bias"))}


def _base_and_neutral_outputs(model, backbone: str, gate: float | None = None):
    """The MCIE transformer (every token global, the whole image background: the injection
    engaged everywhere) and the plain diffusers transformer with the same base weights."""
    from diffusers import FluxTransformer2DModel, QwenImageTransformer2DModel

    from trainer.model import _seeded

    kind = FluxTransformer2DModel if backbone == "flux-kontext" else QwenImageTransformer2DModel
    plain = _seeded(model.config.seed + 3, lambda: kind(**model.config.transformer)).eval()
    ours = copy.deepcopy(model.transformer).eval()
    if gate is not None:
        with torch.no_grad():
            for name, p in _branch(ours).items():
                if name.endswith("gate"):
                    p.fill_(gate)
    g = torch.Generator().manual_seed(8)
    target, source = torch.randn(1, 64, 16, generator=g), torch.randn(1, 64, 16, generator=g)
    text = torch.randn(1, 5, ours.config.joint_attention_dim, generator=g)
    neutral = JointCondition(torch.full((1, 5), GLOBAL_TOKEN), torch.zeros(1, 0, 16, 16),
                             torch.ones(1, 1, 16, 16), (8, 8), source=source)
    with torch.no_grad():
        if backbone == "flux-kontext":
            pooled = torch.randn(1, ours.config.pooled_projection_dim, generator=g)
            inputs = kontext_inputs(plain, target, source, text, pooled, torch.tensor([0.5]))
            mine = ours(**inputs, joint_attention_kwargs={"mcie": neutral})[0]
        else:
            inputs = qwen_edit_inputs(target, source, text, torch.tensor([0.5]), (8, 8))
            mine = ours(**inputs, attention_kwargs={"mcie": neutral})[0]
        theirs = plain(**inputs)[0]
    return mine, theirs


@pytest.mark.parametrize("backbone", BACKBONES)
def test_background_gates_learn_from_step_one_and_never_die(backbone, build, tmp_path):
    config = with_train(preset("tiny", backbone), batch_size=2, checkpoint_every=1000,
                        box_region_prob=0.0, predicted_region_prob=0.0)
    trainer = Trainer(build, with_model(config, region_dilation=0), tmp_path / "out")
    model = trainer.raw_model
    background = []  # background target tokens per step, as the injection reads them
    condition = model._attention_condition

    def counted(*args):
        cond = condition(*args)
        background.append(int(cond.background_tokens(torch.float32).sum()))
        return cond

    model._attention_condition = counted

    # at init, with the background branch engaged on every token, the model is the base model
    mine, theirs = _base_and_neutral_outputs(model, backbone)
    torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)
    opened, theirs = _base_and_neutral_outputs(model, backbone, gate=0.5)
    assert (opened - theirs).abs().max() > 1e-3  # ... and the branch is there: a gate moves it

    branch = _branch(model.transformer)
    gates = [n for n in branch if n.endswith("gate")]
    assert len(gates) == len(model.transformer.attn_processors) and gates
    assert all(float(branch[n].detach()) == 0.0 for n in gates)
    before = {name: p.detach().clone() for name, p in branch.items()}
    grads: dict[str, list[float]] = {name: [] for name in branch}
    for name, p in branch.items():  # the gradient of each backward (grad_accum 1: one per step)
        p.register_post_accumulate_grad_hook(lambda p, name=name: grads[name].append(float(p.grad.abs().sum())))
    projections = sorted({name.rsplit(".", 1)[0] for name in branch if ".proj." in name})
    assert len(projections) == len(gates)

    result = trainer.fit(STEPS)
    assert result.step == STEPS and all(len(g) == STEPS for g in grads.values()) and len(background) == STEPS
    with_background = [step for step, count in enumerate(background, 1) if count > 0]
    assert with_background[0] == 1 and len(with_background) >= STEPS // 2, background

    for name in gates:
        dead = [step for step in with_background if grads[name][step - 1] == 0.0]
        assert not dead, f"{name}: no gradient at steps {dead} (gate {float(branch[name].detach()):+.4f})"
    for proj in projections:
        per_step = [w + b for w, b in zip(grads[f"{proj}.weight"], grads[f"{proj}.bias"])]
        assert per_step[0] == 0.0  # the gate is 0 at the first step: see the module docstring
        dead = [step for step in with_background[1:] if per_step[step - 1] == 0.0]
        assert not dead, f"{proj}: no gradient at steps {dead}"
    for name in branch:
        assert not torch.equal(branch[name].detach(), before[name]), f"{name} has not moved"
