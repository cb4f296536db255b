"""Inference with a trained MCIE-E1 checkpoint, and the `mcie edit` subcommand.

The complex instruction is split into sub-instructions by the composer's own connective grammar
(`pipeline.compose.procedural.split_instruction`; a small splitter on the same connectives if that module is
absent), plus a bare "and" before an edit verb, or, with `--split mllm`, by the checkpoint's MLLM
(asked for a JSON list; the grammar takes over when its answer is not one); each
sub-instruction's region is predicted by the model's region decoder (never empty: see
`trainer.model.predicted_regions`) unless `--regions` gives it (a mask image or a pixel box
`x0,y0,x1,y1`, one per sub-instruction). Sampling is DDIM as Stable Diffusion runs it
(`trainer.model.make_sampler`: no x0 clamping) with InstructPix2Pix's two guidance scales.

The background is kept exactly: the image is edited at its own aspect ratio (about
`resolution`² pixels, sides a multiple of the model's downsampling), the latents outside the
sub-instructions' regions are replaced at every step by the source's latents noised to that step
(latent blending), and the unedited pixels of the original image are pasted back over the decoded
result (`paste_back=False`, `mcie edit --no-paste-back`, shows the raw output). `mcie edit` reads
the photo through the factory's safe decoder (`pipeline.sources.decode`: EXIF orientation, 16-bit,
alpha, CMYK, palette normalised; bombs and truncated files refused with a one-line reason).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from trainer.build import build_model
from trainer.checkpoints import CONFIG_FILE, EMA_FILE, latest_checkpoint
from trainer.config import Config
from trainer.data import to_tensor
from trainer.export import is_pretrained_dir, load_pretrained
from trainer.model import MCIEE1, make_sampler

log = logging.getLogger(__name__)

_CONNECTIVES = re.compile(
    r"\s*(?:;|,)?\s*\b(?:and then|after that|and also|then|finally|afterwards|next)\b\s*,?\s*"
    r"|\s*[;,.]\s+",
    re.IGNORECASE,
)
_FIRST = re.compile(r"^\s*first\s*,?\s*", re.IGNORECASE)


def fallback_split(text: str) -> list[str]:
    """Split on then / after that / and also / finally / next / commas / semicolons / full stops."""
    body = _FIRST.sub("", text.strip().rstrip("."))
    pieces = [p.strip(" ,;.") for p in _CONNECTIVES.split(body)]
    return [p[0].lower() + p[1:] for p in pieces if p]


# People also join edits with a bare "and" ("make the circle blue and remove the star"); it is a
# connective only before an edit verb, since "and" also joins colours and objects inside one edit
# ("swap the cup and the tree"). The verbs are the composer's (it never writes "and <verb>" inside
# a sub-instruction) and a few common synonyms.
EDIT_VERBS = ("add", "change", "color", "colour", "cover", "delete", "draw", "enlarge", "erase",
              "exchange", "fill", "get", "give", "insert", "let", "make", "move", "paint", "place",
              "put", "recolor", "remove", "replace", "resize", "rotate", "scale", "shift", "shrink",
              "slide", "swap", "take", "turn", "write")
_AND_VERB = re.compile(r"\s+and\s+(?:also\s+|then\s+)?(?=(?:%s)\b)" % "|".join(EDIT_VERBS),
                       re.IGNORECASE)


def split_instruction(text: str) -> list[str]:
    try:
        from pipeline.compose.procedural import split_instruction as composer_split
    except ImportError:
        pieces = fallback_split(text)
    else:
        pieces = composer_split(text) or fallback_split(text)
    return [part[0].lower() + part[1:] for piece in pieces for part in _AND_VERB.split(piece) if part]


MAX_SPLIT_PARTS = 8  # the most sub-instructions a complex instruction has (the composer's range)


def parse_split_answer(answer: str) -> list[str] | None:
    """The sub-instructions in an MLLM's answer: the first JSON list in it whose items are 1 to
    MAX_SPLIT_PARTS non-empty strings (a ```json fence or words around it are fine), else None."""
    decoder = json.JSONDecoder()
    start = answer.find("[")
    while start != -1:
        try:
            value, _ = decoder.raw_decode(answer, start)
        except json.JSONDecodeError:
            value = None
        if isinstance(value, list) and 1 <= len(value) <= MAX_SPLIT_PARTS and all(
                isinstance(item, str) and item.strip() for item in value):
            return [item.strip().rstrip(".") for item in value]
        start = answer.find("[", start + 1)
    return None


def split_with(model: MCIEE1, instruction: str, splitter: str) -> tuple[list[str], str]:
    """(sub-instructions, how they were split). `mllm` asks the model's MLLM and falls back to the
    grammar when its answer is not a usable JSON list (a random or untuned MLLM)."""
    if splitter == "mllm":
        answer = model.frozen.mllm.answer_split(instruction)
        parts = parse_split_answer(answer)
        if parts:
            return parts, "mllm"
        log.warning("the MLLM's split was not a JSON list of sub-instructions (%r); using the grammar",
                    answer[:200])
        return split_instruction(instruction), "grammar (the MLLM's answer was unusable)"
    if splitter != "grammar":
        raise ValueError(f"splitter must be grammar or mllm, got {splitter!r}")
    return split_instruction(instruction), "grammar"


def resolve_checkpoint(path: str | Path) -> Path:
    """A `checkpoint-N` dir, a model in diffusers layout (`trainer.export`), or a training `--out`
    dir (its newest checkpoint)."""
    path = Path(path)
    if (path / "model.safetensors").is_file() or is_pretrained_dir(path):
        return path
    latest = latest_checkpoint(path) if path.is_dir() else None
    if latest is None:
        raise FileNotFoundError(f"{path} is neither a checkpoint-N dir nor a training dir with checkpoints")
    return latest


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def inference_dtype(name: str, device: str | torch.device) -> torch.dtype:
    """`auto`: bfloat16 on CUDA — the released Qwen-Image-Edit and FLUX.1 Kontext weights are
    bfloat16 (their config.json's `torch_dtype`), so nothing is lost against the checkpoint's own
    precision, and training runs its bf16 autocast on the same numbers — float32 elsewhere (CPU
    runs the tiny models, and stay exact as before)."""
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"dtype must be auto or one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


def place(model: MCIEE1, device: str | torch.device, dtype: torch.dtype, offload_device: str | None) -> None:
    """Put a loaded model where inference runs it, in `dtype`: the frozen VAE and `encoders`, and a DiT's
    transformer (its base: LoRA-tuned or trained in full), are cast to `dtype`; what MCIE-E1 trained
    as small modules stays float32 — connector, source encoder, region decoder, the attention
    processors (zero-started gates and the injection), the transformer's and MLLM's LoRA adapters:
    they are the float32 master weights training updated, ≈ 2 % of the base presets' memory, and bf16 would
    round the small gate values and adapter updates. `edit_image` runs them under autocast, as
    training did. A UNet backbone stays float32 (0.9 B parameters: it fits anywhere).

    `offload_device` (e.g. "cpu"): the encoders (MLLM, Kontext's T5 and CLIP) and the denoiser
    never sit on `device` together — the denoiser waits there until the instruction is encoded
    (`edit_image` moves the encoders out before it brings the denoiser in, and the denoiser out
    after sampling), so the peak is the larger phase's, not their sum (`bench/inference_memory.py`).
    The VAE and the small trained modules stay on `device`."""
    from trainer.dit.processors import PROCESSOR_PREFIX

    device = torch.device(device)
    model.eval()
    model.inference_dtype = dtype
    model.offload_device = None if offload_device is None else torch.device(offload_device)
    if model.config.is_dit:
        for name, param in model.denoiser.named_parameters():
            if PROCESSOR_PREFIX not in f".{name}" and ".lora_" not in f".{name}":
                param.data = param.data.to(dtype)
    parked = model.denoiser if model.offload_device is not None else None
    for child in model.children():  # everything trained on `device`, but a parked denoiser
        child.to(model.offload_device if child is parked else device)
    for param in model.parameters(recurse=False):  # null_context
        param.data = param.data.to(device)
    vae = model.frozen.vae.to(device)
    if next(vae.parameters()).dtype != dtype:  # a VAE from `vae_path` was loaded in dtype already
        vae.to(dtype)
    for encoder in encoders(model):
        encoder.to(device, dtype)
    if model.lora is not None:  # the MLLM's adapters: float32, as trained
        model.lora.float()


def load_model(checkpoint: str | Path, device: str | torch.device = "cpu", weights: str = "ema",
               dtype: str = "auto", offload: bool | None = None) -> MCIEE1:
    """The checkpoint's model; `weights="ema"` takes the EMA weights where training kept them
    (`model.weights_used` says which were loaded), "trained" the optimiser's own. `dtype`: see
    `inference_dtype` and `place`; `offload` (default: on CUDA) parks the MLLM on the CPU while
    the denoiser runs and the denoiser while the MLLM runs."""
    from safetensors.torch import load_file

    if weights not in ("ema", "trained"):
        raise ValueError(f"weights must be ema or trained, got {weights!r}")
    torch_dtype = inference_dtype(dtype, device)
    if offload is None:
        offload = torch.device(device).type == "cuda"
    path = resolve_checkpoint(checkpoint)
    if not (path / "model.safetensors").is_file():  # diffusers layout only: its weights as saved
        model = load_pretrained(path, torch_dtype)
    else:
        config = Config.from_json(json.loads((path / CONFIG_FILE).read_text()))
        model = build_model(config.model, torch_dtype)  # frozen parts (and a LoRA DiT's base) in dtype
        model.load_state_dict(load_file(str(path / "model.safetensors")))
        model.weights_used = "trained"
        if weights == "ema" and (path / EMA_FILE).is_file():
            ema = load_file(str(path / EMA_FILE))
            missing = {name for name, _ in model.trained_named_parameters()} - set(ema)
            if missing:
                raise ValueError(f"{path / EMA_FILE} lacks {len(missing)} trained weights, "
                                 f"e.g. {sorted(missing)[0]}")
            model.load_state_dict(ema, strict=False)
            model.weights_used = "ema"
    place(model, device, torch_dtype, "cpu" if offload else None)
    return model


def encoders(model: MCIEE1) -> list:
    """What reads the instruction: the MLLM, and FLUX.1 Kontext's own T5 and CLIP where the model
    has them (`text_tokens: released`). They run, and are offloaded, together."""
    text = getattr(model.frozen, "text", None)
    return [model.frozen.mllm] + ([text] if text is not None else [])


def execution_device(model: MCIEE1) -> torch.device:
    """Where `edit_image` computes: the small trained modules' device (they never move; the MLLM
    and the denoiser may be parked elsewhere)."""
    return next(model.source_encoder.parameters()).device


def _mllm_phase(model: MCIEE1, device: torch.device) -> None:
    """The encoders onto `device` (the denoiser is parked already: at load and after every sampling)."""
    if model.offload_device is not None:
        for encoder in encoders(model):
            encoder.to(device)


class _DenoiserPhase:
    """With offloading: the encoders out to the offload device, then the denoiser in; on exit the
    denoiser back out — so the two never share `device`."""

    def __init__(self, model: MCIEE1, device: torch.device):
        self.model, self.device = model, device

    def __enter__(self) -> None:
        park = self.model.offload_device
        if park is not None:
            for encoder in encoders(self.model):
                encoder.to(park)
            _release(self.device)
            self.model.denoiser.to(self.device)

    def __exit__(self, *exc) -> None:
        park = self.model.offload_device
        if park is not None:
            self.model.denoiser.to(park)
            _release(self.device)


def _release(device: torch.device) -> None:
    """Hand the freed blocks back, so the next phase's peak does not sit on the last one's cache."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def region_masks(specs: list[str], size: tuple[int, int]) -> torch.Tensor:
    """(S, H, W) masks at the image's size from mask files or `x0,y0,x1,y1` pixel boxes."""
    width, height = size
    masks = []
    for spec in specs:
        box = re.fullmatch(r"\s*(\d+),(\d+),(\d+),(\d+)\s*", spec)
        mask = np.zeros((height, width), dtype=bool)
        if box:
            x0, y0, x1, y1 = map(int, box.groups())
            if not (x0 < x1 and y0 < y1):
                raise ValueError(f"region box {spec!r} is empty")
            mask[y0:y1, x0:x1] = True
        elif Path(spec).is_file():
            with Image.open(spec) as image:
                mask = np.asarray(image.convert("L").resize(size, Image.NEAREST)) > 127
        else:
            raise ValueError(f"region {spec!r} is neither a mask file nor a box x0,y0,x1,y1")
        masks.append(mask)
    return torch.from_numpy(np.stack(masks)).float()


def read_image(path: str | Path) -> tuple[np.ndarray, list[str]]:
    """A photo file through the factory's one safe decoder → (RGB uint8 HxWx3, normalisation notes).
    Raises `pipeline.sources.base.SourceError` (a ValueError) with a one-line reason."""
    from pipeline.sources.decode import decode_image, read_bytes

    decoded = decode_image(read_bytes(path))
    return decoded.image, list(decoded.notes)


def downsampling(model: MCIEE1) -> int:
    """The multiple an image side must be (VAE × UNet downsampling, or VAE × a DiT's 2×2 packing)."""
    return model.pixel_multiple


def working_size(width: int, height: int, resolution: int, multiple: int) -> tuple[int, int]:
    """(w, h) with the image's aspect ratio and about resolution² pixels, sides multiples of `multiple`."""
    scale = (resolution * resolution / (width * height)) ** 0.5
    return (max(multiple, int(round(width * scale / multiple)) * multiple),
            max(multiple, int(round(height * scale / multiple)) * multiple))


def sample_latents(denoise, sampler, noise: torch.Tensor, steps: int, text_guidance: float,
                   image_guidance: float, known: torch.Tensor | None = None,
                   keep: torch.Tensor | None = None) -> torch.Tensor:
    """DDIM from `noise` (1, C, h, w) with InstructPix2Pix's guidance over the three conditions
    `denoise(latents (3, ...), t (3,))` returns (full, image only, none).

    `known`, `keep`: the source's (scaled) latents and where to keep them (1 = background). After
    every step the kept positions are set to `known` noised to the next step with the starting
    noise (at the last step, `known` itself), so the sampler edits only the regions and the
    background it builds around them is the source's (blended latent diffusion)."""
    sampler.set_timesteps(steps, device=noise.device)
    timesteps = sampler.timesteps
    latents = noise * sampler.init_noise_sigma
    for i, t in enumerate(timesteps):
        model_in = sampler.scale_model_input(latents, t).expand(3, -1, -1, -1)
        full, image_only, none = denoise(model_in, t.expand(3)).float().chunk(3)
        eps = none + image_guidance * (image_only - none) + text_guidance * (full - image_only)
        latents = sampler.step(eps, t, latents).prev_sample
        if keep is not None:
            if i + 1 < len(timesteps):
                target = sampler.add_noise(known, noise, timesteps[i + 1:i + 2])
            else:
                target = known
            latents = torch.lerp(latents, target.to(latents.dtype), keep.to(latents.dtype))
    return latents


def _resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if (image.shape[1], image.shape[0]) == size:
        return image
    return np.asarray(Image.fromarray(image).resize(size, Image.BICUBIC))


@torch.no_grad()
def edit_image(model: MCIEE1, image: Image.Image | np.ndarray, instruction: str,
               regions: list[str] | None = None, steps: int = 20, text_guidance: float | None = None,
               image_guidance: float | None = None, seed: int = 0, splitter: str = "grammar",
               paste_back: bool = True, blend: bool = True) -> tuple[Image.Image, dict]:
    """Edit `image` (any size and aspect) by `instruction`. Outside the sub-instructions' regions
    the result is the source's pixels exactly with `paste_back` (the default); `blend` keeps the
    source's latents there while sampling. Guidance scales default to the backbone's
    (`model.guidance`: UNet 7.5 / 1.5 as InstructPix2Pix; FLUX.1 Kontext 1.0 / 1.0, one pass
    per step with the distilled guidance; Qwen-Image-Edit 4.0 / 1.0, true CFG rescaled per token).
    Runs in `model.inference_dtype` (autocast: see `place`), with the MLLM and the denoiser on the
    device one phase at a time when `model.offload_device` is set."""
    device = execution_device(model)
    dtype = model.inference_dtype  # float32: no autocast, exactly as before
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        config = model.config
        text_guidance = model.guidance[0] if text_guidance is None else text_guidance
        image_guidance = model.guidance[1] if image_guidance is None else image_guidance
        _mllm_phase(model, device)  # the instruction is read (and split, by --split mllm) first
        subs, split_by = split_with(model, instruction, splitter)
        if not subs:
            raise ValueError("the instruction is empty")
        if len(subs) > config.max_sub_edits:  # the last slot takes the rest, as in training
            subs = subs[: config.max_sub_edits - 1] + [" and ".join(subs[config.max_sub_edits - 1:])]
        rgb = np.asarray(image.convert("RGB")) if isinstance(image, Image.Image) else np.asarray(image)
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise ValueError(f"expected an RGB uint8 image, got shape {rgb.shape} {rgb.dtype}")
        height, width = rgb.shape[:2]
        size = working_size(width, height, config.resolution, downsampling(model))
        source_uint8 = _resize(rgb, size)
        source = to_tensor(source_uint8)[None].to(device)

        relaxed: list[int] = []
        if regions:
            if len(regions) != len(subs):
                raise ValueError(f"{len(regions)} regions given for {len(subs)} sub-instructions: {subs}")
            given = region_masks(regions, (width, height))  # (S, H, W) at the image's own size
            slots = torch.zeros(1, config.max_sub_edits, size[1], size[0], device=device)
            slots[0, : len(subs)] = F.interpolate(given[None].to(device), size=(size[1], size[0]), mode="nearest")[0]
            edited = given.amax(0).bool().numpy()
        else:  # the region decoder's prediction (dilated), from the full condition
            cond = model.condition(source, [subs], source_uint8[None], background=None, region_masks=None)
            slots = cond.condition.region_masks
            relaxed = cond.relaxed_regions[0].nonzero().flatten().tolist()
            union = slots[0, : len(subs)].amax(0)[None, None]
            edited = F.interpolate(union, size=(height, width), mode="nearest")[0, 0].bool().cpu().numpy()

        # Three conditions at once: full, image only (text dropped), none (both dropped).
        three = source.expand(3, -1, -1, -1)
        cond = model.condition(three, [subs] * 3, np.repeat(source_uint8[None], 3, 0), background=None,
                               region_masks=slots.expand(3, -1, -1, -1),
                               drop_text=torch.tensor([False, True, True], device=device),
                               drop_image=torch.tensor([False, False, True], device=device))
        generator = torch.Generator(device="cpu").manual_seed(seed)
        noise = torch.randn(cond.source_latents[:1].shape, generator=generator).to(device)
        known = model.to_target_space(cond.source_latents[:1].float())  # undropped row: the source's
        keep = cond.condition.background[:1] if blend else None
        with _DenoiserPhase(model, device):  # offloading: the MLLM out, the denoiser in (then out)
            if config.is_dit:  # rectified flow, Euler on the backbone's sigmas
                latents = model.sample(cond, noise, steps, text_guidance, image_guidance, known=known, keep=keep)
            else:
                latents = sample_latents(lambda x, t: model.denoise(x, t, cond), make_sampler(config), noise, steps,
                                         text_guidance, image_guidance, known=known, keep=keep)
        decoded = model.frozen.decode(latents).float().clamp(-1, 1)
        pixels = ((decoded[0].permute(1, 2, 0) + 1) * 127.5).round().byte().cpu().numpy()
        result = _resize(pixels, (width, height))
        if paste_back:
            result = np.where(edited[..., None], result, rgb)
    info = {
        "sub_instructions": subs,
        "split_by": split_by,
        "region_fractions": [round(float(slots[0, i].mean()), 4) for i in range(len(subs))],
        "regions_from": "given" if regions else "predicted",
        "relaxed_regions": relaxed,  # sub-instructions whose predicted region fell back to half the peak
        "weights": model.weights_used,
        "backbone": config.backbone,
        "guidance": [text_guidance, image_guidance],
        "working_size": list(size),
        "edited_fraction": round(float(edited.mean()), 4),
        "paste_back": paste_back,
        "dtype": str(dtype).removeprefix("torch."),
        "offload": None if model.offload_device is None else str(model.offload_device),
    }
    return Image.fromarray(np.ascontiguousarray(result)), info
