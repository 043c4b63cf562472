# The sampler registry: name -> sampler; each objective names the samplers that fit what it trains.
"""A sampler maps a model and a list of prompts to outputs, reading everything else from a
:class:`SampleContext` (the run's facts, built once by the trainer layer): never the job config.

Every sampler says what it reads (``reads``: held-out ``"caption"``, ``"image"`` or
``"video"``) and what it draws (``task``: ``"text_to_image"``, ``"image_to_text"``,
``"text_to_video"``, ``"video_to_text"``, also its dashboard key), so the trainer's sample hook,
the evaluations and ``mmgen sample`` can feed any of them without knowing which family it
belongs to. Objectives name theirs in a ``samplers`` class attribute
(``TransfusionObjective.samplers = ("flow_t2i", "text")``) and their clip samplers in
``video_samplers`` (``("flow_t2v", "text_v2t")``, read by ``mmgen eval shapes --video``).

Video samplers are registered under their own names rather than making the image ones
frame-aware: a sampler's ``task`` fixes the layout of what it returns (images ``[n, C, H, W]``,
clips ``[n, T, C, H, W]``) and every consumer dispatches on it (the sample hook turns a
text-to-image output into one PNG tile per image), so one name never changes layout with the
context. They share the image samplers' code: the flow ODE over a span of grid
``ctx.grid_thw``, captions after a clean span, the discrete-token AR loop.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Protocol, Sequence

import torch
import torch.nn as nn

from mmgen.batch import CAUSAL, FULL
from mmgen.models.codecs import VisualCodec
from mmgen.models.tokenizers.text import ByteTokenizer
from mmgen.sampling.captions import generate_captions
from mmgen.sampling.config import SamplerConfig
from mmgen.sampling.images import generate_images, generate_videos

CAPTION, IMAGE, VIDEO = "caption", "image", "video"         # what a sampler reads
TEXT_TO_IMAGE, IMAGE_TO_TEXT = "text_to_image", "image_to_text"   # what it draws
TEXT_TO_VIDEO, VIDEO_TO_TEXT = "text_to_video", "video_to_text"
RECONSTRUCTION = "reconstruction"   # images from images: a codec's input -> decode(encode(input))


@dataclass(frozen=True)
class SampleContext:
    """The facts of a run that samplers need besides the model and the prompts.

    Args:
        tokenizer: the run's text tokenizer.
        image_size: side in pixels of the images drawn and read (of a clip's frames, for the
            video samplers: ``data.frame_size``).
        codec: the run's visual codec (``data.codec``): span grids, payload width, decoding.
        cfg: the sampler knobs (``sampler.*`` of the job).
        precision: as ``trainer.precision``: "auto" (bf16 autocast on CUDA, fp32 on CPU),
            "bf16" or "fp32", so samples run in the dtype the model trained in.
        frames: frames of the clips the video samplers draw (``data.video_frames``); the
            image samplers ignore it.
    """

    tokenizer: ByteTokenizer
    image_size: int
    codec: VisualCodec
    cfg: SamplerConfig = field(default_factory=SamplerConfig)
    precision: str = "auto"
    frames: int = 1

    def __post_init__(self):
        if self.frames < 1:
            raise ValueError(f"sample context: frames must be >= 1, got {self.frames}")

    @property
    def grid_hw(self) -> tuple[int, int]:
        _, h, w = self.codec.grid(self.image_size)
        return h, w

    @property
    def grid_thw(self) -> tuple[int, int, int]:
        """The span grid of one clip of ``frames`` frames (the video samplers')."""
        return self.codec.grid(self.image_size, self.frames)

    def autocast(self, device: torch.device):
        if self.precision == "bf16" or (self.precision == "auto" and device.type == "cuda"):
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()


class Sampler(Protocol):
    task: str      # TEXT_TO_IMAGE, IMAGE_TO_TEXT, TEXT_TO_VIDEO, VIDEO_TO_TEXT (or RECONSTRUCTION)
    reads: str     # CAPTION (a list of str), IMAGE (a [n, 3, H, W] tensor in [-1, 1]) or
                   # VIDEO (a [n, T, 3, H, W] tensor in [-1, 1])

    def __call__(self, model: nn.Module, prompts, ctx: SampleContext):
        """Images ``[n, 3, H, W]`` in [-1, 1] for TEXT_TO_IMAGE, clips ``[n, ctx.frames, 3, H,
        W]`` for TEXT_TO_VIDEO, one string per image or clip for IMAGE_TO_TEXT /
        VIDEO_TO_TEXT; on the model's device, in ``ctx.precision``."""
        ...


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


class FlowTextToImage:
    """Euler integration of the flow ODE with classifier-free guidance (:func:`generate_images`)."""

    task, reads = TEXT_TO_IMAGE, CAPTION

    def __call__(self, model: nn.Module, prompts: Sequence[str], ctx: SampleContext) -> torch.Tensor:
        dev = _device(model)
        with ctx.autocast(dev):
            return generate_images(model, ctx.tokenizer, list(prompts), ctx.grid_hw, ctx.codec,
                                   ctx.cfg, dev)


class DDPMTextToImage:
    """DDIM / ancestral sampling of DDPM-trained spans with guidance (:func:`generate_images_ddpm`)."""

    task, reads = TEXT_TO_IMAGE, CAPTION

    def __call__(self, model: nn.Module, prompts: Sequence[str], ctx: SampleContext) -> torch.Tensor:
        from mmgen.sampling.ddpm import generate_images_ddpm

        dev = _device(model)
        with ctx.autocast(dev):
            return generate_images_ddpm(model, ctx.tokenizer, list(prompts), ctx.grid_hw,
                                        ctx.codec, ctx.cfg, dev)


class GreedyCaptions:
    """Greedy text decoding after a clean image span, with a KV cache (:func:`generate_captions`)."""

    task, reads = IMAGE_TO_TEXT, IMAGE

    def __call__(self, model: nn.Module, prompts: torch.Tensor, ctx: SampleContext) -> list[str]:
        dev = _device(model)
        with ctx.autocast(dev):
            return generate_captions(model, ctx.tokenizer, prompts, ctx.codec, ctx.cfg, dev)


class ARTextToImage:
    """Discrete-token AR: codes one at a time with CFG over logits, temperature, top-k/top-p and
    a KV cache, decoded through the codec (:func:`mmgen.sampling.ar.generate_images_ar`)."""

    task, reads = TEXT_TO_IMAGE, CAPTION

    def __call__(self, model: nn.Module, prompts: Sequence[str], ctx: SampleContext) -> torch.Tensor:
        from mmgen.sampling.ar import generate_images_ar

        dev = _device(model)
        with ctx.autocast(dev):
            return generate_images_ar(model, ctx.tokenizer, list(prompts), ctx.codec,
                                      ctx.image_size, ctx.cfg, dev)


class MaskGITTextToImage:
    """Masked discrete diffusion: MaskGIT parallel decoding of the whole span in ``sampler.steps``
    iterations (cosine unmasking schedule, confidence + annealed Gumbel noise, CFG over logits),
    decoded through the codec (:func:`mmgen.sampling.maskgit.generate_images_maskgit`)."""

    task, reads = TEXT_TO_IMAGE, CAPTION

    def __call__(self, model: nn.Module, prompts: Sequence[str], ctx: SampleContext) -> torch.Tensor:
        from mmgen.sampling.maskgit import generate_images_maskgit

        dev = _device(model)
        with ctx.autocast(dev):
            return generate_images_maskgit(model, ctx.tokenizer, list(prompts), ctx.codec,
                                           ctx.image_size, ctx.cfg, dev)


class MARTextToImage:
    """MAR: tokens revealed in a random order, a cosine number per iteration, each drawn by the
    "mar" head's flow ODE with classifier-free guidance (:func:`mmgen.sampling.mar.generate_images_mar`)."""

    task, reads = TEXT_TO_IMAGE, CAPTION

    def __call__(self, model: nn.Module, prompts: Sequence[str], ctx: SampleContext) -> torch.Tensor:
        from mmgen.sampling.mar import generate_images_mar

        dev = _device(model)
        with ctx.autocast(dev):
            return generate_images_mar(model, ctx.tokenizer, list(prompts), ctx.grid_hw, ctx.codec,
                                       ctx.cfg, dev)


class ARCaptions:
    """Greedy captions of a model trained causal over whole documents (``objective=vq_ar``):
    :func:`generate_captions` with the image prompt's span CAUSAL, as in training."""

    task, reads = IMAGE_TO_TEXT, IMAGE

    def __call__(self, model: nn.Module, prompts: torch.Tensor, ctx: SampleContext) -> list[str]:
        dev = _device(model)
        with ctx.autocast(dev):
            return generate_captions(model, ctx.tokenizer, prompts, ctx.codec, ctx.cfg, dev,
                                     attention=CAUSAL)


class FlowTextToVideo:
    """The flow ODE with classifier-free guidance over a clip span of grid ``ctx.grid_thw``
    (:func:`generate_videos`): ``[n, T, C, H, W]``."""

    task, reads = TEXT_TO_VIDEO, CAPTION

    def __call__(self, model: nn.Module, prompts: Sequence[str], ctx: SampleContext) -> torch.Tensor:
        dev = _device(model)
        with ctx.autocast(dev):
            return generate_videos(model, ctx.tokenizer, list(prompts), ctx.grid_thw, ctx.codec,
                                   ctx.cfg, dev)


class GreedyVideoCaptions:
    """Greedy text decoding after a clean clip span ``[BOS] [BOV] <clip> [EOV]``, with a KV
    cache (:func:`generate_captions` on ``[n, T, C, H, W]`` clips)."""

    task, reads = VIDEO_TO_TEXT, VIDEO
    attention = FULL

    def __call__(self, model: nn.Module, prompts: torch.Tensor, ctx: SampleContext) -> list[str]:
        if prompts.dim() != 5:
            raise ValueError(f"video captions read clips [n, T, C, H, W], got {list(prompts.shape)}")
        dev = _device(model)
        with ctx.autocast(dev):
            return generate_captions(model, ctx.tokenizer, prompts, ctx.codec, ctx.cfg, dev,
                                     attention=self.attention)


class ARVideoCaptions(GreedyVideoCaptions):
    """:class:`GreedyVideoCaptions` with the clip span CAUSAL (``objective=vq_ar``, as
    :class:`ARCaptions`)."""

    attention = CAUSAL


class ARTextToVideo:
    """Discrete-token AR over a clip: ``ctx.frames`` frames of codes after ``[BOS] caption
    [BOV]``, decoded by the codec (:func:`mmgen.sampling.ar.generate_videos_ar`)."""

    task, reads = TEXT_TO_VIDEO, CAPTION

    def __call__(self, model: nn.Module, prompts: Sequence[str], ctx: SampleContext) -> torch.Tensor:
        from mmgen.sampling.ar import generate_videos_ar

        dev = _device(model)
        with ctx.autocast(dev):
            return generate_videos_ar(model, ctx.tokenizer, list(prompts), ctx.codec,
                                      ctx.image_size, ctx.frames, ctx.cfg, dev)


class Reconstruct:
    """A codec model's reconstruction of held-out images (``model.family`` vae / vq): the
    decoded posterior mean or nearest codes, clamped to [-1, 1]."""

    task, reads = RECONSTRUCTION, IMAGE

    def __call__(self, model: nn.Module, prompts: torch.Tensor, ctx: SampleContext) -> torch.Tensor:
        from mmgen.sampling.mode import inference

        dev = _device(model)
        with inference(model), ctx.autocast(dev):
            return model(prompts.to(dev))["recon"].float().clamp(-1, 1)


SAMPLERS: dict[str, Sampler] = {
    "flow_t2i": FlowTextToImage(),
    "ddpm_t2i": DDPMTextToImage(),
    "text": GreedyCaptions(),
    "reconstruct": Reconstruct(),
    "ar_t2i": ARTextToImage(),
    "ar_text": ARCaptions(),
    "maskgit_t2i": MaskGITTextToImage(),
    "mar_t2i": MARTextToImage(),
    "flow_t2v": FlowTextToVideo(),
    "text_v2t": GreedyVideoCaptions(),
    "ar_t2v": ARTextToVideo(),
    "ar_v2t": ARVideoCaptions(),
}


def get_sampler(name: str) -> Sampler:
    """``SAMPLERS[name]``, or a one-line ValueError naming the registered samplers.

    Args:
        name: a registry key, e.g. one of an objective's ``samplers``.
    """
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler '{name}' (registered: {', '.join(SAMPLERS)})")
    return SAMPLERS[name]


def sampler_reading(names: Sequence[str], reads: str, owner: str = "the objective") -> str:
    """The first of ``names`` whose sampler reads ``reads`` (CAPTION, IMAGE or VIDEO).

    Args:
        names: sampler names, e.g. an objective's ``samplers``.
        reads: what the prompts are.
        owner: named in the error when none fits (e.g. "objective=next_token").
    """
    for name in names:
        if get_sampler(name).reads == reads:
            return name
    raise ValueError(f"{owner} has no sampler that reads {reads}s (its samplers: "
                     f"{', '.join(names) or 'none'})")
