"""MCIE-E1 on a DiT backbone (trainer/dit): property tests on tiny random FLUX.1 Kontext and
Qwen-Image-Edit transformers built from diffusers configs.

(a) perturbing the text of sub-instruction j moves the image outputs only inside region j;
(b) with the background gate at its limit, background tokens do not depend on the instruction;
(c) with the gate at 0 and every token global, the model is diffusers' own, bit for bit;
(d) the flex_attention path (BlockMask) is the dense-mask SDPA path: same mask, same outputs.
"""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import FluxTransformer2DModel
from torch.nn.attention.flex_attention import create_mask

from trainer.dit import (
    GLOBAL_TOKEN,
    PADDING_TOKEN,
    JointCondition,
    install_mcie_processors,
    kontext_inputs,
    mcie_parameters,
    qwen_edit_inputs,
    tiny_flux_kontext,
    tiny_qwen_image_edit,
)

B, H, W, T = 2, 4, 4, 9
PIXELS = 16  # region/background masks at 4× the token grid, as latents or pixels would be
# text: 2 global, 3 of sub-instruction 0, 3 of sub-instruction 1, 1 global
SPANS = [GLOBAL_TOKEN, GLOBAL_TOKEN, 0, 0, 0, 1, 1, 1, GLOBAL_TOKEN]


def _masks():
    """Region 0: left half; region 1: a block in the lower right overlapping region 0 in one
    column; background: everything outside both."""
    regions = torch.zeros(B, 2, PIXELS, PIXELS)
    regions[:, 0, :, :8] = 1
    regions[:, 1, 8:, 6:14] = 1
    background = (regions.amax(1, keepdim=True) == 0).float()
    return regions, background


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(target=torch.randn(B, H * W, 16, generator=g), source=torch.randn(B, H * W, 16, generator=g),
                text=torch.randn(B, T, 24, generator=g), pooled=torch.randn(B, 20, generator=g),
                sigma=torch.tensor([0.3, 0.8]))


def _condition(data, spans=SPANS, regions=None, background=None, attention="sdpa"):
    default_regions, default_background = _masks()
    regions = default_regions if regions is None else regions
    background = default_background if background is None else background
    return JointCondition(torch.tensor([spans] * B), regions, background, (H, W), source=data["source"],
                          attention=attention)


def _run(model, data, cond, text=None, mask=None):
    """The target tokens' prediction (B, H·W, C) and the whole output."""
    text = data["text"] if text is None else text
    with torch.no_grad():
        if isinstance(model, FluxTransformer2DModel):
            kwargs = kontext_inputs(model, data["target"], data["source"], text, data["pooled"], data["sigma"])
            extra = {} if cond is None else {"joint_attention_kwargs": {"mcie": cond}}
        else:
            kwargs = qwen_edit_inputs(data["target"], data["source"], text, data["sigma"], (H, W), text_mask=mask)
            extra = {} if cond is None else {"attention_kwargs": {"mcie": cond}}
        out = model(**kwargs, **extra)[0]
    return out[:, : H * W], out


def _set_gates(model, value):
    with torch.no_grad():
        for name, p in mcie_parameters(model).items():
            if name.endswith("gate"):
                p.fill_(value)


@pytest.fixture(scope="module", params=["flux-kontext", "qwen-image-edit"])
def backbone(request):
    """(plain diffusers model, the same weights with the MCIE processors installed)."""
    plain = tiny_flux_kontext() if request.param == "flux-kontext" else tiny_qwen_image_edit()
    mcie = copy.deepcopy(plain)
    install_mcie_processors(mcie)
    return plain, mcie


def test_mask_follows_the_label_set_rule():
    """On a hand-made joint sequence: spans ↔ their regions, global everywhere, padding never read,
    tokens that have read span j hidden from those that may not."""
    regions = torch.zeros(1, 2, 2, 2)
    regions[0, 0, 0, 0] = 1  # token 0 in region 0
    regions[0, 1, 0, 1] = 1  # token 1 in region 1
    regions[0, 0, 1, 1] = regions[0, 1, 1, 1] = 1  # token 3 in both
    cond = JointCondition(torch.tensor([[GLOBAL_TOKEN, 0, 1, PADDING_TOKEN]]), regions,
                          torch.ones(1, 1, 2, 2), (2, 2))
    mask = cond.attention_mask(image_length=5)[0, 0]  # 4 text, 4 target, 1 source
    g, s0, s1, pad, t0, t1, t2, t01, src = range(9)
    may = lambda q, k: bool(mask[q, k])  # noqa: E731
    assert all(may(q, g) and may(q, src) and may(q, t2) for q in (g, s0, s1, t0, t1, t2, t01, src))
    assert may(t0, s0) and may(s0, t0) and may(t1, s1) and may(s1, t1)
    assert not may(t1, s0) and not may(t2, s0) and not may(g, s0) and not may(src, s0)
    assert not may(s1, s0) and not may(s0, t1) and not may(t0, t01) and not may(t2, t0)
    assert may(t01, s0) and may(t01, s1) and may(t01, t0) and may(t01, t1)
    assert not any(may(q, pad) for q in (g, s0, s1, t0, t1, t2, t01, src)) and may(pad, pad)
    assert mask.any(1).all()  # no empty row


@pytest.mark.parametrize("attention", ["sdpa", "flex"])
def test_spans_of_j_move_only_region_j(backbone, attention):
    """(a) through every layer of both backbones, with the injection half open, dense mask or flex."""
    _, model = backbone
    _set_gates(model, 0.5)
    try:
        data = _data()
        cond = _condition(data, attention=attention)
        in_region = cond.regions()[:, 1]  # (B, H·W)
        base, whole = _run(model, data, cond)
        text = data["text"].clone()
        text[:, 5:8] += torch.randn(B, 3, 24, generator=torch.Generator().manual_seed(1))  # sub-instruction 1
        moved, whole_moved = _run(model, data, _condition(data, attention=attention), text=text)
        change = (moved - base).abs().amax(-1)
        assert change[~in_region].max() <= 1e-6
        assert change[in_region].min() > 1e-4  # every token of region 1 hears sub-instruction 1
        assert (whole_moved[:, H * W:] - whole[:, H * W:]).abs().max() <= 1e-6  # nor the source tokens
    finally:
        _set_gates(model, 0.0)


def test_closed_gate_keeps_background_free_of_the_instruction(backbone):
    """(b) gate at its limit: background target tokens ignore all text (global and spans); at 0
    they read the global instruction, so the gate is what cuts them off."""
    _, model = backbone
    data = _data()
    background = _condition(data).background_tokens(torch.float32)[..., 0].bool()
    assert background.any() and (~background).any()
    text = data["text"] + torch.randn(B, T, 24, generator=torch.Generator().manual_seed(2))
    _set_gates(model, 1.0)
    try:
        base, _ = _run(model, data, _condition(data))
        moved, _ = _run(model, data, _condition(data), text=text)
        change = (moved - base).abs().amax(-1)
        assert change[background].max() <= 1e-6
        assert change[~background].min() > 1e-4
    finally:
        _set_gates(model, 0.0)
    base, _ = _run(model, data, _condition(data))
    moved, _ = _run(model, data, _condition(data), text=text)
    assert (moved - base).abs().amax(-1)[background].min() > 1e-4


def test_gate_zero_and_global_tokens_is_diffusers_model_exactly(backbone):
    """(c) oracle: the unmodified diffusers model with the same weights."""
    plain, model = backbone
    data = _data()
    cond = _condition(data, spans=[GLOBAL_TOKEN] * T, regions=torch.zeros(B, 0, PIXELS, PIXELS))
    ours, _ = _run(model, data, cond)
    theirs, _ = _run(plain, data, None)
    assert torch.equal(ours, theirs)
    regions_without_spans = _condition(data, spans=[GLOBAL_TOKEN] * T)  # regions given, nothing names them
    assert regions_without_spans.restricts  # ... still a mask (regions hide from the background)


def test_qwen_padding_is_never_read():
    """Qwen's text mask and PADDING labels agree with diffusers' own padding mask on every real token."""
    plain = tiny_qwen_image_edit()
    model = copy.deepcopy(plain)
    install_mcie_processors(model)
    data = _data()
    text_mask = torch.ones(B, T, dtype=torch.bool)
    text_mask[:, -2:] = False
    labels = [GLOBAL_TOKEN] * (T - 2) + [PADDING_TOKEN] * 2
    ours, _ = _run(model, data, _condition(data, spans=labels, regions=torch.zeros(B, 0, PIXELS, PIXELS)),
                   mask=text_mask)
    theirs, _ = _run(plain, data, None, mask=text_mask)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    scrambled = data["text"].clone()
    scrambled[:, -2:] = 1e3
    again, _ = _run(model, data, _condition(data, spans=labels, regions=torch.zeros(B, 0, PIXELS, PIXELS)),
                    text=scrambled, mask=text_mask)
    assert (again - ours).abs().max() <= 1e-6


def test_missing_condition_and_unknown_backbone_are_one_line_errors(backbone):
    _, model = backbone
    data = _data()
    with pytest.raises(ValueError, match="needs the transformer's"):
        _run(model, data, None)
    with pytest.raises(ValueError, match="no MCIE processor for Linear"):
        install_mcie_processors(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="names sub-instruction 2"):
        JointCondition(torch.tensor([[0, 2]]), torch.zeros(1, 2, 4, 4), torch.ones(1, 1, 4, 4), (2, 2))
    with pytest.raises(ValueError, match="attention must be one of"):
        JointCondition(torch.tensor([[0]]), torch.zeros(1, 1, 4, 4), torch.ones(1, 1, 4, 4), (2, 2), attention="xformers")


def test_one_lora_flow_matching_step_moves_only_lora_and_new_modules():
    """Kontext-style step: LoRA (peft) + MCIE modules trainable, base frozen; undisturbed at step 0;
    the loss is finite, the zero-initialised gate is what learns first, and every gate and its
    projection go on learning (issue 26: clamped gates died)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from trainer.dit.flow import add_lora, kontext_training_step, make_optimizer

    plain = tiny_flux_kontext()
    model = copy.deepcopy(plain)
    install_mcie_processors(model)
    groups = add_lora(model, rank=4)
    model.train()
    data = _data()
    everything_global = _condition(data, spans=[GLOBAL_TOKEN] * T, regions=torch.zeros(B, 0, PIXELS, PIXELS))
    torch.testing.assert_close(_run(model, data, everything_global)[0], _run(plain, data, None)[0],
                               rtol=0, atol=1e-6)  # LoRA B = 0 and gate = 0: the pretrained model

    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in before if "lora_" in n} | set(mcie_parameters(model))
    optimizer = make_optimizer(groups, lr=1e-3, mcie_lr=1e-2)
    loss = kontext_training_step(model, optimizer, FlowMatchEulerDiscreteScheduler(), data["target"],
                                 data["source"], data["text"], data["pooled"], _condition(data),
                                 generator=torch.Generator().manual_seed(3))
    assert torch.isfinite(loss) and loss > 0
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed and changed <= trainable
    assert any("lora_B" in n for n in changed)  # B starts at 0 and takes the first gradient
    gates = {n for n in mcie_parameters(model) if n.endswith("gate")}
    assert gates <= changed
    # ... and the gates stay alive: every gate and its projection keeps taking gradient (a gate
    # clamped to [0, 1] that stepped below 0 at the first step "changed" but takes none, for good)
    branch = {n: p for n, p in mcie_parameters(model).items() if n.endswith(("gate", "injection.proj.weight"))}
    grads = {n: [] for n in branch}
    for n, p in branch.items():
        p.register_post_accumulate_grad_hook(lambda p, n=n: grads[n].append(float(p.grad.abs().sum())))
    for seed in range(4, 8):
        kontext_training_step(model, optimizer, FlowMatchEulerDiscreteScheduler(), data["target"], data["source"],
                              data["text"], data["pooled"], _condition(data), generator=torch.Generator().manual_seed(seed))
    dead = sorted(n for n, g in grads.items() if len(g) != 4 or min(g) == 0.0)
    assert not dead, f"no gradient after the first step: {dead}"


def test_block_mask_is_the_dense_mask():
    """(d) the flex `mask_mod` evaluated on every (q, k) is `attention_mask` exactly, with Qwen's
    key mask folded in; and the BlockMask's block summary is the dense mask pooled per 128×128
    block, over a sequence long enough (521 tokens, 5 blocks) for some blocks to be skipped."""
    spans = [GLOBAL_TOKEN, 0, 0, 1, 1, 1, GLOBAL_TOKEN, PADDING_TOKEN, PADDING_TOKEN]
    regions = torch.zeros(2, 2, 16, 16)
    regions[:, 0, :8] = 1  # region 0: top half of the 16×16 target grid
    regions[:, 1, 7:] = 1  # region 1: bottom half, overlapping region 0 in row 7
    regions[1, 1, :, :4] = 1  # the second sample differs
    key_valid = torch.ones(2, len(spans), dtype=torch.bool)
    key_valid[1, 6] = False  # the model's own mask hides one more text token in sample 1
    cond = JointCondition(torch.tensor([spans] * 2), regions, torch.zeros(2, 1, 16, 16), (16, 16), attention="flex")
    image_length = 2 * 256  # target + source
    n = len(spans) + image_length
    for valid in (None, key_valid):
        dense = cond.attention_mask(image_length, key_valid=valid)
        block_mask = cond.block_mask(image_length, key_valid=valid)
        assert block_mask is cond.block_mask(image_length, key_valid=valid)  # cached like the dense mask
        assert torch.equal(create_mask(block_mask.mask_mod, 2, 1, n, n, device="cpu"), dense)
        padded = torch.nn.functional.pad(dense.float(), (0, 640 - n, 0, 640 - n))
        pooled = torch.nn.functional.max_pool2d(padded, 128) > 0  # (B, 1, 5, 5): any allowed pair in the block
        assert torch.equal(block_mask.to_dense().bool(), pooled)
    assert not pooled.all()  # some blocks (source rows × region-1 columns) are skipped by the kernel


def test_flex_equals_sdpa(backbone):
    """(d) on the property fixtures (spans, overlapping regions, padding: a PADDING label, and for
    Qwen also its text mask), every output token of flex equals the dense-mask SDPA path; with
    nothing to restrict, flex is diffusers' model exactly (no mask at all)."""
    plain, model = backbone
    data = _data()
    spans = SPANS[:-1] + [PADDING_TOKEN]
    text_mask = None
    if not isinstance(model, FluxTransformer2DModel):
        text_mask = torch.ones(B, T, dtype=torch.bool)
        text_mask[:, -1] = False
    _set_gates(model, 0.5)
    try:
        _, dense = _run(model, data, _condition(data, spans=spans), mask=text_mask)
        _, flex = _run(model, data, _condition(data, spans=spans, attention="flex"), mask=text_mask)
    finally:
        _set_gates(model, 0.0)
    torch.testing.assert_close(flex, dense, rtol=1e-5, atol=2e-6)  # float32: observed ≤ 4e-7
    everything_global = _condition(data, spans=[GLOBAL_TOKEN] * T, regions=torch.zeros(B, 0, PIXELS, PIXELS),
                                   attention="flex")
    assert torch.equal(_run(model, data, everything_global)[0], _run(plain, data, None)[0])
