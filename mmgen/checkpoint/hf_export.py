# `mmgen export --format hf`: a run's language trunk as a Hugging Face directory, its multimodal parts beside it.
"""Writes, into a new directory (through a temporary one renamed at the end):

* ``config.json``: the trunk as a llama / qwen2 / qwen3 config (mmgen.models.hf.config);
* ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json`` (or one
  ``model.safetensors``): the trunk's tensors under HF names, every vocabulary row included
  (mmgen's specials too); the index names exactly the tensors each file holds;
* the tokenizer's files when the run used ``data.tokenizer=hf:<dir>``, and ``mmgen_specials.json``
  (mmgen's special ids);
* ``mmgen_multimodal.safetensors`` + ``mmgen_model.json``: what Hugging Face's causal LM has no
  place for (visual embedders, flow head, timestep MLP), with mmgen's model config.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import torch

from mmgen.errors import ConfigError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def shard(state: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Split ``state`` (in key order) into dicts of at most ``max_bytes`` each (a tensor larger
    than that gets a file of its own)."""
    shards, current, size = [], {}, 0
    for key in state:
        n = state[key].numel() * state[key].element_size()
        if current and size + n > max_bytes:
            shards.append(current)
            current, size = {}, 0
        current[key] = state[key]
        size += n
    if current:
        shards.append(current)
    return shards


def export_hf(state: dict[str, torch.Tensor], model_cfg, out: str | Path, tokenizer: str = "bytes",
              max_shard_bytes: int = 5 * 2**30, source: str = "") -> Path:
    """Write the Hugging Face directory ``out`` (must not exist yet) from a plain-model state dict.

    Args:
        state: the consolidated mmgen state dict (``consolidated_state_dict``).
        model_cfg: the run's ``ModelConfig``.
        out: the directory to create.
        tokenizer: the run's ``data.tokenizer`` (``hf:<dir>``: its files are copied).
        max_shard_bytes: largest safetensors file.
        source: the checkpoint, recorded in the files' metadata.
    """
    from safetensors.torch import save_file

    from mmgen.models.hf.adapter import hf_name, mmgen_to_hf
    from mmgen.models.hf.config import hf_config_from_model
    from mmgen.models.tokenizers import build_tokenizer, special_ids

    out = Path(out)
    if out.exists():
        raise ConfigError(f"export: --out {out} exists; give a new directory")
    if model_cfg.block != "dense":
        raise ConfigError(f"export --format hf: model.block={model_cfg.block} has no Hugging Face causal-LM layout")
    config = hf_config_from_model(model_cfg)
    trunk = {k: v.float().contiguous() for k, v in mmgen_to_hf(state, model_cfg.tie_embeddings).items()}
    rest = {k: v.float().contiguous() for k, v in state.items() if hf_name(k) is None}
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        meta = {"format": "pt", "source": source}
        parts = shard(trunk, max_shard_bytes)
        if len(parts) == 1:
            save_file(parts[0], str(tmp / "model.safetensors"), metadata=meta)
        else:
            weight_map = {}
            for i, part in enumerate(parts):
                name = f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors"
                save_file(part, str(tmp / name), metadata=meta)
                weight_map.update({k: name for k in part})
            total = sum(v.numel() * v.element_size() for v in trunk.values())
            (tmp / "model.safetensors.index.json").write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        if rest:
            save_file(rest, str(tmp / "mmgen_multimodal.safetensors"), metadata=meta)
        (tmp / "mmgen_model.json").write_text(json.dumps(dataclasses.asdict(model_cfg), indent=2))
        if tokenizer.startswith("hf:"):
            src = Path(tokenizer[len("hf:"):])
            for f in TOKENIZER_FILES:
                if (src / f).is_file():
                    shutil.copy2(src / f, tmp / f)
        (tmp / "mmgen_specials.json").write_text(json.dumps(special_ids(build_tokenizer(tokenizer)), indent=2))
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
