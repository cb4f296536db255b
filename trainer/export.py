"""MCIE-E1 in diffusers layout, beside each checkpoint's accelerate state.

```
checkpoint-N/
  model_index.json            what each folder holds (diffusers' `[library, class]` pairs)
  mcie_config.json            the ModelConfig (frozen VAE / MLLM by absolute path or random-init spec)
  unet/                       UNet2DConditionModel: config.json + diffusion_pytorch_model.safetensors
  scheduler/                  scheduler_config.json: the DDIM sampler `mcie edit` uses
  mcie_attention/             the cross-attention processors' own weights (source branch, gate)
  connector/  source_encoder/  region_decoder/  [lora/]    config.json + weights each
```

`unet/` loads with plain diffusers (`UNet2DConditionModel.from_pretrained(CKPT, subfolder="unet")`,
its default attention processors) and `scheduler/` with `DDIMScheduler.from_pretrained`; the
weights are those inference uses (the EMA's when training kept one; `model_index.json` says which).
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
PARTS = ("connector", "source_encoder", "region_decoder", "lora")  # MCIEE1 submodules with own folders
PROCESSORS = "mcie_attention"


def _split(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """A full MCIEE1 state dict by folder: the UNet's own weights, its processors', each part's."""
    folders: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in state.items():
        head, _, rest = name.partition(".")
        if head == "unet":
            folder = PROCESSORS if ".processor." in rest else "unet"
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
    configs = {
        "connector": {"hidden_size": model.frozen.mllm.hidden_size},
        "source_encoder": {"latent_channels": model.unet.config.out_channels,
                           "dim": model.config.source_feature_dim},
        "region_decoder": {"dim": model.config.mask_head_dim, "grid": list(model.region_decoder.grid)},
        PROCESSORS: {"source_dim": model.config.source_feature_dim, "grid": model.config.background_grid},
        "lora": {"rank": model.config.lora_rank},
    }
    for folder, tensors in folders.items():
        (directory / folder).mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(directory / folder / WEIGHTS))
        if folder == "unet":
            model.unet.save_config(directory / "unet")
        else:
            (directory / folder / "config.json").write_text(json.dumps(configs[folder], indent=2))
    make_sampler(model.config).save_config(directory / "scheduler")
    index = {"_class_name": "MCIEE1", "_diffusers_version": diffusers.__version__, "weights": weights_used,
             "unet": ["diffusers", "UNet2DConditionModel"], "scheduler": ["diffusers", "DDIMScheduler"],
             **{folder: ["trainer", folder] for folder in folders if folder != "unet"}}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2))
    (directory / CONFIG_FILE).write_text(json.dumps(asdict(model.config), indent=2))
    return directory


def is_pretrained_dir(path: str | Path) -> bool:
    return (Path(path) / INDEX_FILE).is_file() and (Path(path) / CONFIG_FILE).is_file()


def load_pretrained(directory: str | Path):
    """The MCIEE1 saved by `save_pretrained` (frozen parts rebuilt from its config)."""
    from safetensors.torch import load_file

    from trainer.config import ModelConfig
    from trainer.model import build_model

    directory = Path(directory)
    config = ModelConfig(**json.loads((directory / CONFIG_FILE).read_text()))
    model = build_model(config)
    state: dict[str, torch.Tensor] = {}
    for folder in ("unet", PROCESSORS, *PARTS):
        path = directory / folder / WEIGHTS
        if not path.is_file():
            continue
        for name, tensor in load_file(str(path)).items():
            if folder == "connector" and name == "null_context":
                state["null_context"] = tensor
            else:
                state[f"unet.{name}" if folder in ("unet", PROCESSORS) else f"{folder}.{name}"] = tensor
    model.load_state_dict(state)
    model.weights_used = json.loads((directory / INDEX_FILE).read_text()).get("weights", "trained")
    return model
