# The data pipeline's typed config (a Hydra structured config: flat, plain types only).
"""`DataConfig`: what the data pipeline receives, and nothing else (STYLE.md habit 4).

Shard existence is checked when the loader is built (``build_dataloader``), not here, so a
config can be validated on a machine that does not hold the data.
"""
from __future__ import annotations

from dataclasses import dataclass

# Framing tokens of the smallest image document: [BOS] [BOI] <image> [EOI] [EOS].
DOC_FRAME_TOKENS = 4


@dataclass
class DataConfig:
    name: str = "shapes"
    # A directory of *.tar, a glob, a brace pattern (shapes-{000000..000009}.tar), or several
    # of those joined by "::" (webdataset's separator). Relative paths resolve against the cwd.
    train_shards: str = "data/shapes/train"
    val_shards: str = "data/shapes/val"
    image_size: int = 32
    patch_size: int = 4
    seq_len: int = 256
    batch_size: int = 16            # packed rows per micro-batch per rank
    num_workers: int = 1            # DataLoader workers per rank; 0 = in the main process
    t2i_ratio: float = 0.5          # share of examples that are text->image; rest image->text
    caption_dropout: float = 0.1    # t2i examples with an emptied caption (for CFG)
    seed: int = 0
    shuffle_samples: bool = True
    tokenizer: str = "bytes"
    prefetch_factor: int = 2        # batches prefetched per worker (num_workers > 0 only)

    @property
    def image_tokens(self) -> int:
        """Visual positions of one image span."""
        return (self.image_size // self.patch_size) ** 2

    def validate(self) -> "DataConfig":
        """Raise ValueError (one line) on an inconsistent config; return self for chaining."""
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"data config: {msg}")

        need(self.image_size > 0 and self.patch_size > 0,
             f"image_size ({self.image_size}) and patch_size ({self.patch_size}) must be > 0")
        need(self.image_size % self.patch_size == 0,
             f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}")
        smallest = self.image_tokens + DOC_FRAME_TOKENS
        need(smallest <= self.seq_len,
             f"one image document needs {smallest} positions ({self.image_tokens} image tokens + "
             f"{DOC_FRAME_TOKENS} framing tokens) but seq_len is {self.seq_len}")
        need(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        need(self.num_workers >= 0, f"num_workers must be >= 0, got {self.num_workers}")
        need(self.prefetch_factor >= 1, f"prefetch_factor must be >= 1, got {self.prefetch_factor}")
        need(0.0 <= self.t2i_ratio <= 1.0, f"t2i_ratio must be in [0, 1], got {self.t2i_ratio}")
        need(0.0 <= self.caption_dropout <= 1.0,
             f"caption_dropout must be in [0, 1], got {self.caption_dropout}")
        need(bool(self.train_shards), "train_shards is empty")
        return self
