"""`mcie edit` on one 80 GB GPU (issue 26): the inference dtype, the MLLM and the denoiser never on
the device together, and the peak of the base presets computed from their real-size architectures
on the `meta` device (`bench/inference_memory.py`)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bench.inference_memory import GPU_BYTES, plan
from test_trainer import _cli, one_thread  # noqa: F401  (module fixture, shared helper)
from trainer.build import build_model
from trainer.config import preset
from trainer.dit.processors import PROCESSOR_PREFIX
from trainer.edit import DTYPES, edit_image, inference_dtype, load_model, place
from trainer.evaluate import INFERENCE_DTYPES
from trainer.export import save_pretrained

INSTRUCTION = "make the cup blue, then remove the star"
IMAGE = np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8)


def tiny_dit():
    return build_model(preset("tiny", "qwen-image-edit").model)


class MLLMRan(Exception):
    pass


def test_the_mllm_waits_on_the_offload_device_while_the_denoiser_runs():
    """Offloading to "meta" (weights gone: any use of the MLLM after its phase would fail): at
    every denoiser call the MLLM is off the device, the edit is bit-identical to the one without
    offloading, and the denoiser is parked again once it has sampled."""
    model = tiny_dit()
    place(model, "cpu", torch.float32, None)
    kept, info = edit_image(model, IMAGE, INSTRUCTION, steps=2)
    assert info["offload"] is None and info["dtype"] == "float32"
    seen = []
    model.denoiser.register_forward_pre_hook(
        lambda module, args: seen.append({p.device.type for p in model.frozen.mllm.model.parameters()}))
    model.offload_device = torch.device("meta")
    offloaded, info = edit_image(model, IMAGE, INSTRUCTION, steps=2)
    assert seen == [{"meta"}, {"meta"}]  # one call per step (true CFG: two rows in one batch)
    assert np.array_equal(np.asarray(offloaded), np.asarray(kept)) and info["offload"] == "meta"
    assert {p.device.type for p in model.denoiser.parameters()} == {"meta"}
    assert next(model.source_encoder.parameters()).device.type == "cpu"  # the small modules never move


def test_the_denoiser_waits_on_the_offload_device_while_the_mllm_reads():
    """`place` parks the denoiser: the MLLM reads the instruction with the denoiser off the device
    (the edit is stopped there: a denoiser parked on "meta" has no weights to come back with)."""
    model = tiny_dit()
    place(model, "cpu", torch.float32, "meta")
    seen = []

    def record(module, args, kwargs):
        seen.append({p.device.type for p in model.denoiser.parameters()})
        raise MLLMRan

    model.frozen.mllm.model.model.register_forward_pre_hook(record, with_kwargs=True)
    with pytest.raises(MLLMRan):
        edit_image(model, IMAGE, INSTRUCTION, steps=2)
    assert seen == [{"meta"}]
    assert {p.device.type for p in model.frozen.mllm.model.parameters()} == {"cpu"}
    assert {p.device.type for p in model.frozen.vae.parameters()} == {"cpu"}


@pytest.fixture(scope="module")
def pretrained_dit(tmp_path_factory):
    return save_pretrained(tiny_dit(), tmp_path_factory.mktemp("dit") / "model")


def test_bfloat16_inference_casts_the_frozen_parts_and_keeps_the_trained_modules_float32(pretrained_dit):
    model = load_model(pretrained_dit, "cpu", dtype="bfloat16")
    assert model.offload_device is None  # auto: offload on CUDA only
    assert {p.dtype for p in model.frozen.vae.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.frozen.mllm.model.parameters()} == {torch.bfloat16}
    by_kind = {"base": set(), "processors": set(), "lora": set()}
    for name, p in model.denoiser.named_parameters():
        kind = "processors" if PROCESSOR_PREFIX in f".{name}" else "lora" if "lora_" in name else "base"
        by_kind[kind].add(p.dtype)
    assert by_kind == {"base": {torch.bfloat16}, "processors": {torch.float32}, "lora": {torch.float32}}
    for part in (model.source_encoder, model.region_decoder):
        assert {p.dtype for p in part.parameters()} == {torch.float32}
    half, info = edit_image(model, IMAGE, INSTRUCTION, steps=2)
    full, _ = edit_image(load_model(pretrained_dit, "cpu"), IMAGE, INSTRUCTION, steps=2)
    assert info["dtype"] == "bfloat16" and np.asarray(half).shape == IMAGE.shape
    difference = np.abs(np.asarray(half, dtype=int) - np.asarray(full, dtype=int))
    assert 0 < difference.mean() < 8  # bf16 rounding, not a different model


def test_auto_dtype_is_bfloat16_on_cuda_and_float32_on_cpu_and_bad_names_fail():
    assert inference_dtype("auto", "cuda:0") is torch.bfloat16
    assert inference_dtype("auto", "cpu") is torch.float32
    assert inference_dtype("float16", "cpu") is torch.float16
    assert set(INFERENCE_DTYPES) == {"auto", *DTYPES}  # the CLI offers what load_model reads
    with pytest.raises(ValueError, match="dtype"):
        inference_dtype("float8", "cpu")


def test_mcie_edit_runs_in_the_dtype_asked_and_refuses_a_bad_one(pretrained_dit, tmp_path, capsys):
    from PIL import Image

    Image.fromarray(IMAGE).save(tmp_path / "in.png")
    common = ["edit", "--checkpoint", str(pretrained_dit), "--image", str(tmp_path / "in.png"),
              "--instruction", INSTRUCTION, "--steps", "1", "--out", str(tmp_path / "out.png")]
    assert _cli(common + ["--dtype", "bfloat16", "--no-offload"]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert info["dtype"] == "bfloat16" and info["offload"] is None
    with pytest.raises(SystemExit) as exit_:
        _cli(common + ["--dtype", "float8"])
    assert exit_.value.code == 2 and "invalid choice: 'float8'" in capsys.readouterr().err


def test_the_base_presets_fit_one_80_gb_gpu_and_float32_without_offload_does_not():
    qwen, kontext = plan("qwen-image-edit"), plan("flux-kontext")
    for peak in (qwen, kontext):
        assert peak["peak_bytes"] < GPU_BYTES and peak["dtype"] == "bfloat16" and peak["offload"]
    # the released sizes, counted from the modules
    assert 20.0e9 < qwen["components"]["transformer"]["params"] < 20.9e9
    assert 8.0e9 < qwen["components"]["mllm"]["params"] < 8.5e9  # Qwen2.5-VL-7B
    assert 11.7e9 < kontext["components"]["transformer"]["params"] < 12.1e9
    assert 4.6e9 < kontext["components"]["t5_xxl_encoder"]["params"] < 4.9e9
    # the peak is the larger phase, not the sum: the DiT's phase for both
    assert qwen["peak_gb"] == max(qwen["phases_gb"].values()) == qwen["phases_gb"]["denoise"]
    before = plan("qwen-image-edit", "float32", offload=False)  # what `mcie edit` built before
    assert before["peak_bytes"] > GPU_BYTES
    weights = sum(c["params"] for c in before["components"].values()) * 4
    assert before["peak_bytes"] > weights > GPU_BYTES
