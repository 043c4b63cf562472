# Blocks of the unified transformer: RMSNorm, RoPE, SwiGLU, grouped-query attention, timestep MLP.
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from mmgen.models.attention import AttentionMask, attend
from mmgen.models.kv_cache import LayerKV


def _trunc_normal(weight: torch.Tensor, std: float) -> None:
    nn.init.trunc_normal_(weight, mean=0.0, std=std, a=-3 * std, b=3 * std)


class _ScatterAddLookup(torch.autograd.Function):
    """``F.embedding`` whose backward is one ``index_add_`` into a zero gradient. torch's CUDA
    embedding backward (the sort-based kernel used above 3,072 ids) reads a segment count back
    to the host: a device synchronisation at the very end of every backward, after which the
    GPU idles while the host queues the optimizer step and the next step's inputs."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(ids)
        ctx.weight_shape, ctx.weight_dtype = weight.shape, weight.dtype
        return F.embedding(ids, weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (ids,) = ctx.saved_tensors
        grad_weight = grad.new_zeros(ctx.weight_shape, dtype=ctx.weight_dtype)
        grad_weight.index_add_(0, ids.reshape(-1), grad.reshape(-1, grad.shape[-1]).to(ctx.weight_dtype))
        return grad_weight, None


class Embedding(nn.Embedding):
    """``nn.Embedding`` (same parameter, same state-dict key) that trains without a host sync on
    CUDA (:class:`_ScatterAddLookup`; its atomic adds sum in no fixed order, so under
    ``trainer.deterministic`` and on CPU torch's own lookup runs)."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        plain = (self.padding_idx is not None or self.max_norm is not None or self.scale_grad_by_freq
                 or self.sparse)
        if (ids.is_cuda and self.weight.requires_grad and torch.is_grad_enabled() and not plain
                and not torch.are_deterministic_algorithms_enabled()):
            return _ScatterAddLookup.apply(self.weight, ids)
        return super().forward(ids)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)

    def init_weights(self) -> None:
        nn.init.ones_(self.weight)


# ---------------------------------------------------------------- rotary position embedding

@dataclass(frozen=True)
class RopeScaling:
    """Frequency scaling of a long-context RoPE (the forms Hugging Face configs name).

    Args:
        kind: "linear" (every frequency divided by ``factor``) or "llama3" (Llama 3.1: long
            wavelengths divided by ``factor``, short ones kept, a smooth blend between).
        factor, low_freq_factor, high_freq_factor, original_max_len: Llama 3.1's parameters
            (``original_max_len``: the pretraining context).
    """

    kind: str
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_len: int = 8192

    def apply(self, inv_freq: torch.Tensor) -> torch.Tensor:
        if self.kind == "linear":
            return inv_freq / self.factor
        if self.kind != "llama3":
            raise ValueError(f"RoPE scaling '{self.kind}' is not supported (linear, llama3)")
        wavelen = 2 * math.pi / inv_freq
        low_wavelen = self.original_max_len / self.low_freq_factor
        high_wavelen = self.original_max_len / self.high_freq_factor
        smooth = (self.original_max_len / wavelen - self.low_freq_factor) / (
            self.high_freq_factor - self.low_freq_factor)
        blended = (1 - smooth) * inv_freq / self.factor + smooth * inv_freq
        out = torch.where(wavelen > low_wavelen, inv_freq / self.factor, inv_freq)
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, blended, out)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float,
                 scaling: RopeScaling | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables ``[B, 1, L, head_dim / 2]`` (fp32) for 1-D RoPE at ``positions``.

    Computed from positions on the fly rather than cached: positions restart in every packed
    document, and a buffer would have to be re-made after a meta-device build.

    Args:
        positions: ``[B, L]`` position ids.
        head_dim: width of one attention head.
        theta: the RoPE base.
        scaling: long-context frequency scaling (None: plain RoPE).
    """
    half = head_dim // 2
    inv_freq = theta ** (-torch.arange(half, device=positions.device, dtype=torch.float32) / half)
    if scaling is not None:
        inv_freq = scaling.apply(inv_freq)
    angles = positions.float()[:, None, :, None] * inv_freq
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE (the Llama / megatron-core layout) on ``[B, H, L, D]``; math in fp32."""
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.type_as(x)


# ---------------------------------------------------------------- attention and FFN

class Attention(nn.Module):
    """Grouped-query self-attention: projections, optional qk-norm, RoPE, masked attention."""

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, qk_norm: bool, norm_eps: float,
                 head_dim: int | None = None, qkv_bias: bool = False):
        """``head_dim``: None = ``dim // n_heads``; ``qkv_bias``: biases on q/k/v (Qwen2)."""
        super().__init__()
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.head_dim = head_dim or dim // n_heads
        self.wq = nn.Linear(dim, n_heads * self.head_dim, bias=qkv_bias)
        self.wk = nn.Linear(dim, n_kv_heads * self.head_dim, bias=qkv_bias)
        self.wv = nn.Linear(dim, n_kv_heads * self.head_dim, bias=qkv_bias)
        self.wo = nn.Linear(n_heads * self.head_dim, dim, bias=False)
        self.q_norm = RMSNorm(self.head_dim, norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, norm_eps) if qk_norm else None

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                mask: AttentionMask, kv: LayerKV | None = None) -> torch.Tensor:
        """``x`` ``[B, L, dim]``. With ``kv`` (incremental decoding), this call's keys/values
        are appended to the layer's cache and the queries attend over the whole cached
        history; ``mask`` then has one column per cached slot (``[B, 1, L, slots]``)."""
        b, length, _ = x.shape
        q = self.wq(x).view(b, length, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(b, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(b, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if kv is not None:
            k, v = kv.update(k, v)       # cached before the GQA expansion (inside attend)
        out = attend(q, k, v, mask)
        return self.wo(out.transpose(1, 2).reshape(b, length, -1))

    def init_weights(self, std: float, out_std: float) -> None:
        for lin in (self.wq, self.wk, self.wv):
            _trunc_normal(lin.weight, std)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)
        _trunc_normal(self.wo.weight, out_std)
        for norm in (self.q_norm, self.k_norm):
            if norm is not None:
                norm.init_weights()


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)   # gate
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)   # up
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)   # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))

    def init_weights(self, std: float, out_std: float) -> None:
        _trunc_normal(self.w1.weight, std)
        _trunc_normal(self.w3.weight, std)
        _trunc_normal(self.w2.weight, out_std)


# ---------------------------------------------------------------- diffusion timestep

def timestep_features(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features ``[S, dim]`` of flow times ``t`` in [0, 1].

    t is scaled by 1000 first: with t in [0, 1] most frequencies would barely move over the
    whole range, leaving the MLP a nearly constant input (DiT/SD3 use the same scale).
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) *
                      torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = (t.float() * 1000.0)[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], dim=-1)


class TimestepEmbedding(nn.Module):
    def __init__(self, freq_dim: int, dim: int):
        super().__init__()
        self.freq_dim = freq_dim
        self.fc1 = nn.Linear(freq_dim, dim)
        self.fc2 = nn.Linear(dim, dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        feats = timestep_features(t, self.freq_dim).to(self.fc1.weight.dtype)
        return self.fc2(F.silu(self.fc1(feats)))

    def init_weights(self, std: float) -> None:
        _trunc_normal(self.fc1.weight, std)
        _trunc_normal(self.fc2.weight, std)
        nn.init.zeros_(self.fc1.bias)
        nn.init.zeros_(self.fc2.bias)
