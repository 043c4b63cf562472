# Context manager that puts a model in inference mode and restores its train/eval state.
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn


@contextlib.contextmanager
def inference(model: nn.Module):
    """``model.eval()`` + ``torch.no_grad()`` for the block; the trainer's model comes back in
    whatever mode it was in (samplers are called from inside training)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)
