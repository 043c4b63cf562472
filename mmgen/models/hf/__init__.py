# Hugging Face causal LMs in mmgen: config.json -> ModelConfig, HF <-> mmgen weight names, safetensors reading.
"""Reads a Hugging Face model directory directly (``config.json``, ``model.safetensors`` or
sharded ``model-*.safetensors`` with ``model.safetensors.index.json``); ``transformers`` is not
needed at run time. Supported ``model_type``: llama, mistral, qwen2, qwen3.

* :mod:`.config`: ``config.json`` <-> :class:`~mmgen.models.config.ModelConfig` fields;
* :mod:`.adapter`: the name map between HF and mmgen state dicts, and which mmgen parameters
  have no HF counterpart (the multimodal parts, extra vocabulary rows);
* :mod:`.weights`: tensor-by-tensor (and row-range) reading of the safetensors files.

Loading into sharded parameters lives in ``mmgen/parallel/pretrained.py`` (this package
imports nothing from torch.distributed).
"""
from mmgen.models.hf.config import SUPPORTED_MODEL_TYPES, hf_model_fields, read_hf_config

__all__ = ["SUPPORTED_MODEL_TYPES", "hf_model_fields", "read_hf_config"]
