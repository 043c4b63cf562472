# The state-dict map between Hugging Face Llama/Qwen causal LMs and mmgen's trunk, and what stays fresh.
"""mmgen's dense trunk and Hugging Face's ``*ForCausalLM`` have the same computation (pre-norm
blocks, RMSNorm, rotate-half RoPE: q/k rows need no permutation, SwiGLU), so the map is a
renaming, one tensor to one tensor. mmgen's vocabulary may be longer than the HF one (its
specials appended above): those rows of ``tok_embeddings`` / ``output`` have no HF rows.
Parameters outside the trunk (visual embedders, flow head, timestep MLP, visual position
tables) have no HF counterpart and are initialised fresh.

Sparse trunks start from the same tensors (:func:`init_source`): every modality tower of a
``mot`` block (``layers.<i>.towers.<t>.<rest>``) is a copy of the HF layer's ``<rest>`` (BAGEL:
the generation tower starts as the text tower), and every expert of an MoE FFN
(``feed_forward.experts.w1 [E, dim, hidden]``) a transposed copy of the HF SwiGLU (sparse
upcycling, as ``mmgen.models.moe.upcycle_state_dict`` does for mmgen checkpoints); routers
are fresh. Both keep the dense model's function at step 0.
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
# a modality tower's copy of a dense block parameter (mmgen/models/mot.py)
_TOWER_KEY = re.compile(r"^(layers\.\d+\.)towers\.\d+\.(.+)$")
# an MoE FFN's stacked experts (mmgen/models/moe.py: x @ w, so the dense weight transposed)
_EXPERT_KEY = re.compile(r"^(.*\.feed_forward)\.experts\.(w[123])$")
_SHARED_KEY = re.compile(r"\.feed_forward\.shared\.")


def hf_name(key: str) -> str | None:
    """The Hugging Face tensor name of mmgen state-dict key ``key`` (None: no HF counterpart)."""
    if key in _TOP:
        return _TOP[key]
    m = _LAYER_KEY.match(key)
    if m and m.group(2) in _LAYER:
        return f"model.layers.{m.group(1)}.{_LAYER[m.group(2)]}"
    return None


def init_source(key: str) -> tuple[str | None, bool]:
    """Where mmgen parameter ``key`` starts from in a HF dense causal LM: ``(HF name, experts)``,
    ``experts`` True when the value is the HF matrix transposed and repeated once per expert;
    ``(None, False)`` for a fresh parameter. Tower keys resolve to their dense block's tensor.

    Args:
        key: an mmgen state-dict key (dense, ``mot``, ``moe`` or ``motmoe`` trunk).
    """
    m = _TOWER_KEY.match(key)
    dense = m.group(1) + m.group(2) if m else key
    e = _EXPERT_KEY.match(dense)
    if e:
        return hf_name(f"{e.group(1)}.{e.group(2)}.weight"), True
    return hf_name(dense), False


@dataclass
class PretrainedMap:
    """Which mmgen parameters come from which HF tensors, checked against both sides.

    Attributes:
        source: mmgen key -> HF key.
        fresh: mmgen keys with no HF counterpart (initialised fresh), in model order.
        hf_rows: mmgen vocabulary key -> the number of its rows the HF tensor gives (the rest
            are fresh rows for mmgen's specials).
        experts: mmgen keys of stacked MoE experts (each expert a transposed HF FFN matrix).
        towers: how many mmgen keys are modality-tower copies of an HF layer tensor.
    """

    source: dict[str, str] = field(default_factory=dict)
    fresh: list[str] = field(default_factory=list)
    hf_rows: dict[str, int] = field(default_factory=dict)
    experts: set[str] = field(default_factory=set)
    towers: int = 0

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
            if _SHARED_KEY.search(key):
                # a fresh shared expert would change the pretrained model's function at step 0
                raise ValueError(f"{where}: {key}: an MoE with shared experts cannot start from a dense model "
                                 f"(set model.moe_shared_experts=0)")
            name, experts = init_source(key)
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
            if experts:
                # [E, in, out] experts from an HF [out, in] matrix
                if tuple(hf_shape[::-1]) != tuple(shape[1:]):
                    raise ValueError(f"{where}: {name} has shape {list(hf_shape)}, the experts of mmgen's {key} "
                                     f"need {list(shape[:0:-1])} (set model.moe_ffn_dim=0)")
                out.experts.add(key)
            elif (vocab and (hf_shape[1:] != shape[1:] or hf_shape[0] > shape[0])) or (not vocab and hf_shape != shape):
                raise ValueError(f"{where}: {name} has shape {list(hf_shape)}, mmgen's {key} needs {list(shape)}")
            out.towers += bool(_TOWER_KEY.match(key))
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
        """Top-level module names of the fresh parameters (for a module that is partly
        pretrained, the fresh sub-modules with layer and tower indices as ``*``, e.g.
        ``layers.*.feed_forward.router``): what the one log line lists."""
        partly = {k.split(".")[0] for k in self.source}
        parts = []
        for key in self.fresh:
            top = key.split(".")[0]
            name = re.sub(r"\.\d+(?=\.)", ".*", key.rsplit(".", 1)[0]) if top in partly else top
            if name not in parts:
                parts.append(name)
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
