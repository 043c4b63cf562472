# Samplers behind one registry (SAMPLERS): text-to-image (flow ODE + CFG), image-to-text (greedy, KV cache).
from __future__ import annotations

from mmgen.sampling.batching import (VisualSpan, build_batch, image_to_text_doc, pack_rows,
                                     text_to_image_doc)
from mmgen.sampling.captions import generate_captions
from mmgen.sampling.config import SamplerConfig
from mmgen.sampling.images import generate_images, time_grid
from mmgen.sampling.mode import inference
from mmgen.sampling.registry import (CAPTION, IMAGE, IMAGE_TO_TEXT, SAMPLERS, TEXT_TO_IMAGE,
                                     SampleContext, Sampler, get_sampler, sampler_reading)

__all__ = ["CAPTION", "IMAGE", "IMAGE_TO_TEXT", "SAMPLERS", "SampleContext", "Sampler",
           "SamplerConfig", "TEXT_TO_IMAGE", "VisualSpan", "build_batch", "generate_captions",
           "generate_images", "get_sampler", "image_to_text_doc", "inference", "pack_rows",
           "sampler_reading", "text_to_image_doc", "time_grid"]
