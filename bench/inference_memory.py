"""The GPU memory `mcie edit` needs with the `base` DiT presets, computed on the CPU.

Every component is instantiated at its released size on the `meta` device (no weights, no memory)
from its architecture config, and its parameters are counted from the module itself:

- qwen-image-edit: QwenImageTransformer2DModel (diffusers' default config is the released
  Qwen-Image one: 60 layers, 24 heads x 128, joint_attention_dim 3584 — checked below), the
  Qwen2.5-VL-7B MLLM (its released config.json values: transformers' defaults are the 72B's), the
  Qwen-Image VAE (AutoencoderKLQwenImage defaults);
- flux-kontext: FluxTransformer2DModel with guidance_embeds (FLUX.1 Kontext-dev: 19 + 38 layers),
  the T5-XXL encoder and CLIP-L text model the released pipeline conditions on, FLUX's VAE, and
  the Qwen2.5-VL-3B MLLM;
- both: what MCIE-E1 adds, built by the trainer's own code on the meta transformer — its
  attention processors (`install_mcie_processors`), the LoRA adapters (`add_lora`, the preset's
  rank and targets), the source encoder, region decoder and (where the preset has them)
  connector and pooled map.

Bytes: the frozen parts and the DiT's base at the inference dtype (`--dtype`, default bfloat16:
`mcie edit`'s default on CUDA), MCIE-E1's trained modules at float32 (`trainer.edit.place`).

The offload plan (`trainer.edit`): the VAE and the small trained modules stay on the GPU; the
MLLM (and the text encoders) are there while the instruction is read, the DiT while it samples,
never both. peak = resident + max(encode phase, denoise phase, decode phase), each phase its
weights plus its activations. Without offloading every weight is resident at once.

Activations at `--resolution`² (default 1024², the stated scenario; the presets train and edit at
512²), inference (no gradients), dtype bytes b:
- DiT: rows · L · 16·D · b + rows · L² · 1, with L = 2 images · (res / (vae_factor · 2))² tokens
  + T text tokens, D the transformer's width, rows the sampled conditions per step (Qwen-Image-Edit
  true CFG: 2; Kontext distilled guidance: 1); 16·D per token = residual and its normalised copy
  (2), Q, K, V (3), attention output (1), the 4·D MLP hidden before and after its activation (8),
  2 spare; the second term is the label-set mask (`JointCondition`, a dense bool (B, 1, L, L)).
  Attention itself is taken as SDPA's memory-efficient kernel (no L² scores).
- MLLM: rows 3 (full, image only, none) · T · (2 · layers · kv_width + 16 · hidden) · b (its
  KV cache plus one layer's working set), T = 2 + (448/28)² image tokens + 128 instruction tokens
  (Qwen-Image-Edit `text_tokens: released`: its pipeline's reading, (1024/28)² + 128). The DiT's
  text tokens T are these, or T5's 512 (FLUX.1 Kontext `released`).
- VAE decode: 6 · C · res² · b, C the channels of its full-resolution stage (input, norm, SiLU,
  conv output, residual, upsample copy).

Run: `python bench/inference_memory.py [--dtype bfloat16|float32|float16] [--resolution 1024]
[--no-offload]` — one JSON line per base preset.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

GB = 1e9
GPU_BYTES = 80 * GB  # one 80 GB H100 / A100 (the target)
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
MLLM_IMAGE_TOKENS = 2 + (448 // 28) ** 2  # <|vision_start|>, the merged patches, <|vision_end|>
INSTRUCTION_TOKENS = 128

# Released config.json values (Qwen/Qwen2.5-VL-7B-Instruct, Qwen/Qwen2.5-VL-3B-Instruct); the
# vision tower is the same 32-layer ViT in both, only its output width differs.
_QWEN_VL_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14,
                       spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                       fullatt_block_indexes=[7, 15, 23, 31], in_chans=3)
QWEN_VL = {
    "7b": dict(text=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                         num_key_value_heads=4, vocab_size=152064), vision_out=3584, tie=False),
    "3b": dict(text=dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                         num_key_value_heads=2, vocab_size=151936), vision_out=2048, tie=True),
}
# google/t5-v1_1-xxl's encoder (FLUX's text_encoder_2) and openai/clip-vit-large-patch14's text model
T5_XXL = dict(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, vocab_size=32128,
              feed_forward_proj="gated-gelu", is_encoder_decoder=False)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              vocab_size=49408, max_position_embeddings=77, projection_dim=768)
FLUX_VAE = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                layers_per_block=2, use_quant_conv=False, use_post_quant_conv=False)
T5_TOKENS = 512  # FluxKontextPipeline's max_sequence_length
QWEN_PIPELINE_PIXELS = 1024  # QwenImageEditPipeline shows its MLLM the source at about 1024² pixels


def count(module: torch.nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def qwen_vl(size: str):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    spec = QWEN_VL[size]
    config = Qwen2_5_VLConfig(text_config=dict(spec["text"], tie_word_embeddings=spec["tie"]),
                              vision_config=dict(_QWEN_VL_VISION, out_hidden_size=spec["vision_out"]),
                              tie_word_embeddings=spec["tie"])
    return Qwen2_5_VLForConditionalGeneration(config)


def released_transformer(backbone: str):
    from diffusers import FluxTransformer2DModel, QwenImageTransformer2DModel

    if backbone == "qwen-image-edit":
        model = QwenImageTransformer2DModel()
        c = model.config  # diffusers' defaults are Qwen-Image's released transformer/config.json
        assert (c.num_layers, c.num_attention_heads, c.attention_head_dim, c.joint_attention_dim,
                c.in_channels, c.out_channels) == (60, 24, 128, 3584, 64, 16), dict(c)
        return model
    return FluxTransformer2DModel(guidance_embeds=True)  # FLUX.1 Kontext-dev (distilled guidance)


@functools.lru_cache(maxsize=None)  # the counts do not depend on dtype, resolution or offloading
def components(backbone: str) -> dict[str, dict]:
    """{name: {"params": n, "phase": resident | encode | denoise, "trained": bool}} at real size."""
    from diffusers import AutoencoderKL, AutoencoderKLQwenImage
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from trainer.config import preset
    from trainer.dit.flow import add_lora
    from trainer.dit.processors import install_mcie_processors, mcie_parameters
    from trainer.model import Connector, RegionDecoder, SourceEncoder

    config = preset("base", backbone).model
    found: dict[str, dict] = {}

    def add(name, params, phase, trained=False):
        found[name] = {"params": int(params), "phase": phase, "trained": trained}

    with torch.device("meta"):
        transformer = released_transformer(backbone)
        base = count(transformer)
        install_mcie_processors(transformer)
        processors = sum(p.numel() for p in mcie_parameters(transformer).values())
        add_lora(transformer, config.transformer_lora_rank, alpha=config.transformer_lora_rank,
                 targets=tuple(config.transformer_lora_targets))
        lora = sum(p.numel() for n, p in transformer.named_parameters() if "lora_" in n)
        assert count(transformer) == base + processors + lora
        add("transformer", base, "denoise")
        add("mcie_processors", processors, "denoise", trained=True)
        add("transformer_lora", lora, "denoise", trained=True)

        mllm = qwen_vl("7b" if backbone == "qwen-image-edit" else "3b")
        add("mllm", count(mllm), "encode")
        hidden = mllm.config.text_config.hidden_size
        if backbone == "flux-kontext":
            add("t5_xxl_encoder", count(T5EncoderModel(T5Config(**T5_XXL))), "encode")
            add("clip_l_text", count(CLIPTextModel(CLIPTextConfig(**CLIP_L))), "encode")
            vae = AutoencoderKL(**FLUX_VAE)
        else:
            vae = AutoencoderKLQwenImage()
        add("vae", count(vae), "resident")

        # MCIE-E1's own modules, as `MCIEDiT._build` sizes them
        context = transformer.config.joint_attention_dim
        latent_channels = transformer.config.in_channels // 4
        grid = (config.mllm_image_size // 28,) * 2
        add("source_encoder", count(SourceEncoder(latent_channels, config.source_feature_dim)), "resident", True)
        add("region_decoder", count(RegionDecoder(config.source_feature_dim, hidden, context, config.mask_head_dim,
                                                  grid)), "resident", True)
        if config.text_tokens == "connector":
            add("connector", count(Connector(hidden, context, config)) + config.global_queries * context,
                "resident", True)  # + null_context
        elif hidden != context:  # the MLLM's own states, mapped to the DiT's width
            add("text_proj", hidden * context + context, "resident", True)
        if backbone == "flux-kontext" and config.text_tokens != "released":  # else CLIP's own pooled vector
            add("pooled", context * transformer.config.pooled_projection_dim + transformer.config.pooled_projection_dim,
                "resident", True)
    facts = {"width": transformer.config.num_attention_heads * transformer.config.attention_head_dim,
             "vae_factor": vae_factor_of(vae), "vae_full_res_channels": vae_full_res_channels(vae),
             "mllm_layers": mllm.config.text_config.num_hidden_layers, "mllm_hidden": hidden,
             "mllm_kv_width": mllm.config.text_config.num_key_value_heads
             * (hidden // mllm.config.text_config.num_attention_heads)}
    return {"components": found, "facts": facts, "text_tokens": config.text_tokens}


def vae_factor_of(vae) -> int:
    from trainer.model import vae_factor

    return vae_factor(vae)


def vae_full_res_channels(vae) -> int:
    c = vae.config
    if hasattr(c, "temperal_downsample"):  # Qwen-Image: base_dim · dim_mult[0] at full resolution
        return c.base_dim * c.dim_mult[0]
    return c.block_out_channels[0]


def activations(backbone: str, facts: dict, text_tokens: str, resolution: int, b: int) -> dict[str, int]:
    """Bytes of each phase's activations (the formulas in the module docstring)."""
    per_image = (resolution // (facts["vae_factor"] * 2)) ** 2
    mllm_tokens = MLLM_IMAGE_TOKENS + INSTRUCTION_TOKENS
    if text_tokens == "released" and backbone == "qwen-image-edit":  # the pipeline's own reading
        mllm_tokens = (QWEN_PIPELINE_PIXELS // 28) ** 2 + INSTRUCTION_TOKENS
    text = T5_TOKENS if text_tokens == "released" and backbone == "flux-kontext" else mllm_tokens
    length = 2 * per_image + text
    rows = 2 if backbone == "qwen-image-edit" else 1
    dit = rows * length * 16 * facts["width"] * b + rows * length * length
    mllm = 3 * mllm_tokens * (2 * facts["mllm_layers"] * facts["mllm_kv_width"] + 16 * facts["mllm_hidden"]) * b
    vae = 6 * facts["vae_full_res_channels"] * resolution * resolution * b
    return {"denoise": dit, "encode": mllm, "decode": vae, "dit_tokens": length}


def plan(backbone: str, dtype: str = "bfloat16", resolution: int = 1024, offload: bool = True) -> dict:
    """Per component params and bytes, and the peak of `mcie edit` with `backbone`'s base preset."""
    built = components(backbone)
    b = DTYPE_BYTES[dtype]
    parts = {name: {**c, "bytes": c["params"] * (4 if c["trained"] else b)} for name, c in built["components"].items()}
    act = activations(backbone, built["facts"], built["text_tokens"], resolution, b)
    weights = {phase: sum(c["bytes"] for c in parts.values() if c["phase"] == phase)
               for phase in ("resident", "encode", "denoise")}
    phases = {"encode": weights["resident"] + weights["encode"] + act["encode"],
              "denoise": weights["resident"] + weights["denoise"] + act["denoise"],
              "decode": weights["resident"] + act["decode"]}
    if offload:
        peak = max(phases.values())
    else:
        peak = sum(weights.values()) + max(act["encode"], act["denoise"], act["decode"])
    return {"backbone": backbone, "dtype": dtype, "offload": offload, "resolution": resolution,
            "components": {name: {"params": c["params"], "gb": round(c["bytes"] / GB, 3),
                                  "phase": c["phase"], "trained": c["trained"]} for name, c in parts.items()},
            "activations_gb": {k: round(v / GB, 3) for k, v in act.items() if k != "dit_tokens"},
            "dit_tokens": act["dit_tokens"],
            "phases_gb": {k: round(v / GB, 2) for k, v in phases.items()},
            "peak_bytes": int(peak), "peak_gb": round(peak / GB, 2), "fits_80gb": peak < GPU_BYTES}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", choices=sorted(DTYPE_BYTES), default="bfloat16")
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--no-offload", dest="offload", action="store_false")
    args = parser.parse_args(argv)
    if args.resolution < 64 or args.resolution % 64:
        print("inference_memory: error: --resolution must be a positive multiple of 64", file=sys.stderr)
        return 2
    for backbone in ("qwen-image-edit", "flux-kontext"):
        print(json.dumps(plan(backbone, args.dtype, args.resolution, args.offload)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
