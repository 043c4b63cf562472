# The data pipeline's typed config (a Hydra structured config: plain types, dicts of sources).
"""`DataConfig`: what the data pipeline receives, and nothing else (STYLE.md habit 4).

One source (the default): ``train_shards`` / ``val_shards`` hold image-text pairs and the source
is called ``name``. Several sources: ``sources`` maps a name to a ``SourceConfig`` (shards and
sample type) and ``weights`` (or a source's own ``weight``) gives each source's share of the
documents (sample-level mixing, README.md "Mixing"); ``train_shards`` / ``val_shards`` are then
unused. A source of weight 0 is not read, and its shards need not exist.

Shard existence is checked when the loader is built (``build_dataloader``), not here, so a
config can be validated on a machine that does not hold the data.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from mmgen.models.codecs import CODEC_LOADERS, CODECS, VisualCodec, build_codec, codec_known
from mmgen.models.tokenizers import TOKENIZERS, is_tokenizer_name

# Framing tokens of the smallest image document: [BOS] [BOI] <image> [EOI] [EOS].
DOC_FRAME_TOKENS = 4

PAIR, INTERLEAVED, VIDEO = "pair", "interleaved", "video"
SAMPLE_TYPES = (PAIR, INTERLEAVED, VIDEO)
# which images of an interleaved document are generated (data.interleaved_targets; pack.py)
INTERLEAVED_TARGETS = ("random", "last", "all", "none")
CLIP_STARTS = ("random", "start", "center")
ENCODE_ON = ("workers", "device")
RANGE_MODES = ("partial", "always", "never")


@dataclass
class SourceConfig:
    """One data source of a mixture.

    Args:
        shards: training shards (directory, glob, brace pattern, or several joined by "::").
        val_shards: held-out shards; empty = this source has no validation split.
        type: sample type of every sample: "pair" (image + caption), "interleaved" (``.json``
            with parallel ``texts``/``images`` lists + image members) or "video" (clip + caption).
        recipe: the ``data_recipes/<recipe>.yaml`` the shards were made with (documentation).
        weight: this source's mixing weight, so a source added on the command line carries its
            own (``+data.sources.clips={type:video,shards:...,weight:0.2}``); None = the entry
            in ``DataConfig.weights`` (or 1 when ``weights`` is empty). Weights are relative.
    """

    shards: str = ""
    val_shards: str = ""
    type: str = PAIR
    recipe: str = ""
    weight: Optional[float] = None


@dataclass
class RemoteConfig:
    """Reading shards from object stores, HTTP and ``pipe:`` commands (mmgen/data/remote.py).

    Args:
        connect_timeout_s, read_timeout_s: per request; a stalled connection fails after
            ``read_timeout_s`` without data (then it is retried like any transient failure).
        retries: further attempts after a transient failure (timeout, dropped connection,
            HTTP 5xx, short read), with ``backoff_s * 2**attempt`` seconds between them. A
            missing shard (404, no such key) is not retried.
        max_consecutive_failures: a reader that finds this many shards in a row unreachable
            stops the run with one error line (the store or network is down); 0 = never.
        ranges: when to read by byte ranges from the offsets ``mmgen data index`` stored
            next to the shards: "partial" (default) for a shard the reader reads only part of
            (resumed mid-shard, or shared by readers taking every k-th sample), "always", or
            "never"; otherwise a shard is spooled to local disk (one request) and read there.
        read_ahead: byte-range reads kept in flight ahead of the reader (the next samples of
            its order); 0 = one request at a time.
        spool_dir: where spooled shards live while read ("" = the system temp dir).
        cache_dir: keep spooled shards here for later epochs and other workers of the node
            ("" = no cache); ``cache_max_gb`` caps it (least recently used evicted first).
    """

    connect_timeout_s: float = 10.0
    read_timeout_s: float = 30.0
    retries: int = 3
    backoff_s: float = 1.0
    max_consecutive_failures: int = 8
    ranges: str = "partial"
    read_ahead: int = 8
    spool_dir: str = ""
    cache_dir: str = ""
    cache_max_gb: float = 50.0

    def validate(self) -> None:
        if not (self.connect_timeout_s > 0 and self.read_timeout_s > 0):
            raise ValueError(f"data config: remote timeouts must be > 0, got connect "
                             f"{self.connect_timeout_s}, read {self.read_timeout_s}")
        if min(self.retries, self.backoff_s, self.max_consecutive_failures, self.read_ahead) < 0:
            raise ValueError(f"data config: remote.retries ({self.retries}), backoff_s "
                             f"({self.backoff_s}), max_consecutive_failures "
                             f"({self.max_consecutive_failures}) and read_ahead "
                             f"({self.read_ahead}) must be >= 0")
        if self.ranges not in RANGE_MODES:
            raise ValueError(f"data config: remote.ranges={self.ranges!r} is not one of "
                             f"{', '.join(RANGE_MODES)}")
        if self.cache_max_gb <= 0:
            raise ValueError(f"data config: remote.cache_max_gb must be > 0, got {self.cache_max_gb}")


@dataclass
class DataConfig:
    name: str = "shapes"
    # A directory of *.tar, a glob, a brace pattern (shapes-{000000..000009}.tar), or several
    # of those joined by "::" (webdataset's separator). Relative paths resolve against the cwd.
    train_shards: str = "data/shapes/train"
    val_shards: str = "data/shapes/val"
    image_size: int = 32
    codec: str = "pixels"          # visual codec (mmgen.models.codecs.CODECS); pixels: patches
    patch_size: int = 4             # patch side on the codec's grid
    # where a codec with latents (a VAE / VQ) runs on raw images: "workers" (the data workers,
    # on their CPU) or "device" (the trainer, micro-batch by micro-batch on the accelerator,
    # under no_grad; the workers then send pixel patches covering one latent patch each).
    # Cached latents (`mmgen data encode`) are read as they are under both.
    encode_on: str = "workers"
    seq_len: int = 256
    batch_size: int = 16            # packed rows per micro-batch per rank
    num_workers: int = 1            # DataLoader workers per rank; 0 = in the main process
    t2i_ratio: float = 0.5          # share of examples that generate the visual span (t2i, t2v)
    caption_dropout: float = 0.1    # generation examples with an emptied caption (for CFG)
    seed: int = 0
    shuffle_samples: bool = True
    tokenizer: str = "bytes"
    # compute-balanced packing (README.md): 0 = by positions only; f in (0, 1] closes a batch
    # before the document that would take its estimated FLOPs above f x a reference batch
    pack_compute_budget: float = 0.0
    prefetch_factor: int = 2        # batches prefetched per worker (num_workers > 0 only)
    pin_memory: bool = True         # page-locked batches (async host-to-GPU copy); CUDA only
    # -- several sources (empty: one pair source `name` from train_shards / val_shards) ------
    sources: dict[str, SourceConfig] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)    # source -> weight; {} = equal
    # -- video clips ---------------------------------------------------------------------------
    video_frames: int = 8           # frames per clip (the span's grid t)
    video_fps: float = 4.0          # frames are sampled at this rate from the clip start
    video_size: int = 0             # frame side in pixels; 0 = image_size
    video_clip_start: str = "random"   # random (hash of seed and key) | start | center
    # -- interleaved documents -----------------------------------------------------------------
    max_images_per_doc: int = 8     # images after this many are dropped (counted)
    # which images of an interleaved document are generated (targets) and which condition:
    # random (each with probability t2i_ratio) | last (the last one kept) | all | none
    interleaved_targets: str = "random"
    # -- remote shards (http(s)://, s3://, gs://, pipe:) ---------------------------------------
    remote: RemoteConfig = field(default_factory=RemoteConfig)

    def visual_codec(self) -> VisualCodec:
        """The codec that turns this data's pixels into span payloads."""
        return build_codec(self.codec, self.patch_size)

    def worker_codec(self) -> VisualCodec:
        """The codec the data workers run on raw images: the visual codec itself, or with
        ``encode_on="device"`` the pixel codec whose patches cover one latent patch each (same
        grid, so the batch layout is the one the device-side encoding fills in)."""
        codec = self.visual_codec()
        if self.encode_on != "device":
            return codec
        return build_codec("pixels", codec.downsample * codec.patch_size)

    @property
    def image_tokens(self) -> int:
        """Visual positions of one image span."""
        t, h, w = self.visual_codec().grid(self.image_size)
        return t * h * w

    @property
    def frame_size(self) -> int:
        return self.video_size or self.image_size

    @property
    def video_tokens(self) -> int:
        """Visual positions of one video span (per-frame patches, t = video_frames)."""
        t, h, w = self.visual_codec().grid(self.frame_size, frames=self.video_frames)
        return t * h * w

    def source_configs(self, split: str = "train") -> dict[str, SourceConfig]:
        """Every source by name, in a fixed (sorted) order; the single-source default too."""
        if not self.sources:
            return {self.name: SourceConfig(self.train_shards, self.val_shards, PAIR)}
        return {k: self.sources[k] for k in sorted(self.sources)}

    def raw_weight(self, name: str) -> float:
        """A source's weight before normalising: its own ``weight``, else ``weights[name]``,
        else 1 when ``weights`` is empty (equal mixing)."""
        src = self.source_configs().get(name)
        if src is not None and src.weight is not None:
            return float(src.weight)
        return float(self.weights.get(name, 0.0) if self.weights else 1.0)

    def source_weights(self) -> dict[str, float]:
        """Normalised weights in source order (equal when no weight is given)."""
        raw = {n: self.raw_weight(n) for n in self.source_configs()}
        total = sum(raw.values())
        return {n: w / total for n, w in raw.items()}

    def validate(self) -> "DataConfig":
        """Raise ValueError (one line) on an inconsistent config; return self for chaining."""
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"data config: {msg}")

        need(self.image_size > 0 and self.patch_size > 0,
             f"image_size ({self.image_size}) and patch_size ({self.patch_size}) must be > 0")
        need(codec_known(self.codec),
             f"codec={self.codec!r} is not one of {', '.join(sorted(CODECS))} or <kind>:<path> "
             f"(kinds: {', '.join(sorted(CODEC_LOADERS))})")
        need(is_tokenizer_name(self.tokenizer),
             f"tokenizer={self.tokenizer!r} is not one of {', '.join(sorted(TOKENIZERS))} or hf:<dir>")
        self._check_grid("image_size", self.image_size)
        need(self.encode_on in ENCODE_ON,
             f"encode_on={self.encode_on!r} is not one of {', '.join(ENCODE_ON)}")
        if self.encode_on == "device":
            from mmgen.batch import CONTINUOUS
            from mmgen.models.codecs import LatentCodec

            codec = self.visual_codec()
            need(isinstance(codec, LatentCodec) and codec.kind == CONTINUOUS,
                 f"encode_on=device runs a continuous latent codec (a VAE) before the step; "
                 f"codec={self.codec!r} is not one (use encode_on=workers)")
        smallest = self.image_tokens + DOC_FRAME_TOKENS
        need(smallest <= self.seq_len,
             f"one image document needs {smallest} positions ({self.image_tokens} image tokens + "
             f"{DOC_FRAME_TOKENS} framing tokens) but seq_len is {self.seq_len}")
        need(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        need(self.num_workers >= 0, f"num_workers must be >= 0, got {self.num_workers}")
        need(self.prefetch_factor >= 1, f"prefetch_factor must be >= 1, got {self.prefetch_factor}")
        need(0.0 <= self.t2i_ratio <= 1.0, f"t2i_ratio must be in [0, 1], got {self.t2i_ratio}")
        need(self.interleaved_targets in INTERLEAVED_TARGETS,
             f"interleaved_targets='{self.interleaved_targets}' must be one of {', '.join(INTERLEAVED_TARGETS)}")
        need(0.0 <= self.caption_dropout <= 1.0,
             f"caption_dropout must be in [0, 1], got {self.caption_dropout}")
        need(self.max_images_per_doc >= 1,
             f"max_images_per_doc must be >= 1, got {self.max_images_per_doc}")
        self.remote.validate()
        from mmgen.data.remote import check_no_credentials

        for name, src in self.source_configs().items():
            check_no_credentials(src.shards, f"shards of source {name!r}")
            check_no_credentials(src.val_shards, f"val_shards of source {name!r}")
        need(0.0 <= self.pack_compute_budget <= 1.0,
             f"pack_compute_budget must be in [0, 1] (0 = pack by positions), got {self.pack_compute_budget}")
        if not self.sources:
            need(bool(self.train_shards), "train_shards is empty")
        for name, src in self.sources.items():
            need(bool(name) and "/" not in name, f"source name {name!r} must be non-empty, no '/'")
            need(src.type in SAMPLE_TYPES,
                 f"sources.{name}.type={src.type!r} is not one of {', '.join(SAMPLE_TYPES)}")
            need(bool(src.shards), f"sources.{name}.shards is empty")
            if src.weight is not None:
                need(math.isfinite(src.weight) and src.weight >= 0,
                     f"sources.{name}.weight={src.weight} must be >= 0 (and finite)")
                need(name not in self.weights or self.weights[name] == src.weight,
                     f"sources.{name}.weight={src.weight} and weights.{name}={self.weights.get(name)} "
                     f"disagree (give one)")
        names = set(self.source_configs())
        for name, w in self.weights.items():
            need(name in names, f"weights.{name}: no such source (sources: {', '.join(sorted(names))})")
            need(math.isfinite(w) and w >= 0, f"weights.{name}={w} must be >= 0 (and finite)")
        if self.weights:
            own = {n for n, s in self.sources.items() if s.weight is not None}
            missing = sorted(names - set(self.weights) - own)
            need(not missing, f"weights has no entry for source(s) {', '.join(missing)} "
                              f"(give every source a weight, 0 to leave one out)")
        need(sum(self.raw_weight(n) for n in names) > 0, "source weights sum to 0")
        # a video source of weight 0 is not read, so it sets no bound on seq_len (yet)
        if any(s.type == VIDEO and self.raw_weight(n) > 0 for n, s in self.sources.items()):
            need(self.video_frames >= 1, f"video_frames must be >= 1, got {self.video_frames}")
            need(math.isfinite(self.video_fps) and self.video_fps > 0,
                 f"video_fps must be > 0 (and finite), got {self.video_fps}")
            self._check_grid("video frame size", self.frame_size)
            need(self.video_clip_start in CLIP_STARTS,
                 f"video_clip_start={self.video_clip_start!r} is not one of {', '.join(CLIP_STARTS)}")
            need(self.video_tokens + DOC_FRAME_TOKENS <= self.seq_len,
                 f"one video document needs {self.video_tokens + DOC_FRAME_TOKENS} positions "
                 f"({self.video_tokens} visual positions for {self.video_frames} frames + "
                 f"{DOC_FRAME_TOKENS}) but seq_len is {self.seq_len}")
        return self

    def _check_grid(self, what: str, size: int) -> None:
        """The codec decides which sizes divide into whole patches."""
        try:
            self.visual_codec().grid(size)
        except ValueError as e:
            raise ValueError(f"data config: {what} {size} does not fit the {self.codec} codec "
                             f"(patch_size {self.patch_size}): {e}") from None
