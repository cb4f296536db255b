"""MCIE-E1: the instruction-based editor trained on the factory's train shards.

config (presets + JSON files) · mllm (Qwen-VL encoder, LoRA through peft) · attention (the two
diffusers attention processors) · model (MCIEE1: UNet, connector, source encoder, region decoder)
· dit (the DiT backbones) · build (the model of a config's backbone) · export (the diffusers
layout of a checkpoint) · data (the positionable webdataset loader) · kernels (channels-last,
compile, cuDNN settings) · train (accelerate loop, `mcie train`) · ema (the EMA of the trained
weights, LoRA adapters as their product) · checkpoints (their files and the latest one) · edit
(`mcie edit`: bf16, offloading) · evaluate / eval_report / predictions (`mcie eval`: a checkpoint
on CIE-Bench).
"""
