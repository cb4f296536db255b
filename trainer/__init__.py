"""MCIE-E1: the instruction-based editor trained on the factory's train shards.

config (presets + JSON files) · mllm (Qwen-VL encoder, LoRA) · attention (the two diffusers
attention processors) · model (MCIEE1: UNet, connector, source encoder, region head) · data (the
positionable webdataset loader) · kernels (channels-last, compile, cuDNN settings) · train
(accelerate loop, `mcie train`) · edit (`mcie edit`).
"""
