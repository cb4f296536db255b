"""bench/dit_train.py (issue 19's GPU figures): the CPU dry run prints every figure with sane
values, the per-layer FLOP extrapolation equals a direct count, and the largest-batch search
brackets the limit of a synthetic memory model. The GPU run itself cannot happen here."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch

from bench_scripts import load_bench

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    return load_bench("dit_train")


@pytest.fixture(scope="module")
def dry_run():
    done = subprocess.run([sys.executable, "bench/dit_train.py", "--device", "cpu", "--size", "tiny", "--steps", "2"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines()]


def test_dry_run_prints_every_figure_with_sane_values(dry_run):
    bench = _bench()
    kinds = bench.attention_kinds()
    assert dry_run[-1]["bench"] == "dit_done"
    assert not [line for line in dry_run if "error" in line]
    for backbone in ("qwen-image-edit", "flux-kontext"):
        mine = [line for line in dry_run if line.get("backbone") == backbone]
        config = next(line for line in mine if line["bench"] == "dit_config")
        assert config["config"]["num_layers"] == 2 and config["lora_rank"] == 64 and config["gradient_checkpointing"]
        assert config["attention"] == list(kinds) and config["dtype"].startswith("bf16 base")
        flops = {(line["px"], line["variant"], line["attention"]): line
                 for line in mine if line["bench"] == "dit_flops"}
        assert set(flops) == {(px, v, a) for px in (64, 128) for v, a in [("plain-lora", "sdpa")]
                              + [("mcie-lora", k) for k in kinds]}
        for px in (64, 128):
            plain, mcie = flops[(px, "plain-lora", "sdpa")], flops[(px, "mcie-lora", "sdpa")]
            # the injection's projections add work; the backward costs more than the forward
            assert 0 < plain["gflops_per_sample"] <= mcie["gflops_per_sample"] < 1.2 * plain["gflops_per_sample"]
            assert mcie["gflops_forward_per_sample"] < mcie["gflops_per_sample"] - mcie["gflops_forward_per_sample"]
            assert 0 < mcie["gflops_recompute_per_sample"] <= mcie["gflops_forward_per_sample"]
            assert mcie["sdpa"] == ["flash_attention_for_cpu+mask"] and plain["sdpa"] == ["flash_attention_for_cpu"]
            assert flops[(128, "plain-lora", "sdpa")]["gflops_per_sample"] > plain["gflops_per_sample"] or px == 128
        trains = {(line["px"], line["variant"]): line for line in mine if line["bench"] == "dit_train"}
        assert set(trains) == {(px, v) for px in (64, 128) for v in ("plain-lora", "mcie-lora")}
        for (px, variant), line in trains.items():
            side = px // 16
            assert line["latent_grid"] == side and line["batch"] == 2 and line["steps_done"] == 2
            assert line["tokens"] == {"text": 32, "target": side * side, "source": side * side,
                                      "joint": 32 + 2 * side * side}
            assert line["samples_per_s"] == pytest.approx(2000 / line["step_ms"], rel=0.01)
            assert math.isfinite(line["loss"]) and line["loss"] > 0
            assert line["mfu"] is None and line["hfu"] is None and line["peak_mem_gib"] is None  # no peak, no CUDA
            flops_line = flops[(px, variant, "sdpa")]
            assert line["tflops_per_step"] == pytest.approx(2 * flops_line["gflops_per_sample"] / 1000, abs=1e-3)
            assert line["trainable_m"] > 0 and line["sdpa"] == flops_line["sdpa"]
        for px in (64, 128):
            plain, mcie = trains[(px, "plain-lora")], trains[(px, "mcie-lora")]
            assert mcie["vs_plain"] == pytest.approx(mcie["samples_per_s"] / plain["samples_per_s"], rel=0.01)
            assert mcie["meets_ratio"] == (mcie["vs_plain"] >= 0.95)
            assert mcie["trainable_m"] > plain["trainable_m"]  # + the MCIE modules
        skips = {line["what"] for line in mine if line["bench"] == "dit_skip"}
        assert ("fit" in skips) == (backbone == "qwen-image-edit")  # the fit is a CUDA figure
        if "flex" in kinds:
            assert {"train 64 px mcie-lora/flex", "train 128 px mcie-lora/flex"} <= skips  # no CPU backward
        summary = next(line for line in mine if line["bench"] == "dit_summary")
        assert len(summary["figures"]) == 4


def _args(**overrides):
    return Namespace(rank=8, gate=0.5, text_tokens=16, spans=2, region_fraction=0.3, **overrides)


@pytest.mark.parametrize("backbone, layers", [("qwen-image-edit", (3,)), ("flux-kontext", (2, 3))])
def test_flops_extrapolated_from_one_and_two_layers_equal_a_direct_count(backbone, layers):
    """FLOPs are affine in each block count; with checkpointing the counted step is exactly the
    model's FLOPs plus the recomputed forward of the blocks (what `hfu` adds)."""
    bench = _bench()
    torch.set_num_threads(1)
    device, args = torch.device("cpu"), _args()
    config = bench.backbone_config(backbone, "tiny", **dict(zip(("num_layers", "num_single_layers"), layers)))
    variants = [("plain-lora", "sdpa"), ("mcie-lora", "sdpa")]
    extrapolated = bench.count_flops(backbone, config, device, [64], args, variants)[64]
    for checkpointing in (False, True):
        net = bench.Backbone(backbone, config, device, args.rank, args.gate, checkpointing=checkpointing)
        data = bench.Batch(net, 1, 64, args.text_tokens, args.spans, args.region_fraction)
        for variant, attention in variants:
            net.use(variant)
            forward, backward, _ = bench.count_once(net, data, attention)
            figures = extrapolated[(variant, attention)]
            assert forward == figures["forward"]
            assert forward + backward == figures["model"] + (figures["recompute"] if checkpointing else 0)


def _memory(fixed: int, per_sample: int, curve: float = 0.0):
    """A card whose step peaks at fixed + b·per_sample (+ a convex term the line cannot see)."""
    return lambda b: fixed + b * per_sample + int(curve * b * b)


@pytest.mark.parametrize("curve", [0.0, 3e6])
def test_largest_batch_search_brackets_the_limit(curve):
    bench = _bench()
    gib, capacity = 2**30, 80 * 2**30
    peak = _memory(41 * gib, int(0.6 * gib), curve)
    truth = max(b for b in range(1, 500) if peak(b) <= capacity)
    tried = []

    def try_batch(b):
        tried.append(b)
        return peak(b) if peak(b) <= capacity else None

    result = bench.largest_batch(try_batch, {1: peak(1), 8: peak(8)}, capacity, lambda b: True, max_tries=6)
    assert result["largest_fitting_batch"] == truth and result["smallest_failing_batch"] == truth + 1
    assert result["exact"] and len(tried) <= 6
    assert result["per_sample_gib"] == pytest.approx(0.6 + curve * 9 / gib, rel=0.01)
    if curve == 0.0:
        assert result["predicted_max_batch"] == truth and tried == [truth, truth + 1]  # the line is the card


def test_largest_batch_search_stops_where_the_budget_does():
    bench = _bench()
    peak = _memory(10, 2)
    result = bench.largest_batch(lambda b: peak(b), {1: peak(1), 2: peak(2)}, 100, lambda b: b < 20)
    assert result["largest_fitting_batch"] == 2 and result["smallest_failing_batch"] is None
    assert result["predicted_max_batch"] == 45 and result["tries"] == [] and not result["exact"]


def test_spans_and_regions_follow_the_stated_layout():
    bench = _bench()
    labels = bench.span_labels(512, 3)
    assert len(labels) == 512 and labels[:128] == [-1] * 128 and labels[-1] == -1
    assert [labels.count(s) for s in range(3)] == [106, 106, 106]
    regions = bench.region_masks(4, 3, 32, 0.3, "cpu")
    share = regions.amax(1).mean().item()
    assert 0.28 <= share <= 0.32 and regions.sum(1).max() == 1  # ≈ 30 %, no overlap


@pytest.mark.parametrize("argv, message", [
    (["--backbone", "sd15"], "--backbone takes"), (["--resolutions", "500"], "multiples of 16"),
    (["--attention", "paged"], "--attention takes"), (["--text-tokens", "2", "--spans", "3"], "cannot hold"),
])
def test_bad_arguments_are_one_line_errors(argv, message, capsys):
    bench = _bench()
    with pytest.raises(SystemExit) as stop:
        bench.main(["--device", "cpu", *argv])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
