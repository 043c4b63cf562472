# Typed configuration of the unified transformer (Hydra structured config, group `model`).
from __future__ import annotations

from dataclasses import dataclass, field

from mmgen.models.codecs.config import AutoencoderConfig

ATTENTION_BACKENDS = ("auto", "sdpa", "flex")
VISUAL_POS = ("learned", "none")
# modality towers (block "mot"): which tower each position uses, from the batch's span table
TOWER_SPLITS = ("none", "role", "modality")
TOWER_INITS = ("independent", "copy")
ROPE_SCALINGS = ("none", "linear", "llama3")
# what build_model builds: the unified transformer, or one of mmgen's trainable codecs (a run
# that trains a VAE / VQ tokenizer through the same trainer, objective vae / vq)
FAMILIES = ("transformer", "vae", "vq")


@dataclass
class ModelConfig:
    """Shape of a :class:`~mmgen.models.transformer.UnifiedTransformer`.

    Defaults are the ``debug`` flavor, small enough to train on a CPU in seconds. Flat and
    made of plain types so Hydra/OmegaConf can type-check overrides.

    Args:
        n_kv_heads: key/value heads (grouped-query attention); must divide ``n_heads``.
        vocab_size: text (and later discrete visual) vocabulary; 264 = ByteTokenizer.
        patch_dim: features per continuous visual position (p * p * C); 0 for a model whose
            visual spans are all discrete codes (``data.codec=vq:...``): it then has no
            continuous input projection, timestep embedder or "flow" head.
        max_grid: largest (t, h, w) patch grid the learned visual position tables cover.
        visual_pos: "learned" adds learned t/h/w embeddings at visual positions; "none" relies
            on 1-D RoPE alone.
        attention: "auto" = FlexAttention on CUDA, SDPA with a boolean mask elsewhere.
        timestep_dim: width of the sinusoidal timestep features fed to the timestep MLP.
        block: kind of trunk block (``mmgen.models.trunk.BLOCKS``; registry names are checked by
            ``mmgen.models.check_registered``, since the registries import this module).
        heads: output heads to build (``mmgen.models.heads.HEADS``): "lm" (vocabulary logits),
            "flow" (velocity / clean-patch prediction per continuous visual position). A
            training job derives it from the objective (each objective names the heads it
            trains, ``Objective.heads``), so no parameter goes without a gradient; the default
            here is Transfusion's pair.
        tower_split: modality towers (``mmgen/models/mot.py``): "none" (dense); "role" (BAGEL:
            tower 0 = understanding = text and condition spans, tower 1 = generation = target
            spans); "modality" (tower 0 = text, tower 1 = visual). Needs a tower block
            (``block=mot``), and a tower block needs it.
        tower_init: "independent" (each tower drawn from the RNG) or "copy" (every tower starts
            as a copy of tower 0, the text tower).
        freeze_text_tower: tower 0's parameters of every block get ``requires_grad=False``
            (LMFusion: the language model's weights stay as they are); the optimizer skips them.
        attention_head_dim: width of one attention head; 0 = ``dim // n_heads`` (Qwen3 sets
            it explicitly, with ``n_heads * head_dim != dim``).
        qkv_bias: biases on the q/k/v projections (Qwen2); the output projection has none.
        rope_scaling: "none", "linear" (every frequency divided by ``rope_factor``) or
            "llama3" (Llama 3.1's wavelength-dependent scaling, with ``rope_low_freq_factor``,
            ``rope_high_freq_factor`` and ``rope_original_max_len``).
        from_hf: a Hugging Face model directory whose ``config.json`` the ``hf`` flavor reads
            (``model=hf:<dir>``, docs/pretrained.md); empty for every other flavor.
        moe_experts: routed experts per MoE FFN; 0 (default) = no MoE anywhere (``block=moe``
            needs > 0). See ``mmgen/models/moe.py``.
        moe_top_k: experts each token is routed to.
        moe_score: router scores, "softmax" or "sigmoid" (DeepSeek-V3).
        moe_norm_topk: renormalise the chosen scores to sum to 1 (needed for upcycling to
            reproduce the dense FFN).
        moe_ffn_dim: hidden width of each expert (0: ``ffn_dim``).
        moe_shared_experts: experts every token goes through besides its routed ones.
        moe_every: an MoE FFN on layers ``i % moe_every == 0`` (dense SwiGLU elsewhere).
        moe_capacity_factor: 0 = dropless; > 0 = each expert takes at most
            ``ceil(factor * tokens * top_k / experts)`` assignments, the rest are dropped.
        moe_aux_loss_weight, moe_z_loss_weight: default weights of the ``moe_balance`` and
            ``moe_z`` losses in the total (an ``objective.weights`` entry overrides).
        moe_bias_update_rate: DeepSeek-V3 aux-loss-free balancing: per optimizer step each
            expert's selection bias moves by this towards balance (0: off).
        moe_experts_impl: "grouped" (``torch._grouped_mm`` or padded ``bmm``) or "loop" (the
            Python loop reference).
        family: "transformer" (everything above), or "vae" / "vq": the model is then a
            convolutional codec shaped by ``autoencoder`` and the transformer fields are unused.
        autoencoder: the codec's shape (``family`` vae or vq only).
        mar_width, mar_depth: the "mar" head (MAR's per-token MLP denoiser,
            ``mmgen/models/heads.py``): hidden width and number of residual AdaLN blocks. Read
            only when ``heads`` has "mar".
    """

    name: str = "debug"
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    ffn_dim: int = 192
    vocab_size: int = 264
    patch_dim: int = 48
    max_grid: list[int] = field(default_factory=lambda: [16, 32, 32])
    visual_pos: str = "learned"
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    qk_norm: bool = True
    tie_embeddings: bool = False
    init_std: float = 0.02
    attention: str = "auto"
    timestep_dim: int = 256
    block: str = "dense"
    heads: list[str] = field(default_factory=lambda: ["lm", "flow"])
    tower_split: str = "none"
    tower_init: str = "independent"
    freeze_text_tower: bool = False
    # the fields pretrained Hugging Face LLMs need (mmgen/models/hf/); defaults: v1's shape
    attention_head_dim: int = 0
    qkv_bias: bool = False
    rope_scaling: str = "none"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_len: int = 8192
    from_hf: str = ""
    # Mixture-of-Experts (off by default: moe_experts=0)
    moe_experts: int = 0
    moe_top_k: int = 2
    moe_score: str = "softmax"
    moe_norm_topk: bool = True
    moe_ffn_dim: int = 0
    moe_shared_experts: int = 0
    moe_every: int = 1
    moe_capacity_factor: float = 0.0
    moe_aux_loss_weight: float = 0.01
    moe_z_loss_weight: float = 0.001
    moe_bias_update_rate: float = 0.0
    moe_experts_impl: str = "grouped"
    family: str = "transformer"
    # the per-token diffusion head (heads=[..., mar]; MAR-B uses width 1024, depth 6)
    mar_width: int = 128
    mar_depth: int = 3
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)

    @property
    def head_dim(self) -> int:
        return self.attention_head_dim or self.dim // self.n_heads

    def validate(self) -> "ModelConfig":
        """Raise ValueError on an inconsistent shape; returns self so calls can chain."""
        if self.family not in FAMILIES:
            raise ValueError(f"model.family='{self.family}' not in {FAMILIES}")
        if self.family != "transformer":
            self.autoencoder.validate()
            return self
        positive = ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size",
                    "timestep_dim")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.patch_dim < 0:
            raise ValueError(f"model.patch_dim must be >= 0, got {self.patch_dim}")
        if self.patch_dim == 0 and "flow" in self.heads:
            # a discrete codec (payload_dim 0) has no continuous rows for a flow head to predict
            raise ValueError("model.patch_dim=0 (a discrete codec) leaves the 'flow' head nothing to "
                             "predict: train it with an objective over codes (objective=vq_ar)")
        if "mar" in self.heads:
            if self.patch_dim == 0:
                raise ValueError("model.patch_dim=0 (a discrete codec) leaves the 'mar' head nothing to "
                                 "denoise: it needs continuous visual rows (data.codec=pixels or vae:...)")
            if self.mar_width <= 0 or self.mar_depth <= 0:
                raise ValueError(f"model.mar_width ({self.mar_width}) and model.mar_depth ({self.mar_depth}) "
                                 "must be positive")
        if self.attention_head_dim < 0:
            raise ValueError(f"model.attention_head_dim must be >= 0, got {self.attention_head_dim}")
        if not self.attention_head_dim and self.dim % self.n_heads:
            raise ValueError(f"model.dim={self.dim} is not divisible by n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"model.n_heads={self.n_heads} is not divisible by "
                             f"n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"model head_dim={self.head_dim} must be even for RoPE")
        if self.timestep_dim % 2:
            raise ValueError(f"model.timestep_dim={self.timestep_dim} must be even")
        if len(self.max_grid) != 3 or min(self.max_grid) <= 0:
            raise ValueError(f"model.max_grid must be 3 positive ints (t, h, w), "
                             f"got {self.max_grid}")
        if self.visual_pos not in VISUAL_POS:
            raise ValueError(f"model.visual_pos='{self.visual_pos}' not in {VISUAL_POS}")
        if self.attention not in ATTENTION_BACKENDS:
            raise ValueError(f"model.attention='{self.attention}' not in {ATTENTION_BACKENDS}")
        if self.rope_theta <= 0 or self.norm_eps <= 0 or self.init_std <= 0:
            raise ValueError("model.rope_theta, norm_eps and init_std must be positive")
        if self.tower_split not in TOWER_SPLITS:
            raise ValueError(f"model.tower_split='{self.tower_split}' not in {TOWER_SPLITS}")
        if self.tower_init not in TOWER_INITS:
            raise ValueError(f"model.tower_init='{self.tower_init}' not in {TOWER_INITS}")
        if self.freeze_text_tower and self.tower_split == "none":
            raise ValueError("model.freeze_text_tower=true needs modality towers "
                             "(model.tower_split=role|modality, model.block=mot)")
        if self.rope_scaling not in ROPE_SCALINGS:
            raise ValueError(f"model.rope_scaling='{self.rope_scaling}' not in {ROPE_SCALINGS}")
        if self.rope_scaling != "none" and self.rope_factor <= 0:
            raise ValueError(f"model.rope_factor must be positive, got {self.rope_factor}")
        if self.rope_scaling == "llama3" and not (
                0 < self.rope_low_freq_factor < self.rope_high_freq_factor and self.rope_original_max_len > 0):
            raise ValueError("model.rope_scaling=llama3 needs 0 < rope_low_freq_factor < rope_high_freq_factor "
                             "and rope_original_max_len > 0")
        self._validate_moe()
        return self

    def _validate_moe(self) -> None:
        if self.moe_experts < 0:
            raise ValueError(f"model.moe_experts must be >= 0, got {self.moe_experts}")
        if self.block in ("moe", "motmoe") and self.moe_experts == 0:
            raise ValueError(f"model.block={self.block} needs model.moe_experts > 0")
        if self.moe_experts == 0:
            return
        if not 1 <= self.moe_top_k <= self.moe_experts:
            raise ValueError(f"model.moe_top_k={self.moe_top_k} must be in [1, moe_experts={self.moe_experts}]")
        if self.moe_score not in ("softmax", "sigmoid"):
            raise ValueError(f"model.moe_score='{self.moe_score}' not in ('softmax', 'sigmoid')")
        if self.moe_experts_impl not in ("grouped", "loop"):
            raise ValueError(f"model.moe_experts_impl='{self.moe_experts_impl}' not in ('grouped', 'loop')")
        for name in ("moe_ffn_dim", "moe_shared_experts", "moe_capacity_factor", "moe_aux_loss_weight",
                     "moe_z_loss_weight", "moe_bias_update_rate"):
            if getattr(self, name) < 0:
                raise ValueError(f"model.{name} must be >= 0, got {getattr(self, name)}")
        if self.moe_every < 1:
            raise ValueError(f"model.moe_every must be >= 1, got {self.moe_every}")
