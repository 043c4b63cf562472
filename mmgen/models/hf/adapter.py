# The state-dict map between Hugging Face Llama/Qwen causal LMs and mmgen's trunk, and what stays fresh.
"""mmgen's dense trunk and Hugging Face's ``*ForCausalLM`` have the same computation (pre-norm
blocks, RMSNorm, rotate-half RoPE: q/k rows need no permutation, SwiGLU), so the map is a
renaming, one tensor to one tensor. mmgen's vocabulary may be longer than the HF one (its
specials appended above): those rows of ``tok_embeddings`` / ``output`` have no HF rows.
Parameters outside the trunk (visual embedders, flow head, timestep MLP, visual position
tables) have no HF counterpart and are initialised fresh.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

_LAYER = {
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "attention.wq.bias": "self_attn.q_proj.bias",
    "attention.wk.bias": "self_attn.k_proj.bias",
    "attention.wv.bias": "self_attn.v_proj.bias",
    "attention.q_norm.weight": "self_attn.q_norm.weight",
    "attention.k_norm.weight": "self_attn.k_norm.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
}
_TOP = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight"}
# rows indexed by token id: mmgen's may extend past the HF vocabulary
VOCAB_KEYS = ("tok_embeddings.weight", "output.weight")
# buffers older checkpoints carry that are recomputed, not learned
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
_LAYER_KEY = re.compile(r"^layers\.(\d+)\.(.+)$")


def hf_name(key: str) -> str | None:
    """The Hugging Face tensor name of mmgen state-dict key ``key`` (None: no HF counterpart)."""
    if key in _TOP:
        return _TOP[key]
    m = _LAYER_KEY.match(key)
    if m and m.group(2) in _LAYER:
        return f"model.layers.{m.group(1)}.{_LAYER[m.group(2)]}"
    return None


@dataclass
class PretrainedMap:
    """Which mmgen parameters come from which HF tensors, checked against both sides.

    Attributes:
        source: mmgen key -> HF key.
        fresh: mmgen keys with no HF counterpart (initialised fresh), in model order.
        hf_rows: mmgen vocabulary key -> the number of its rows the HF tensor gives (the rest
            are fresh rows for mmgen's specials).
    """

    source: dict[str, str] = field(default_factory=dict)
    fresh: list[str] = field(default_factory=list)
    hf_rows: dict[str, int] = field(default_factory=dict)

    @classmethod
    def build(cls, shapes: dict[str, tuple[int, ...]], hf_shapes: dict[str, tuple[int, ...]], where: str,
              tied_hf: bool = False) -> "PretrainedMap":
        """Match mmgen's parameter shapes with the HF file's.

        Args:
            shapes: mmgen key -> global shape (every parameter of the plain model).
            hf_shapes: HF key -> shape (every tensor in the files).
            where: the HF directory, for messages.
            tied_hf: the HF model ties its head to its embeddings (``tie_word_embeddings``):
                an untied mmgen ``output.weight`` then starts from ``model.embed_tokens.weight``.

        Raises:
            ValueError: one line naming missing or unexpected keys, or a key with both shapes.
        """
        out = cls()
        used: set[str] = set()
        missing = []
        for key, shape in shapes.items():
            name = hf_name(key)
            if name is None:
                out.fresh.append(key)
                continue
            if name not in hf_shapes and key == "output.weight" and tied_hf:
                name = "model.embed_tokens.weight"
            if name not in hf_shapes:
                missing.append(f"{name} (for {key})")
                continue
            hf_shape = hf_shapes[name]
            vocab = key in VOCAB_KEYS
            if (vocab and (hf_shape[1:] != shape[1:] or hf_shape[0] > shape[0])) or (not vocab and hf_shape != shape):
                raise ValueError(f"{where}: {name} has shape {list(hf_shape)}, mmgen's {key} needs {list(shape)}")
            out.source[key] = name
            if vocab:
                out.hf_rows[key] = hf_shape[0]
            used.add(name)
        if missing:
            raise ValueError(f"{where}: missing {len(missing)} tensor(s) the model needs: {', '.join(missing[:6])}")
        # a tied HF model may still store lm_head.weight (a copy of the embeddings)
        spare = {"lm_head.weight"} if tied_hf or "output.weight" not in shapes else set()
        unexpected = sorted(k for k in hf_shapes if k not in used and k not in spare and not _IGNORED.search(k))
        if unexpected:
            raise ValueError(f"{where}: {len(unexpected)} unexpected tensor(s) mmgen's trunk has no place for: "
                             f"{', '.join(unexpected[:6])}")
        return out

    def fresh_modules(self) -> list[str]:
        """Top-level module names of the fresh parameters, plus ``<key>[rows a:b]`` for extra
        vocabulary rows: what the one log line lists."""
        parts = []
        for key in self.fresh:
            top = key.split(".")[0]
            if top not in parts:
                parts.append(top)
        return parts


def mmgen_to_hf(state: dict, tie_embeddings: bool) -> dict:
    """Rename an mmgen trunk state dict to HF keys (export); keys without a counterpart are
    left out (returned separately by the caller). A tied model writes no ``lm_head.weight``."""
    out = {}
    for key, value in state.items():
        name = hf_name(key)
        if name is not None:
            out[name] = value
    if tie_embeddings:
        out.pop("lm_head.weight", None)
    return out
