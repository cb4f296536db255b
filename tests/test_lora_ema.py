"""The EMA of LoRA adapters is the EMA of the weight change they apply (B·A), kept at the
adapter's rank (trainer/ema.py): exact while the EMA stays within rank r, the best rank-r
truncation of every update otherwise, and — through `mcie train` — what `ema.safetensors` and
the exported checkpoint hold."""

from __future__ import annotations

import pytest
import torch
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file

from test_trainer import build, one_thread  # noqa: F401  (fixtures: the trainer tests' build, one torch thread)
from trainer.config import preset, with_train
from trainer.ema import TrainedWeightsEMA, ema_of_product, lora_pairs
from trainer.train import Trainer

RANK, OUT, IN = 3, 10, 7


def _decays(steps: int, decay: float) -> list[float]:
    """The decay EMAModel applies at each step (its warm-up: 0, then (1+n)/(10+n), capped)."""
    schedule = EMAModel([torch.zeros(())], decay=decay)
    return [schedule.get_decay(n) for n in range(1, steps + 1)]


def _truncate(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(matrix)
    return (u[:, :rank] * s[:rank]) @ vh[:rank]


def _run(trajectory, decay, params):
    """Drive a TrainedWeightsEMA over a trajectory of {name: value} states."""
    ema = None
    for state in trajectory:
        with torch.no_grad():
            for name, value in state.items():
                params[name].copy_(value)
        if ema is None:
            ema = TrainedWeightsEMA(list(params.items()), decay)
        ema.step(params)
    return ema


def test_ema_of_adapters_in_a_fixed_subspace_is_the_ema_of_their_deltas():
    """Adapters that move inside one rank-r row and column space: the EMA pair's product is the
    dense EMA of B·A exactly; EMA(B)·EMA(A) (averaging the factors apart) is far from it. A
    full weight beside them gets diffusers' EMA."""
    g = torch.Generator().manual_seed(0)
    columns, rows = torch.randn(OUT, RANK, generator=g), torch.randn(RANK, IN, generator=g)
    trajectory = [{"m.lora_A.default.weight": torch.randn(RANK, RANK, generator=g) @ rows,
                   "m.lora_B.default.weight": columns @ torch.randn(RANK, RANK, generator=g),
                   "head.weight": torch.randn(4, generator=g)} for _ in range(8)]
    params = {name: torch.nn.Parameter(value.clone()) for name, value in trajectory[0].items()}
    ema = _run(trajectory, 0.8, params)
    dense, factors, head = None, None, None
    for decay, state in zip(_decays(8, 0.8), trajectory):
        delta = state["m.lora_B.default.weight"] @ state["m.lora_A.default.weight"]
        dense = delta if dense is None else decay * dense + (1 - decay) * delta
        pair = (state["m.lora_A.default.weight"], state["m.lora_B.default.weight"])
        factors = pair if factors is None else tuple(decay * f + (1 - decay) * p for f, p in zip(factors, pair))
        head = state["head.weight"] if head is None else decay * head + (1 - decay) * state["head.weight"]
    weights = ema.state_dict()
    product = weights["m.lora_B.default.weight"] @ weights["m.lora_A.default.weight"]
    torch.testing.assert_close(product, dense, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(weights["head.weight"], head, rtol=1e-6, atol=1e-6)
    separate = factors[1] @ factors[0]
    assert (separate - dense).abs().max() > 0.1 * dense.abs().max()  # the defect this replaces


def test_general_trajectories_keep_the_best_rank_r_truncation_of_each_update():
    """Unconstrained adapters (the EMA's rank would grow): the pair follows
    ΔE ← truncate_r(d·ΔE + (1-d)·B·A), written densely; batched over two layers of one shape and
    a conv-shaped adapter of another."""
    g = torch.Generator().manual_seed(1)
    shapes = {"a.lora_A.default.weight": (RANK, IN), "a.lora_B.default.weight": (OUT, RANK),
              "b.lora_A.default.weight": (RANK, IN), "b.lora_B.default.weight": (OUT, RANK),
              "c.lora_A.default.weight": (RANK, 4, 3, 3), "c.lora_B.default.weight": (6, RANK, 1, 1)}
    trajectory = [{name: torch.randn(shape, generator=g) for name, shape in shapes.items()} for _ in range(6)]
    params = {name: torch.nn.Parameter(value.clone()) for name, value in trajectory[0].items()}
    ema = _run(trajectory, 0.9, params)
    weights = ema.state_dict()
    assert {name: tuple(w.shape) for name, w in weights.items()} == shapes
    for layer in "abc":
        a_name, b_name = f"{layer}.lora_A.default.weight", f"{layer}.lora_B.default.weight"
        expected = None
        for decay, state in zip(_decays(6, 0.9), trajectory):
            delta = state[b_name].flatten(1) @ state[a_name].flatten(1)
            expected = delta if expected is None else _truncate(decay * expected + (1 - decay) * delta, RANK)
        torch.testing.assert_close(weights[b_name].flatten(1) @ weights[a_name].flatten(1), expected,
                                   rtol=1e-4, atol=1e-5)


def test_resumed_ema_continues_where_it_stopped():
    g = torch.Generator().manual_seed(2)
    trajectory = [{"x.lora_A.default.weight": torch.randn(RANK, IN, generator=g),
                   "x.lora_B.default.weight": torch.randn(OUT, RANK, generator=g),
                   "y.weight": torch.randn(3, generator=g)} for _ in range(5)]
    params = {name: torch.nn.Parameter(value.clone()) for name, value in trajectory[0].items()}
    whole = _run(trajectory, 0.9, params).state_dict()
    first = _run(trajectory[:3], 0.9, params)
    again = TrainedWeightsEMA(list(params.items()), 0.9)
    again.load_state_dict(first.state_dict())
    again.optimization_step = first.optimization_step
    for state in trajectory[3:]:
        with torch.no_grad():
            for name, value in state.items():
                params[name].copy_(value)
        again.step(params)
    for name, value in again.state_dict().items():
        torch.testing.assert_close(value, whole[name], rtol=0, atol=0)


def test_a_layer_narrower_than_twice_the_rank():
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(1, 4, 2, generator=g), torch.randn(1, 3, 4, generator=g)  # rank 4, 3 × 2
    new_a, new_b = ema_of_product(a, b, a.flip(-1), b.flip(-2), 0.5)
    assert new_a.shape == a.shape and new_b.shape == b.shape
    torch.testing.assert_close(new_b @ new_a, 0.5 * b @ a + 0.5 * b.flip(-2) @ a.flip(-1), rtol=1e-5, atol=1e-5)


def test_lora_pairs_by_peft_names():
    names = ["t.to_q.lora_A.default.weight", "t.to_q.lora_B.default.weight", "t.to_q.base_layer.weight",
             "p.lora_A.default.weight", "gate"]
    assert lora_pairs(names) == [("t.to_q.lora_A.default.weight", "t.to_q.lora_B.default.weight")]


@pytest.mark.parametrize("backbone", ["flux-kontext"])
def test_training_saves_the_ema_of_each_adapter_s_delta(backbone, build, tmp_path, monkeypatch):
    """`mcie train` with an EMA: every adapter's pair in `ema.safetensors` multiplies to the
    rank-r EMA of the B·A the optimiser produced, step by step; the new modules' weights are
    diffusers' EMA of their values."""
    seen = []
    original = TrainedWeightsEMA.step

    def recording(self, params):
        seen.append({name: p.detach().clone() for name, p in params.items()})
        original(self, params)

    monkeypatch.setattr(TrainedWeightsEMA, "step", recording)
    # a large learning rate: successive adapters differ enough that EMA(B)·EMA(A) is off by far
    # more than the tolerance (at the default rate the cross terms would hide below it)
    config = with_train(preset("tiny", backbone), batch_size=2, checkpoint_every=3, ema_decay=0.9,
                        learning_rate=5e-2)
    trainer = Trainer(build, config, tmp_path / "ckpt")
    trainer.fit(3)
    saved = load_file(str(tmp_path / "ckpt" / "checkpoint-3" / "ema.safetensors"))
    decays = _decays(3, 0.9)
    pairs = lora_pairs(list(saved))
    assert len(pairs) > 4 and len(seen) == 3
    rank = saved[pairs[0][0]].shape[0]
    separate_error = 0.0
    for a_name, b_name in pairs:
        expected, factors = None, None
        for decay, state in zip(decays, seen):
            delta = state[b_name] @ state[a_name]
            expected = delta if expected is None else _truncate(decay * expected + (1 - decay) * delta, rank)
            pair = (state[a_name], state[b_name])
            factors = pair if factors is None else tuple(decay * f + (1 - decay) * p for f, p in zip(factors, pair))
        torch.testing.assert_close(saved[b_name] @ saved[a_name], expected, rtol=1e-4, atol=1e-6)
        separate_error = max(separate_error, float((factors[1] @ factors[0] - expected).abs().max()))
    assert separate_error > 1e-3  # averaging the factors apart would fail the comparison above
    gate = next(name for name in saved if name.endswith("gate"))
    expected = seen[0][gate]
    for decay, state in zip(decays[1:], seen[1:]):
        expected = decay * expected + (1 - decay) * state[gate]
    torch.testing.assert_close(saved[gate], expected, rtol=1e-6, atol=1e-7)
    moved = [float((seen[-1][b] @ seen[-1][a]).abs().max()) for a, b in pairs]
    assert max(moved) > 0  # the adapters did train: the comparison is not of zeros
