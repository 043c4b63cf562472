# The CPU compatibility layer: what megatron-core 0.16.1 needs to run on a CPU with gloo (process-global).
"""megatron-core assumes CUDA everywhere: ``torch.cuda.current_device()`` in ~175 places,
``device="cuda"`` / ``.cuda()`` in its schedules, optimizers and mask helpers, CUDA streams in
its DDP, and ``Tensor.type() == "torch.cuda.FloatTensor"`` checks in its optimizers. On a
machine without CUDA this module makes those calls mean "the CPU" (PLATFORM.md, "megatron-core
on CPU"), and mends two megatron bugs that show only without Transformer Engine.

:func:`apply` is called by the megatron backend only when the run's device is the CPU; it is
process-global (it patches ``torch.cuda`` and installs a ``TorchFunctionMode``) and idempotent.
:data:`PATCHED` names every megatron function whose behaviour this relies on, with the
fragment of its source the patch answers to; :func:`check_megatron_sources` fails with one
line naming the function when an upgrade changed it (tests/test_megatron.py runs it).
"""
from __future__ import annotations

import contextlib
import importlib
import inspect

import torch
from torch.overrides import TorchFunctionMode

MEGATRON_VERSION = "0.16.1"

# megatron function -> a source fragment whose presence means the patch below still applies
PATCHED: dict[str, str] = {
    # torch.cuda.current_device() as a device argument: patched to return the CPU device
    "megatron.core.tensor_parallel.layers:ColumnParallelLinear.__init__": "torch.cuda.current_device()",
    "megatron.core.pipeline_parallel.p2p_communication:P2PCommunicator._communicate_shapes":
        "torch.cuda.current_device()",
    # a communication stream at DDP construction: patched to a do-nothing stream
    "megatron.core.distributed.distributed_data_parallel:DistributedDataParallel.__init__":
        "torch.cuda.Stream(",
    # stream contexts around gradient collectives: no-op stream and context
    "megatron.core.distributed.param_and_grad_buffer:_ParamAndGradBucketGroup.start_grad_sync":
        "torch.cuda.stream(",
    # torch.cuda.synchronize() before freeing buffers: a no-op
    "megatron.core.distributed.distributed_data_parallel:DistributedDataParallel.offload_grad_buffers":
        "torch.cuda.synchronize()",
    # dtype checks spelled as CUDA tensor type names: Tensor.type() reports them on the CPU
    "megatron.core.optimizer.distrib_optimizer:DistributedOptimizer._build_model_and_main_param_groups":
        "'torch.cuda.FloatTensor'",
    "megatron.core.optimizer.optimizer:Float16OptimizerWithFloat16Params.__init__":
        "'torch.cuda.FloatTensor'",
    # device='cuda' in tensor factories: mapped to the CPU by the function mode
    "megatron.core.optimizer.clip_grads:get_grad_norm_fp32": "device='cuda'",
    # bug 1 (no TE): maybe_move_tensor_to_cpu leaves CPU split sizes as tensors when as_numpy
    "megatron.core.transformer.moe.moe_utils:maybe_move_tensor_to_cpu": "if torch.is_tensor(tensor) and tensor.is_cuda:",
}

_applied = False


class _CudaIsCpu(TorchFunctionMode):
    """Maps CUDA device requests to the CPU: ``device="cuda"`` in factories, ``.to("cuda")``,
    ``.cuda()``; and makes ``Tensor.type()`` spell a CPU tensor's type with ``torch.cuda.``, the
    names megatron's optimizers compare against."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if not name.startswith("torch.cuda.") else name
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs["device"] = "cpu"
        if func in (torch.Tensor.to,) and args and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


def _is_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return False


class _NoStream:
    """Stands for a CUDA stream or event on the CPU: every operation is already in order."""

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, *args, **kwargs):
        return _NoStream()

    def record(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True


def _move_to_cpu_fixed(tensor, as_numpy: bool = False, record_stream: bool = False):
    # megatron's version returns CPU tensors unchanged even when as_numpy is asked for, and
    # all_to_all_single then receives tensor split sizes
    if torch.is_tensor(tensor):
        tensor = tensor.to("cpu")
        if as_numpy:
            tensor = tensor.numpy()
    return tensor


def apply() -> None:
    """Make megatron-core run on the CPU (process-global, idempotent; call before the first
    megatron call of a CPU run, never on a CUDA machine)."""
    global _applied
    if _applied:
        return
    if torch.cuda.is_available():
        raise RuntimeError("the megatron CPU compatibility layer must not be applied when CUDA is available")
    cpu = torch.device("cpu")
    torch.cuda.current_device = lambda: cpu
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.Stream = _NoStream
    torch.cuda.Event = _NoStream
    torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()
    torch.cuda.current_stream = lambda *a, **k: _NoStream()
    torch.cuda.default_stream = lambda *a, **k: _NoStream()
    _CudaIsCpu().__enter__()   # stays on for the process: megatron calls reach it anywhere

    import megatron.core.extensions.transformer_engine as te_ext  # noqa: F401 - defines te_general_gemm=None
    moe_utils = importlib.import_module("megatron.core.transformer.moe.moe_utils")
    if not hasattr(moe_utils, "te_general_gemm"):   # bug 2 (no TE): referenced, never defined
        moe_utils.te_general_gemm = None
    moe_utils.maybe_move_tensor_to_cpu = _move_to_cpu_fixed
    dispatcher = importlib.import_module("megatron.core.transformer.moe.token_dispatcher")
    dispatcher.maybe_move_tensor_to_cpu = _move_to_cpu_fixed
    _applied = True


def is_applied() -> bool:
    return _applied


def check_megatron_sources() -> None:
    """Raise RuntimeError naming the first megatron function in :data:`PATCHED` that is gone
    or no longer contains the fragment this layer answers to (a megatron-core upgrade)."""
    import megatron.core

    version = getattr(megatron.core, "__version__", "?")
    for target, fragment in PATCHED.items():
        module_name, qualname = target.split(":")
        try:
            obj = importlib.import_module(module_name)
            for part in qualname.split("."):
                obj = getattr(obj, part)
            source = inspect.getsource(obj)
        except (ImportError, AttributeError, OSError, TypeError) as e:
            raise RuntimeError(f"megatron-core {version}: {target} is gone ({type(e).__name__}); "
                               f"mmgen/parallel/megatron/cpu_compat.py was written for {MEGATRON_VERSION}") from None
        if fragment not in source:
            raise RuntimeError(f"megatron-core {version}: {target} no longer contains {fragment!r}; re-check "
                               f"mmgen/parallel/megatron/cpu_compat.py (written for {MEGATRON_VERSION})")
