# Samplers behind one registry (SAMPLERS): text-to-image/-video (flow ODE + CFG), image/video-to-text (greedy, KV cache).
from __future__ import annotations

from mmgen.sampling.batching import (VisualSpan, build_batch, image_to_text_doc, pack_rows,
                                     text_to_image_doc, text_to_video_doc, video_to_text_doc)
from mmgen.sampling.captions import generate_captions
from mmgen.sampling.config import SamplerConfig
from mmgen.sampling.images import generate_images, generate_videos, time_grid
from mmgen.sampling.mode import inference
from mmgen.sampling.registry import (CAPTION, IMAGE, IMAGE_TO_TEXT, SAMPLERS, TEXT_TO_IMAGE,
                                     TEXT_TO_VIDEO, VIDEO, VIDEO_TO_TEXT, SampleContext, Sampler,
                                     get_sampler, sampler_reading)

__all__ = ["CAPTION", "IMAGE", "IMAGE_TO_TEXT", "SAMPLERS", "SampleContext", "Sampler",
           "SamplerConfig", "TEXT_TO_IMAGE", "TEXT_TO_VIDEO", "VIDEO", "VIDEO_TO_TEXT",
           "VisualSpan", "build_batch", "generate_captions", "generate_images",
           "generate_videos", "get_sampler", "image_to_text_doc", "inference", "pack_rows",
           "sampler_reading", "text_to_image_doc", "text_to_video_doc", "time_grid",
           "video_to_text_doc"]
