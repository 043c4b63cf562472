# Hugging Face config.json <-> ModelConfig fields for the Llama / Mistral / Qwen2 / Qwen3 family.
from __future__ import annotations

import functools
import json
from pathlib import Path

from mmgen.models.config import ModelConfig

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
# what every supported type shares: pre-norm, SwiGLU ("silu"), RMSNorm, rotate-half RoPE
_ACT = ("silu",)


def read_hf_config(path: str | Path) -> dict:
    """``config.json`` of a Hugging Face model directory (or the file itself) as a dict.

    Args:
        path: the directory (or its ``config.json``).
    """
    p = Path(path)
    f = p / "config.json" if p.is_dir() else p
    if not f.is_file():
        raise FileNotFoundError(f"{path}: no Hugging Face config.json there")
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{f}: not valid JSON ({e})") from None


def _rope(cfg: dict, where: str) -> dict:
    """RoPE fields from either form: transformers 5 ``rope_parameters`` or the older top-level
    ``rope_theta`` + ``rope_scaling``."""
    params = dict(cfg.get("rope_parameters") or {})
    legacy = cfg.get("rope_scaling") or {}
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    kind = params.get("rope_type") or legacy.get("rope_type") or legacy.get("type") or "default"
    scale = {**legacy, **params}
    if scale.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"{where}: partial_rotary_factor={scale['partial_rotary_factor']} is not supported "
                         f"(mmgen rotates the whole head)")
    out = {"rope_theta": float(theta), "rope_scaling": "none"}
    if kind == "default":
        return out
    if kind == "linear":
        return {**out, "rope_scaling": "linear", "rope_factor": float(scale["factor"])}
    if kind == "llama3":
        return {**out, "rope_scaling": "llama3", "rope_factor": float(scale["factor"]),
                "rope_low_freq_factor": float(scale["low_freq_factor"]),
                "rope_high_freq_factor": float(scale["high_freq_factor"]),
                "rope_original_max_len": int(scale["original_max_position_embeddings"])}
    raise ValueError(f"{where}: RoPE type '{kind}' is not supported (default, linear, llama3)")


def _check_unsupported(cfg: dict, kind: str, where: str) -> None:
    """One line naming the first feature mmgen's trunk does not implement."""
    act = cfg.get("hidden_act", "silu")
    if act not in _ACT:
        raise ValueError(f"{where}: hidden_act='{act}' is not supported (SwiGLU with silu only)")
    layer_types = cfg.get("layer_types") or []
    sliding = [i for i, t in enumerate(layer_types) if t != "full_attention"]
    if sliding:
        raise ValueError(f"{where}: layers {sliding[:4]} use '{layer_types[sliding[0]]}' attention "
                         f"(sliding window is not supported)")
    window = cfg.get("sliding_window")
    # qwen2/qwen3 name a window but use it only with use_sliding_window; mistral always uses it
    used = kind == "mistral" or cfg.get("use_sliding_window", False)
    if window and used:
        raise ValueError(f"{where}: sliding_window={window} is not supported (full attention only)")
    if cfg.get("mlp_bias"):
        raise ValueError(f"{where}: mlp_bias=true is not supported")
    if kind == "llama" and cfg.get("attention_bias"):
        raise ValueError(f"{where}: attention_bias=true (biases on q/k/v and o) is not supported for llama")
    if kind == "qwen3" and cfg.get("attention_bias"):
        raise ValueError(f"{where}: attention_bias=true is not supported for qwen3")
    if cfg.get("pretraining_tp", 1) != 1:
        raise ValueError(f"{where}: pretraining_tp={cfg['pretraining_tp']} is not supported")


def hf_model_fields(path: str | Path) -> dict:
    """Cached :func:`read_model_fields` (resolvers ask once per field)."""
    f = Path(path) / "config.json"
    return dict(_cached_fields(str(path), f.stat().st_mtime if f.is_file() else 0.0))


@functools.lru_cache(maxsize=16)
def _cached_fields(path: str, mtime: float) -> dict:
    return read_model_fields(path)


def read_model_fields(path: str | Path) -> dict:
    """The :class:`ModelConfig` fields a Hugging Face causal LM's ``config.json`` fixes (shape,
    RoPE, norms, biases, tying); everything multimodal keeps mmgen's values.

    Args:
        path: the Hugging Face model directory.

    Raises:
        ValueError: one line naming an unsupported ``model_type`` or feature.
    """
    cfg = read_hf_config(path)
    where = f"{path}/config.json"
    kind = cfg.get("model_type", "")
    if kind not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"{where}: model_type '{kind}' is not supported "
                         f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    _check_unsupported(cfg, kind, where)
    dim, n_heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    head_dim = int(cfg.get("head_dim") or dim // n_heads)
    fields = {
        "name": f"hf-{kind}",
        "dim": dim,
        "n_layers": int(cfg["num_hidden_layers"]),
        "n_heads": n_heads,
        "n_kv_heads": int(cfg.get("num_key_value_heads") or n_heads),
        "ffn_dim": int(cfg["intermediate_size"]),
        "vocab_size": int(cfg["vocab_size"]),
        "norm_eps": float(cfg.get("rms_norm_eps", 1e-6)),
        "qk_norm": kind == "qwen3",
        "qkv_bias": kind == "qwen2",
        "tie_embeddings": bool(cfg.get("tie_word_embeddings", False)),
        # 0 when it is dim // n_heads, so the saved config reads as a plain shape
        "attention_head_dim": head_dim if head_dim * n_heads != dim else 0,
        **_rope(cfg, where),
    }
    return fields


def hf_config_from_model(cfg: ModelConfig, vocab_size: int | None = None) -> dict:
    """A ``config.json`` dict for mmgen's trunk (``mmgen export --format hf``): qwen3 when it
    has qk-norm, qwen2 when it has q/k/v biases, llama otherwise.

    Args:
        cfg: the model shape.
        vocab_size: rows written (default ``cfg.vocab_size``).
    """
    if cfg.qk_norm and cfg.qkv_bias:
        raise ValueError("export --format hf: qk-norm together with q/k/v biases matches no supported "
                         "Hugging Face architecture")
    kind = "qwen3" if cfg.qk_norm else "qwen2" if cfg.qkv_bias else "llama"
    arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[kind]
    rope: dict = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling == "linear":
        rope.update(rope_type="linear", factor=cfg.rope_factor)
    elif cfg.rope_scaling == "llama3":
        rope.update(rope_type="llama3", factor=cfg.rope_factor, low_freq_factor=cfg.rope_low_freq_factor,
                    high_freq_factor=cfg.rope_high_freq_factor,
                    original_max_position_embeddings=cfg.rope_original_max_len)
    out = {
        "architectures": [arch], "model_type": kind, "hidden_act": "silu",
        "hidden_size": cfg.dim, "intermediate_size": cfg.ffn_dim, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
        "vocab_size": vocab_size or cfg.vocab_size, "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings, "rope_parameters": rope,
        "rope_theta": cfg.rope_theta, "attention_bias": False, "mlp_bias": False,
        "max_position_embeddings": max(cfg.rope_original_max_len if cfg.rope_scaling == "llama3" else 0, 4096) * (
            int(cfg.rope_factor) if cfg.rope_scaling != "none" else 1),
        "torch_dtype": "float32", "dtype": "float32", "use_cache": True,
    }
    if kind != "llama":
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layers,
                   layer_types=["full_attention"] * cfg.n_layers)
    if rope["rope_type"] != "default":
        legacy = {k: v for k, v in rope.items() if k != "rope_theta"}
        out["rope_scaling"] = legacy
    return out


# ---------------------------------------------------------------- the `hf` model flavor

# ModelConfig fields the `hf` flavor takes from config.json (the rest keep mmgen's defaults)
HF_FIELDS = ("name", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "norm_eps", "qk_norm", "qkv_bias",
             "tie_embeddings", "attention_head_dim", "rope_theta", "rope_scaling", "rope_factor",
             "rope_low_freq_factor", "rope_high_freq_factor", "rope_original_max_len")


def hf_field(path: str, name: str):
    """One ModelConfig field of the HF model in ``path`` (the ``hf_model`` resolver)."""
    if not str(path) or str(path) == "???":
        raise ValueError("model=hf needs the directory: model=hf:<dir> (or model.from_hf=<dir>)")
    defaults = ModelConfig()
    return hf_model_fields(path).get(name, getattr(defaults, name))


def hf_vocab(path: str, tokenizer: str) -> int:
    """Embedding rows of a model started from ``path`` with ``data.tokenizer=tokenizer``: the
    HF rows, or more when the tokenizer appends mmgen's specials above them (the ``hf_vocab``
    resolver)."""
    from mmgen.models.tokenizers import build_tokenizer

    return max(int(hf_model_fields(path)["vocab_size"]), build_tokenizer(str(tokenizer)).vocab_size)


def hf_flavor_node(patch_dim: str, heads: str) -> dict:
    """The ``model=hf`` ConfigStore node: every architecture field an interpolation of
    ``model.from_hf`` (a mandatory value), so ``config.yaml`` records the resolved shape."""
    import dataclasses

    node = {**dataclasses.asdict(ModelConfig(name="hf")), "patch_dim": patch_dim, "heads": heads, "from_hf": "???"}
    for name in HF_FIELDS:
        node[name] = "${hf_model:${model.from_hf}," + name + "}"
    node["vocab_size"] = "${hf_vocab:${model.from_hf},${data.tokenizer}}"
    return node


def hf_model_overrides(overrides: list[str]) -> list[str]:
    """``model=hf:<dir>`` -> ``model=hf model.from_hf=<dir>`` (a config group option cannot
    carry an argument; the rewrite gives the one-word form the meaning of the two-word one)."""
    out = []
    for ov in overrides:
        if ov.startswith("model=hf:") and len(ov) > len("model=hf:"):
            out += ["model=hf", f"model.from_hf={ov[len('model=hf:'):]}"]
        else:
            out.append(ov)
    return out
