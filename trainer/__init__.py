"""MCIE-E1: the instruction-based editor trained on the factory's train shards.

config (presets + JSON files) · mllm (Qwen-VL encoder, LoRA through peft) · attention (the two
diffusers attention processors) · model (MCIEE1: UNet, connector, source encoder, region decoder)
· export (the diffusers layout of a checkpoint) · data (the positionable webdataset loader) ·
kernels (channels-last, compile, cuDNN settings) · train (accelerate loop, `mcie train`) · edit
(`mcie edit`) · evaluate / eval_report (`mcie eval`: a checkpoint on CIE-Bench).
"""
