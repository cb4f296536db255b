"""MCIE-E1 on real photos (issue 18): exact background, native aspect, the safe decoder, the
position-aware background branch, the diffusers layout and validation that edits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from photo_fixtures import bomb_png, exif_rotated_jpeg, photo_array
from test_trainer import _cli, build, one_thread, tiny  # noqa: F401  (module fixtures, shared helpers)
from trainer.attention import CrossAttnCondition, MCIECrossAttnProcessor
from trainer.build import build_model
from trainer.config import preset
from trainer.edit import load_model, sample_latents
from trainer.export import save_pretrained
from trainer.model import make_sampler
from trainer.train import train


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """A random-init tiny MCIE-E1 in diffusers layout (what `mcie edit` can load)."""
    out = tmp_path_factory.mktemp("pretrained")
    save_pretrained(build_model(preset("tiny").model), out)
    return out


def test_latent_blending_keeps_the_source_latents_outside_the_regions():
    torch.manual_seed(0)
    known = torch.randn(1, 4, 6, 10) * 1.5
    keep = torch.ones(1, 1, 6, 10)
    keep[..., 1:4, 2:7] = 0  # the region being edited

    def denoise(x, t):  # any model: here one that pulls towards something else entirely
        return (x - 3.0).expand(3, -1, -1, -1)

    noise = torch.randn(known.shape, generator=torch.Generator().manual_seed(1))
    blended = sample_latents(denoise, make_sampler(preset("tiny").model), noise, 5, 7.5, 1.5, known=known, keep=keep)
    assert torch.equal(blended[keep.expand_as(known) == 1], known[keep.expand_as(known) == 1])
    inside = keep.expand_as(known) == 0
    assert (blended[inside] - known[inside]).abs().min() > 0


def test_edit_keeps_a_photo_s_background_exactly_at_its_own_aspect(pretrained, tmp_path, capsys):
    """A real photo, stored sideways with an EXIF orientation, through `mcie edit`: the output has
    the upright photo's size, every pixel outside the given region is the photo's own, and the
    model worked at the photo's aspect ratio; --no-paste-back shows the raw decoded output."""
    photo = photo_array("chelsea")[::2, ::2]  # 150 x 226, a real cat photograph
    path = tmp_path / "cat.jpg"
    path.write_bytes(exif_rotated_jpeg(photo, orientation=6))  # stored as is, shown turned 90°
    from trainer.edit import read_image

    upright, notes = read_image(path)
    height, width = upright.shape[:2]
    assert (height, width) == (photo.shape[1], photo.shape[0]) and notes
    box = (20, 30, 90, 100)  # x0, y0, x1, y1
    common = ["edit", "--checkpoint", str(pretrained), "--image", str(path), "--steps", "3",
              "--instruction", "make the cat blue", "--regions", ",".join(map(str, box))]
    assert _cli(common + ["--out", str(tmp_path / "kept.png")]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    w, h = info["working_size"]
    assert abs(w / h - width / height) < 0.15 and info["paste_back"] and info["decode_notes"] == notes
    kept = np.asarray(Image.open(tmp_path / "kept.png"))
    outside = np.ones((height, width), dtype=bool)
    outside[box[1]:box[3], box[0]:box[2]] = False
    assert kept.shape == upright.shape
    assert np.array_equal(kept[outside], upright[outside])  # the background, byte for byte
    assert not np.array_equal(kept[~outside], upright[~outside])  # the region was edited
    assert _cli(common + ["--out", str(tmp_path / "raw.png"), "--no-paste-back"]) == 0
    raw = np.asarray(Image.open(tmp_path / "raw.png"))
    assert raw.shape == upright.shape and not np.array_equal(raw[outside], upright[outside])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["paste_back"] is False


def test_edit_refuses_a_decompression_bomb_in_one_line(pretrained, tmp_path, capsys):
    (tmp_path / "bomb.png").write_bytes(bomb_png())
    assert _cli(["edit", "--checkpoint", str(pretrained), "--image", str(tmp_path / "bomb.png"),
                 "--instruction", "remove the star", "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mcie edit: error:") and "\n" not in err and not (tmp_path / "x.png").exists()


def test_background_branch_is_position_aware():
    """Shuffling where the source's features lie changes what the background branch returns (an
    attention over position-free source tokens is blind to any permutation of them)."""
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    attn = Attention(query_dim=16, cross_attention_dim=12, heads=2, dim_head=8)
    attn.set_processor(MCIECrossAttnProcessor(attn.inner_dim, source_dim=8, grid=8))
    h = w = 6
    features = torch.randn(1, 8, h, w)
    shuffled = features.flatten(2)[..., torch.randperm(h * w)].view(1, 8, h, w)
    hidden, context = torch.randn(1, h * w, 16), torch.randn(1, 3, 12)
    regions = torch.zeros(1, 1, h, w)

    def run(feats):
        cond = CrossAttnCondition(regions, torch.tensor([[-1, -1, 0]]), torch.ones(1, 1, h, w), feats)
        return attn(hidden, context, mcie=cond)

    with torch.no_grad():
        attn.processor.gate.fill_(1.0)  # the background hears only the source
        assert not torch.allclose(run(features), run(shuffled), atol=1e-4)
        attn.processor.to_q_position.weight.normal_()  # the query's own position, once learned
        assert not torch.allclose(run(features), run(shuffled), atol=1e-4)


def test_checkpoints_are_in_diffusers_layout(build, tmp_path):
    import shutil

    from diffusers import DDIMScheduler, UNet2DConditionModel

    train(build, tiny(batch_size=2, checkpoint_every=2, ema_decay=0.5), tmp_path / "run", 2)
    ckpt = tmp_path / "run" / "checkpoint-2"
    index = json.loads((ckpt / "model_index.json").read_text())
    assert index["weights"] == "ema" and index["unet"] == ["diffusers", "UNet2DConditionModel"]
    unet, info = UNet2DConditionModel.from_pretrained(ckpt, subfolder="unet", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"))
    sampler = DDIMScheduler.from_pretrained(ckpt, subfolder="scheduler")
    assert sampler.config.clip_sample is False and sampler.config.set_alpha_to_one is False
    for folder in ("connector", "source_encoder", "region_decoder", "mcie_attention"):
        assert (ckpt / folder / "config.json").is_file() and (ckpt / folder / "diffusion_pytorch_model.safetensors").is_file()
    # the layout alone (no accelerate state) loads the same inference weights
    layout = tmp_path / "layout"
    layout.mkdir()
    for name in ("model_index.json", "mcie_config.json"):
        shutil.copy(ckpt / name, layout / name)
    for folder in ("unet", "scheduler", "connector", "source_encoder", "region_decoder", "mcie_attention"):
        shutil.copytree(ckpt / folder, layout / folder)
    assert not (layout / "model.safetensors").exists()
    a, b = load_model(ckpt), load_model(layout)
    assert (a.weights_used, b.weights_used) == ("ema", "ema")
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert all(torch.equal(unet.state_dict()[k], sa[f"unet.{k}"]) for k in unet.state_dict())


def test_validation_samples_edits_on_a_bench_and_logs_ic_bc(build, tmp_path):
    from pipeline.ciebench.cases import BenchConfig, build_bench

    build_bench(tmp_path / "bench", BenchConfig(count=2, resolution=64))
    config = tiny(batch_size=2, checkpoint_every=2, bench_every=2, bench_cases=2, bench_steps=2)
    plain = train(build, config, tmp_path / "plain", 2).losses
    validated = train(build, config, tmp_path / "val", 2, val_bench=tmp_path / "bench").losses
    assert validated == plain  # sampled in a forked RNG: training's draws are untouched
    lines = [json.loads(line) for line in (tmp_path / "val" / "metrics.jsonl").read_text().splitlines()]
    figures = {m["step"]: m for m in lines if "val_ic" in m}
    assert sorted(figures) == [0, 2]  # before training, then every bench_every steps
    for m in figures.values():
        assert 0 <= m["val_ic"] <= 1 and m["val_cases"] == 2
        assert m["val_bc"] is None or 0 <= m["val_bc"] <= 1
    assert (tmp_path / "val" / "val-bench" / "step-2" / "report.json").is_file()
