"""MCIE-E1 on FLUX.1 Kontext conditioned as the released model is (`text_tokens: released`): a
tiny FluxKontextPipeline (toy transformer, VAE, CLIP, T5, tokenizers built locally) saved with
`save_pretrained`, read back by `MCIEDiT` from its folders, against the pipeline itself.

- the DiT's text tokens and pooled vector are the pipeline's `prompt_embeds` (T5, 512 tokens) and
  `pooled_prompt_embeds` (CLIP's pooled output) of the joined instruction;
- with MCIE neutral, `MCIEDiT.sample` driven as `trainer.edit` drives it is the pipeline's
  `__call__` (same image, prompt, generator, steps, distilled guidance; no true CFG);
- the sub-instructions' labels cover exactly their own T5 tokens; and the locality this costs:
  T5 and CLIP read the whole instruction, so a sub-instruction's words reach every region.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from test_dit_trainer import _set_gates
from test_trainer import build, one_thread  # noqa: F401  (fixtures: the trainer tests' shards, one torch thread)
from trainer.build import build_model
from trainer.config import TINY_FLUX_KONTEXT, Config, ConfigError, _tiny_vae, preset, with_train
from trainer.data import to_tensor
from trainer.dit.condition import GLOBAL_TOKEN
from trainer.dit.kontext_text import released_prompt
from trainer.dit.model import pack
from trainer.edit import edit_image, load_model
from trainer.train import train

SUBS = ["make the circle blue", "remove the red star"]
WORDS = "make the circle blue remove red star add word sale then".split()
T5_LENGTH = 512  # FluxKontextPipeline's max_sequence_length (what the released model was trained on)
FLUX_SCHEDULER = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                      base_image_seq_len=256, max_image_seq_len=4096)  # FLUX.1's scheduler config


def _tokenizers():
    """CLIP: byte-level BPE with no merges (one token per character); T5: a Unigram vocabulary of a
    few whole words plus single characters (so any text tokenizes), as the real ones are laid out."""
    from transformers import CLIPTokenizer, T5TokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in bytes_to_unicode().values():
        vocab[char] = len(vocab)
        vocab[char + "</w>"] = len(vocab)
    clip = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)] + [("▁" + w, -1.0) for w in WORDS]
    pieces += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ,.;"]
    return clip, T5TokenizerFast(vocab=pieces, extra_ids=0)


@pytest.fixture(scope="module")
def kontext_folder(tmp_path_factory):
    """A FluxKontextPipeline folder: T5's d_model = the transformer's joint_attention_dim, CLIP's
    width = its pooled_projection_dim (TINY_FLUX_KONTEXT: 24 and 20)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxKontextPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(0)
    clip_tok, t5_tok = _tokenizers()
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(clip_tok), hidden_size=TINY_FLUX_KONTEXT["pooled_projection_dim"], intermediate_size=40,
        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
        bos_token_id=clip_tok.bos_token_id, eos_token_id=clip_tok.eos_token_id, pad_token_id=clip_tok.pad_token_id))
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=TINY_FLUX_KONTEXT["joint_attention_dim"], d_kv=8,
                                 d_ff=48, num_layers=2, num_heads=3, relative_attention_num_buckets=8,
                                 pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    pipe = FluxKontextPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER),
        vae=AutoencoderKL(**dict(_tiny_vae(), shift_factor=0.1159, scaling_factor=0.3611)),
        text_encoder=clip.eval(), tokenizer=clip_tok, text_encoder_2=t5.eval(), tokenizer_2=t5_tok,
        transformer=FluxTransformer2DModel(**TINY_FLUX_KONTEXT).eval())
    root = tmp_path_factory.mktemp("flux-kontext")
    pipe.save_pretrained(root)
    return root


def _released(root, **overrides):
    tiny = preset("tiny", "flux-kontext").model
    folders = dict(transformer_path=str(root / "transformer"), scheduler_path=str(root / "scheduler"),
                   vae_path=str(root / "vae"), text_encoder_path=str(root / "text_encoder"),
                   text_encoder_2_path=str(root / "text_encoder_2"))
    return replace(tiny, text_tokens="released", transformer=None, vae=None, **dict(folders, **overrides))


@pytest.fixture(scope="module")
def pipe_and_model(kontext_folder):
    from diffusers import FluxKontextPipeline

    pipe = FluxKontextPipeline.from_pretrained(kontext_folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe, build_model(_released(kontext_folder)).eval()


def _source(seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)


def _condition(model, subs, uint8, regions=None, rows: int = 1, drop_text=None, drop_image=None):
    source = to_tensor(uint8[0])[None].expand(rows, -1, -1, -1)
    if regions is None:
        regions = torch.zeros(rows, model.config.max_sub_edits, 32, 32)
    return model.condition(source, [subs] * rows, np.repeat(uint8, rows, 0), background=None,
                           region_masks=regions, drop_text=drop_text, drop_image=drop_image)


def test_text_tokens_and_pooled_are_the_pipelines(pipe_and_model):
    """T5's 512 states (padding included) and CLIP's pooled output of the joined instruction,
    exactly the pipeline's `encode_prompt`; a dropped instruction reads the empty prompt."""
    import inspect

    from trainer.dit import kontext_text

    pipe, model = pipe_and_model
    assert kontext_text.T5_LENGTH == inspect.signature(pipe.__call__).parameters["max_sequence_length"].default
    prompt, _ = released_prompt(SUBS)
    assert prompt == "Make the circle blue, then remove the red star."
    with torch.no_grad():
        cond = _condition(model, SUBS, _source(), rows=2, drop_text=torch.tensor([False, True]))
        theirs, pooled, text_ids = pipe.encode_prompt(prompt=[prompt, ""], prompt_2=None, max_sequence_length=512)
    assert cond.context.shape == (2, T5_LENGTH, 24) and cond.pooled.shape == (2, 20)
    torch.testing.assert_close(cond.context, theirs, rtol=0, atol=1e-6)
    torch.testing.assert_close(cond.pooled, pooled, rtol=0, atol=1e-6)
    assert not torch.allclose(cond.pooled[0], cond.pooled[1], atol=1e-3)  # the prompt is read
    assert torch.equal(text_ids, torch.zeros(T5_LENGTH, 3))  # what `kontext_inputs` gives (txt_ids)
    assert (cond.condition.token_spans[1] == GLOBAL_TOKEN).all()  # no instruction: nothing labelled


def test_sample_with_mcie_neutral_is_the_pipeline(pipe_and_model):
    """`MCIEDiT.sample` as `trainer.edit.edit_image` drives it (three condition rows, the released
    default guidance: one pass per step, distilled guidance `config.guidance`) with every token
    global and no region: the pipeline's final latents and image for the same generator."""
    pipe, model = pipe_and_model
    uint8 = _source()
    prompt, _ = released_prompt(SUBS)
    steps, seed = 3, 7
    with torch.no_grad():
        cond = _condition(model, SUBS, uint8, rows=3, drop_text=torch.tensor([False, True, True]),
                          drop_image=torch.tensor([False, False, True]))
        neutral = replace(cond, condition=replace(cond.condition, _cache={},
                                                  token_spans=torch.full_like(cond.condition.token_spans,
                                                                              GLOBAL_TOKEN)))
        assert not neutral.condition.restricts
        noise = torch.randn(cond.source_latents[:1].shape, generator=torch.Generator().manual_seed(seed))
        ours = model.sample(neutral, noise, steps, *model.guidance)
        image = Image.fromarray(uint8[0])
        call = dict(image=image, prompt=prompt, height=32, width=32, num_inference_steps=steps,
                    guidance_scale=model.config.guidance, max_area=32 * 32, _auto_resize=False)
        theirs = pipe(**call, generator=torch.Generator().manual_seed(seed), output_type="latent").images
        pixels = pipe(**call, generator=torch.Generator().manual_seed(seed), output_type="pt").images
        decoded = model.frozen.decode(ours)
    assert float((pack(ours) - pack(noise)).abs().max()) > 0.1  # it moved: the comparison is not vacuous
    torch.testing.assert_close(pack(ours), theirs, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close((decoded / 2 + 0.5).clamp(0, 1), pixels, rtol=1e-4, atol=1e-4)


def test_sub_instruction_labels_cover_exactly_their_t5_tokens(pipe_and_model):
    """Sub-instruction i's label sits on the T5 tokens of its own words (as T5 tokenizes it alone,
    the first capitalised), contiguous; the connective, the full stop, EOS and the 512-token
    padding are global."""
    pipe, model = pipe_and_model
    with torch.no_grad():
        labels = _condition(model, SUBS, _source()).condition.token_spans[0]
    prompt, _ = released_prompt(SUBS)
    ids = pipe.tokenizer_2(prompt, padding="max_length", max_length=T5_LENGTH, truncation=True).input_ids
    assert labels.shape == (T5_LENGTH,)
    own = [pipe.tokenizer_2(text, add_special_tokens=False).input_ids for text in ("Make the circle blue", SUBS[1])]
    for i, expected in enumerate(own):
        where = (labels == i).nonzero().flatten().tolist()
        assert where == list(range(where[0], where[0] + len(expected)))  # one contiguous run
        assert [ids[p] for p in where] == expected
    rest = [ids[p] for p in (labels == GLOBAL_TOKEN).nonzero().flatten().tolist()]
    tokens = pipe.tokenizer_2.convert_ids_to_tokens(rest)
    assert tokens[:3] == [",", "▁then", "."] and tokens[3] == "</s>" and set(tokens[4:]) == {"<pad>"}
    assert len(rest) == T5_LENGTH - sum(len(e) for e in own)


def test_released_locality_is_leaky_and_measured(pipe_and_model):
    """The cost of the released conditioning, measured: changing sub-instruction 1's words moves
    the velocity OUTSIDE region 1 too (T5 reads both sub-instructions bidirectionally, CLIP's
    pooled vector modulates every token); the connector's leak-free reading moves nothing there
    (tests/test_dit_trainer.py::test_sub_instruction_j_moves_only_region_j). Measured on these
    tiny random models (background gate 0.5, σ = 0.6): max |Δv| inside region 1 5.0e-2, outside
    4.8e-2 (ratio 0.97); with T5 reading each sub-instruction alone and the empty prompt's global
    states and pooled vector, outside is exactly 0 — the label mask itself does not leak
    (docs/trainer.md, "Released conditioning (FLUX.1 Kontext)")."""
    _, model = pipe_and_model
    _set_gates(model, 0.5)
    try:
        uint8 = _source()
        regions = torch.zeros(1, model.config.max_sub_edits, 32, 32)
        regions[0, 0, :, :12] = 1  # left strip
        regions[0, 1, 20:, 16:] = 1  # lower-right block
        noisy = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            base_cond = _condition(model, SUBS, uint8, regions=regions)
            base = model.denoise(noisy, torch.tensor([0.6]), base_cond)
            moved = model.denoise(noisy, torch.tensor([0.6]),
                                  _condition(model, [SUBS[0], "add the word sale"], uint8, regions=regions))
    finally:
        _set_gates(model, 0.0)
    change = pack((moved - base).abs()).amax(-1)[0]
    in_one = base_cond.condition.regions()[0, 1]
    inside, outside = float(change[in_one].max()), float(change[~in_one].max())
    print(f"released locality: max |dv| inside region 1 {inside:.3e}, outside {outside:.3e}, "
          f"ratio {outside / inside:.3f}")
    assert inside > 1e-4
    assert outside > 1e-3 * inside  # leaks: what docs/trainer.md states


def test_trains_saves_reloads_and_edits(kontext_folder, build, tmp_path, monkeypatch):
    """Through `trainer.train` (instruction dropout on: the empty prompt's rows) and back through
    `load_model` and `edit_image`: no pooled map is made or saved (CLIP's vector is read, not
    trained), the checkpoint names the encoders by absolute path (the config gave them relative;
    it reloads from another directory), and the reloaded model reads T5 and CLIP again (its text
    tokens are the pipeline folder's, 512 of them)."""
    monkeypatch.chdir(kontext_folder.parent)
    config = with_train(Config(_released(Path(kontext_folder.name)), preset("tiny", "flux-kontext").train),
                        batch_size=2, text_drop=0.5, both_drop=0.25)
    out = tmp_path / "ckpt"
    train(build, config, out, 1)
    monkeypatch.chdir(tmp_path)
    model = load_model(out)
    assert model.pooled is None and model.frozen.text is not None
    assert not any(name.startswith("pooled.") for name in model.state_dict())
    assert model.config.text_encoder_2_path == str((kontext_folder / "text_encoder_2").resolve())
    passes = []
    model.transformer.register_forward_pre_hook(lambda module, args, kwargs: passes.append(
        kwargs["encoder_hidden_states"].shape), with_kwargs=True)
    image = np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    result, info = edit_image(model, image, "make the circle blue, then remove the red star",
                              regions=["0,0,20,20", "24,16,48,40"], steps=2)
    assert result.size == (48, 40) and info["sub_instructions"] == SUBS
    assert passes == [(1, T5_LENGTH, 24)] * 2  # Kontext's default: one row per step, T5's 512 tokens


def test_released_config_needs_the_pipeline_folders(kontext_folder, tmp_path):
    """`released` without the encoders' paths, the paths without `released`, and a missing
    tokenizer folder are each one clear ConfigError naming what is wrong."""
    with pytest.raises(ConfigError, match="text_encoder_path and model.text_encoder_2_path"):
        replace(preset("tiny", "flux-kontext").model, text_tokens="released")
    with pytest.raises(ConfigError, match="read only by flux-kontext with text_tokens released"):
        replace(preset("tiny", "flux-kontext").model, text_encoder_path=str(kontext_folder / "text_encoder"))
    lonely = tmp_path / "pipe"
    (lonely / "text_encoder_2").mkdir(parents=True)
    config = _released(kontext_folder, text_encoder_2_path=str(lonely / "text_encoder_2"))
    with pytest.raises(ConfigError, match=r"tokenizer directory .*pipe/tokenizer_2"):
        config.check_paths()
    base = preset("base", "flux-kontext").model
    assert base.text_tokens == "released"
    assert (base.text_encoder_path, base.text_encoder_2_path) == ("weights/flux1-kontext-dev/text_encoder",
                                                                  "weights/flux1-kontext-dev/text_encoder_2")
    with pytest.raises(ConfigError, match="model.transformer_path"):  # the first missing folder, named
        base.check_paths()
