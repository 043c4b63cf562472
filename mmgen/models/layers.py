# Blocks of the unified transformer: RMSNorm, RoPE, SwiGLU, grouped-query attention, timestep MLP.
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from mmgen.models.attention import AttentionMask, attend
from mmgen.models.kv_cache import LayerKV


def _trunc_normal(weight: torch.Tensor, std: float) -> None:
    nn.init.trunc_normal_(weight, mean=0.0, std=std, a=-3 * std, b=3 * std)


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

def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables ``[B, 1, L, head_dim / 2]`` (fp32) for 1-D RoPE at ``positions``.

    Computed from positions on the fly rather than cached: positions restart in every packed
    document, and a buffer would have to be re-made after a meta-device build.
    """
    half = head_dim // 2
    inv_freq = theta ** (-torch.arange(half, device=positions.device, dtype=torch.float32) / half)
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

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, qk_norm: bool, norm_eps: float):
        super().__init__()
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.head_dim = dim // n_heads
        self.wq = nn.Linear(dim, n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
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
