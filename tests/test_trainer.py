"""MCIE-E1 trainer (tiny config, CPU): loader, attention properties, training, resume, edit."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from bench_scripts import load_bench
from pipeline.compose.procedural import Composer
from pipeline.sources.procedural import ProceduralSource
from shard_samples import procedural_train_shards
from trainer.attention import (GLOBAL_TOKEN, PADDING_TOKEN, MCIECrossAttnProcessor, CrossAttnCondition,
                               set_background_gate)
from trainer.config import ConfigError, load_config, preset, with_train
from trainer.data import decode_sample, find_shards, make_loader
from trainer.cli import register
from trainer.edit import fallback_split, load_model, parse_split_answer, split_instruction
from trainer.model import predicted_regions
from trainer.checkpoints import checkpoints
from trainer.train import Trainer, train

UNITS, PER_UNIT = 3, 8


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Two busy shared cores: intra-op threads spin against each other (measured ~20x slower).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def build(tmp_path_factory) -> Path:
    """A small build's train shards, made by the real composer, editor and shard writer."""
    return procedural_train_shards(tmp_path_factory.mktemp("build"), UNITS, PER_UNIT)


def tiny(**train):
    return with_train(preset("tiny"), **train)


@pytest.fixture(scope="module")
def trained(build, tmp_path_factory) -> tuple[Path, dict[int, float]]:
    out = tmp_path_factory.mktemp("ckpt")
    result = train(build, tiny(checkpoint_every=100), out, 30)
    return out, result.losses


# ---- loader -------------------------------------------------------------------------------------

def test_loader_keeps_images_and_masks_aligned_and_pads_sub_edits(build):
    import webdataset as wds

    config = preset("tiny")
    raws = list(wds.DataPipeline(wds.SimpleShardList([str(s) for s in find_shards(build)]),
                                 wds.tarfile_to_samples()))
    assert len(raws) == UNITS * PER_UNIT
    counts, same_outside, outside = set(), 0.0, 0.0
    for i, raw in enumerate(raws):
        sample = decode_sample(raw, config.model.resolution, 3, 0.6, np.random.default_rng(i))
        count = len(json.loads(raw["json"])["sub_edits"])
        counts.add(count)
        valid = sample["sub_valid"]
        assert int(valid.sum()) == min(count, 3)
        # the edit mask is the union of the sub-edit masks: still true after the shared crop/resize
        union = sample["sub_masks"][valid].amax(0)
        assert torch.equal(union, sample["edit_mask"][0])
        assert not sample["sub_masks"][~valid].any()
        assert sample["source"].shape == (3, 32, 32) and sample["source"].abs().max() <= 1
        # the crop is shared: unedited pixels stay identical in source and target, except where
        # the bicubic downscale's footprint reaches across the edit mask's border
        same = (sample["source"] == sample["target"]).all(0)
        same_outside += float(same[sample["edit_mask"][0] == 0].sum())
        outside += float((sample["edit_mask"][0] == 0).sum())
    assert same_outside / outside > 0.8
    assert max(counts) > 3  # the merge into the last slot was exercised


def test_loader_skips_a_corrupt_sample_and_counts_it(build, tmp_path):
    import tarfile

    broken = tmp_path / "shards"
    broken.mkdir()
    with tarfile.open(find_shards(build)[0]) as src, tarfile.open(broken / "train-000000.tar", "w") as dst:
        first_key = None
        for member in src:
            key = member.name.split(".", 1)[0]
            first_key = first_key or key
            if key == first_key and member.name.endswith("regions.png"):
                continue  # sample 0 loses its regions member
            dst.addfile(member, src.extractfile(member))
    train_cfg = tiny(batch_size=2, shuffle_buffer=4).train
    loader, state = make_loader(tmp_path, train_cfg, preset("tiny").model)
    batches = iter(loader)
    keys = []
    for _ in range(PER_UNIT):  # more than one epoch
        batch = next(batches)
        state.advance(batch)
        keys += batch["key"]
    assert first_key not in keys
    assert len(set(keys)) == PER_UNIT - 1


# ---- the two attention mechanisms ---------------------------------------------------------------

def _attention(seed: int = 0):
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(seed)
    attn = Attention(query_dim=16, cross_attention_dim=12, heads=2, dim_head=8)
    attn.set_processor(MCIECrossAttnProcessor(attn.inner_dim, source_dim=6, grid=4))
    return attn


def _condition(labels, regions, background, features=None):
    return CrossAttnCondition(region_masks=regions, token_regions=torch.tensor([labels]),
                              background=background, source_features=features)


def test_spatial_attention_changes_only_region_of_the_changed_sub_instruction():
    attn = _attention()
    h = w = 8
    regions = torch.zeros(1, 2, 2 * h, 2 * w)  # given at twice the attention's resolution
    regions[0, 0, :, : w] = 1  # sub-instruction 0: left half
    regions[0, 1, : h, w:] = 1  # sub-instruction 1: top-right quadrant
    background = 1 - regions.amax(1, keepdim=True)
    labels = [-1, -1, 0, 0, 0, 1, 1, -2]
    hidden = torch.randn(1, h * w, 16)
    context = torch.randn(1, len(labels), 12)
    features = torch.randn(1, 6, 2 * h, 2 * w)
    cond = _condition(labels, regions, background, features)
    with torch.no_grad():
        base = attn(hidden, context, mcie=cond)
        for sub, tokens in ((0, [2, 3, 4]), (1, [5, 6])):
            changed = context.clone()
            changed[0, tokens] += torch.randn(len(tokens), 12) * 3
            delta = (attn(hidden, changed, mcie=cond) - base).abs().amax(-1)[0].view(h, w)
            inside = torch.nn.functional.adaptive_max_pool2d(regions[:, sub:sub + 1], (h, w))[0, 0] > 0
            assert delta[~inside].max() == 0, f"sub-instruction {sub} leaked outside its region"
            assert delta[inside].min() > 0, f"sub-instruction {sub} had no effect somewhere in its region"
        padded = context.clone()
        padded[0, 7] += 5  # padding tokens are seen by nobody
        assert torch.equal(attn(hidden, padded, mcie=cond), base)


def test_closed_background_gate_shuts_the_instruction_out_of_the_background():
    attn = _attention(1)
    h = w = 6
    edit = torch.zeros(1, 1, h, w)
    edit[..., 1:4, 2:5] = 1
    regions = torch.cat([edit, torch.zeros_like(edit)], 1)
    labels = [-1, -1, 0, 0, 1]
    hidden = torch.randn(1, h * w, 16)
    features = torch.randn(1, 6, h, w)
    cond = _condition(labels, regions, 1 - edit, features)
    other = torch.randn(1, len(labels), 12) * 4  # an entirely different instruction
    context = torch.randn(1, len(labels), 12)
    outside = (edit[0, 0] == 0).flatten()
    with torch.no_grad():
        attn.processor.gate.fill_(1.0)
        a, b = attn(hidden, context, mcie=cond), attn(hidden, other, mcie=cond)
        assert torch.equal(a[0, outside], b[0, outside])
        assert not torch.equal(a[0, ~outside], b[0, ~outside])
        attn.processor.gate.fill_(0.5)  # half open: the background hears the instruction again
        a, b = attn(hidden, context, mcie=cond), attn(hidden, other, mcie=cond)
        assert not torch.equal(a[0, outside], b[0, outside])


@pytest.mark.parametrize("with_source", [True, False])
def test_optimised_processor_equals_the_plain_reference_computation(with_source):
    from trainer.attention import reference_mcie_attention

    attn = _attention(2)
    h, w = 5, 7  # odd sizes: ceil-halving grids, unaligned token count (bias padding path)
    regions = torch.zeros(2, 3, 2 * h, 2 * w)
    regions[0, 0, :4, :6] = 1
    regions[0, 1, 3:, 5:] = 1
    regions[1, 2, 2:9, 1:12] = 1
    background = 1 - regions.amax(1, keepdim=True)
    labels = torch.tensor([[-1, -1, 0, 0, 1, 1, 2, -2, -2], [-1, -1, 2, 2, 2, -2, -2, -2, -2]])
    features = torch.randn(2, 6, 2 * h, 2 * w) if with_source else None
    cond = CrossAttnCondition(region_masks=regions, token_regions=labels, background=background,
                              source_features=features)
    hidden, context = torch.randn(2, h * w, 16), torch.randn(2, labels.shape[1], 12)
    with torch.no_grad():
        attn.processor.gate.fill_(0.3)
        attn.processor.to_q_position.weight.normal_()  # zero at init: exercise the position path
        fast = attn(hidden, context, mcie=cond)
        slow = reference_mcie_attention(attn, attn.processor, hidden, context, cond)
    assert torch.allclose(fast, slow, atol=1e-5, rtol=1e-4), (fast - slow).abs().max()
    # the gate's gradient flows through the fused mix as through the reference
    if with_source:
        grads = []
        for fn in (lambda: attn(hidden, context, mcie=CrossAttnCondition(regions, labels, background, features)),
                   lambda: reference_mcie_attention(attn, attn.processor, hidden, context, cond)):
            attn.processor.gate.grad = None
            fn().square().sum().backward()
            grads.append(attn.processor.gate.grad.clone())
        assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-6) and grads[0] != 0


def test_processor_loads_weights_saved_with_separate_source_projections():
    attn = _attention(3)
    fused = attn.processor.to_kv_source.weight.detach()
    k, v = fused.chunk(2)
    old_style = {"to_k_source.weight": k.clone(), "to_v_source.weight": v.clone(),
                 "to_q_position.weight": torch.zeros_like(k), "gate": torch.tensor(0.5)}
    fresh = _attention(4).processor
    fresh.load_state_dict(old_style)
    assert torch.equal(fresh.to_kv_source.weight, fused) and fresh.gate.item() == 0.5


def test_unet_cross_attentions_are_all_mcie_processors():
    from trainer.attention import mcie_processors
    from trainer.build import build_model

    model = build_model(preset("tiny").model)
    cross = [n for n in model.unet.attn_processors if "attn2" in n]
    assert len(mcie_processors(model.unet)) == len(cross) > 0
    set_background_gate(model.unet, 1.0)
    assert all(p.gate == 1 for p in mcie_processors(model.unet))
    # the processors' own weights are part of the trained, saved state
    assert any("to_kv_source" in k for k in model.state_dict())
    assert not any(k.startswith("frozen") or "language_model" in k for k in model.state_dict())


# ---- training, resume, edit -------------------------------------------------------------------

def test_loss_goes_down(trained):
    _, losses = trained
    steps = sorted(losses)
    assert len(steps) == 30
    first = np.mean([losses[s] for s in steps[:5]])
    last = np.mean([losses[s] for s in steps[-5:]])
    assert last < 0.8 * first, (first, last)


def _metrics(out: Path) -> dict[int, dict]:
    return {m["step"]: m for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


def test_resume_gives_the_same_next_losses_as_an_uninterrupted_run(build, tmp_path):
    config = tiny(checkpoint_every=3, checkpoint_limit=1, num_workers=2, batch_size=3, shuffle_buffer=5,
                  lr_schedule="cosine", lr_warmup_steps=2, lr_decay_steps=6, log_every=1, ema_decay=0.9)
    straight = train(build, config, tmp_path / "a", 6).losses
    lrs = {step: m["lr"] for step, m in _metrics(tmp_path / "a").items()}
    base = config.train.learning_rate  # warm-up to it in 2 steps, then cosine down to 0 at step 6
    assert lrs[1] == pytest.approx(base / 2) and lrs[2] == pytest.approx(base) and lrs[6] == pytest.approx(0)
    assert lrs[3] > lrs[4] > lrs[5] > 0
    first = train(build, config, tmp_path / "b", 3)
    assert [s for s, _ in checkpoints(tmp_path / "b")] == [3]
    resumed = train(build, config, tmp_path / "b", 6)
    assert resumed.resumed_from == 3
    assert resumed.losses == {s: straight[s] for s in (4, 5, 6)}  # bit-identical
    assert {step: m["lr"] for step, m in _metrics(tmp_path / "b").items()} == lrs  # schedule resumed
    ema_a, ema_b = (load_file(str(tmp_path / run / "checkpoint-6" / "ema.safetensors")) for run in "ab")
    assert ema_a.keys() == ema_b.keys() and all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)
    # inference takes the EMA weights by default, the trained ones on request
    trained = load_file(str(tmp_path / "a" / "checkpoint-6" / "model.safetensors"))
    name = "connector.global_queries"
    assert not torch.equal(ema_a[name], trained[name])
    ema_model, trained_model = load_model(tmp_path / "a"), load_model(tmp_path / "a", weights="trained")
    assert (ema_model.weights_used, trained_model.weights_used) == ("ema", "trained")
    assert torch.equal(ema_model.connector.global_queries, ema_a[name])
    assert torch.equal(trained_model.connector.global_queries, trained[name])
    assert first.losses == {s: straight[s] for s in (1, 2, 3)}
    assert [s for s, _ in checkpoints(tmp_path / "b")] == [6]  # retention limit 1
    assert train(build, config, tmp_path / "b", 6).losses == {}  # already there: nothing to do


def test_compiled_channels_last_training_matches_eager_and_its_checkpoint_loads_eagerly(build, tmp_path):
    import torch._dynamo.utils

    config = tiny(checkpoint_every=2, batch_size=2)
    eager = train(build, config, tmp_path / "eager", 2).losses
    fast = with_train(config, compile="default", channels_last=True)
    counters = torch._dynamo.utils.counters
    graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
    compiled = train(build, fast, tmp_path / "fast", 2).losses
    assert counters["stats"]["unique_graphs"] - graphs == 3  # UNet, source encoder, VAE encoder
    assert sum(counters["graph_break"].values()) == breaks
    assert sorted(compiled) == [1, 2]
    assert compiled == pytest.approx(eager, rel=1e-4)  # same draws, same math, other kernels
    # compiled per module: the checkpoint has the eager parameter names, so an eager run resumes it
    resumed = train(build, config, tmp_path / "fast", 3)
    assert resumed.resumed_from == 2 and sorted(resumed.losses) == [3]
    assert resumed.losses[3] == pytest.approx(train(build, config, tmp_path / "eager", 3).losses[3], rel=1e-3)


def test_bf16_mixed_precision_trains_like_float32_and_keeps_float32_weights(build, tmp_path):
    """The GPU's dtype path (bf16 autocast, the frozen VAE and MLLM held in bf16) run under CPU
    autocast: a dtype mix-up there would otherwise show only on a GPU."""
    config = tiny(checkpoint_every=2, batch_size=2)
    full = train(build, config, tmp_path / "fp32", 2).losses
    half = train(build, with_train(config, mixed_precision="bf16"), tmp_path / "bf16", 2).losses
    assert sorted(half) == [1, 2] and half != full  # other arithmetic, same draws
    assert half == pytest.approx(full, rel=1e-2)
    weights = load_file(str(tmp_path / "bf16" / "checkpoint-2" / "model.safetensors"))
    assert {w.dtype for w in weights.values()} == {torch.float32}  # autocast keeps master weights
    assert load_model(tmp_path / "bf16").weights_used == "trained"


def test_two_process_data_parallel_training_checkpoints_and_resumes(build, tmp_path):
    """The multi-GPU path (`accelerate launch` = torch.distributed.run + DDP) with two CPU processes
    talking gloo: DDP needs a gradient for every parameter on every step (null_context used to get
    none on steps without a dropped instruction), the checkpoint keeps both ranks' loader
    positions, a rerun resumes from it, and only rank 0 prints the summary."""
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")

    def launch(steps: int) -> list[dict]:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                   "-m", "flows.cli", "train", "--data", str(build), "--out", str(tmp_path / "ckpt"),
                   "--steps", str(steps), "--batch-size", "2", "--checkpoint-every", "2"]
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600,
                              cwd=Path(__file__).resolve().parents[1])
        assert done.returncode == 0, done.stderr[-4000:]
        return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]

    [first] = launch(4)
    assert (first["step"], first["resumed_from"]) == (4, None)
    state = json.loads((tmp_path / "ckpt" / "checkpoint-4" / "trainer_state.json").read_text())
    assert [position["batches"] for position in state["loader"]] == [4, 4]  # one per rank
    [again] = launch(6)
    assert (again["step"], again["resumed_from"]) == (6, 4)


def test_validation_loss_is_fixed_and_leaves_training_untouched(build, tmp_path):
    config = tiny(checkpoint_every=4, batch_size=2)
    plain = train(build, config, tmp_path / "plain", 4).losses
    validated = train(build, with_train(config, eval_every=2, eval_batches=2), tmp_path / "val", 4,
                      val_data=build).losses
    assert validated == plain  # the evaluation draws in a forked RNG: training is bit-identical
    lines = [json.loads(line) for line in (tmp_path / "val" / "metrics.jsonl").read_text().splitlines()]
    val = {m["step"]: m for m in lines if "val_loss" in m}
    assert sorted(val) == [2, 4] and all(np.isfinite(m["val_loss"]) for m in val.values())
    assert val[2]["val_loss"] != val[4]["val_loss"]  # the weights changed, the samples did not
    again = Trainer(build, with_train(config, eval_batches=2), tmp_path / "val", val_data=build)
    again.resume()
    assert again.validate()["val_loss"] == val[4]["val_loss"]  # same samples, noise and timesteps


def test_train_cache_skips_the_frozen_encoders_and_trains_the_same(build, tmp_path, capsys, monkeypatch):
    from dataclasses import replace

    from trainer.config import Config
    from trainer.data import count_samples

    command = ["train-cache", "--data", str(build), "--out", str(tmp_path / "cache"), "--batch-size", "5"]
    assert _cli(command) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["shards"] == UNITS and summary["skipped"] == 0
    assert summary["samples"] == sum(count_samples(s) for s in find_shards(build))
    # cached samples are encoded whole: the same as training the build without random crops
    config = tiny(batch_size=2, checkpoint_every=3, crop_min_scale=1.0)
    raw = train(build, config, tmp_path / "raw", 3).losses

    def unused(*args, **kwargs):
        raise AssertionError("a frozen encoder ran although the data is cached")

    with monkeypatch.context() as patch:
        patch.setattr("trainer.model.Frozen.latents", unused)
        patch.setattr("trainer.mllm.MLLMEncoder.encode", unused)
        cached = train(tmp_path / "cache", config, tmp_path / "cached", 3).losses
    assert cached == pytest.approx(raw, rel=1e-5)
    assert _cli(command) == 0  # a rerun keeps the finished shards
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["kept"] == UNITS
    other = Config(replace(config.model, mllm_image_size=28), config.train)
    with pytest.raises(ConfigError, match="another model config"):
        train(tmp_path / "cache", other, tmp_path / "other", 1)
    lora = Config(replace(config.model, mllm_tuning="lora"), config.train)
    with pytest.raises(ConfigError, match="LoRA"):
        train(tmp_path / "cache", lora, tmp_path / "lora", 1)


def test_an_ema_can_be_switched_on_when_resuming(build, tmp_path):
    config = tiny(checkpoint_every=2, batch_size=2)
    train(build, config, tmp_path, 2)
    resumed = train(build, with_train(config, ema_decay=0.5, checkpoint_every=1), tmp_path, 4)
    assert resumed.resumed_from == 2 and sorted(resumed.losses) == [3, 4]
    name = "connector.global_queries"
    weights = {step: load_file(str(tmp_path / f"checkpoint-{step}" / "model.safetensors"))[name]
               for step in (3, 4)}
    ema = {step: load_file(str(tmp_path / f"checkpoint-{step}" / "ema.safetensors"))[name] for step in (3, 4)}
    assert torch.allclose(ema[3], weights[3], atol=1e-7)  # diffusers' EMA copies on its first step
    decay = 2 / 11  # then warms up as (1 + n) / (10 + n), here below the configured 0.5
    assert torch.allclose(ema[4], decay * weights[3] + (1 - decay) * weights[4], atol=1e-7)


def _cli(argv):
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.func(args)


def test_edit_writes_an_image_of_the_source_size(trained, tmp_path, capsys):
    out, _ = trained
    image = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (45, 70, 3), dtype=np.uint8)).save(image)
    common = ["edit", "--checkpoint", str(out), "--image", str(image), "--steps", "2",
              "--instruction", "Make the red cup blue, then remove the star, and also add a tree."]
    assert _cli(common + ["--out", str(tmp_path / "a.png")]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert info["sub_instructions"] == ["make the red cup blue", "remove the star", "add a tree"]
    assert info["regions_from"] == "predicted"
    assert all(fraction > 0 for fraction in info["region_fractions"])  # every sub-edit acts somewhere
    assert info["weights"] == "trained"  # this checkpoint was trained without an EMA
    assert Image.open(tmp_path / "a.png").size == (70, 45)
    boxes = ["0,0,20,20", "30,10,60,40", "0,30,10,45"]
    assert _cli(common + ["--out", str(tmp_path / "b.png"), "--regions", *boxes]) == 0
    assert Image.open(tmp_path / "b.png").size == (70, 45)
    assert _cli(common + ["--out", str(tmp_path / "c.png"), "--regions", "0,0,5,5"]) == 2
    assert "3 sub-instructions" in capsys.readouterr().err
    # the tiny MLLM is random: it is really asked, its answer is no JSON list, the grammar takes over
    assert _cli(common + ["--out", str(tmp_path / "d.png"), "--split", "mllm"]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert info["split_by"] == "grammar (the MLLM's answer was unusable)"
    assert info["sub_instructions"] == ["make the red cup blue", "remove the star", "add a tree"]


def test_predicted_regions_are_never_empty():
    logits = torch.full((1, 4, 4, 4), -6.0)
    logits[0, 0, 1:3, 1:3] = 2.0  # confident: p > 0.5 there
    logits[0, 1, 0, 0], logits[0, 1, 0, 1] = -2.0, -2.5  # unsure: nothing passes 0.5; peak at (0, 0)
    logits[0, 3, 0, 0] = 5.0  # slot 3 holds no sub-instruction
    tokens = torch.tensor([[GLOBAL_TOKEN, 0, 0, 1, 2, PADDING_TOKEN]])
    regions, relaxed = predicted_regions(logits, tokens)
    assert relaxed.tolist() == [[False, True, True, False]]
    assert regions[0, 0].nonzero().tolist() == [[1, 1], [1, 2], [2, 1], [2, 2]]
    assert regions[0, 1].nonzero().tolist() == [[0, 0], [0, 1]]  # p >= half of p(-2.0)
    assert regions[0, 2].all()  # a flat prediction: everywhere, i.e. no spatial restriction
    assert not regions[0, 3].any()  # a padding slot stays empty, whatever its logits


def test_mllm_split_answers_are_parsed_or_refused():
    assert parse_split_answer('```json\n["Make the cup red.", " remove the star"]\n```') == [
        "Make the cup red", "remove the star"]
    assert parse_split_answer('Edits [1]: ["add a tree"] done') == ["add a tree"]  # first usable list
    for unusable in ("make the cup red", "[]", '["a", ""]', "[1, 2]", '["a", ', '{"edits": "a"}',
                     json.dumps([f"edit {i}" for i in range(9)])):
        assert parse_split_answer(unusable) is None, unusable


def test_fallback_splitter_on_connectives():
    text = "First make the cup red, then remove the star; after that add a tree and also move the car. Finally, write SALE."
    assert fallback_split(text) == ["make the cup red", "remove the star", "add a tree", "move the car",
                                    "write SALE"]


def test_edit_splits_a_bare_and_only_before_an_edit_verb():
    assert split_instruction("Make the circle blue and remove the star.") == [
        "make the circle blue", "remove the star"]
    assert split_instruction("Swap the cup and the tree, then paint the car red and also Add a tree") == [
        "swap the cup and the tree", "paint the car red", "add a tree"]
    assert split_instruction("Make the cup red and blue and then erase the sky and mint") == [
        "make the cup red and blue", "erase the sky and mint"]


def test_edit_split_recovers_every_composed_sub_instruction():
    # the "and <verb>" rule must not cut the composer's own sub-instructions ("move the ring up and
    # to the left", "change the background to sand on top and mint at the bottom")
    samples = [ProceduralSource(resolution=128).make(5, i) for i in range(300)]
    Composer(min_edits=2, max_edits=8)(samples)
    composed = [s for s in samples if not s.failed]
    assert len(composed) > 200
    for sample in composed:
        assert split_instruction(sample.instruction) == [s.text for s in sample.sub_edits]


def test_configs_and_cli_errors(build, tmp_path, capsys):
    base = preset("base")
    with pytest.raises(ConfigError, match="weights/sd15"):
        base.model.check_paths()
    config_file = tmp_path / "c.json"
    config_file.write_text(json.dumps({"preset": "base", "model": {"mllm_path": str(tmp_path / "qwen-missing")}}))
    assert load_config(str(config_file)).model.mllm_path.endswith("qwen-missing")
    config_file.write_text(json.dumps({"preset": "tiny", "train": {"bogus": 1}}))
    with pytest.raises(ConfigError, match="bogus"):
        load_config(str(config_file))
    assert _cli(["train", "--data", str(build), "--config", "base", "--out",
                                 str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert _cli(["train", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "y"),
                                 "--steps", "1"]) == 2
    assert "no train-*.tar" in capsys.readouterr().err
    assert _cli(["train", "--data", str(build), "--val-data", str(tmp_path / "none"), "--out",
                 str(tmp_path / "z"), "--steps", "1"]) == 2
    assert "no train-*.tar" in capsys.readouterr().err and not (tmp_path / "z").exists()


def test_components_load_from_local_weight_directories(build, tmp_path):
    """The `base` code path (from_pretrained of a VAE, a 4-channel UNet widened to 8, a Qwen2.5-VL
    with its tokenizer and PIL image processor), exercised on tiny saved weights."""
    from dataclasses import replace

    from diffusers import AutoencoderKL, UNet2DConditionModel

    from trainer.mllm import build_tiny_mllm
    from trainer.build import build_model

    tiny_cfg = preset("tiny").model
    mllm, tokenizer, processor = build_tiny_mllm(tiny_cfg.mllm, 0)
    for part in (mllm, tokenizer, processor):
        part.save_pretrained(tmp_path / "qwen")
    AutoencoderKL(**tiny_cfg.vae).save_pretrained(tmp_path / "vae")
    UNet2DConditionModel(**dict(tiny_cfg.unet, in_channels=4)).save_pretrained(tmp_path / "unet")
    config = replace(tiny_cfg, vae=None, vae_path=str(tmp_path / "vae"), mllm=None,
                     mllm_path=str(tmp_path / "qwen"), unet_path=str(tmp_path / "unet"), mllm_tuning="lora")
    model = build_model(config)
    assert model.unet.config.in_channels == 8 and model.lora is not None
    loader, _ = make_loader(build, tiny(batch_size=2).train, config)
    losses = model(next(iter(loader)), edit_weight=1.0, mask_loss_weight=0.5)
    losses["loss"].backward()
    assert torch.isfinite(losses["loss"])
    from peft.tuners.lora import LoraLayer

    assert any(isinstance(m, LoraLayer) for m in model.frozen.mllm.model.modules())  # peft's LoRA
    assert all(p.grad is not None for p in model.lora.parameters())  # LoRA is trained
    with pytest.raises(ConfigError, match="missing-vae"):
        build_model(replace(config, vae_path=str(tmp_path / "missing-vae")))


# ---- throughput benchmark (bench/train.py), smoke-sized ----------------------------------------

def _bench_module():
    return load_bench("train")


def test_bench_runs_every_variant_on_both_models_and_names_the_attention_kernels(capsys):
    bench = _bench_module()
    assert bench.main(["--device", "cpu", "--size", "tiny", "--steps", "1", "--warmup", "0",
                       "--variants", "eager,cl+tune", "--skip", "loader"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(f["model"], f["variant"]) for f in lines] == [
        ("ip2p", "eager"), ("mcie-e1", "eager"),
        ("ip2p", "channels_last+cudnn_benchmark"), ("mcie-e1", "channels_last+cudnn_benchmark")]
    assert all("error" not in f and f["samples_per_s"] > 0 and f["tflops_per_step"] > 0 for f in lines)
    plain, mcie = lines[0], lines[1]
    assert mcie["tflops_per_step"] > plain["tflops_per_step"]  # the added modules are counted
    assert "vs_ip2p_same_variant" in mcie and "vs_ip2p_eager" in lines[3]
    # plain: unmasked cross-attention; MCIE: masked text branch + unmasked source branch
    assert not any(k.endswith("+mask") for k in plain["sdpa"]["attn2"])
    kernels = mcie["sdpa"]["attn2"]
    assert any(k.endswith("+mask") for k in kernels) and any(not k.endswith("+mask") for k in kernels)
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--device", "cpu", "--variants", "eager,fast"])
    assert exit_info.value.code == 2


def test_bench_runs_one_model_with_cudnn_attention_preferred_and_counts_flops_without_running(capsys):
    bench = _bench_module()
    assert bench.main(["--device", "cpu", "--size", "tiny", "--steps", "1", "--warmup", "0",
                       "--models", "mcie-e1", "--variants", "cudnn_attn", "--skip", "loader",
                       "--profile", "3"]) == 0
    [line] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert line["model"] == "mcie-e1" and line["variant"] == "cudnn_attn" and "error" not in line
    assert len(line["top_ops"]) == 3 and 0 < sum(op["share"] for op in line["top_ops"]) <= 1
    assert line["sdpa"]["attn1"]  # no cuDNN attention on a CPU: the next kernel in the list ran
    # FLOPs on meta tensors: a smaller background grid means fewer source keys, so fewer FLOPs
    assert bench.main(["--flops-only", "--size", "tiny"]) == 0
    assert bench.main(["--flops-only", "--size", "tiny", "--models", "mcie-e1", "--background-grid", "2"]) == 0
    plain, mcie, small = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert plain["model"] == "ip2p" and mcie["vs_ip2p"] > 1
    assert small["background_grid"] == 2 and small["gflops_per_sample"] < mcie["gflops_per_sample"]


@pytest.mark.slow  # ≈ 3 min: every step of the GPU script at the tiny size
def test_device_check_script_dry_runs_on_the_cpu(tmp_path):
    """bench/device_check.sh is what a GPU session runs in its few minutes: it must not have rotted.
    DEVICE=cpu runs every step of it (trainer smokes on the tiny DiT and UNet, the inference
    memory figures, the generative editor benchmark, the DiT benchmark, each UNet bench variant)
    at the tiny size."""
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, DEVICE="cpu", OUT=str(tmp_path),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    done = subprocess.run(["bash", "bench/device_check.sh"], cwd=root, env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in (tmp_path / "device_check.jsonl").read_text().splitlines()]
    dit, smoke, *figures = lines
    assert dit["check"] == "trainer_smoke" and dit["backbone"] == "qwen-image-edit" and dit["ok"]
    assert dit["flex_vs_sdpa"]["finite"] and dit["flex_vs_sdpa"]["max_abs"] < 1e-4
    assert dit["gates_moved"]["of"] > 0 and dit["gates_moved"]["moved"] == dit["gates_moved"]["of"]
    memory = [json.loads(line) for line in (tmp_path / "inference_memory.jsonl").read_text().splitlines()]
    assert {m["backbone"] for m in memory} == {"qwen-image-edit", "flux-kontext"}
    assert all(m["peak_gb"] < 80 for m in memory)
    editors = [json.loads(line) for line in (tmp_path / "editors.jsonl").read_text().splitlines()]
    assert editors and not [line for line in editors if "error" in line]
    assert smoke["check"] == "trainer_smoke" and smoke["backbone"] == "unet" and smoke["ok"]
    assert smoke["weights_loaded"] == "ema"
    dit_lines = [json.loads(line) for line in (tmp_path / "dit_train.jsonl").read_text().splitlines()]
    assert dit_lines[-1]["bench"] == "dit_done" and not [line for line in dit_lines if "error" in line]
    assert [(f["model"], f["variant"]) for f in figures] == [
        ("mcie-e1", "channels_last+cudnn_benchmark+compile"), ("ip2p", "channels_last+cudnn_benchmark+compile")]
    assert all("error" not in f and f["top_ops"] for f in figures)
    assert all(f["graph_breaks"] == 0 for f in figures if "compile" in f["variant"])
