# Model FLOPs of a training step counted from the batch (DESIGN.md contract 8), for MFU and baselines.
"""The work the model must do on *this* batch, not a per-token estimate.

Counting rules (one convention, so numbers compare across families, layouts and baselines):

* A matmul of ``n`` input rows of width ``a`` with an ``[a, b]`` weight is ``2 n a b`` FLOPs.
  Biases, norms, RoPE, softmax, activations and embedding lookups are elementwise (O(n d)) and
  not counted.
* Trunk linear layers (attention q/k/v/o with their GQA widths, the three SwiGLU matmuls) run
  once per **non-padding** position. The dense kernels also compute padding, but that is not
  model work, so a badly packed batch shows up as lower MFU.
* Each head only where it runs: the text (LM) head at positions with a next-token target
  (``targets != IGNORE_INDEX``), the visual input projection ``patch_in`` at continuous visual
  positions, the visual head ``visual_out`` there too when the model has it (the "flow" head
  in ``model.heads``), the timestep MLP once per span.
* The per-token MLP denoiser (the "mar" head, MAR / Harmon: ``mmgen/models/heads.py``
  ``MARDenoiser``) once per noised row it is given: ``objective.mar_draws`` rows per masked
  position. Its matmuls per row (:func:`mar_row_flops`): the input projection
  (``patch_dim -> w``), the time MLP (``timestep_dim -> w -> w``), the conditioning
  projection (``dim -> w``), per AdaLN block the modulation (``w -> 3w``) and the two MLP
  layers (``w -> w``), the final modulation (``w -> 2w``) and the output (``w -> patch_dim``).
  Which positions are masked is drawn inside the objective, after the host counted the step,
  so this term is an **expectation**: ``BatchWork.denoiser_rows`` holds the expected number
  of rows (``mmgen.objectives.mar.expected_masked``: exact for MAR's truncated-normal ratio
  and its ``ceil``, >= 1 clamp), and the term is rounded to an integer. A run's sum over many
  steps is then right on average, one step's figure is not the FLOPs of that exact draw.
* Attention per **allowed** (query, key) pair of the mask, per layer: QK^T and AV are two
  matmuls of ``2 * head_dim`` FLOPs per pair and query head, so ``4 * head_dim * n_heads``.
  Under GQA every query head still scores every key, so it is ``n_heads``, not ``n_kv_heads``.
  Pairs follow the rule of ``mmgen/models/attention.py`` (same document, causal, plus full
  attention inside a span); the self-pair a padding position keeps (so no softmax row is
  empty) is not counted.
* Mixture-of-Experts layers (``mmgen/models/moe.py``) count **active** parameters only: per
  non-padding position the router (``2 d E``), ``top_k`` routed experts and the shared experts
  (``3 * 2 d moe_ffn_dim`` each), whatever the number of experts. Assignments a capacity
  factor drops are still counted (the batch does not say which), so MFU under token dropping
  is a slight overestimate; dropless runs count exactly.
* Training = forward + backward = 3 x forward (the backward computes gradients with respect
  to the inputs and to the weights, each costing one forward). Recomputation by activation
  checkpointing is work the hardware does, not model FLOPs: MFU does not rise when it is on.
* Modality towers (``model.block=mot``): a position runs the linear layers of its own tower
  only, and every tower has the block's shape, so it costs one tower's FLOPs; the counts above
  hold as they are (towers add parameters, not work per position).
"""
from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass

import torch

from mmgen.batch import IGNORE_INDEX, MultimodalBatch
from mmgen.models.config import ModelConfig
from mmgen.models.moe import moe_layer_ids

# forward + backward (inputs and weights); see the module docstring
TRAINING_MULTIPLIER = 3


@dataclass(frozen=True)
class BatchWork:
    """What a batch asks of the model, in counts (no model shape involved).

    Args:
        positions: all positions, padding included (``B * L``).
        tokens: non-padding positions (the trunk's linear layers run here).
        text_targets: positions where the text head runs.
        visual_positions: continuous visual positions (``patch_in`` and ``visual_out``).
        spans: timestep MLP evaluations (one per span of the span table).
        attention_pairs: allowed (query, key) pairs of the mask, padding excluded.
        denoiser_rows: rows the "mar" denoiser runs on (draws x masked positions); an expected
            value, hence a float (module docstring). 0 for every other family.
    """

    positions: int
    tokens: int
    text_targets: int
    visual_positions: int
    spans: int
    attention_pairs: int
    denoiser_rows: float = 0.0


def attention_pairs(document_ids: torch.Tensor, span_ids: torch.Tensor,
                    full: torch.Tensor | None = None, hidden: torch.Tensor | None = None) -> int:
    """Allowed (query, key) pairs of the mask rule in ``mmgen.models.attention``, by arithmetic.

    A document of ``n`` positions gives ``n (n + 1) / 2`` causal pairs wherever its positions
    lie in the row (query ``q`` sees the keys of its document at or before it); the ``m``
    positions of one FULL span inside one document add the ``m (m - 1) / 2`` pairs with the key
    after the query (a CAUSAL span adds none); a span hidden from later positions removes the
    pairs of every later position of its document outside the span with each of its keys.
    O(B * L) on the host (plus one pass per hidden span) instead of ``B * L * L`` booleans.

    Args:
        document_ids: ``[B, L]`` long, -1 for padding.
        span_ids: ``[B, L]`` long, -1 outside visual spans.
        full, hidden: ``[B, L]`` bool per position (``mmgen.models.attention.MaskLayout``);
            default: every span FULL and visible (v1's rule).
    """
    document_ids, span_ids = document_ids.cpu(), span_ids.cpu()
    valid = document_ids >= 0
    if not valid.any():
        return 0
    full = (span_ids >= 0) if full is None else full.cpu()
    # document ids are only unique within a row: key each document by (row, id) in one integer
    stride = int(document_ids.max()) + 1
    doc_key = torch.arange(document_ids.shape[0])[:, None] * stride + document_ids
    n = torch.bincount(doc_key[valid])
    # a span id names one span of the batch; keyed with its document in case it crossed one
    span_key = span_ids * (stride * document_ids.shape[0]) + doc_key
    _, m = torch.unique(span_key[valid & (span_ids >= 0) & full], return_counts=True)
    pairs = int((n * (n + 1) // 2).sum() + (m * (m - 1) // 2).sum())
    if hidden is not None and bool(hidden.any()):
        hidden = hidden.cpu() & valid
        for key in torch.unique(span_key[hidden]).tolist():
            where = (span_key == key) & hidden
            row = int(where.any(1).nonzero()[0])
            same_doc = document_ids[row] == document_ids[row][where[row]][0]
            later = same_doc.flip(-1).cumsum(-1).flip(-1) - same_doc.long()  # same-doc positions after
            size = int(where[row].sum())
            pairs -= int(later[where[row]].sum()) - size * (size - 1) // 2   # less those inside the span
    return pairs


def mask_pairs(mask: torch.Tensor, document_ids: torch.Tensor | None = None) -> int:
    """Allowed pairs of an arbitrary boolean mask (True = attend), e.g. a dense SDPA mask.

    Args:
        mask: ``[B, 1, L, L]`` or ``[B, L, L]`` bool, query along dim -2, key along dim -1.
        document_ids: ``[B, L]``; when given, rows of padding queries (``-1``) are not counted.
    """
    mask = mask.reshape(-1, *mask.shape[-2:]) if mask.dim() == 4 else mask
    if document_ids is not None:
        mask = mask & (document_ids >= 0)[:, :, None].to(mask.device)
    return int(mask.sum())


def batch_work(batch: MultimodalBatch) -> BatchWork:
    """The counts of :class:`BatchWork` for ``batch``; reads host tensors (no device sync when
    called before ``batch.to(device)``).

    Args:
        batch: a packed batch.
    """
    from mmgen.models.attention import mask_layout

    layout = mask_layout(batch)
    return BatchWork(
        positions=batch.tokens.numel(),
        tokens=int((batch.document_ids >= 0).sum()),
        text_targets=int((batch.targets != IGNORE_INDEX).sum()),
        visual_positions=int(batch.continuous_mask().sum()),
        spans=len(batch.spans),
        attention_pairs=attention_pairs(layout.document_ids, layout.span_ids, layout.full, layout.hidden))


def forward_flops(cfg: ModelConfig, work: BatchWork) -> dict[str, int]:
    """Forward FLOPs of ``work`` on the model shape ``cfg``, by part (the module docstring's rules).

    Args:
        cfg: the model shape.
        work: what the batch asks (:func:`batch_work`).
    """
    d, hd = cfg.dim, cfg.head_dim
    q_width, kv_width = cfg.n_heads * hd, cfg.n_kv_heads * hd
    per_position = (2 * d * q_width + 2 * 2 * d * kv_width + 2 * q_width * d   # q, k, v, o
                    + 3 * 2 * d * cfg.ffn_dim)                                # SwiGLU w1, w3, w2
    linear = cfg.n_layers * per_position * work.tokens
    n_moe = len(moe_layer_ids(cfg))
    if n_moe:
        # an MoE layer swaps the dense SwiGLU for router + the experts a token actually runs
        hidden = cfg.moe_ffn_dim or cfg.ffn_dim
        moe_ffn = 2 * d * cfg.moe_experts + (cfg.moe_top_k + cfg.moe_shared_experts) * 3 * 2 * d * hidden
        linear += n_moe * (moe_ffn - 3 * 2 * d * cfg.ffn_dim) * work.tokens
    parts = {
        "linear": linear,
        "attention": cfg.n_layers * 2 * 2 * hd * cfg.n_heads * work.attention_pairs,
        "text_head": 2 * d * cfg.vocab_size * work.text_targets,
        "visual_in": 2 * cfg.patch_dim * d * work.visual_positions,
        "visual_head": 2 * d * cfg.patch_dim * work.visual_positions if "flow" in cfg.heads else 0,
        "timestep": 2 * (cfg.timestep_dim * d + d * d) * work.spans,
    }
    if "mar" in cfg.heads:
        parts["mar_head"] = round(mar_row_flops(cfg) * work.denoiser_rows)
    return parts


def mar_row_flops(cfg: ModelConfig) -> int:
    """Forward FLOPs of the "mar" denoiser (``MARDenoiser``) on one noised row: its matmuls
    (the module docstring lists them), ``2 a b`` per ``[a, b]`` weight.

    Args:
        cfg: the model shape (``mar_width``, ``mar_depth``, ``dim``, ``patch_dim``, ``timestep_dim``).
    """
    w, p = cfg.mar_width, cfg.patch_dim
    embed = 2 * p * w + 2 * (cfg.timestep_dim * w + w * w) + 2 * cfg.dim * w   # input, time MLP, cond
    blocks = cfg.mar_depth * 2 * (w * 3 * w + w * w + w * w)                     # ada, fc1, fc2
    return embed + blocks + 2 * w * 2 * w + 2 * w * p                            # final ada, out


def training_flops(cfg: ModelConfig, batch: MultimodalBatch | BatchWork) -> int:
    """Model FLOPs of one training pass (forward + backward) over ``batch``.

    Args:
        cfg: the model shape.
        batch: a packed batch, or its :class:`BatchWork` (e.g. with another pair count).
    """
    if cfg.family != "transformer":
        return TRAINING_MULTIPLIER * codec_batch_flops(cfg, batch)
    work = batch if isinstance(batch, BatchWork) else batch_work(batch)
    return TRAINING_MULTIPLIER * sum(forward_flops(cfg, work).values())


def unit_costs(cfg: ModelConfig) -> dict[str, float]:
    """Training FLOPs of one unit of each :class:`BatchWork` count (one position, one allowed
    attention pair, one text target, ...) on the model shape ``cfg``: the coefficients of this
    module's model, linear in the counts, for estimating a document's compute before it is
    packed (``mmgen.data.pack.DocumentCost``).

    Args:
        cfg: the model shape.
    """
    fields = ("tokens", "attention_pairs", "text_targets", "visual_positions", "spans")
    out = {}
    for f in fields:
        work = BatchWork(positions=0, **{g: int(g == f) for g in fields})
        out[f] = float(TRAINING_MULTIPLIER * sum(forward_flops(cfg, work).values()))
    return out


def codec_batch_flops(cfg: ModelConfig, batch: MultimodalBatch) -> int:
    """Forward FLOPs of a codec family (``model.family`` vae / vq) on the batch's frames: every
    continuous span's frames, at the pixel size its grid and pixel patches give."""
    from mmgen.batch import CONTINUOUS

    dim = batch.patches.shape[1] if batch.patches.dim() == 2 else 0
    p = int(round((dim / cfg.autoencoder.in_channels) ** 0.5))
    total = 0
    for kind, (t, gh, gw) in zip(batch.spans.kind.tolist(), batch.spans.grid.tolist()):
        if kind == CONTINUOUS:
            total += t * codec_frame_flops(cfg.family, json.dumps(dataclasses.asdict(cfg.autoencoder)),
                                           gh * p, gw * p)
    return total


@functools.lru_cache(maxsize=64)
def codec_frame_flops(family: str, autoencoder: str, h: int, w: int) -> int:
    """Convolution FLOPs (``2 * k*k*Cin/groups * Cout`` per output pixel) of one ``h x w`` frame
    through the codec's encoder and decoder, traced once on the meta device (no memory, no
    compute); ``autoencoder`` is the shape as JSON (a hashable cache key)."""
    from mmgen.models import CODEC_MODELS
    from mmgen.models.codecs.config import AutoencoderConfig

    cfg = AutoencoderConfig(**json.loads(autoencoder))
    total = 0

    def count(mod, _inp, out):
        nonlocal total
        k = mod.kernel_size[0] * mod.kernel_size[1] * mod.in_channels // mod.groups
        total += 2 * k * mod.out_channels * out.shape[-2] * out.shape[-1]

    with torch.device("meta"):
        model = CODEC_MODELS[family](cfg)
        hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
        with torch.no_grad():
            model.decoder(model.encoder(torch.empty(1, cfg.in_channels, h, w))[:, :cfg.latent_channels])
    for hk in hooks:
        hk.remove()
    return total
