# The visual codec protocol: the pixel codec's geometry, exact round trips, and the config asking it.
from __future__ import annotations

import numpy as np
import pytest
import torch

from mmgen.batch import CONTINUOUS
from mmgen.cli.preflight import compose_job, one_line
from mmgen.errors import ConfigError
from mmgen.data import DataConfig
from mmgen.models.codecs import CODECS, PixelCodec, VisualCodec, build_codec, to_uint8, to_unit


def test_pixel_codec_is_a_visual_codec_with_its_geometry():
    codec = build_codec("pixels", 4)
    assert isinstance(codec, VisualCodec) and isinstance(codec, PixelCodec)
    assert (codec.kind, codec.channels, codec.downsample, codec.patch_size) == (CONTINUOUS, 3, 1, 4)
    assert codec.payload_dim == 48 and PixelCodec(8).payload_dim == 192
    assert codec.grid(32) == (1, 8, 8)
    assert codec.grid((16, 24), frames=5) == (5, 4, 6)
    with pytest.raises(ValueError, match="not divisible"):
        codec.grid(30)
    with pytest.raises(ValueError, match="unknown codec 'vae'.*pixels"):
        build_codec("vae", 4)
    assert set(CODECS) == {"pixels"}


def test_image_rows_are_row_major_patches_of_p_p_c():
    codec = PixelCodec(2)
    img = torch.arange(3 * 4 * 6, dtype=torch.float32).reshape(3, 4, 6)
    rows, grid = codec.encode(img)
    assert grid == (1, 2, 3) and rows.shape == (6, 12)
    p, C = 2, 3
    for r in range(2):
        for c in range(3):
            for i in range(p):
                for j in range(p):
                    for ch in range(C):
                        assert rows[r * 3 + c, (i * p + j) * C + ch] == img[ch, r * p + i, c * p + j]


def test_round_trips_are_exact_for_images_and_clips():
    gen = torch.Generator().manual_seed(0)
    codec = PixelCodec(4)
    img = torch.rand(3, 8, 12, generator=gen) * 2 - 1
    rows, grid = codec.encode(img)
    assert torch.equal(codec.decode(rows, grid), img[None])
    clip = torch.rand(3, 3, 8, 8, generator=gen) * 2 - 1
    rows, grid = codec.encode(clip)
    assert grid == (3, 2, 2) and rows.shape == (12, 48)
    # frame by frame in (t, h, w) order: frame 1 is rows 4..7
    assert torch.equal(rows[4:8], codec.encode(clip[1])[0])
    assert torch.equal(codec.decode(rows, grid), clip)
    with pytest.raises(ValueError, match="do not fit grid"):
        codec.decode(rows[:-1], grid)
    with pytest.raises(ValueError, match="C = 3"):
        codec.encode(torch.zeros(1, 8, 8))


def test_pixel_convention_round_trips_uint8():
    img = np.random.default_rng(0).integers(0, 256, (6, 5, 3), dtype=np.uint8)
    unit = to_unit(img)
    assert unit.shape == (3, 6, 5) and unit.min() >= -1 and unit.max() <= 1
    assert np.array_equal(to_uint8(unit), img)


def test_data_config_asks_the_codec():
    cfg = DataConfig(image_size=32, patch_size=8, video_frames=3)
    assert cfg.visual_codec().payload_dim == 192
    assert cfg.image_tokens == 16 and cfg.video_tokens == 48
    with pytest.raises(ValueError, match="codec='nope' is not one of pixels"):
        DataConfig(codec="nope").validate()
    with pytest.raises(ValueError, match="image_size 30 does not fit the pixels codec"):
        DataConfig(image_size=30).validate()


def test_job_config_takes_patch_dim_from_the_codec():
    job = compose_job(["data.codec=pixels", "data.patch_size=8"])
    assert job.data.codec == "pixels" and job.model.patch_dim == 192
    with pytest.raises(ConfigError, match="codec's payload_dim 48"):
        compose_job(["model.patch_dim=40"])
    with pytest.raises(Exception) as err:
        compose_job(["data.codec=nope"])
    line = one_line(err.value)
    assert "unknown codec 'nope' (available: pixels)" in line and "\n" not in line
