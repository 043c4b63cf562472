# Pretrained codecs from local diffusers directories: same latents / codes as diffusers, clear errors.
from __future__ import annotations

import json
import sys

import pytest
import torch

from mmgen.batch import CONTINUOUS, DISCRETE
from mmgen.cli.preflight import compose_job, one_line
from mmgen.models.codecs import LatentCodec, VisualCodec, build_codec
from mmgen.models.codecs.pretrained import DiffusersCodec
from tests.codec_assets import make_kl, make_vq

pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("codecs")
    return {"kl": make_kl(root / "kl"), "vq": make_vq(root / "vq"), "root": root}


def _pixels(n: int = 2, size: int = 32) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1


def test_autoencoder_kl_latent_mean_matches_diffusers(assets):
    codec = build_codec(f"diffusers:{assets['root'] / 'kl'}", 2)
    assert isinstance(codec, VisualCodec) and isinstance(codec, LatentCodec)
    assert (codec.kind, codec.channels, codec.downsample, codec.payload_dim) == (CONTINUOUS, 4, 2, 16)
    assert (codec.scaling_factor, codec.shift_factor) == (0.7, 0.1)
    assert codec.grid(32) == (1, 8, 8) and codec.grid(32, frames=3) == (3, 8, 8)
    x = _pixels()
    with torch.no_grad():
        mean = assets["kl"].encode(x).latent_dist.mean
    ref = (mean - 0.1) * 0.7
    assert (codec.encode_latents(x) - ref).abs().max() < 1e-5
    rows, grid = codec.encode(x[0])
    assert grid == (1, 8, 8) and rows.shape == (64, 16)
    # rows are the scaled latent cut into 2x2 patches, (p, p, c) flattened like pixel patches
    assert torch.allclose(rows[0], ref[0, :, :2, :2].permute(1, 2, 0).reshape(-1), atol=1e-5)
    with torch.no_grad():
        pixels = assets["kl"].decode(mean[:1]).sample
    assert (codec.decode(rows, grid)[0] - pixels[0]).abs().max() < 1e-4
    # a clip goes through frame by frame
    clip_rows, clip_grid = codec.encode(x)
    assert clip_grid == (2, 8, 8) and torch.allclose(clip_rows[64:], codec.encode(x[1])[0], atol=1e-6)


def test_vq_model_codes_match_diffusers_exactly(assets):
    codec = build_codec(f"diffusers:{assets['root'] / 'vq'}", 1)
    assert (codec.kind, codec.payload_dim, codec.codebook_size, codec.downsample) == (DISCRETE, 0, 32, 2)
    x = _pixels()
    vq = assets["vq"]
    with torch.no_grad():
        h = vq.encode(x).latents
        _, _, (_, _, idx) = vq.quantize(h)
        pixels = vq.decode(h).sample
    codes, grid = codec.encode(x[0])
    assert grid == (1, 16, 16) and codes.dtype == torch.long
    assert torch.equal(codes, idx.reshape(2, -1)[0])
    assert len(codes.unique()) > 4          # the test would be empty if every cell had one code
    assert (codec.decode(codes, grid)[0] - pixels[0]).abs().max() < 1e-4
    with pytest.raises(ValueError, match="patch_size must be 1"):
        DiffusersCodec(assets["root"] / "vq", 2)


def test_fingerprint_follows_config_and_weights(assets, tmp_path):
    a = DiffusersCodec(assets["root"] / "kl", 2)
    assert a.fingerprint() == DiffusersCodec(assets["root"] / "kl", 4).fingerprint()
    make_kl(tmp_path / "other_weights", seed=1)
    make_kl(tmp_path / "other_scale", scaling_factor=0.5)
    fps = {DiffusersCodec(tmp_path / d, 2).fingerprint() for d in ("other_weights", "other_scale")}
    assert a.fingerprint() not in fps and len(fps) == 2


def test_bad_directories_give_one_line(assets, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "badjson").mkdir()
    (tmp_path / "badjson" / "config.json").write_text("{nope")
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text((assets["root"] / "kl" / "config.json").read_text())
    (tmp_path / "torn").mkdir()
    (tmp_path / "torn" / "config.json").write_text((assets["root"] / "kl" / "config.json").read_text())
    (tmp_path / "torn" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x00" * 20)
    cases = {"missing": "no such directory", "empty": "no config.json", "badjson": "not valid JSON",
             "unet": "names class 'UNet2DModel'", "noweights": "no \\*.safetensors"}
    for name, msg in cases.items():
        with pytest.raises(ValueError, match=msg) as err:
            build_codec(f"diffusers:{tmp_path / name}", 2)
        assert "\n" not in str(err.value) and str(tmp_path / name) in str(err.value)
    torn = build_codec(f"diffusers:{tmp_path / 'torn'}", 2)   # geometry reads config.json only
    assert torn.payload_dim == 16
    with pytest.raises(ValueError, match="cannot load the weights") as err:
        torn.encode(_pixels(1)[0])
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="no path after 'diffusers:'"):
        build_codec("diffusers:", 2)


def test_missing_diffusers_is_one_line(assets, monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)     # what an install without it raises
    codec = DiffusersCodec(assets["root"] / "kl", 2)
    with pytest.raises(ValueError, match=r"needs the diffusers package \(pip install 'mmgen\[hf\]'\)"):
        codec.encode(_pixels(1)[0])


def test_job_config_takes_the_codec_geometry(assets):
    kl = assets["root"] / "kl"
    job = compose_job([f"data.codec=diffusers:{kl}", "data.patch_size=2", "data.seq_len=128"])
    assert job.model.patch_dim == 16 and job.data.image_tokens == 64
    with pytest.raises(Exception) as err:
        compose_job([f"data.codec=diffusers:{kl}", "data.patch_size=3"])
    line = one_line(err.value)
    assert "downsampling 2 x patch size 3" in line and "\n" not in line
    with pytest.raises(Exception) as err:
        compose_job([f"data.codec=diffusers:{assets['root']}/none", "data.patch_size=2"])
    assert "no such directory" in one_line(err.value)
