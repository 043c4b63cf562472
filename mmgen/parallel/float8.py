# FP8 training of the trunk's linear layers through torchao's Float8Linear (trainer.fp8).
"""``trainer.fp8=tensorwise|rowwise`` swaps the ``nn.Linear`` layers of the trunk's blocks
(``model.layers``: attention q/k/v/o projections, dense SwiGLU FFNs, MoE shared experts, each
tower's copies of them) for torchao's ``Float8Linear``: its forward casts the input and the
weight to float8 e4m3 with a dynamic scale (one per tensor, or one per row for ``rowwise``),
multiplies with ``torch._scaled_mm`` and returns the autocast dtype; the backward casts the
output gradient (e5m2 tensorwise, e4m3 rowwise) the same way. Weights, gradients and optimizer
states stay what they were (fp32 master weights, bf16 autocast): only the three matmuls of each
converted linear run in FP8.

What stays in bf16, and why:

* everything outside ``model.layers``: the token and patch embedders (``tok_embeddings``,
  ``patch_in``), the timestep MLP (``t_embedder``), the position table and the heads
  (``output``, ``visual_out``): small matmuls at the edges of the network where the FP8
  rounding costs the most accuracy for the least time (the text head is a gather plus a
  vocab-wide matmul on ~12% of positions; the timestep MLP runs once per span);
* the MoE router (an ``nn.Parameter``, not a linear: its logits decide discrete routing) and
  the routed experts (``Experts`` holds ``[E, d, h]`` weights run by ``torch._grouped_mm``;
  torchao's float8 grouped GEMM is a prototype that wants another weight layout);
* any linear whose in- or out-features is not a multiple of 16 (``_scaled_mm``'s constraint).

The swap runs on the meta-device model after expert parallelism and before activation
checkpointing, compile and FSDP (DESIGN.md 6's order): ``Float8Linear`` keeps the parameter
names and holds no extra state, so checkpoints, ``mmgen export`` and ``load_state_dict`` into
a plain model are unchanged. Backends: ``ddp`` and ``fsdp2`` (FSDP2 all-gathers the high-
precision weights; torchao's float8 all-gather stays off). DeepSpeed wraps its own linears'
parameters and megatron builds its own layers: both are refused.
"""
from __future__ import annotations

import dataclasses
import functools
import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

from mmgen.errors import ConfigError

log = logging.getLogger(__name__)

FP8_RECIPES = ("none", "tensorwise", "rowwise")   # torchao Float8LinearRecipeName values (and none)
FP8_BACKENDS = ("ddp", "fsdp2")
FP8_MIN_CAPABILITY = (8, 9)   # Ada / Hopper and newer: FP8 tensor cores
TRUNK_PREFIX = "layers."
GEMM_MULTIPLE = 16


def is_fp8_linear(module: nn.Module, fqn: str) -> bool:
    """The module filter: an ``nn.Linear`` inside the trunk's blocks, outside any MoE router,
    with both dimensions multiples of 16.

    Args:
        module: a module of the model.
        fqn: its name in the model (``layers.0.attention.wq``).
    """
    if not isinstance(module, nn.Linear) or not fqn.startswith(TRUNK_PREFIX):
        return False
    if ".router" in fqn:   # today a Parameter, not a Linear; kept out should that change
        return False
    return module.in_features % GEMM_MULTIPLE == 0 and module.out_features % GEMM_MULTIPLE == 0


def check_backend(fp8: str, backend: str) -> None:
    """ConfigError unless ``backend`` can run ``fp8`` (one line)."""
    if fp8 != "none" and backend not in FP8_BACKENDS:
        raise ConfigError(f"trainer.fp8={fp8} runs under parallel={' or '.join(FP8_BACKENDS)} (torchao's Float8Linear "
                          f"inside the plain model), not parallel={backend}: set trainer.fp8=none")


def check_device(fp8: str, emulate: bool, device: torch.device) -> None:
    """ConfigError when ``device`` has no FP8 tensor cores and emulation is off (one line)."""
    if emulate:
        return
    if device.type != "cuda":
        raise ConfigError(f"trainer.fp8={fp8} needs a CUDA GPU with FP8 tensor cores (compute capability >= "
                          f"{FP8_MIN_CAPABILITY[0]}.{FP8_MIN_CAPABILITY[1]}), this run is on {device.type}: set "
                          f"trainer.fp8=none, or trainer.fp8_emulate=true (emulated, no speed-up)")
    cap = torch.cuda.get_device_capability(device)
    if cap < FP8_MIN_CAPABILITY:
        raise ConfigError(f"trainer.fp8={fp8} needs FP8 tensor cores (compute capability >= "
                          f"{FP8_MIN_CAPABILITY[0]}.{FP8_MIN_CAPABILITY[1]}); {torch.cuda.get_device_name(device)} "
                          f"has {cap[0]}.{cap[1]}: set trainer.fp8=none")


def float8_config(fp8: str, emulate: bool = False):
    """torchao's ``Float8LinearConfig`` of recipe ``fp8`` (``emulate``: high-precision matmuls
    of the float8-rounded operands, for machines without FP8 GEMMs)."""
    from torchao.float8 import Float8LinearConfig

    config = Float8LinearConfig.from_recipe_name(fp8)
    return dataclasses.replace(config, emulate=True) if emulate else config


@functools.cache
def _trunk_linear_class() -> type:
    """``Float8Linear`` that passes a zero-row input through the plain linear: torchao's dynamic
    scale is an amax over the input, which fails on an empty tensor, and a modality tower may
    get no rows in a micro-batch (or a context-parallel slice). The output and the (zero)
    weight gradient are those of ``nn.Linear``, so DDP still sees every parameter used."""
    from torchao.float8.float8_linear import Float8Linear

    class TrunkFloat8Linear(Float8Linear):
        def forward(self, input: torch.Tensor) -> torch.Tensor:
            if input.numel() == 0:
                return F.linear(input, self.weight, self.bias)
            return super().forward(input)

    return TrunkFloat8Linear


def apply_float8(model: nn.Module, fp8: str, *, emulate: bool = False) -> list[str]:
    """Swap the trunk's eligible linears (:func:`is_fp8_linear`) for ``Float8Linear``, in place.

    Args:
        model: the plain model (meta device or materialised), before activation checkpointing
            and compile.
        fp8: ``trainer.fp8`` (``none`` does nothing).
        emulate: ``trainer.fp8_emulate``.

    Returns:
        the names of the converted linears.
    """
    if fp8 == "none":
        return []
    from torchao.float8 import convert_to_float8_training

    trunk = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith(TRUNK_PREFIX)]
    converted: list[str] = []

    def keep(module: nn.Module, fqn: str) -> bool:
        ok = is_fp8_linear(module, fqn)
        if ok:
            converted.append(fqn)
        return ok

    # torchao's entry point (it also patches an inductor fp8 codegen issue before any compile)
    convert_to_float8_training(model, module_filter_fn=keep, config=float8_config(fp8, emulate))
    if not converted:
        raise ConfigError(f"trainer.fp8={fp8}: no linear of model.layers has both dimensions multiples of "
                          f"{GEMM_MULTIPLE} (FP8 GEMMs need them): set trainer.fp8=none")
    cls = _trunk_linear_class()
    for name in converted:
        model.get_submodule(name).__class__ = cls   # same state, one more branch in forward
    log.info("fp8 %s%s: %d of %d trunk linears in float8 (%d kept in high precision: dims not multiples of %d)",
             fp8, " (emulated)" if emulate else "", len(converted), len(trunk), len(trunk) - len(converted),
             GEMM_MULTIPLE)
    return converted
