"""MCIE-E1's maths (issue 18, defects 1-7): each test states the property a defect broke."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from test_trainer import build, one_thread, tiny  # noqa: F401  (module fixtures, shared helpers)
from trainer.attention import PADDING_TOKEN, CrossAttnCondition, mcie_processors
from trainer.build import build_model
from trainer.config import ConfigError, preset, with_train
from trainer.data import make_loader
from trainer.model import boxes, dilate, make_sampler, predicted_regions
from trainer.train import accumulate_gradients, train


@pytest.fixture(scope="module")
def model():
    return build_model(preset("tiny").model)


@pytest.fixture(scope="module")
def batch(build):
    loader, _ = make_loader(build, tiny(batch_size=3).train, preset("tiny").model)
    return next(iter(loader))


# ---- 1. the sampler --------------------------------------------------------------------------------

def _oracle_sample(sampler, x0: torch.Tensor, steps: int = 20) -> torch.Tensor:
    """DDIM with the exact ε of a known x0, through the sampling loop `mcie edit` runs."""
    from trainer.edit import sample_latents

    alphas = sampler.alphas_cumprod

    def oracle(x, t):
        a = alphas[t[0].long()].double()
        eps = (x.double() - a.sqrt() * x0) / (1 - a).sqrt()
        return eps.float().expand(3, -1, -1, -1)

    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    return sample_latents(oracle, sampler, noise, steps, text_guidance=7.5, image_guidance=1.5)


x_a = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(21))


def row_epsilon(x: torch.Tensor, t: float, row: int) -> torch.Tensor:
    """Rows 0 full, 1 image only, 2 none: different, non-linear in x and t — a sampler on the wrong
    timesteps, alphas or η, or a wrong guidance formula, lands elsewhere (an exact ε of one x0
    lands on x0 under any of them, and identical rows cancel any guidance)."""
    return torch.tanh(x) * (0.6 + 0.3 * row) + x_a * math.cos(t / 150.0 + row)


def test_ddim_sampling_is_sd_s_ddim_with_instructpix2pix_guidance():
    """`sample_latents` with `make_sampler` against DDIM written out: SD's scaled-linear ᾱ (betas
    linear in √β from 0.00085 to 0.012 over 1000 steps), timesteps 1000/n·k + 1 ("leading" with
    the offset), η = 0, the last step towards ᾱ[0], and InstructPix2Pix's combination."""
    from trainer.edit import sample_latents

    steps, text, image = 10, 7.5, 1.5
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    alphas = torch.cumprod(1.0 - betas, 0)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    x = noise.double()
    for t in range(1000 - 1000 // steps + 1, 0, -(1000 // steps)):  # 901, 801, ..., 1
        full, image_only, none = (row_epsilon(x, t, r) for r in range(3))
        eps = none + image * (image_only - none) + text * (full - image_only)
        a, previous = alphas[t], alphas[t - 1000 // steps] if t - 1000 // steps >= 0 else alphas[0]
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        x = previous.sqrt() * x0 + (1 - previous).sqrt() * eps

    def oracle(latents, t):
        return torch.cat([row_epsilon(latents[i:i + 1], float(t[i]), i) for i in range(3)])

    out = sample_latents(oracle, make_sampler(preset("tiny").model), noise, steps, text, image)
    torch.testing.assert_close(out.double(), x, rtol=1e-4, atol=1e-4)
    assert (out - noise).abs().max() > 0.5  # it moved: the comparison is not vacuous


def test_sampler_returns_x0_from_an_oracle_noise_prediction():
    """A perfect ε must give x0 back unclamped (the exact ε of one x0 checks only that: it reaches
    x0 on any schedule, see the test above); SD latents (scaled) lie well outside [-1, 1] a third
    of the time."""
    from diffusers import DDIMScheduler, DDPMScheduler

    x0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * 1.2
    assert (x0.abs() > 1).float().mean() > 0.3
    config = preset("tiny").model
    error = ((_oracle_sample(make_sampler(config), x0.double()) - x0).norm() / x0.norm()).item()
    # the last step lands on alphas_cumprod[0] (set_alpha_to_one=False): x0 up to sqrt(1 - ᾱ0)·noise
    assert error < 0.05, error
    # what `mcie edit` used to build: DDIM from a DDPM config, clip_sample defaulting to True
    ddpm = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    clamped = DDIMScheduler.from_config(ddpm.config)
    assert ((_oracle_sample(clamped, x0.double()) - x0).norm() / x0.norm()).item() > 0.2
    assert make_sampler(config).config.clip_sample is False and make_sampler(config).config.steps_offset == 1


# ---- 2. gradient accumulation ---------------------------------------------------------------------

def test_k_micro_batches_give_the_gradient_of_one_k_times_larger_batch():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    torch.manual_seed(0)
    inputs, targets = torch.randn(8, 5), torch.randn(8, 3)

    def gradient(accum: int) -> torch.Tensor:
        AcceleratorState._reset_state()
        acc = Accelerator(gradient_accumulation_steps=accum, cpu=True)
        torch.manual_seed(1)
        layer = acc.prepare(torch.nn.Linear(5, 3))
        micro = [(inputs[i::accum], targets[i::accum]) for i in range(accum)]
        mean, _ = accumulate_gradients(acc, layer, micro,
                                       lambda b: {"loss": F.mse_loss(layer(b[0]), b[1])})
        assert torch.isclose(mean, torch.stack([F.mse_loss(layer(x), y) for x, y in micro]).mean())
        return layer.weight.grad.clone()

    one = gradient(1)
    for k in (2, 4):
        assert torch.allclose(gradient(k), one, atol=1e-6), k
    AcceleratorState._reset_state()


def test_the_loop_syncs_with_the_host_once_a_step_whatever_the_accumulation(build, tmp_path, monkeypatch):
    import sys

    from trainer.train import Trainer

    calls = []
    original = torch.Tensor.item

    def item(self):
        if sys._getframe(1).f_code.co_filename.endswith("trainer/train.py"):
            calls.append(sys._getframe(1).f_lineno)
        return original(self)

    trainer = Trainer(build, tiny(batch_size=2, grad_accum=3, log_every=100, checkpoint_every=100), tmp_path)
    monkeypatch.setattr(torch.Tensor, "item", item)
    trainer.fit(2)
    assert len(calls) <= 2 + 2  # one per step, plus the final step's logged parts


# ---- 3. the forward diffusion in float32 ----------------------------------------------------------

def test_forward_diffusion_is_float32_under_bf16_autocast(model):
    latents = (torch.randn(4, 4, 8, 8) * 1.5).to(torch.bfloat16)  # what a bf16 VAE returns
    noise = torch.randn(4, 4, 8, 8)
    t = torch.tensor([0, 1, 500, 999])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        noisy = model.noised(latents, noise, t)
    assert noisy.dtype == torch.float32
    a = model.scheduler.alphas_cumprod.double()[t][:, None, None, None]
    exact = a.sqrt() * latents.double() + (1 - a).sqrt() * noise.double()
    assert torch.allclose(noisy.double(), exact, atol=1e-6)
    # what bf16 latents through diffusers' add_noise gave: at t = 0 the 0.029·noise drowns in bf16's rounding
    old = model.scheduler.add_noise(latents, noise.to(torch.bfloat16), t)
    noise_part = lambda x: x[0].double() - a[0].sqrt() * latents[0].double()  # noqa: E731
    assert torch.allclose(noise_part(noisy), (1 - a[0]).sqrt() * noise[0].double(), atol=1e-6)
    assert (noise_part(old) - (1 - a[0]).sqrt() * noise[0].double()).abs().max() > 1e-3


# ---- 4. the spatial restriction does not leak ------------------------------------------------------

def test_a_sub_instruction_s_text_changes_the_cross_attention_only_inside_its_region(model):
    """Perturb the *text* of sub-instruction j (same token count): through the MLLM, the connector
    and every MCIE cross-attention, the output changes only inside region j."""
    size = model.config.resolution
    image = np.random.default_rng(0).integers(0, 255, (1, size, size, 3), dtype=np.uint8)
    source = torch.tensor(image).permute(0, 3, 1, 2).float() / 127.5 - 1
    regions = torch.zeros(1, model.config.max_sub_edits, size, size)
    regions[0, 0, :, : size // 2] = 1  # left half
    regions[0, 1, : size // 2, size // 2:] = 1  # top-right quadrant
    texts = ["make the red cup blue", "remove the star"]
    changed_texts = {0: ["make the big cup gold", "remove the star"], 1: ["make the red cup blue", "remove the tree"]}
    with torch.no_grad():
        base = model.condition(source, [texts], image, background=None, region_masks=regions)
        globals_ = model.config.global_queries
        for j, other in changed_texts.items():
            cond = model.condition(source, [other], image, background=None, region_masks=regions)
            assert torch.equal(cond.context[:, :globals_], base.context[:, :globals_])  # globals: image only
            # the region decoder reads the words too: only sub-instruction j's region logits move
            others = [s for s in range(len(texts)) if s != j]
            assert torch.equal(cond.region_logits[:, others], base.region_logits[:, others])
            assert not torch.equal(cond.region_logits[:, j], base.region_logits[:, j])
            cross = [(n, p) for n, p in model.unet.attn_processors.items() if "attn2" in n]
            assert len(cross) > 1 and all(isinstance(p, type(cross[0][1])) and hasattr(p, "gate") for _, p in cross)
            checked = []
            for name, processor in cross:
                attn = model.unet.get_submodule(name.removesuffix(".processor"))
                for factor in (2, 4):  # two resolutions of the UNet
                    h, w = size // factor, size // factor
                    hidden = torch.randn(1, h * w, attn.to_q.in_features, generator=torch.Generator().manual_seed(h))
                    fresh = lambda c: CrossAttnCondition(c.condition.region_masks, c.condition.token_regions,
                                                         c.condition.background, c.condition.source_features)
                    with torch.no_grad():
                        processor.gate.fill_(0.5)
                        a = attn(hidden, base.context, mcie=fresh(base))
                        b = attn(hidden, cond.context, mcie=fresh(cond))
                        processor.gate.fill_(0.0)
                    delta = (a - b).abs().amax(-1)[0].view(h, w)
                    inside = F.adaptive_max_pool2d(base.condition.region_masks[:, j:j + 1], (h, w))[0, 0] > 0
                    assert delta[~inside].max() == 0, f"sub-instruction {j}'s text leaked outside its region in {name}"
                    assert delta[inside].max() > 0, name
                checked.append(name)
            assert len(checked) == len(cross)  # every MCIE cross-attention, not the first one only


# ---- 5. training and inference see the same kind of regions ----------------------------------------

def test_training_shows_dilated_boxes_or_predictions_never_the_silhouette(model, batch, monkeypatch):
    seen = []
    original = type(model).denoise
    monkeypatch.setattr(type(model), "denoise", lambda self, noisy, t, cond: seen.append(cond) or original(self, noisy, t, cond))
    latent = model.config.unet["sample_size"]
    exact = F.adaptive_max_pool2d(batch["sub_masks"].float(), (latent, latent))
    cells = model.config.region_dilation
    for p_box, p_pred in ((0.0, 0.0), (1.0, 0.0), (0.0, 1.0)):
        torch.manual_seed(0)
        with torch.no_grad():
            model(batch, regions=(p_box, p_pred))
        cond = seen[-1]
        shown = cond.condition.region_masks
        if p_pred == 1.0:
            predicted, _ = predicted_regions(cond.region_logits, cond.condition.token_regions)
            assert torch.equal(shown, dilate(predicted, cells))
            continue
        assert torch.equal(shown, dilate(boxes(exact) if p_box else exact, cells))
        assert (shown >= exact).all() and not torch.equal(shown, exact)  # covers, but is not, the shape
        assert torch.equal(cond.condition.background, 1 - shown.amax(1, keepdim=True))
    # inference dilates the decoder's prediction by the same rule
    image = batch["source_uint8"][:1]
    with torch.no_grad():
        cond = model.condition(batch["source"][:1], batch["sub_texts"][:1], image, background=None, region_masks=None)
    predicted, _ = predicted_regions(cond.region_logits, cond.condition.token_regions)
    assert torch.equal(cond.condition.region_masks, dilate(predicted, cells))


def test_boxes_and_dilation():
    mask = torch.zeros(1, 2, 6, 7)
    mask[0, 0, 1, 2] = mask[0, 0, 3, 5] = 1
    box = boxes(mask)
    assert box[0, 0].nonzero().tolist() == [[r, c] for r in range(1, 4) for c in range(2, 6)]
    assert not box[0, 1].any()
    assert dilate(mask, 1)[0, 0, :3, 1:4].all() and dilate(mask, 1)[0, 0].sum() == 18


# ---- 6. nothing new disturbs a pretrained UNet at step 0 ---------------------------------------------

def test_a_pretrained_instruct_pix2pix_unet_is_undisturbed_at_step_0(tmp_path, batch):
    """`--init-unet` with an 8-channel InstructPix2Pix UNet: at step 0 MCIE-E1's UNet computes what
    that UNet computes with the same (visible) context; the source latents follow its convention;
    only the new modules are in the new-module learning-rate group; the VAE's scale is its own."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    config = preset("tiny").model
    torch.manual_seed(5)
    UNet2DConditionModel(**config.unet).save_pretrained(tmp_path / "ip2p")
    AutoencoderKL(**dict(config.vae, scaling_factor=0.5)).save_pretrained(tmp_path / "vae")
    model = build_model(replace(config, unet_path=str(tmp_path / "ip2p"), vae=None, vae_path=str(tmp_path / "vae")))
    plain = UNet2DConditionModel.from_pretrained(tmp_path / "ip2p")
    assert model.frozen.scaling == 0.5
    vae = AutoencoderKL.from_pretrained(tmp_path / "vae")
    with torch.no_grad():
        assert torch.equal(model.frozen.source_latents(batch["source"]),
                           vae.encode(batch["source"]).latent_dist.mode())  # unscaled
        everywhere = torch.ones_like(batch["sub_masks"])
        cond = model.condition(batch["source"], batch["sub_texts"], batch["source_uint8"], background=None,
                               region_masks=everywhere)
        noisy = torch.randn_like(cond.source_latents)
        t = torch.tensor([10, 500, 900])
        ours = model.denoise(noisy, t, cond)
        for row in range(3):  # the plain UNet reads the tokens MCIE lets every position see
            visible = cond.condition.token_regions[row] != PADDING_TOKEN
            reference = plain(torch.cat([noisy[row:row + 1], cond.source_latents[row:row + 1]], 1), t[row:row + 1],
                              encoder_hidden_states=cond.context[row:row + 1, visible]).sample
            assert torch.allclose(ours[row:row + 1], reference, atol=1e-5), (ours[row] - reference[0]).abs().max()
    assert all(p.gate.item() == 0 for p in mcie_processors(model.unet))
    groups = {g["name"]: g for g in model.parameter_groups(1e-5, 1e-4)}
    own = {id(p) for n, p in model.unet.named_parameters() if ".processor." not in n}
    assert {id(p) for p in groups["pretrained"]["params"]} == own and groups["pretrained"]["lr"] == 1e-5
    assert groups["new"]["lr"] == 1e-4 and not own & {id(p) for p in groups["new"]["params"]}
    assert len(groups["pretrained"]["params"]) + len(groups["new"]["params"]) == len(model.trained_named_parameters())


def test_init_unet_option_starts_training_from_the_given_unet(build, tmp_path, capsys):
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    from test_trainer import _cli

    torch.manual_seed(6)
    UNet2DConditionModel(**preset("tiny").model.unet).save_pretrained(tmp_path / "ip2p")
    assert _cli(["train", "--data", str(build), "--out", str(tmp_path / "run"), "--steps", "1",
                 "--init-unet", str(tmp_path / "ip2p"), "--lr", "0", "--new-lr", "1e-3", "--batch-size", "2"]) == 0
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["model"]
    assert saved["unet_path"] == str((tmp_path / "ip2p").resolve())
    trained = load_file(str(tmp_path / "run" / "checkpoint-1" / "model.safetensors"))
    start = UNet2DConditionModel.from_pretrained(tmp_path / "ip2p").state_dict()
    assert all(torch.equal(trained[f"unet.{k}"], v) for k, v in start.items())  # lr 0: the given UNet
    assert not torch.equal(trained["connector.global_queries"],
                           build_model(preset("tiny").model).connector.global_queries.detach())


# ---- 7. the smaller ones ----------------------------------------------------------------------------

def test_no_region_loss_on_rows_whose_image_was_dropped(model, batch):
    torch.manual_seed(0)
    with torch.no_grad():
        assert model(batch, drops=(0.0, 1.0, 0.0))["regions"] == 0  # every image dropped
        assert model(batch, drops=(0.0, 0.0, 0.0))["regions"] > 0


def test_ranks_draw_their_own_noise(build, tmp_path, monkeypatch):
    import accelerate.utils

    calls = []
    original = accelerate.utils.set_seed
    monkeypatch.setattr(accelerate.utils, "set_seed", lambda *a, **k: calls.append(k) or original(*a, **k))
    from trainer.train import Trainer

    Trainer(build, tiny(), tmp_path)
    assert calls == [{"device_specific": True}]


def test_a_checkpoint_loads_from_any_working_directory(build, tmp_path, monkeypatch):
    from diffusers import AutoencoderKL

    from trainer.config import Config
    from trainer.edit import load_model

    AutoencoderKL(**preset("tiny").model.vae).save_pretrained(tmp_path / "weights" / "vae")
    config = tiny(batch_size=2, checkpoint_every=1)
    config = Config(replace(config.model, vae=None, vae_path="weights/vae"), config.train)
    monkeypatch.chdir(tmp_path)
    train(build, config, tmp_path / "run", 1)
    monkeypatch.chdir(tmp_path / "run")
    assert load_model(tmp_path / "run").frozen.scaling == pytest.approx(0.18215)


def test_a_cache_encoded_in_another_dtype_is_refused(tmp_path):
    from trainer.cache import FINGERPRINT_FILE, check_cache, fingerprint

    config = preset("tiny")
    (tmp_path / FINGERPRINT_FILE).write_text(json.dumps(fingerprint(config.model, torch.float32)))
    assert check_cache(tmp_path, config, torch.float32)
    with pytest.raises(ConfigError, match="encoded in float32, training computes in bfloat16"):
        check_cache(tmp_path, config, torch.bfloat16)


def test_gradient_checkpointing_gives_the_same_gradients(batch):
    grads = []
    for checkpointing in (False, True):
        model = build_model(preset("tiny").model)
        if checkpointing:
            model.unet.enable_gradient_checkpointing()
        model.train()
        torch.manual_seed(0)
        model(batch, edit_weight=1.0, mask_loss_weight=0.5)["loss"].backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    assert all(torch.allclose(grads[0][n], grads[1][n], atol=1e-6) for n in grads[0])
    with pytest.raises(ConfigError):
        with_train(preset("tiny"), box_region_prob=0.8, predicted_region_prob=0.5)


def test_each_sub_instruction_reads_as_if_it_alone_followed_the_image(model):
    """The prefix-cache continuation equals one plain forward of `image prefix + that text`."""
    encoder = model.frozen.mllm
    image = np.random.default_rng(3).integers(0, 255, (1, 40, 40, 3), dtype=np.uint8)
    with torch.no_grad():
        together = encoder.encode(image, [["make the cup red", "remove the star"]])
        pixels = encoder._pixels(image)
        for s, text in enumerate(["make the cup red", "remove the star"]):
            ids = torch.tensor([encoder._prefix(together.prefix.sum().item() - 2) + encoder._piece(text)])
            alone = encoder.model.model(input_ids=ids, attention_mask=torch.ones_like(ids),
                                        pixel_values=pixels["pixel_values"], image_grid_thw=pixels["image_grid_thw"],
                                        mm_token_type_ids=(ids == encoder.image_token).long()).last_hidden_state[0]
            assert torch.allclose(together.hidden[0][together.spans[0, s]], alone[-len(encoder._piece(text)):], atol=1e-5)
            assert torch.allclose(together.hidden[0][together.prefix[0]], alone[: int(together.prefix.sum())], atol=1e-5)
