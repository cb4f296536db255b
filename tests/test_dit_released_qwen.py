"""MCIE-E1 on Qwen-Image-Edit with `text_tokens: released` keeps the released model's own
conditioning: a tiny QwenImageEditPipeline (transformer, video VAE, Qwen2.5-VL, tokenizer, PIL
processor, scheduler) is saved and MCIEDiT is loaded from its folders; with MCIE neutral (one
sub-instruction whose region is the whole image, the background gate at its start, LoRA at zero)
its text tokens are the pipeline's `prompt_embeds` and its sampler gives the pipeline's image."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from trainer.config import TINY_QWEN_IMAGE_EDIT, _tiny_mllm, _tiny_qwen_vae, preset
from trainer.data import to_tensor
from trainer.dit.condition import GLOBAL_TOKEN, PADDING_TOKEN
from trainer.dit.model import DiTFrozen, MCIEDiT, pack
from trainer.dit.qwen_text import RELEASED_AREA, _image_only_processor_class, causal_labels
from trainer.model import build_frozen

AREA_SCALE = 256  # the pipeline's 1024² working area over 256: 64² (calculate_dimensions is patched)
STEPS = 2
SUB = "make the circle blue"
PROMPT = "Make the circle blue."  # as MCIEDiT writes one sub-instruction for the pipeline (released_prompt)
SEED = 7


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """(pipeline, MCIEDiT loaded from the pipeline's saved folders), the working area shrunk for
    both alike: they call the pipeline module's `calculate_dimensions` with 1024², and the patch
    divides what they pass (a wrong area in either would still show)."""
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageEditPipeline,
                           QwenImageTransformer2DModel)
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit

    from trainer.mllm import build_tiny_mllm

    patch = pytest.MonkeyPatch()
    original = pipeline_qwenimage_edit.calculate_dimensions
    patch.setattr(pipeline_qwenimage_edit, "calculate_dimensions",
                  lambda area, ratio: original(area / AREA_SCALE, ratio))
    text_encoder, tokenizer, image_processor = build_tiny_mllm(_tiny_mllm(), seed=0)
    width = text_encoder.config.text_config.hidden_size  # the DiT reads the MLLM's states as they are
    torch.manual_seed(1)
    transformer = QwenImageTransformer2DModel(**dict(TINY_QWEN_IMAGE_EDIT, joint_attention_dim=width))
    vae = AutoencoderKLQwenImage(**{k: v for k, v in _tiny_qwen_vae().items() if k != "_class_name"})
    # the released scheduler's shape: resolution-dependent exponential shift, a terminal σ
    scheduler = FlowMatchEulerDiscreteScheduler(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192,
                                                max_shift=0.9, shift=1.0, shift_terminal=0.02,
                                                time_shift_type="exponential", use_dynamic_shifting=True)
    processor = _image_only_processor_class()(image_processor=image_processor, tokenizer=tokenizer)
    pipe = QwenImageEditPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                 processor=processor, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    root = tmp_path_factory.mktemp("qwen-image-edit")
    for name in ("transformer", "vae", "text_encoder", "tokenizer", "processor", "scheduler"):
        getattr(pipe, name).save_pretrained(root / name)
    tiny = preset("tiny", "qwen-image-edit").model
    config = replace(tiny, transformer=None, transformer_path=str(root / "transformer"), vae=None,
                     vae_path=str(root / "vae"), mllm=None, mllm_path=str(root / "text_encoder"),
                     scheduler_path=str(root / "scheduler"), text_tokens="released", resolution=64)
    model = MCIEDiT(config, build_frozen(config, kind=DiTFrozen), base_dtype=torch.float32).eval()
    yield pipe, model
    patch.undo()


def _image(width: int, height: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _recorded_prompt_embeds(pipe, **call):
    """The pipeline's own `_get_qwen_prompt_embeds` outputs during `__call__` (prompt, then negative)."""
    seen = []
    own = pipe._get_qwen_prompt_embeds

    def record(*args, **kwargs):
        seen.append(own(*args, **kwargs))
        return seen[-1]

    pipe._get_qwen_prompt_embeds = record
    try:
        out = pipe(**call)
    finally:
        del pipe._get_qwen_prompt_embeds
    return out, seen


def test_text_tokens_are_the_pipelines_prompt_embeds(released):
    """A 200×120 photo: the pipeline resizes it to calculate_dimensions(1024², 5/3), shows it to
    Qwen2.5-VL in its template and drops the first 64 states; MCIEDiT's released text tokens are
    those states, its real tokens the pipeline's mask (no padding inside one prompt)."""
    from PIL import Image

    pipe, model = released
    photo = _image(200, 120, seed=0)
    _, seen = _recorded_prompt_embeds(pipe, image=Image.fromarray(photo), prompt=PROMPT, negative_prompt="",
                                      true_cfg_scale=4.0, num_inference_steps=2, output_type="latent",
                                      generator=torch.Generator().manual_seed(0))
    (embeds, mask), (negative, negative_mask) = seen
    with torch.no_grad():
        context, labels, _ = model.encode_instruction(photo[None], [[SUB]])
        empty, empty_labels, _ = model.encode_instruction(photo[None], [[]])
    assert embeds.shape[1] > 40  # the image tokens and the instruction are in there
    torch.testing.assert_close(context, embeds, rtol=0, atol=1e-6)
    assert torch.equal(labels != PADDING_TOKEN, mask.bool())
    # "no instruction" (classifier-free guidance's image-only row) is the negative prompt "" read
    torch.testing.assert_close(empty, negative, rtol=0, atol=1e-6)
    assert torch.equal(empty_labels, torch.full_like(negative_mask, GLOBAL_TOKEN))


def test_sampling_gives_the_pipelines_image(released):
    """Driven as `trainer.edit.edit_image` drives it (three rows, full / image only / none; noise
    from the seeded generator; the backbone's guidance, true CFG 4 against the image-only row,
    rescaled; `blend=False`), with MCIE neutral — no region, the sub-instruction's tokens
    relabelled global (a span makes the source tokens, label set ∅, stop reading it: the one
    change MCIE-E1 makes to the released model at step 0) — `MCIEDiT.sample` ends at the
    pipeline's latents for the same photo, prompt, negative prompt "" and generator (decoding
    them as the pipeline does: tests/test_dit_trainer.py::test_latents_and_tokens_are_the_pipelines)."""
    from PIL import Image

    pipe, model = released
    photo = _image(96, 32, seed=1)  # already at calculate_dimensions(64², 3): no resize on either side
    theirs = pipe(image=Image.fromarray(photo), prompt=PROMPT, negative_prompt="", true_cfg_scale=4.0,
                  num_inference_steps=STEPS, output_type="latent",
                  generator=torch.Generator().manual_seed(SEED)).images

    source = to_tensor(photo)[None]
    nowhere = torch.zeros(3, model.config.max_sub_edits, 32, 96)
    with torch.no_grad():
        cond = model.condition(source.expand(3, -1, -1, -1), [[SUB]] * 3, np.repeat(photo[None], 3, 0),
                               background=None, region_masks=nowhere,
                               drop_text=torch.tensor([False, True, True]),
                               drop_image=torch.tensor([False, False, True]))
        spans = cond.condition.token_spans
        assert (spans[0] == 0).sum() > 5  # the sub-instruction was found ...
        neutral = replace(cond.condition, token_spans=torch.where(spans >= 0, GLOBAL_TOKEN, spans), _cache={})
        cond = replace(cond, condition=neutral)  # ... and is made global
        noise = torch.randn(cond.source_latents[:1].shape, generator=torch.Generator().manual_seed(SEED))
        text_guidance, image_guidance = model.guidance
        latents = model.sample(cond, noise, STEPS, text_guidance, image_guidance)
    assert (text_guidance, image_guidance) == (4.0, 1.0)
    assert float(latents.std()) > 0.1
    torch.testing.assert_close(pack(latents), theirs, rtol=0, atol=1e-5)


def test_spans_are_the_sub_instructions_tokens_and_labels_follow_causality(released):
    """Two sub-instructions in one reading: the tokens of span i decode to sub-instruction i as it
    stands in the written prompt; labels are global before the first span, i from span i's first
    token up to the next span (connective and template suffix included), padding after."""
    _, model = released
    subs = ["make the circle blue", "remove the red star"]
    encoded, _ = model.qwen_text.read(_image(160, 96, seed=2)[None], [subs], model.config.max_sub_edits)
    tokenizer = model.qwen_text.processor.tokenizer
    read = _token_ids(model, subs)
    written = ["Make the circle blue", "remove the red star"]  # released_prompt capitalises the first
    for i, text in enumerate(written):
        assert tokenizer.decode(read[encoded.spans[0, i].cpu()]).strip() == text
    assert not encoded.spans[0, 2:].any()
    labels = causal_labels(encoded.spans, encoded.valid)[0]
    first = int(encoded.spans[0, 0].nonzero()[0])
    second = int(encoded.spans[0, 1].nonzero()[0])
    assert (labels[:first] == GLOBAL_TOKEN).all()
    assert (labels[first:second] == 0).all() and (labels[second:] == 1).all()
    assert tokenizer.decode(read[first:second]) == "Make the circle blue, then "
    assert tokenizer.decode(read[second:]).startswith("remove the red star.<|im_end|>")


def _token_ids(model, subs):
    """The token ids of the released reading (after the dropped prefix), for decoding."""
    from trainer.dit.kontext_text import released_prompt
    from trainer.dit.qwen_text import released_pipeline, shown_image

    pipe = released_pipeline()
    prompt, _ = released_prompt(subs)
    inputs = model.qwen_text.processor(text=[pipe.prompt_template_encode.format(prompt)],
                                       images=[shown_image(_image(160, 96, seed=2))], return_tensors="pt")
    return inputs["input_ids"][0, pipe.prompt_template_encode_start_idx:]


def test_area_is_the_pipelines():
    """The area the pipeline works at (a literal in QwenImageEditPipeline.__call__)."""
    import inspect

    from diffusers import QwenImageEditPipeline

    assert RELEASED_AREA == 1024 * 1024
    assert "calculate_dimensions(1024 * 1024" in inspect.getsource(QwenImageEditPipeline.__call__)


def _set_gates(model, value: float) -> None:
    from trainer.dit.processors import mcie_parameters

    with torch.no_grad():
        for name, p in mcie_parameters(model.transformer).items():
            if name.endswith("gate"):
                p.fill_(value)


def test_sub_instruction_j_reaches_regions_j_and_later_only(released):
    """The causal reading's locality, through MLLM → labels → joint attention (background gate
    half open): changing the last sub-instruction's words moves region 1's tokens only; changing
    the first's moves region 0 and — the causal leak: span 1 and the template suffix have read
    it — region 1, never the background."""
    _, model = released
    photo = _image(64, 64, seed=3)
    source = to_tensor(photo)[None]
    regions = torch.zeros(1, model.config.max_sub_edits, 64, 64)
    regions[0, 0, :, :24] = 1  # left strip
    regions[0, 1, 40:, 32:] = 1  # lower-right block
    noisy = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(4))
    texts = [["make the circle blue", "remove the red star"],  # as written
             ["make the circle blue", "add the word SALE"],  # the last changed
             ["paint the square green", "remove the red star"]]  # the first changed

    _set_gates(model, 0.5)
    try:
        with torch.no_grad():  # one batch of three: rows are independent (padding is never read)
            cond = model.condition(source.expand(3, -1, -1, -1), texts, np.repeat(photo[None], 3, 0),
                                   background=None, region_masks=regions.expand(3, -1, -1, -1))
            base, last, first = pack(model.denoise(noisy.expand(3, -1, -1, -1), torch.full((3,), 0.6), cond))
    finally:
        _set_gates(model, 0.0)
    one, two = cond.condition.regions()[0, 0], cond.condition.regions()[0, 1]
    background = ~(one | two)
    moved_by_last = (last - base).abs().amax(-1)
    moved_by_first = (first - base).abs().amax(-1)
    assert moved_by_last[~two].max() <= 1e-6 and moved_by_last[two].min() > 1e-5
    assert moved_by_first[background].max() <= 1e-6 and moved_by_first[one].min() > 1e-5
    assert moved_by_first[two].min() > 1e-5  # the documented leak of an earlier sub-instruction


def test_region_decoder_reads_each_sub_instruction_and_trains(released):
    """Under "released" the region decoder still gets one embedding per sub-instruction (the mean
    of the states labelled with it), a dropped instruction none; one training loss backpropagates
    into the region decoder through them."""
    _, model = released
    photo = _image(64, 64, seed=5)
    source = to_tensor(photo)[None].expand(2, -1, -1, -1)
    subs = [["make the circle blue", "remove the red star"]] * 2
    with torch.no_grad():
        cond = model.condition(source, subs, np.repeat(photo[None], 2, 0), background=None, region_masks=None,
                               drop_text=torch.tensor([False, True]))
        context, labels = cond.context, cond.condition.token_spans
        embeddings = model.sub_embeddings(context, labels)
    for slot in (0, 1):
        torch.testing.assert_close(embeddings[0, slot], context[0][labels[0] == slot].mean(0))
    assert (embeddings[0, 0] - embeddings[0, 1]).abs().max() > 1e-3 and not embeddings[0, 2:].any()
    assert (cond.condition.token_spans[1] < 0).all()  # the dropped row read the empty prompt: no spans
    masks = torch.zeros(2, model.config.max_sub_edits, 64, 64)
    masks[:, 0, :, :24] = 1
    masks[:, 1, 40:, 32:] = 1
    batch = {"source": source, "target": source.flip(-1), "sub_texts": subs,
             "source_uint8": np.repeat(photo[None], 2, 0), "sub_masks": masks,
             "edit_mask": masks.amax(1, keepdim=True),
             "sub_valid": torch.tensor([[True, True, False, False]] * 2)}
    try:
        losses = model(batch, mask_loss_weight=1.0)
        losses["loss"].backward()
        assert torch.isfinite(losses["loss"]) and float(losses["regions"]) > 0
        assert float(model.region_decoder.film.weight.grad.abs().sum()) > 0
    finally:
        model.zero_grad(set_to_none=True)


def test_released_needs_the_mllms_width_on_the_dit():
    """The released states go to the DiT as they are: a transformer of another text width is a
    config error (the tiny preset's DiT is 24 wide, its MLLM 64), caught before anything loads."""
    from trainer.config import ConfigError

    tiny = preset("tiny", "qwen-image-edit").model
    with pytest.raises(ConfigError, match="joint_attention_dim must be the MLLM's width 64"):
        replace(tiny, text_tokens="released")
    width = tiny.mllm["text"]["hidden_size"]
    replace(tiny, text_tokens="released", transformer=dict(tiny.transformer, joint_attention_dim=width))
