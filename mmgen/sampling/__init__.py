# Samplers for dashboards and evaluation: text-to-image (flow ODE + CFG) and image-to-text (greedy).
from __future__ import annotations

from mmgen.sampling.batching import (VisualSpan, build_batch, image_to_text_doc, pack_rows,
                                     text_to_image_doc)
from mmgen.sampling.captions import generate_captions
from mmgen.sampling.config import SamplerConfig
from mmgen.sampling.images import generate_images, time_grid
from mmgen.sampling.mode import inference

__all__ = ["SamplerConfig", "VisualSpan", "build_batch", "generate_captions", "generate_images",
           "image_to_text_doc", "inference", "pack_rows", "text_to_image_doc", "time_grid"]
