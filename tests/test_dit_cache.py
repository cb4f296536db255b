"""What the DiT processors keep and what they hand to diffusers: the joint-attention mask cache
of `JointCondition` holds one mask per (image length, text-mask content) across sampling steps
(the model passes a new text-mask tensor every step), and diffusers' attention dispatch settings
(`set_attention_backend`, context parallelism) reach `dispatch_attention_fn` from both MCIE
processors, as they do from diffusers' own."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

import trainer.dit.processors as processors
from test_trainer import one_thread  # noqa: F401  (fixture: one torch thread)
from trainer.build import build_model
from trainer.config import preset
from trainer.dit import GLOBAL_TOKEN, PADDING_TOKEN, JointCondition, install_mcie_processors
from trainer.dit.tiny import kontext_inputs, qwen_edit_inputs, tiny_flux_kontext, tiny_qwen_image_edit


def _hand_condition() -> JointCondition:
    regions = torch.zeros(1, 2, 2, 2)
    regions[0, 0, 0, 0] = regions[0, 1, 1, 1] = 1
    return JointCondition(torch.tensor([[GLOBAL_TOKEN, 0, 1, GLOBAL_TOKEN]]), regions, torch.ones(1, 1, 2, 2), (2, 2))


def test_one_mask_per_text_mask_content_and_each_its_own():
    """A new tensor with the same content is served the cached mask (no second N² mask); a
    different content gets its own, equal to what a fresh condition builds, for the dense and the
    flex form."""
    cond = _hand_condition()
    every = torch.tensor([[True, True, True, True]])
    first = cond.attention_mask(5, key_valid=every)
    assert cond.attention_mask(5, key_valid=every.clone()) is first  # same content, new object
    assert cond.attention_mask(5, key_valid=every.float()) is first  # and in another dtype
    hidden = torch.tensor([[True, True, False, True]])  # the model hides text token 2 (span 1)
    other = cond.attention_mask(5, key_valid=hidden)
    torch.testing.assert_close(other, _hand_condition().attention_mask(5, key_valid=hidden), rtol=0, atol=0)
    # text token 2 (span 1) is read by region 1's target token (joint index 7) unless hidden;
    # hidden, only by itself (every row reads itself)
    assert first[0, 0, 7, 2] and other[0, 0, :, 2].nonzero().flatten().tolist() == [2]
    assert cond.attention_mask(5, key_valid=hidden.clone()) is other
    assert cond.attention_mask(5, key_valid=every) is first
    assert cond.attention_mask(5) is not first  # no text mask: its own entry
    assert len(cond._cache[("mask", 5)]) == 3

    blocks = [cond.block_mask(5, key_valid=m) for m in (every, every.clone(), hidden, hidden.clone())]
    assert blocks[0] is blocks[1] and blocks[2] is blocks[3] and blocks[0] is not blocks[2]
    dense = blocks[2].to_dense()  # per-block summary: 1 block here; the rule itself is mask_mod's
    assert dense.numel() == 1
    q, k = torch.arange(8)[:, None], torch.arange(8)[None, :]
    torch.testing.assert_close(blocks[2].mask_mod(torch.tensor(0), torch.tensor(0), q, k), other[0, 0, :8, :8],
                               rtol=0, atol=0)


def test_ten_sampling_steps_build_one_mask(monkeypatch):
    """Qwen-Image-Edit sampling hands its transformer a new text mask each step: 10 steps × every
    layer build the dense mask once and leave one cache entry."""
    model = build_model(preset("tiny", "qwen-image-edit").model).eval()
    built, conditions = [], []
    build_dense = JointCondition._dense_mask
    monkeypatch.setattr(JointCondition, "_dense_mask",
                        lambda self, *args: built.append(args[0]) or build_dense(self, *args))
    model.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: conditions.append(kwargs["attention_kwargs"]["mcie"]), with_kwargs=True)
    source = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    uint8 = ((source[0].permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()[None]
    regions = torch.zeros(1, model.config.max_sub_edits, 32, 32)
    regions[0, 0, :, :12] = 1
    cond = model.condition(source, [["make the circle blue", "remove the star"]], uint8, background=None,
                           region_masks=regions)
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    model.sample(cond, noise, 10, text_guidance=1.0, image_guidance=1.0)
    assert len(conditions) == 10 and all(c is conditions[0] for c in conditions)
    assert conditions[0].restricts  # the mask is in use
    assert built == [128]  # 64 target + 64 source tokens, once
    assert [len(v) for k, v in conditions[0]._cache.items() if k[0] == "mask"] == [1]


@pytest.fixture
def active_backend_kept():
    """`set_attention_backend` also sets diffusers' process-wide active backend: put it back."""
    before = _AttentionBackendRegistry._active_backend
    yield
    _AttentionBackendRegistry.set_active_backend(before)


@pytest.mark.parametrize("backbone", ["flux-kontext", "qwen-image-edit"])
def test_attention_backend_and_parallel_config_reach_the_dispatch(backbone, monkeypatch, active_backend_kept):
    """`set_attention_backend` (diffusers) sets every MCIE processor's backend, and the processor
    passes it and its `_parallel_config` to `dispatch_attention_fn` (the masked path and the
    unrestricted one)."""
    plain = tiny_flux_kontext() if backbone == "flux-kontext" else tiny_qwen_image_edit()
    model = copy.deepcopy(plain)
    install_mcie_processors(model)
    model.set_attention_backend("_native_math")
    marker = object()  # a parallel config stand-in: recorded, not run
    for processor in model.attn_processors.values():
        processor._parallel_config = marker
    seen = []
    real = processors.dispatch_attention_fn

    def recording(*args, **kwargs):
        seen.append((kwargs.get("backend"), kwargs.get("parallel_config")))
        return real(*args, **{**kwargs, "parallel_config": None})

    monkeypatch.setattr(processors, "dispatch_attention_fn", recording)
    g = torch.Generator().manual_seed(0)
    target, source = torch.randn(1, 16, 16, generator=g), torch.randn(1, 16, 16, generator=g)
    text = torch.randn(1, 5, model.config.joint_attention_dim, generator=g)
    regions = torch.zeros(1, 1, 4, 4)
    regions[..., :2] = 1
    for spans in ([GLOBAL_TOKEN] * 5, [GLOBAL_TOKEN, 0, 0, GLOBAL_TOKEN, PADDING_TOKEN]):
        cond = JointCondition(torch.tensor([spans]), regions, torch.ones(1, 1, 4, 4), (4, 4), source=source)
        with torch.no_grad():
            if backbone == "flux-kontext":
                inputs = kontext_inputs(model, target, source, text, torch.randn(1, 20, generator=g),
                                        torch.tensor([0.5]))
                model(**inputs, joint_attention_kwargs={"mcie": cond})
            else:
                inputs = qwen_edit_inputs(target, source, text, torch.tensor([0.5]), (4, 4),
                                          text_mask=torch.tensor([[s != PADDING_TOKEN for s in spans]]))
                model(**inputs, attention_kwargs={"mcie": cond})
    layers = len(model.attn_processors)
    assert len(seen) == 2 * layers
    assert set(seen) == {(AttentionBackendName("_native_math"), marker)}


def test_selected_rows_get_their_own_cache():
    """`select_rows` (the guidance rows `sample` computes) builds a condition with a cache of its
    own: `dataclasses.replace` would hand it the parent's dict, whose masks are the whole batch's."""
    from trainer.dit.model import select_rows
    from trainer.model import Conditioning

    regions = torch.zeros(2, 1, 2, 2)
    regions[0, 0, 0, 0] = 1
    parent = JointCondition(torch.tensor([[GLOBAL_TOKEN, 0], [GLOBAL_TOKEN, 0]]), regions,
                            torch.ones(2, 1, 2, 2), (2, 2))
    assert parent.attention_mask(4).shape[0] == 2  # the parent's cache now holds a 2-row mask
    fields = {f: None for f in Conditioning.__dataclass_fields__ if f not in ("context", "condition")}
    cond = Conditioning(context=torch.zeros(2, 2, 3), condition=parent, **fields)
    chosen = select_rows(cond, [1]).condition
    assert chosen._cache is not parent._cache
    assert chosen.attention_mask(4).shape[0] == 1
    assert not chosen.attention_mask(4)[0, 0, 2:, 1].any()  # row 1 has no region: its image never reads span 0
