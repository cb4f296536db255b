"""`mcie train-cache`: run MCIE-E1's frozen encoders once, offline, instead of in every step.

A `base` training step spends about two thirds of its FLOPs in frozen parts — the VAE encodes
source and target (≈ 1.1 TFLOP each at 512 px) and Qwen2.5-VL reads the source and the
sub-instructions (≈ 2.9 TFLOP) — and their outputs never change. `encode_build` writes a copy of a
build's train shards in which every sample also carries `frozen.safetensors`: the source and
target latents and the MLLM's hidden states with their token masks, in the dtype the trainer
would compute them in. `mcie train --data CACHE` then skips the frozen encoders.

The price: no random crop for cached samples (the encodings are of the whole image at the model's
resolution), about 1.2 MB per sample at 448 px in bf16, and a frozen MLLM (LoRA tuning needs it
live). `CACHE/frozen.json` records what the encodings depend on; the trainer refuses a cache made
for another model config. Shards are written like a build's (`pipeline.dataset.shards.write_tar_members`:
a temporary name, renamed once complete), so a killed run resumes with the shards it has not
finished.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import storage
from pipeline.dataset.shards import write_tar_members
from trainer.config import Config, ConfigError, ModelConfig
from trainer.data import BAD_SAMPLE_ERRORS, FROZEN_MEMBER, decode_sample, find_shards, shard_samples

log = logging.getLogger(__name__)

FINGERPRINT_FILE = "frozen.json"
_FINGERPRINT_FIELDS = ("backbone", "resolution", "vae", "vae_path", "vae_scaling", "mllm", "mllm_path",
                       "mllm_image_size", "max_sub_edits")


# 2: source latents unscaled (InstructPix2Pix's convention), each sub-instruction read against the
# image prefix alone (trainer.mllm.MLLMEncoder.encode); the backbone names the latents' space (a DiT
# normalises source and target alike, `trainer.dit.model.DiTFrozen`)
CACHE_FORMAT = 2


def fingerprint(model: ModelConfig, dtype: torch.dtype) -> dict[str, Any]:
    """What the cached encodings depend on (the seed only where a frozen part is random-init),
    including the dtype they were computed in."""
    random_init = model.vae_path is None or model.mllm_path is None
    return {**{name: getattr(model, name) for name in _FINGERPRINT_FIELDS},
            "seed": model.seed if random_init else None, "dtype": str(dtype).removeprefix("torch."),
            "format": CACHE_FORMAT}


def cached_fingerprint(data: str | Path) -> dict[str, Any] | None:
    """The fingerprint of a cache made by `encode_build`, or None for a plain build (local or at a
    URL)."""
    path = storage.location(data) / FINGERPRINT_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def check_cache(data: str | Path, config: Config, dtype: torch.dtype = torch.float32) -> bool:
    """True when `data` is a cache usable with `config` trained with its frozen parts in `dtype`;
    raises ConfigError when it is one for another model, format or dtype, or the MLLM is to be
    LoRA-tuned; False for a plain build."""
    saved = cached_fingerprint(data)
    if saved is None:
        return False
    if config.model.mllm_tuning == "lora":
        raise ConfigError(f"{data} holds frozen MLLM encodings; LoRA tuning needs the MLLM live "
                          "(train on the build itself)")
    if config.model.backbone == "qwen-image-edit" and config.model.text_tokens == "released":
        raise ConfigError(f"{data} holds per-sub-instruction MLLM encodings; text_tokens released reads "
                          "the whole instruction live (train on the build itself)")
    saved.setdefault("backbone", "unet")  # caches made before DiT backbones existed
    wanted = fingerprint(config.model, dtype)
    changed = sorted(k for k in wanted if saved.get(k) != wanted[k])
    if changed:
        dtypes = (f"; encoded in {saved.get('dtype')}, training computes in {wanted['dtype']}"
                  if "dtype" in changed else "")
        raise ConfigError(f"{data} was encoded for another model config ({', '.join(changed)} "
                          f"differ{dtypes}); run mcie train-cache again")
    return True


def _encode_chunk(frozen, samples: list[dict[str, Any]], device: torch.device) -> list[bytes]:
    from safetensors.torch import save

    source = torch.stack([s["source"] for s in samples]).to(device)
    target = torch.stack([s["target"] for s in samples]).to(device)
    with torch.no_grad():
        source_latents = frozen.source_latents(source)
        target_latents = frozen.latents(target)
        encoded = frozen.mllm.encode(np.stack([s["source_uint8"] for s in samples]),
                                     [s["sub_texts"] for s in samples])
    members = []
    for i in range(len(samples)):
        length = int(encoded.valid[i].sum())  # right padding: the sample's tokens come first
        members.append(save({
            "source_latents": source_latents[i].contiguous().cpu(),
            "target_latents": target_latents[i].contiguous().cpu(),
            "hidden": encoded.hidden[i, :length].contiguous().cpu(),
            "spans": encoded.spans[i, :, :length].contiguous().cpu(),
        }))
    return members


def _members(raw: dict[str, Any]) -> dict[str, bytes]:
    """A webdataset sample's members (without its `__key__`, `__url__`, ... fields)."""
    return {suffix: data for suffix, data in raw.items() if not suffix.startswith("__")}


def encode_build(data: str | Path, config: Config, out: str | Path, batch_size: int = 16,
                 device: str | None = None) -> dict[str, Any]:
    """Write `out/shards/train-*.tar` = the build's train shards plus each sample's frozen
    encodings, and `out/frozen.json`. Shards already written are kept (resume)."""
    from trainer.build import build_frozen

    if config.model.mllm_tuning == "lora":
        raise ConfigError("a LoRA-tuned MLLM is trained: its encodings cannot be cached")
    if config.model.backbone == "qwen-image-edit" and config.model.text_tokens == "released":
        # the cache holds the per-sub-instruction reading; released reads the pipeline's template
        raise ConfigError("text_tokens released (qwen-image-edit) reads the whole instruction with the "
                          "pipeline's template at every step: it cannot be cached (set model.text_tokens "
                          "to mllm to train from a cache)")
    config.model.check_paths()
    shards = find_shards(data)
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if target.type == "cuda" else torch.float32  # what training computes in
    out = Path(out)
    (out / "shards").mkdir(parents=True, exist_ok=True)
    wanted = fingerprint(config.model, dtype)
    saved = cached_fingerprint(out)
    if saved is not None and saved != wanted:
        raise ConfigError(f"{out} holds encodings for another model config or dtype; use another --out")
    (out / FINGERPRINT_FILE).write_text(json.dumps(wanted, indent=2, sort_keys=True))
    frozen = build_frozen(config.model, dtype)
    frozen.to(target, dtype)
    model = config.model
    started, summary = time.perf_counter(), {"shards": 0, "kept": 0, "samples": 0, "skipped": 0}
    for shard in shards:
        destination = out / "shards" / shard.name
        if destination.exists():
            summary["kept"] += 1
            continue
        raws, decoded = [], []
        for raw in shard_samples(shard):
            rng = np.random.default_rng(0)  # crop_min_scale 1: the whole (square) image
            try:
                decoded.append(decode_sample(raw, model.resolution, model.max_sub_edits, 1.0, rng))
            except BAD_SAMPLE_ERRORS as exc:
                log.warning("not cached: sample %s of %s: %s", raw.get("__key__"), shard, exc)
                summary["skipped"] += 1
                continue
            raws.append(raw)
        encodings = []
        for lo in range(0, len(decoded), batch_size):
            encodings += _encode_chunk(frozen, decoded[lo:lo + batch_size], target)
        write_tar_members(destination, [(raw["__key__"], {**_members(raw), FROZEN_MEMBER: encoding})
                                        for raw, encoding in zip(raws, encodings)])
        summary["shards"] += 1
        summary["samples"] += len(raws)
        log.info("cached %s (%d samples)", destination, len(raws))
    summary["seconds"] = round(time.perf_counter() - started, 1)
    return summary
