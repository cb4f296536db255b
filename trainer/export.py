"""MCIE-E1 in diffusers layout, beside each checkpoint's accelerate state.

```
checkpoint-N/
  model_index.json            what each folder holds (diffusers' `[library, class]` pairs)
  mcie_config.json            the ModelConfig (frozen VAE / MLLM / base DiT by absolute path or random-init spec)
  unet/                       UNet backbone: UNet2DConditionModel (config.json + diffusion_pytorch_model.safetensors)
  transformer/                DiT backbone trained in full: Flux / QwenImage Transformer2DModel
  transformer_lora/           DiT backbone with LoRA: pytorch_lora_weights.safetensors (diffusers' LoRA
                              format; the base is `transformer_path` of mcie_config.json, never copied)
  scheduler/                  scheduler_config.json: DDIM (UNet) or FlowMatchEulerDiscrete (DiT)
  mcie_attention/             the attention processors' own weights (source branch / injection, gate)
  [connector/]  source_encoder/  region_decoder/  [text_proj/]  [pooled/]  [lora/]    config.json + weights each
```

`unet/` loads with plain diffusers (`UNet2DConditionModel.from_pretrained(CKPT, subfolder="unet")`,
its default attention processors), `transformer/` likewise, `transformer_lora/` with
`transformer.load_lora_adapter(CKPT / "transformer_lora", prefix="transformer",
weight_name="pytorch_lora_weights.safetensors")` or a pipeline's
`load_lora_weights`, and `scheduler/` with the scheduler's `from_pretrained`; the weights are
those inference uses (the EMA's when training kept one; `model_index.json` says which).
`trainer.edit.load_model` loads either this layout or the accelerate state.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

INDEX_FILE = "model_index.json"
CONFIG_FILE = "mcie_config.json"
WEIGHTS = "diffusion_pytorch_model.safetensors"
PARTS = ("connector", "source_encoder", "region_decoder", "text_proj", "pooled", "lora")  # submodules with own folders
PROCESSORS = "mcie_attention"
TRANSFORMER_LORA = "transformer_lora"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' LoRA file name
ADAPTER = ".default"  # peft's adapter name inside our module names; diffusers' LoRA files omit it


def _split(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """A full model state dict by folder: the denoiser's own weights, its processors', its LoRA
    (keys as diffusers' LoRA files name them: `transformer.<module>.lora_A.weight`), each part's."""
    folders: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in state.items():
        head, _, rest = name.partition(".")
        if head in ("unet", "transformer"):
            if ".processor." in rest:
                folder = PROCESSORS
            elif ".lora_" in rest:
                folder, rest = TRANSFORMER_LORA, f"transformer.{rest.replace(ADAPTER + '.', '.')}"
            else:
                folder = head
        elif head in PARTS:
            folder = head
        elif head == "null_context":
            folder, rest = "connector", "null_context"
        else:
            raise ValueError(f"no folder for weight {name!r}")
        folders.setdefault(folder, {})[rest] = tensor.detach().cpu().contiguous()
    return folders


def save_pretrained(model, directory: str | Path, weights: dict[str, torch.Tensor] | None = None,
                    weights_used: str = "trained") -> Path:
    """Write `model` in diffusers layout into `directory`; `weights` (by parameter name, e.g. the
    EMA's) replace the model's own where given."""
    import diffusers
    from safetensors.torch import save_file

    from trainer.model import make_sampler

    directory = Path(directory)
    state = {name: tensor for name, tensor in model.state_dict().items()}
    state.update(weights or {})
    folders = _split(state)
    denoiser = "transformer" if model.config.is_dit else "unet"
    latent_channels = model.source_encoder.net[0].in_channels
    configs = {
        "connector": {"hidden_size": model.frozen.mllm.hidden_size},
        "source_encoder": {"latent_channels": latent_channels, "dim": model.config.source_feature_dim},
        "region_decoder": {"dim": model.config.mask_head_dim, "grid": list(model.region_decoder.grid)},
        PROCESSORS: ({"source_dim": model.denoiser.config.in_channels, "injection": "packed source latents"}
                     if model.config.is_dit else
                     {"source_dim": model.config.source_feature_dim, "grid": model.config.background_grid}),
        "text_proj": {"text_tokens": model.config.text_tokens},
        "pooled": {"pooled_projection_dim": getattr(model.denoiser.config, "pooled_projection_dim", None)},
        "lora": {"rank": model.config.lora_rank},
        TRANSFORMER_LORA: {"rank": model.config.transformer_lora_rank,
                           "alpha": model.config.transformer_lora_rank,
                           "targets": list(model.config.transformer_lora_targets)},
    }
    for folder, tensors in folders.items():
        (directory / folder).mkdir(parents=True, exist_ok=True)
        if folder == TRANSFORMER_LORA:
            save_file(tensors, str(directory / folder / LORA_WEIGHTS))
        else:
            save_file(tensors, str(directory / folder / WEIGHTS))
        if folder == denoiser:
            model.denoiser.save_config(directory / folder)
        else:
            (directory / folder / "config.json").write_text(json.dumps(configs[folder], indent=2))
    sampler = model.scheduler if model.config.is_dit else make_sampler(model.config)
    sampler.save_config(directory / "scheduler")
    index = {"_class_name": "MCIEE1", "_diffusers_version": diffusers.__version__, "weights": weights_used,
             "backbone": model.config.backbone, "scheduler": ["diffusers", type(sampler).__name__],
             **{folder: ["trainer", folder] for folder in folders},
             **({denoiser: ["diffusers", type(model.denoiser).__name__]} if denoiser in folders else {})}
    if TRANSFORMER_LORA in folders:
        index[TRANSFORMER_LORA] = ["diffusers", "lora"]
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2))
    (directory / CONFIG_FILE).write_text(json.dumps(asdict(model.config), indent=2))
    return directory


def is_pretrained_dir(path: str | Path) -> bool:
    return (Path(path) / INDEX_FILE).is_file() and (Path(path) / CONFIG_FILE).is_file()


def load_pretrained(directory: str | Path, dtype: torch.dtype = torch.float32):
    """The MCIEE1 saved by `save_pretrained` (frozen parts, and a LoRA-tuned DiT's base, rebuilt
    from its config in `dtype`)."""
    from safetensors.torch import load_file

    from trainer.build import build_model
    from trainer.config import ModelConfig

    directory = Path(directory)
    config = ModelConfig(**json.loads((directory / CONFIG_FILE).read_text()))
    model = build_model(config, dtype)
    denoiser = "transformer" if config.is_dit else "unet"
    state: dict[str, torch.Tensor] = {}
    for folder in (denoiser, PROCESSORS, TRANSFORMER_LORA, *PARTS):
        path = directory / folder / (LORA_WEIGHTS if folder == TRANSFORMER_LORA else WEIGHTS)
        if not path.is_file():
            continue
        for name, tensor in load_file(str(path)).items():
            if folder == "connector" and name == "null_context":
                state["null_context"] = tensor
            elif folder == TRANSFORMER_LORA:  # transformer.<module>.lora_A.weight → ....lora_A.default.weight
                module, _, kind = name.rpartition(".lora_")
                part, _, leaf = kind.partition(".")
                state[f"{module}.lora_{part}{ADAPTER}.{leaf}"] = tensor
            else:
                state[f"{denoiser}.{name}" if folder in (denoiser, PROCESSORS) else f"{folder}.{name}"] = tensor
    model.load_state_dict(state)
    model.weights_used = json.loads((directory / INDEX_FILE).read_text()).get("weights", "trained")
    return model
