"""Tiny randomly initialised models built from configs and saved with `save_pretrained`, for the
model-backed stages' tests and CPU benches: a SAM, a Stable-Diffusion inpainting pipeline and an
InstructPix2Pix pipeline. Nothing downloads: the CLIP tokenizer is a byte-level one made offline
(a vocab of the 256 byte-unicode characters, each also with `</w>`, plus the two special tokens,
and no merges)."""

from __future__ import annotations

import json
from pathlib import Path


def tiny_sam(path: Path, image_size: int = 128) -> Path:
    import torch
    from transformers import (SamConfig, SamMaskDecoderConfig, SamModel, SamPromptEncoderConfig,
                              SamVisionConfig)
    from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil

    torch.manual_seed(0)
    vision = SamVisionConfig(hidden_size=32, output_channels=32, num_hidden_layers=2,
                             num_attention_heads=2, image_size=image_size, patch_size=16,
                             window_size=4, global_attn_indexes=[1], num_pos_feats=16, mlp_dim=64)
    prompt = SamPromptEncoderConfig(hidden_size=32, image_size=image_size, patch_size=16,
                                    mask_input_channels=4)
    decoder = SamMaskDecoderConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                   mlp_dim=64, iou_head_hidden_dim=32)
    config = SamConfig(vision_config=vision.to_dict(), prompt_encoder_config=prompt.to_dict(),
                       mask_decoder_config=decoder.to_dict())
    SamModel(config).eval().save_pretrained(path)
    mask_side = image_size // 4
    SamImageProcessorPil(size={"longest_edge": image_size},
                         pad_size={"height": image_size, "width": image_size},
                         mask_size={"longest_edge": mask_side},
                         mask_pad_size={"height": mask_side, "width": mask_side}).save_pretrained(path)
    return Path(path)


def byte_tokenizer(path: Path):
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    path.mkdir(parents=True, exist_ok=True)
    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(vocab_file=str(path / "vocab.json"), merges_file=str(path / "merges.txt"),
                         model_max_length=77), len(vocab)


def _parts(tmp: Path, in_channels: int):
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    tokenizer, vocab_size = byte_tokenizer(tmp / "tokenizer-src")
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=32, in_channels=in_channels,
        out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
        attention_head_dim=8)
    vae = AutoencoderKL(block_out_channels=(32, 64), in_channels=3, out_channels=3,
                        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), latent_channels=4)
    text = CLIPTextModel(CLIPTextConfig(bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1,
                                        hidden_size=32, intermediate_size=37, layer_norm_eps=1e-05,
                                        num_attention_heads=4, num_hidden_layers=2, pad_token_id=1,
                                        vocab_size=vocab_size, max_position_embeddings=77))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False)
    return dict(unet=unet, vae=vae, text_encoder=text, tokenizer=tokenizer, scheduler=scheduler,
                safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def tiny_inpaint(path: Path) -> Path:
    from diffusers import StableDiffusionInpaintPipeline

    StableDiffusionInpaintPipeline(**_parts(Path(path).parent, 9)).save_pretrained(path)
    return Path(path)


def tiny_instruct(path: Path) -> Path:
    from diffusers import StableDiffusionInstructPix2PixPipeline

    StableDiffusionInstructPix2PixPipeline(**_parts(Path(path).parent, 8)).save_pretrained(path)
    return Path(path)
