# Loading checkpoint files without running code (used by the backends and the checkpoint manager).
"""The trust rule (docs/checkpoints.md, "What loading may run"):

* mmgen's own files (``train_state.pt``, ``rank_*.pt``, DDP's ``model.pt``/``optimizer.pt``)
  hold tensors and plain values only and are read with ``torch.load(weights_only=True)``;
* formats whose files need pickle (DeepSpeed's shards, a checkpoint of mmgen v1) are first
  read with the same restricted unpickler, allowing only the few plain data classes the
  format uses (:func:`check_restricted`); a file that names anything else is opened with
  pickle only when it is trusted: ``checkpoint.trust=true`` (``--trust`` on ``mmgen export``
  and ``mmgen sample``), or, when resuming, a checkpoint that this run wrote into its own
  run directory.

Refusals and unreadable files raise :class:`CheckpointError`: one line that names the file
(entries print it and exit 2).
"""
from __future__ import annotations

import logging
import pickle
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from mmgen.errors import ConfigError

log = logging.getLogger(__name__)
TRUST_SWITCH = "checkpoint.trust=true"
TRUST_HINT = f"set {TRUST_SWITCH} (mmgen export/sample: --trust) only if you trust who wrote it"


class CheckpointError(ConfigError):
    """A checkpoint cannot be used as asked (damaged, unsafe to unpickle, not writable); the
    message is one line naming the file. A ConfigError, so entries print it without a
    traceback and exit 2."""


class UnsafeCheckpointError(CheckpointError):
    """A file would need pickle (it names a global the restricted unpickler refuses)."""


def refused_global(error: BaseException) -> str:
    """The global that torch's weights_only unpickler refused, from its message."""
    text = str(error)
    m = re.search(r"GLOBAL ([\w.]+)", text) or re.search(r"Unsupported global: ([\w.]+)", text)
    if m:
        return m.group(1)
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(error).__name__)
    return first[:160]


def refusal(path: Path | str, error: BaseException, what: str = "", trustable: bool = True) -> UnsafeCheckpointError:
    """The one-line error for a file that would need pickle (``trustable``: the trust
    switch would let it load; else the format never holds pickled objects)."""
    kind = f" ({what})" if what else ""
    fix = TRUST_HINT if trustable else "mmgen writes this file with tensors and plain values only: it is not mmgen's"
    return UnsafeCheckpointError(
        f"{path}: not loaded: it needs pickle for {refused_global(error)}{kind}, and unpickling can run "
        f"code; {fix}")


def unreadable(path: Path | str, error: BaseException) -> CheckpointError:
    first = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
    return CheckpointError(f"{path}: cannot be read ({first[:200]})")


def load_plain(path: Path | str, *, map_location: Any = "cpu", trust: bool = False,
               allow: Iterable = (), what: str = "", trustable: bool = True) -> Any:
    """``torch.load`` of a file that holds tensors and plain values (dicts, lists, tuples,
    numbers, strings, None).

    Args:
        path: the file.
        map_location: as for ``torch.load``.
        trust: fall back to full pickle when the restricted unpickler refuses the file.
        allow: classes (or ``(class, "module.Name")`` pairs) the restricted unpickler may build
            for this one load (``torch.serialization.safe_globals``).
        what: a few words on what would need pickle, for the refusal message.
        trustable: the refusal names the trust switch (False: files that never need pickle).

    Raises:
        UnsafeCheckpointError: the file needs pickle and ``trust`` is False.
        CheckpointError: the file is missing, empty or not a torch.save file.
    """
    try:
        with torch.serialization.safe_globals(list(allow)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if not trust:
            raise refusal(path, e, what, trustable) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise unreadable(path, e) from None
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as e:
        raise unreadable(path, e) from None


def allow_own(error: UnsafeCheckpointError, own: bool) -> None:
    """Raise ``error`` unless the file is this run's own (the trust rule's second case):
    then say so in a warning and let the caller unpickle it."""
    if not own:
        raise error
    log.warning("%s: loading it all the same: this run wrote it into its own run directory", str(error).split(";")[0])


def find_in_chain(exc: BaseException, cls: type) -> BaseException | None:
    """The first ``cls`` among ``exc``, its causes and contexts, and the per-rank failures
    of torch.distributed.checkpoint's CheckpointException."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, cls):
            return e
        todo += [e.__cause__, e.__context__]
        failures = getattr(e, "failures", None) or getattr(e, "_failures", None)
        if isinstance(failures, dict):
            todo += [f[0] if isinstance(f, tuple) else f for f in failures.values()]
    return None


def check_restricted(path: Path | str, allow: Iterable, what: str = "", own: bool = False) -> None:
    """Prove that a file another library opens with pickle would build nothing but tensors,
    plain values and the ``allow``-ed classes: read it with torch's restricted unpickler
    (storages memory-mapped, so large shards cost little). Pickle then runs the same opcodes
    on the same bytes, so it can reach no other global.

    Args:
        path: the file.
        allow: the classes the format may name.
        what: the format, for the refusal message.
        own: the file was written by this run into its own run directory: a refusal becomes a
            warning (the caller unpickles it).

    Raises:
        UnsafeCheckpointError: the file names another global (and ``own`` is False).
        CheckpointError: the file cannot be read.
    """
    try:
        _load_restricted(path, allow, what)
    except UnsafeCheckpointError as e:
        allow_own(e, own)


def _load_restricted(path: Path | str, allow: Iterable, what: str) -> None:
    with torch.serialization.safe_globals(list(allow)):
        try:
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError as e:
            raise refusal(path, e, what) from None
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise unreadable(path, e) from None
            try:  # an old (non-zip) torch.save file cannot be memory-mapped
                torch.load(path, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as e2:
                raise refusal(path, e2, what) from None
            except (RuntimeError, EOFError, OSError, ValueError) as e2:
                raise unreadable(path, e2) from None
        except (EOFError, OSError, ValueError) as e:
            raise unreadable(path, e) from None


class RestrictedUnpickler(pickle.Unpickler):
    """A plain ``pickle.Unpickler`` that resolves only the listed globals (the "restricting
    globals" recipe of Python's pickle documentation), for pickles that are not torch.save
    files (DCP's ``.metadata``).

    Args:
        file: the open binary file.
        allowed: ``{"module": {"Name", ...}}`` of classes and functions that may be built.
        dtypes: also resolve ``torch.<dtype>`` names (``torch.float32`` ...).
    """

    def __init__(self, file, allowed: dict[str, set[str]], dtypes: bool = True):
        super().__init__(file)
        self.allowed, self.dtypes = allowed, dtypes

    def find_class(self, module: str, name: str):
        if name in self.allowed.get(module, ()):
            return super().find_class(module, name)
        if self.dtypes and module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"Unsupported global: GLOBAL {module}.{name}")
