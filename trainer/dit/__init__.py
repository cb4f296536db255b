"""MCIE-E1 on a flow-matching DiT editor (FLUX.1 Kontext, Qwen-Image-Edit; `model.backbone`): the
spatial-aware joint-attention mask and the background-consistent injection as diffusers attention
processors (`condition`, `processors`), the model (`model.MCIEDiT`, built by
`trainer.build.build_model` for a DiT backbone), the released pipelines' own text conditioning
(`qwen_text`, `kontext_text`), flow-matching LoRA training (`flow`) and the pipelines' input
packing with tiny CPU configs (`tiny`)."""

from trainer.dit.condition import GLOBAL_TOKEN, PADDING_TOKEN, JointCondition
from trainer.dit.processors import (
    FluxMCIEAttnProcessor,
    QwenMCIEAttnProcessor,
    SourceInjection,
    install_mcie_processors,
    mcie_parameters,
)
from trainer.dit.tiny import kontext_inputs, qwen_edit_inputs, tiny_flux_kontext, tiny_qwen_image_edit

__all__ = ["GLOBAL_TOKEN", "PADDING_TOKEN", "JointCondition", "FluxMCIEAttnProcessor", "QwenMCIEAttnProcessor",
           "SourceInjection", "install_mcie_processors", "mcie_parameters", "kontext_inputs", "qwen_edit_inputs",
           "tiny_flux_kontext", "tiny_qwen_image_edit"]
