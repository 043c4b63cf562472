# Start-up checks of a megatron layout against the architecture: pure arithmetic, no megatron import.
"""Called from the job's validation (``ParallelConfig.validate_model``), before any process
group or model exists, so a layout that cannot work stops the run with one line and exit 2.
That the degrees multiply to the world size is checked where the world is known
(``ParallelDims.from_config``)."""
from __future__ import annotations

import dataclasses

# the ModelConfig fields this backend maps; a field added later (biases, rope scaling, ...) is
# accepted only at its default value, so nothing is silently dropped from the megatron form
MAPPED_FIELDS = frozenset({
    "name", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size", "patch_dim", "max_grid",
    "visual_pos", "rope_theta", "norm_eps", "qk_norm", "tie_embeddings", "init_std", "attention",
    "timestep_dim", "block", "heads",
    # Hugging Face architectures (model=hf:<dir>): q/k/v biases in the fused QKV, a head width
    # other than dim // n_heads (the blocks use head_dim throughout), the plain model's RoPE
    # scaling; from_hf only names where the shape was read
    "qkv_bias", "attention_head_dim", "rope_scaling", "rope_factor", "rope_low_freq_factor",
    "rope_high_freq_factor", "rope_original_max_len", "from_hf"})
# MoE fields: mmgen's own router and experts run under megatron (moe.py), so all of them are
# mapped as they are
MOE_FIELDS = frozenset({
    "moe_experts", "moe_top_k", "moe_score", "moe_norm_topk", "moe_ffn_dim", "moe_shared_experts", "moe_every",
    "moe_capacity_factor", "moe_aux_loss_weight", "moe_z_loss_weight", "moe_bias_update_rate",
    "moe_experts_impl"})
BLOCKS = ("dense", "moe")


def check_model(parallel, model, seq_len: int) -> None:
    """Raise ValueError (one line) when ``model`` cannot be split as ``parallel`` asks.

    Args:
        parallel: the ParallelConfig (``tp``, ``pp``, ``sequence_parallel``).
        model: the ModelConfig.
        seq_len: ``data.seq_len`` (packed row length).
    """
    tp, pp = parallel.tp, parallel.pp
    defaults = type(model)()
    for field in dataclasses.fields(model):
        value = getattr(model, field.name)
        if field.name not in MAPPED_FIELDS | MOE_FIELDS and value != getattr(defaults, field.name):
            raise ValueError(f"parallel=megatron does not map model.{field.name}={value!r} yet (only its default "
                             f"{getattr(defaults, field.name)!r}); use parallel=ddp|fsdp2 for this model")
    if model.block not in BLOCKS:
        raise ValueError(f"parallel=megatron builds model.block=dense|moe, not model.block='{model.block}'")
    check_experts(parallel, model, seq_len)
    for name in ("n_heads", "n_kv_heads", "ffn_dim"):
        value = getattr(model, name)
        if value % tp:
            raise ValueError(f"model.{name}={value} is not divisible by parallel.tp={tp} (tensor parallelism "
                             f"splits {'heads' if 'heads' in name else 'FFN units'} over the TP ranks)")
    if model.n_layers % pp:
        raise ValueError(f"model.n_layers={model.n_layers} is not divisible by parallel.pp={pp} (each pipeline "
                         f"stage holds the same number of blocks)")
    if pp > 1 and model.tie_embeddings:
        raise ValueError("model.tie_embeddings=true with parallel.pp > 1 is not supported (the embedding and the "
                         "LM head live on different pipeline stages)")
    if parallel.sequence_parallel and seq_len % tp:
        raise ValueError(f"data.seq_len={seq_len} is not divisible by the sequence-parallel degree "
                         f"parallel.tp={tp} (parallel.sequence_parallel=true splits the sequence over TP ranks)")


def check_experts(parallel, model, seq_len: int) -> None:
    """The MoE part of :func:`check_model` (expert parallelism; ValueError, one line)."""
    ep = getattr(parallel, "ep", 1)
    if model.block != "moe":
        if ep > 1:
            raise ValueError(f"parallel.ep={ep} needs an MoE model (model.block=moe), not model.block='{model.block}'")
        return
    if model.moe_experts % ep:
        raise ValueError(f"model.moe_experts={model.moe_experts} is not divisible by parallel.ep={ep} (each "
                         f"expert-parallel rank holds the same number of experts)")
    if parallel.pp > 1:
        raise ValueError("parallel=megatron with MoE blocks and parallel.pp > 1 is not supported yet (the "
                         "auxiliary losses of earlier stages would not reach the loss)")
    if parallel.tp > 1 and not parallel.sequence_parallel:
        # megatron's MoE layer asks the same; measured here without SP: grad norm off by 3.4e-6
        raise ValueError(f"parallel=megatron with MoE blocks and parallel.tp={parallel.tp} needs "
                         f"parallel.sequence_parallel=true (each TP rank dispatches its own tokens)")
    if parallel.tp > 1 and seq_len % parallel.tp:
        raise ValueError(f"data.seq_len={seq_len} is not divisible by parallel.tp={parallel.tp} (with MoE blocks "
                         f"each TP rank dispatches 1/tp of the tokens)")
