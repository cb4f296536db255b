"""MCIE-E1 on the DiT backbones (`--backbone flux-kontext | qwen-image-edit`), tiny configs on CPU:
the latents and tokens as the diffusers pipelines make them, the spatial property through the
whole model (MLLM, connector, joint attention), training with resume through `mcie train`, the
diffusers-layout checkpoint (LoRA loadable by plain diffusers, the frozen base never saved), and
`mcie edit` keeping the background exactly. Sampling itself: tests/test_dit_sampling.py."""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from test_trainer import build, one_thread  # noqa: F401  (fixtures: the trainer tests' build, one torch thread)
from trainer.build import build_model
from trainer.config import Config, ConfigError, load_config, preset, with_model, with_train
from trainer.dit.condition import GLOBAL_TOKEN
from trainer.dit.model import MCIEDiT, pack, unpack
from trainer.dit.processors import mcie_parameters
from trainer.dit.tiny import kontext_inputs, qwen_edit_inputs
from trainer.data import make_loader
from trainer.edit import edit_image, load_model
from trainer.export import save_pretrained
from trainer.train import Trainer, train

BACKBONES = ["flux-kontext", "qwen-image-edit"]


@pytest.fixture(scope="module", params=BACKBONES)
def trained(request, build, tmp_path_factory):
    """(backbone, training dir) after 2 steps then a resume to 3, with an EMA."""
    out = tmp_path_factory.mktemp(f"ckpt-{request.param}")
    config = with_train(preset("tiny", request.param), batch_size=2, checkpoint_every=2, ema_decay=0.9)
    first = train(build, config, out, 2)
    again = train(build, config, out, 3)
    assert again.resumed_from == 2 and set(again.losses) == {3}
    assert all(np.isfinite(v) for v in {**first.losses, **again.losses}.values())
    return request.param, out


def _set_gates(model, value: float) -> None:
    with torch.no_grad():
        for name, p in mcie_parameters(model.transformer).items():
            if name.endswith("gate"):
                p.fill_(value)


# ---- the pipelines' own conventions -----------------------------------------------------------

@pytest.mark.parametrize("backbone", BACKBONES)
def test_latents_and_tokens_are_the_pipelines(backbone):
    """Source/target latents are what FluxKontextPipeline / QwenImageEditPipeline's own
    `_encode_vae_image` makes (run unbound on our VAE), tokens their `_pack_latents`, and decoding
    inverts the normalisation exactly."""
    from diffusers import FluxKontextPipeline, QwenImageEditPipeline

    model = build_model(preset("tiny", backbone).model)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    ours = model.frozen.latents(images)
    if backbone == "flux-kontext":
        theirs = FluxKontextPipeline._encode_vae_image(SimpleNamespace(vae=model.frozen.vae), images, None)
        packer = FluxKontextPipeline._pack_latents
    else:
        pipe = SimpleNamespace(vae=model.frozen.vae, latent_channels=4)
        theirs = QwenImageEditPipeline._encode_vae_image(pipe, images[:, :, None], None)[:, :, 0]
        packer = QwenImageEditPipeline._pack_latents
    assert float(ours.std()) > 0.1
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.frozen.source_latents(images), ours, rtol=0, atol=0)
    b, c, h, w = ours.shape
    assert torch.equal(pack(ours), packer(ours, b, c, h, w))
    assert torch.equal(unpack(pack(ours), h, w), ours)
    vae = model.frozen.vae  # decode = the VAE's decode of the un-normalised latents
    shift, scale = model.frozen._stats(ours)
    raw = ours / scale + shift
    direct = vae.decode(raw[:, :, None]).sample[:, :, 0] if backbone == "qwen-image-edit" else vae.decode(raw).sample
    torch.testing.assert_close(model.frozen.decode(ours), direct, rtol=1e-5, atol=1e-5)


# ---- maths through the whole model ------------------------------------------------------------

def _own_states(backbone: str) -> Config:
    """Text tokens = the MLLM's hidden states, the DiT's text width = the MLLM's (no projection),
    as Qwen-Image-Edit with its Qwen2.5-VL-7B."""
    tiny = preset("tiny", backbone)
    width = tiny.model.mllm["text"]["hidden_size"]
    return with_model(tiny, text_tokens="mllm", transformer=dict(tiny.model.transformer, joint_attention_dim=width))


@pytest.mark.parametrize("backbone,text_tokens", [("flux-kontext", "connector"), ("qwen-image-edit", "connector"),
                                                  ("qwen-image-edit", "mllm")])
def test_sub_instruction_j_moves_only_region_j(backbone, text_tokens):
    """MLLM → connector (or the MLLM's own states) → joint attention, background gate half open:
    changing the words of sub-instruction 1 changes the predicted velocity only in region 1's
    tokens (and changes all of them); sub-instruction 0's region and the background do not move."""
    config = preset("tiny", backbone) if text_tokens == "connector" else _own_states(backbone)
    model = build_model(config.model).eval()
    _set_gates(model, 0.5)
    source = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    uint8 = ((source[0].permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()[None]
    regions = torch.zeros(1, model.config.max_sub_edits, 32, 32)
    regions[0, 0, :, :12] = 1  # left strip
    regions[0, 1, 20:, 16:] = 1  # lower-right block
    noisy = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(2))

    def velocity(texts):
        cond = model.condition(source, [texts], uint8, background=None, region_masks=regions)
        return model.denoise(noisy, torch.tensor([0.6]), cond), cond

    with torch.no_grad():
        base, cond = velocity(["make the circle blue", "remove the red star"])
        moved, _ = velocity(["make the circle blue", "add the word SALE"])
    change = pack((moved - base).abs()).amax(-1)[0]  # per token
    in_one = cond.condition.regions()[0, 1]
    assert change[~in_one].max() <= 1e-6
    assert change[in_one].min() > 1e-5


def test_flow_matching_loss_weights_positions_like_the_unet():
    """The exact velocity scores 0; an error δ in one region scores δ²·Σ_region w / Σ w, so the
    edit weight scales exactly the edited positions' share."""
    from trainer.dit.flow import flow_matching_loss

    x0, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    sigmas = torch.tensor([0.2, 0.7])
    exact = noise - x0
    assert flow_matching_loss(exact, x0, noise, sigmas) == 0
    edited = torch.zeros(2, 1, 8, 8)
    edited[..., :2, :] = 1  # a quarter of the positions
    weight = 1.0 + 2.0 * edited
    off = exact + 0.5 * edited  # wrong by 0.5 on every channel of the edited positions only
    expected = 0.25 * float((weight * edited).sum() / weight.sum())
    assert float(flow_matching_loss(off, x0, noise, sigmas, weight=weight)) == pytest.approx(expected, rel=1e-6)
    assert float(flow_matching_loss(off, x0, noise, sigmas)) == pytest.approx(0.25 * 0.25, rel=1e-6)


def test_flex_attention_config_equals_sdpa():
    """`model.attention = flex` (a flex_attention BlockMask) predicts what the dense mask does."""
    config = preset("tiny", "qwen-image-edit").model
    sdpa = build_model(config).eval()
    flex = build_model(with_model(preset("tiny", "qwen-image-edit"), attention="flex").model).eval()
    flex.load_state_dict(sdpa.state_dict())
    for model in (sdpa, flex):
        _set_gates(model, 0.5)
    source = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(6)) * 2 - 1
    uint8 = ((source.permute(0, 2, 3, 1) + 1) * 127.5).round().byte().numpy()
    regions = torch.zeros(2, config.max_sub_edits, 32, 32)
    regions[:, 0, 4:20, 4:20] = 1
    noisy = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(7))
    texts = [["make the circle blue", "remove the star"], ["turn the square green"]]
    with torch.no_grad():
        outs = [m.denoise(noisy, torch.tensor([0.3, 0.9]),
                          m.condition(source, texts, uint8, background=None, region_masks=regions))
                for m in (sdpa, flex)]
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=2e-6)


# ---- training, checkpoints, editing -----------------------------------------------------------

@pytest.mark.parametrize("backbone", BACKBONES)
def test_training_fits_a_fixed_batch(backbone, build):
    """Gradients reach what is trained (LoRA, MCIE modules, connector, ...): 60 AdamW steps on one
    batch cut its flow-matching loss — on the same noise and σ draws before and after — by over
    20 % (measured: 1.36 → 0.89 FLUX, 1.47 → 1.05 Qwen)."""
    config = with_train(preset("tiny", backbone), batch_size=4)
    model = build_model(config.model)
    loader, _ = make_loader(build, config.train, config.model)
    batch = next(iter(loader))

    def loss_on_fixed_draws() -> float:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(123)
            return float(model(batch, edit_weight=2.0)["diffusion"])

    model.eval()
    before = loss_on_fixed_draws()
    optimizer = torch.optim.AdamW(model.parameter_groups(3e-3), lr=3e-3)
    model.train()
    torch.manual_seed(0)
    for _ in range(60):
        model(batch, edit_weight=2.0, mask_loss_weight=0.5)["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    assert loss_on_fixed_draws() < 0.8 * before


def test_checkpoint_holds_what_was_trained_and_lora_loads_in_plain_diffusers(trained):
    """The accelerate state and the diffusers layout hold LoRA + new modules, never the frozen
    base; `transformer_lora/` loads into a plain diffusers transformer of the same base with
    `load_lora_adapter`, which then computes what our trained transformer computes with the MCIE
    modules neutral — and not what the base computes without it (an all-zero or mis-keyed LoRA
    file would leave the base)."""
    backbone, out = trained
    ckpt = out / "checkpoint-3"
    model = load_model(out)  # the EMA's weights: what the diffusers layout holds
    assert isinstance(model, MCIEDiT) and model.weights_used == "ema"
    saved = load_file(str(ckpt / "model.safetensors"))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert set(saved) == trainable  # no frozen base weight in the accelerate state
    assert any(".lora_B." in name for name in saved)
    index = json.loads((ckpt / "model_index.json").read_text())
    assert index["backbone"] == backbone and index["transformer_lora"] == ["diffusers", "lora"]
    assert "transformer" not in index and not (ckpt / "transformer").exists()
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]

    # plain diffusers transformers of the same base (random-init: the model's seed), one with our LoRA file
    from diffusers import FluxTransformer2DModel, QwenImageTransformer2DModel

    from trainer.dit.condition import JointCondition
    from trainer.model import _seeded

    kind = FluxTransformer2DModel if backbone == "flux-kontext" else QwenImageTransformer2DModel
    base = _seeded(model.config.seed + 3, lambda: kind(**model.config.transformer)).eval()
    plain = copy.deepcopy(base)
    plain.load_lora_adapter(str(ckpt / "transformer_lora"), prefix="transformer",
                            weight_name="pytorch_lora_weights.safetensors")
    ours = copy.deepcopy(model).eval()
    _set_gates(ours, 0.0)
    g = torch.Generator().manual_seed(8)
    target, source = torch.randn(1, 64, 16, generator=g), torch.randn(1, 64, 16, generator=g)
    text = torch.randn(1, 5, ours.transformer.config.joint_attention_dim, generator=g)
    neutral = JointCondition(torch.full((1, 5), GLOBAL_TOKEN), torch.zeros(1, 0, 16, 16), torch.ones(1, 1, 16, 16),
                             (8, 8), source=source)
    with torch.no_grad():
        if backbone == "flux-kontext":
            pooled = torch.randn(1, ours.transformer.config.pooled_projection_dim, generator=g)
            inputs = kontext_inputs(plain, target, source, text, pooled, torch.tensor([0.5]))
            mine = ours.transformer(**inputs, joint_attention_kwargs={"mcie": neutral})[0]
        else:
            inputs = qwen_edit_inputs(target, source, text, torch.tensor([0.5]), (8, 8))
            mine = ours.transformer(**inputs, attention_kwargs={"mcie": neutral})[0]
        theirs, untouched = plain(**inputs)[0], base(**inputs)[0]
    torch.testing.assert_close(theirs, mine, rtol=1e-5, atol=1e-5)
    assert (theirs - untouched).abs().max() > 1e-3  # the LoRA changes the base by far more than the tolerance


def test_diffusers_layout_round_trips(trained, tmp_path):
    backbone, out = trained
    model = load_model(out, weights="ema")
    assert model.weights_used == "ema"
    save_pretrained(model, tmp_path / "export", weights_used="ema")
    again = load_model(tmp_path / "export")
    mine, theirs = model.state_dict(), again.state_dict()
    assert set(mine) == set(theirs) and all(torch.equal(mine[k], theirs[k]) for k in mine)
    broken = dict(mine)
    broken.pop(next(name for name in mine if ".lora_A." in name))
    with pytest.raises(RuntimeError, match="missing"):
        again.load_state_dict(broken)


def test_mcie_edit_cli_keeps_the_background_exactly(trained, build, tmp_path):
    """`mcie edit` on a DiT checkpoint, regions given as boxes: every pixel outside them is the
    photo's own, pixels inside are the model's."""
    import tarfile

    backbone, out = trained
    with tarfile.open(build / "shards" / "train-000000.tar") as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("source.png"))
        (tmp_path / "in.png").write_bytes(tar.extractfile(member).read())
    result = subprocess.run(
        [sys.executable, "-m", "flows.cli", "edit", "--checkpoint", str(out), "--image", str(tmp_path / "in.png"),
         "--instruction", "make the circle blue, then remove the star", "--regions", "0,0,24,24", "30,30,60,50",
         "--steps", "3", "--out", str(tmp_path / "out.png")],
        capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr[-2000:]
    info = json.loads(result.stdout.strip().splitlines()[-1])
    released = [1.0, 1.0] if backbone == "flux-kontext" else [4.0, 1.0]  # each pipeline's own default
    assert info["backbone"] == backbone and info["guidance"] == released and info["regions_from"] == "given"
    source = np.asarray(Image.open(tmp_path / "in.png").convert("RGB"))
    edited = np.asarray(Image.open(tmp_path / "out.png"))
    inside = np.zeros(source.shape[:2], bool)
    inside[0:24, 0:24] = inside[30:50, 30:60] = True
    assert np.array_equal(edited[~inside], source[~inside])
    assert not np.array_equal(edited[inside], source[inside])


def test_edit_on_an_odd_aspect_photo(trained):
    """A non-square photo is edited at its own aspect (a rectangular token grid)."""
    _, out = trained
    model = load_model(out)
    photo = (np.random.default_rng(0).random((40, 72, 3)) * 255).astype(np.uint8)
    result, info = edit_image(model, photo, "make the circle blue", steps=2)
    assert result.size == (72, 40)
    width, height = info["working_size"]
    assert width != height and width % model.pixel_multiple == 0 and height % model.pixel_multiple == 0


# ---- configuration ----------------------------------------------------------------------------

def test_backbone_configs_and_their_errors(tmp_path):
    for backbone in BACKBONES:
        config = load_config("tiny", backbone)
        assert config.model.backbone == backbone and config.model.unet is None
        base = load_config("base", backbone).model
        assert base.transformer_path and base.transformer_lora_rank == 64 and base.vae_path.endswith("/vae")
        assert base.resolution == 1024  # both released editors work near 1 Mpx
    assert load_config("tiny").model.backbone == "unet"
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"preset": "tiny", "model": {"backbone": "qwen-image-edit", "transformer_lora_rank": 0}}))
    assert load_config(str(path)).model.transformer["num_layers"] == 2
    with pytest.raises(ConfigError, match="--backbone is 'flux-kontext'"):
        load_config(str(path), "flux-kontext")
    with pytest.raises(ConfigError, match="has no UNet"):
        with_model(preset("tiny", "flux-kontext"), unet_path="/x")
    with pytest.raises(ConfigError, match="multiple of 16"):
        with_model(preset("tiny", "flux-kontext"), resolution=40)
    with pytest.raises(ConfigError, match="attention must be one of"):
        with_model(preset("tiny", "flux-kontext"), attention="dense")
    with pytest.raises(ConfigError, match="model.transformer_path: weight directory"):
        load_config("base", "qwen-image-edit").model.check_paths()


def test_full_fine_tune_without_lora_trains_every_transformer_weight():
    model = build_model(with_model(preset("tiny", "qwen-image-edit"), transformer_lora_rank=0).model)
    assert all(p.requires_grad for p in model.transformer.parameters())
    assert not any("lora_" in name for name, _ in model.named_parameters())
    assert set(model.state_dict()) >= {f"transformer.{n}" for n, _ in model.transformer.named_parameters()}


def test_cli_backbone_argument(build, tmp_path):
    from trainer.cli import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args(["train", "--data", str(build), "--backbone", "sd3"])
    assert exit_.value.code == 2
    args = parser.parse_args(["train", "--data", str(build), "--backbone", "flux-kontext", "--init-unet", "/x",
                              "--out", str(tmp_path / "o")])
    assert args.func(args) == 2 and not (tmp_path / "o").exists()


# ---- `base`: the released weights' code path, on tiny models saved with save_pretrained ---------

def _saved_backbone(root: Path, backbone: str) -> dict:
    """A tiny transformer, VAE and scheduler written as a diffusers pipeline folder would hold them."""
    from diffusers import (AutoencoderKL, AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler,
                           FluxTransformer2DModel, QwenImageTransformer2DModel)

    tiny = preset("tiny", backbone).model
    kind = FluxTransformer2DModel if backbone == "flux-kontext" else QwenImageTransformer2DModel
    kind(**tiny.transformer).save_pretrained(root / "transformer")
    vae_class = AutoencoderKLQwenImage if backbone == "qwen-image-edit" else AutoencoderKL
    vae_class(**{k: v for k, v in tiny.vae.items() if k != "_class_name"}).save_pretrained(root / "vae")
    FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True).save_pretrained(root / "scheduler")
    return dict(transformer=None, transformer_path=str(root / "transformer"), vae=None, vae_path=str(root / "vae"),
                scheduler_path=str(root / "scheduler"))


@pytest.mark.parametrize("backbone", BACKBONES)
def test_base_loads_local_weights_and_trains_lora_on_them(backbone, build, tmp_path):
    """The `base` code path (from_pretrained of transformer/, vae/ (class read from its config) and
    scheduler/ dirs) on tiny saved models: the LoRA adapters of the released DiT train at
    `learning_rate`, the new modules at `new_learning_rate`, the base stays as loaded, and the
    checkpoint's config names the weight dirs by absolute path."""
    from diffusers import FluxTransformer2DModel, QwenImageTransformer2DModel

    paths = _saved_backbone(tmp_path / "weights", backbone)
    tiny = preset("tiny", backbone)
    config = with_train(Config(replace(tiny.model, **paths), tiny.train), batch_size=2, learning_rate=1e-3,
                        new_learning_rate=5e-3)
    model = build_model(config.model)
    kind = FluxTransformer2DModel if backbone == "flux-kontext" else QwenImageTransformer2DModel
    released = kind.from_pretrained(paths["transformer_path"]).state_dict()
    groups = {g["name"]: g for g in model.parameter_groups(1e-3, 5e-3)}
    pretrained = {id(p) for p in groups["pretrained"]["params"]}
    lora = {id(p) for n, p in model.named_parameters() if ".lora_" in n and n.startswith("transformer.")}
    assert pretrained == lora and groups["new"]["lr"] == 5e-3
    assert model.scheduler.config.use_dynamic_shifting
    half = build_model(config.model, torch.bfloat16)  # what bf16 training builds: base in bf16, masters in float32
    dtypes = {(".lora_" in n, p.requires_grad, p.dtype) for n, p in half.transformer.named_parameters()
              if ".processor." not in n}
    assert dtypes == {(False, False, torch.bfloat16), (True, True, torch.float32)}
    loader, _ = make_loader(build, config.train, config.model)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as accelerate's bf16 runs the step
        losses = half(next(iter(loader)), edit_weight=1.0, mask_loss_weight=0.5)
    assert torch.isfinite(losses["loss"])
    out = tmp_path / "ckpt"
    train(build, config, out, 1)
    trained = load_model(out)
    base = {n.replace(".base_layer", ""): p for n, p in trained.transformer.named_parameters()
            if ".lora_" not in n and ".processor." not in n}
    assert all(torch.equal(base[n], released[n]) for n in released if n in base) and len(base) == len(released)
    saved = json.loads((out / "checkpoint-1" / "mcie_config.json").read_text())
    assert saved["transformer_path"] == str(Path(paths["transformer_path"]).resolve())


def test_qwen_image_edit_layout_feeds_its_own_mllm_states(build, tmp_path):
    """`base` qwen-image-edit reads a pipeline folder: the MLLM from text_encoder/ with its
    tokenizer/ and processor/ beside it, and its last hidden states are the DiT's text tokens as
    they are (image prefix global, each sub-instruction's span labelled, padding unread); a
    dropped instruction leaves the image prefix."""
    from trainer.mllm import build_tiny_mllm

    root = tmp_path / "qwen-image-edit"
    paths = _saved_backbone(root, "qwen-image-edit")
    own = _own_states("qwen-image-edit")
    from diffusers import QwenImageTransformer2DModel

    QwenImageTransformer2DModel(**own.model.transformer).save_pretrained(root / "transformer")
    mllm, tokenizer, processor = build_tiny_mllm(own.model.mllm, 0)
    mllm.save_pretrained(root / "text_encoder")
    tokenizer.save_pretrained(root / "tokenizer")
    processor.save_pretrained(root / "processor")
    base = load_config("base", "qwen-image-edit")
    # base reads the pipeline's own conditioning (tests/test_dit_released_qwen.py); this is "mllm"
    assert base.model.text_tokens == "released" and base.model.mllm_path.endswith("qwen-image-edit/text_encoder")
    config = Config(replace(own.model, **paths, mllm=None, mllm_path=str(root / "text_encoder")),
                    with_train(own, batch_size=2, checkpoint_every=1).train)
    model = build_model(config.model)
    assert model.text_proj is None and not hasattr(model, "connector")
    uint8 = (np.random.default_rng(1).random((1, 32, 32, 3)) * 255).astype(np.uint8)
    encoded = model.read_instruction(uint8, [["make the circle blue", "remove the star"]])
    text, labels = model.text_tokens(encoded)
    assert text is encoded.hidden
    spans = encoded.spans[0]
    assert torch.equal(labels[0][spans[0]], torch.zeros(int(spans[0].sum()), dtype=labels.dtype))
    assert torch.equal(labels[0][spans[1]], torch.ones(int(spans[1].sum()), dtype=labels.dtype))
    prefix = encoded.valid[0] & ~spans.any(0)
    assert (labels[0][prefix] == GLOBAL_TOKEN).all() and prefix[: model.region_decoder.grid[0] ** 2 + 2].all()
    _, dropped = model.drop_instruction(text, labels, torch.tensor([True]))
    assert (dropped[0][spans.any(0)] < GLOBAL_TOKEN).all() and torch.equal(dropped[0][prefix], labels[0][prefix])
    result = train(build, config, tmp_path / "ckpt", 1)
    assert np.isfinite(result.losses[1])


def test_bf16_with_gradient_checkpointing_trains(build, tmp_path):
    """The `base` settings that matter for memory (bf16 autocast, recomputed activations) on the
    tiny DiT: finite losses, the DiT's checkpointing switched on, LoRA weights moved."""
    config = with_train(preset("tiny", "flux-kontext"), batch_size=2, mixed_precision="bf16",
                        gradient_checkpointing=True, checkpoint_every=2)
    trainer = Trainer(build, config, tmp_path / "bf16")
    assert trainer.accelerator.mixed_precision == "bf16" and trainer.raw_model.transformer.gradient_checkpointing
    result = trainer.fit(2)
    assert all(np.isfinite(v) for v in result.losses.values())
    model = load_model(tmp_path / "bf16", weights="trained")
    assert any(float(p.detach().abs().max()) > 0 for n, p in model.named_parameters() if ".lora_B." in n)


def test_train_cache_for_a_dit_and_refused_for_another_backbone(build, tmp_path):
    from trainer.cache import encode_build

    config = with_train(preset("tiny", "qwen-image-edit"), batch_size=2, checkpoint_every=1)
    summary = encode_build(build, config, tmp_path / "cache", batch_size=4)
    assert summary["samples"] > 0
    result = train(tmp_path / "cache", config, tmp_path / "ckpt", 1)
    assert np.isfinite(result.losses[1])
    with pytest.raises(ConfigError, match="backbone"):
        train(tmp_path / "cache", with_train(preset("tiny", "flux-kontext"), batch_size=2), tmp_path / "other", 1)


def test_mcie_eval_runs_a_dit_checkpoint(trained, tmp_path):
    from pipeline.ciebench.cases import BenchConfig, build_bench
    from trainer.evaluate import evaluate, load_checkpoint_editor

    _, out = trained
    build_bench(tmp_path / "bench", BenchConfig(count=2, resolution=64))
    summary, report = evaluate(tmp_path / "bench", editor=load_checkpoint_editor(out, steps=2), out=tmp_path / "r")
    assert summary["cases"] == 2 and summary["failed_cases"] == 0
    assert 0.0 <= summary["instruction_compliance"] <= 1.0


def test_prefect_train_flow_takes_the_backbone(build, tmp_path):
    """The scheduled path (`flows.train.train_flow`, a real Prefect run, in its own process so its
    temporary server stops with it) trains a DiT too."""
    code = ("import json, sys; from flows.train import train_flow; "
            "print(json.dumps(train_flow(data=sys.argv[1], out=sys.argv[2], steps=1, batch_size=2, "
            "backbone='qwen-image-edit')))")
    done = subprocess.run([sys.executable, "-c", code, str(build), str(tmp_path / "ckpt")], capture_output=True,
                          text=True, cwd=Path(__file__).resolve().parents[1], timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["step"] == 1 and np.isfinite(result["last_loss"])
    saved = json.loads((tmp_path / "ckpt" / "checkpoint-1" / "mcie_config.json").read_text())
    assert saved["backbone"] == "qwen-image-edit"


def test_a_unet_run_from_before_the_backbones_still_resumes(build, tmp_path):
    """A checkpoint whose config.json predates the DiT fields (backbone, transformer, ...) is the
    same UNet model: the run resumes instead of being refused as "a different model config"."""
    config = with_train(preset("tiny"), batch_size=2, checkpoint_every=1)
    train(build, config, tmp_path / "ckpt", 1)
    path = tmp_path / "ckpt" / "checkpoint-1" / "config.json"
    saved = json.loads(path.read_text())
    for key in ("backbone", "transformer", "transformer_path", "scheduler_path", "transformer_lora_rank",
                "transformer_lora_targets", "attention", "guidance", "text_tokens"):
        del saved["model"][key]
    path.write_text(json.dumps(saved))
    assert train(build, config, tmp_path / "ckpt", 2).resumed_from == 1
