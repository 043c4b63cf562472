# mmgen's own codecs: VAE / VQ modules, the codec protocol around them, fitting shapes, training
# through the trainer (checkpoint, bitwise resume) and loading a trained run as a frozen codec.
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mmgen.batch import CONTINUOUS, DISCRETE
from mmgen.models.codecs import build_codec, codec_known
from mmgen.models.codecs.base import to_unit
from mmgen.models.codecs.config import AutoencoderConfig
from mmgen.models.codecs.load import save_codec
from mmgen.models.codecs.vae import ConvVAE, VAECodec
from mmgen.models.codecs.vq import ConvVQ, VectorQuantizer, VQCodec
from mmgen.objectives.reconstruction import psnr

TINY = AutoencoderConfig(base_channels=8, channel_mult=[1, 2], latent_channels=4, codebook_size=64,
                         dead_after=10)


def built(cls, cfg=TINY, seed=0):
    torch.manual_seed(seed)
    m = cls(cfg)
    m.init_weights()
    return m


def shapes_images(n: int) -> torch.Tensor:
    from mmgen.data.synthetic.shapes import make_sample

    return torch.stack([to_unit(make_sample(i, 0)[1]) for i in range(n)])


# -- the protocol: geometry, shapes, video frame by frame ---------------------------------------
def test_vae_codec_geometry_and_video_frame_by_frame():
    codec = VAECodec(built(ConvVAE), patch_size=2)
    assert (codec.kind, codec.channels, codec.downsample, codec.payload_dim) == (CONTINUOUS, 4, 2, 16)
    clip = torch.rand(3, 3, 32, 32) * 2 - 1
    rows, grid = codec.encode(clip)
    assert grid == (3, 8, 8) == codec.grid(32, frames=3) and rows.shape == (3 * 64, 16)
    # a clip is its frames one after another (time from the grid, no temporal mixing)
    per_frame = torch.cat([codec.encode(f)[0] for f in clip])
    torch.testing.assert_close(rows, per_frame)
    assert codec.decode(rows, grid).shape == (3, 3, 32, 32)
    with pytest.raises(ValueError, match="not divisible"):
        codec.grid(30)
    with pytest.raises(ValueError, match="do not fit"):
        codec.decode(rows[:-1], grid)


def test_vae_scaling_and_shift_factors_apply_to_latents():
    cfg = AutoencoderConfig(**{**TINY.__dict__, "scaling_factor": 0.5, "shift_factor": 0.25})
    m = built(ConvVAE, cfg)
    x = torch.rand(3, 32, 32) * 2 - 1
    rows, grid = VAECodec(m, 1).encode(x)
    mean = m.posterior(x[None])[0][0]
    torch.testing.assert_close(rows, ((mean - 0.25) * 0.5).permute(1, 2, 0).reshape(-1, 4))
    # decode inverts the scaling: decoder(mean) exactly
    torch.testing.assert_close(VAECodec(m, 1).decode(rows, grid)[0], m.decode(mean[None])[0],
                               rtol=1e-5, atol=1e-5)


def test_vq_codec_is_discrete_and_round_trips_codes():
    m = built(ConvVQ)
    codec = VQCodec(m)
    assert (codec.kind, codec.payload_dim, codec.vocab_size, codec.downsample) == (DISCRETE, 0, 64, 2)
    codes, grid = codec.encode(torch.rand(2, 3, 32, 32) * 2 - 1)
    assert grid == (2, 16, 16) and codes.shape == (512,) and codes.dtype == torch.long
    # decoding codes = decoding the quantised map the encoder produced
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(codec.decode(codec.encode(x[0])[0], (1, 16, 16)), m.eval()(x)["recon"])
    with pytest.raises(ValueError, match="patch_size must be 1"):
        VQCodec(m, patch_size=2)
    with pytest.raises(ValueError, match=r"codes must be in \[0, 64\)"):
        codec.decode(torch.full((256,), 64), (1, 16, 16))


def test_factorised_l2_codes_live_on_the_unit_sphere():
    cfg = AutoencoderConfig(**{**TINY.__dict__, "latent_channels": 8, "codebook_dim": 3, "l2_normalize": True})
    m = built(ConvVQ, cfg)
    assert m.quantizer.dim == 3 and VQCodec(m).channels == 3
    out = m(torch.rand(2, 3, 32, 32) * 2 - 1)
    assert out["recon"].shape == (2, 3, 32, 32)
    torch.testing.assert_close(m.quantizer.codebook().norm(dim=1), torch.ones(64))


# -- the quantiser on constructed cases (exact) --------------------------------------------------
@pytest.mark.parametrize("update", ["ema", "st"])
def test_dead_codes_restart_on_the_farthest_inputs(update):
    q = VectorQuantizer(4, 2, update=update, decay=0.5, dead_after=2)
    q.reset_parameters()
    with torch.no_grad():
        q.embedding.copy_(torch.tensor([[0.0, 0.0], [10.0, 10.0], [-10.0, 10.0], [10.0, -10.0]]))
        if update == "ema":
            q.embed_sum.copy_(q.embedding)
    z = torch.tensor([[0.1, 0.0], [0.0, -0.5], [0.3, 0.4], [0.0, 0.2]])  # all nearest to code 0
    q.train()
    out = q(z)
    assert out["codes"].tolist() == [0, 0, 0, 0] and out["counts"].tolist() == [4, 0, 0, 0]
    assert q.idle.tolist() == [0, 1, 1, 1]          # not dead yet (dead_after=2)
    if update == "ema":                              # code 0 moves halfway to the inputs' mean
        torch.testing.assert_close(q.embedding[0], (0.5 * torch.zeros(2) + 0.5 * z.sum(0)) / (0.5 + 0.5 * 4))
    code0 = q.embedding[0].clone()
    q(z)
    # codes 1, 2, 3 were idle twice: restarted on the inputs farthest from their code, farthest first
    dist = (z - code0).square().sum(1)
    order = torch.sort(dist, descending=True, stable=True).indices[:3]
    torch.testing.assert_close(q.embedding[1:], z[order])
    assert q.idle.tolist() == [0, 0, 0, 0]
    q.eval()
    assert (torch.bincount(q(z)["codes"], minlength=4) > 0).sum() > 1   # the restarted codes are used
    before = q.embedding.clone()
    q(z)   # eval: no EMA step, no restarts
    assert torch.equal(before, q.embedding)


def test_vq_objective_reports_usage_and_perplexity():
    from mmgen.objectives.config import ObjectiveConfig
    from mmgen.objectives.reconstruction import VQObjective

    obj = VQObjective(ObjectiveConfig(name="vq", weights={"recon": 1, "commit": 0.25, "codebook": 1}))
    counts = torch.tensor([2.0, 2.0, 0.0, 0.0])   # 2 of 4 codes used, uniformly: perplexity 2
    out = obj.extra_losses({"counts": counts, "commit": torch.zeros(2), "codebook": torch.zeros(2)},
                           torch.zeros(2, 3, 4, 4), torch.tensor(4))
    assert float(out["usage"]) == pytest.approx(0.5 * 2 / 4)       # weighted by 2 of the step's 4 frames
    assert float(out["perplexity"]) == pytest.approx(2.0 * 2 / 4)
    with pytest.raises(ValueError, match="needs objective.weights"):
        VQObjective(ObjectiveConfig(name="vq", weights={"recon": 1}))


# -- fitting shapes: a stated reconstruction bound ------------------------------------------------
# Measured (torch 2.13, 1 thread): 120 Adam steps (lr 3e-3, 16 images of 64 per step) reach
# PSNR 21.7 dB (VAE, L1 0.049) and 21.9 dB (VQ, L1 0.059, 63 of 64 codes used) on the 64 images,
# from ~10 dB untrained; the bound leaves ~2.5 dB of margin. ~4 s each.
PSNR_BOUND, STEPS = 19.0, 120


@pytest.mark.parametrize("cls", [ConvVAE, ConvVQ])
def test_codec_fits_shapes_briefly(cls):
    torch.set_num_threads(1)
    x = shapes_images(64)
    m = built(cls)
    with torch.no_grad():
        start = float(psnr(m.eval()(x)["recon"], x).mean())
    m.train()
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for step in range(STEPS):
        b = x[(step * 16) % 64:(step * 16) % 64 + 16]
        out = m(b, generator=g)
        reg = 1e-3 * out["kl"].mean() if cls is ConvVAE else 0.25 * out["commit"].mean()
        loss = (out["recon"] - b).abs().mean() + reg
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        out = m.eval()(x)
    end = float(psnr(out["recon"], x).mean())
    assert start < 14 and end > PSNR_BOUND, (start, end)
    if cls is ConvVQ:
        used = int((torch.bincount(out["codes"].flatten(), minlength=64) > 0).sum())
        assert used >= 32, used   # restarts keep most of the codebook alive


# -- through the trainer: metrics, samples, checkpoint, bitwise resume, load as a frozen codec ----
CODEC_RUN = ["experiment=codec_vq_shapes", "model.autoencoder.base_channels=8",
             "model.autoencoder.channel_mult=[1,2]", "model.autoencoder.codebook_size=32",
             "model.autoencoder.dead_after=2", "data.batch_size=4", "trainer.log_every=1",
             "trainer.sample_every=3", "trainer.num_samples=4", "metrics.progress=false",
             "optim.warmup_steps=2", "trainer.num_threads=1", "trainer.steps=5", "checkpoint.every=100"]


def make_codec_trainer(shapes_dir, run_dir, extra=()):
    from mmgen.cli.preflight import compose_job
    from mmgen.parallel.dist import DistInfo
    from mmgen.trainer.trainer import Trainer
    from tests.conftest import data_overrides

    job = compose_job([*CODEC_RUN, *data_overrides(shapes_dir), f"run_dir={run_dir}", *extra])
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    (Path(run_dir) / "config.yaml").write_text(__import__("mmgen.trainer.job", fromlist=["to_yaml"]).to_yaml(job))
    return Trainer(job, DistInfo())


def records(run: Path) -> dict[int, dict]:
    return {r["step"]: {k: v for k, v in r.items() if k.startswith(("loss/", "metric/", "optim/"))}
            for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def test_codec_experiment_trains_resumes_bitwise_and_loads_as_codec(shapes_dir, tmp_path):
    straight = make_codec_trainer(shapes_dir, tmp_path / "a")
    straight.train()
    first = make_codec_trainer(shapes_dir, tmp_path / "b")
    first.train(stop_at=2)
    resumed = make_codec_trainer(shapes_dir, tmp_path / "b")
    assert resumed.state.step == 2
    resumed.train()
    a, b = records(tmp_path / "a"), records(tmp_path / "b")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5] and a == b
    for key in ("loss/recon", "loss/commit", "loss/codebook", "metric/psnr", "metric/usage",
                "metric/perplexity"):
        assert key in a[5], key
    # metrics are logged beside the losses but stay out of the total
    assert a[5]["loss/total"] == pytest.approx(
        a[5]["loss/recon"] + 0.25 * a[5]["loss/commit"] + a[5]["loss/codebook"], rel=1e-5)
    assert 0 < a[5]["metric/usage"] <= 1 and a[5]["metric/perplexity"] >= 1
    for (n, p), q in zip(straight.engine.module.state_dict().items(), resumed.engine.module.state_dict().values()):
        assert torch.equal(p, q), n     # parameters and EMA / idle buffers
    assert (tmp_path / "a" / "samples" / "step_0000003_reconstruction.png").is_file()
    # the run, its checkpoint, and a saved safetensors file load as the same frozen codec
    module = straight.engine.module.eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    want = module.encode_codes(x).flatten()
    file = save_codec(module, tmp_path / "vq.safetensors")
    for path in (tmp_path / "a", tmp_path / "a" / "checkpoints" / "step_0000005", file):
        codec = build_codec(f"vq:{path}", 1)
        assert torch.equal(codec.encode(x)[0], want), path
    assert codec_known("vq:/x") and not codec_known("vq:") and not codec_known("nope:/x")
    with pytest.raises(ValueError, match="holds a model.family=vq model, not a vae"):
        build_codec(f"vae:{tmp_path / 'a'}", 1)


def test_codec_family_needs_its_objective_and_ddp():
    from mmgen.cli.preflight import compose_job
    from mmgen.errors import ConfigError

    with pytest.raises(ConfigError, match="objective=transfusion trains model.family=transformer"):
        compose_job(["experiment=codec_vae_shapes", "objective=transfusion"])
    with pytest.raises(ConfigError, match="trains under parallel=ddp"):
        compose_job(["experiment=codec_vae_shapes", "parallel=fsdp2", "trainer.sample_every=0"])
    with pytest.raises(ConfigError, match="trains model.family=vae, but model.family=transformer"):
        compose_job(["objective=vae", "model.family=transformer"])
    # the family follows the objective, as the heads do
    assert compose_job(["objective=vq"]).model.family == "vq"
    job = compose_job(["experiment=codec_vae_shapes"])
    assert job.model.heads == [] and job.model.autoencoder.downsample == 4


def test_mmgen_codecs_are_latent_codecs_for_data_encode_and_the_device(shapes_dir, tmp_path):
    """mmgen's own VAE and VQ serve `mmgen data encode` and data.encode_on=device like a
    diffusers codec: same rows as encode(), a fingerprint of shape + weights, and cached
    latents that train like encoding in the workers."""
    import json

    from mmgen.cli.main import main as mmgen_main
    from mmgen.cli.preflight import compose_job
    from mmgen.models.codecs import LatentCodec
    from mmgen.models.codecs.vae import ConvVAE
    from mmgen.models.codecs.vq import ConvVQ
    from mmgen.parallel.dist import init_distributed
    from mmgen.trainer.trainer import Trainer

    x = shapes_images(2)
    files = {}
    for kind, cls, p in (("vae", ConvVAE, 2), ("vq", ConvVQ, 1)):
        files[kind] = save_codec(built(cls), tmp_path / f"{kind}.safetensors")
        codec = build_codec(f"{kind}:{files[kind]}", p)
        assert isinstance(codec, LatentCodec)
        rows = torch.cat([codec.latent_rows(z) for z in codec.encode_latents(x)])
        one_by_one = torch.cat([codec.encode(im)[0] for im in x])   # batch 1: other conv sum order
        assert torch.equal(rows, one_by_one) if kind == "vq" else torch.allclose(rows, one_by_one, atol=1e-5)
        assert codec.decode_latents(codec.encode_latents(x)).shape == x.shape
        assert codec.fingerprint() == build_codec(f"{kind}:{files[kind]}", p).fingerprint()
    other = save_codec(built(ConvVAE, seed=1), tmp_path / "vae_other.safetensors")
    assert build_codec(f"vae:{other}", 2).fingerprint() != build_codec(f"vae:{files['vae']}", 2).fingerprint()

    mmgen_main(["data", "encode", str(shapes_dir / "train"), "--codec", f"vae:{files['vae']}",
                "--out", str(tmp_path / "lat"), "--image-size", "32"])

    def losses(name, extra):
        run = tmp_path / "runs" / name
        job = compose_job(["experiment=smoke", "model=debug", "data.seq_len=128", "data.batch_size=4",
                           "data.num_workers=0", "trainer.steps=3", "trainer.log_every=1", "trainer.num_threads=1",
                           "trainer.precision=fp32", "trainer.device=cpu", "metrics.progress=false",
                           "checkpoint.enabled=false", f"data.codec=vae:{files['vae']}", "data.patch_size=2",
                           f"data.val_shards={shapes_dir / 'val'}", f"run_dir={run}", f"name={name}", *extra])
        Trainer(job, init_distributed("cpu", "gloo", 5.0)).train()
        recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [r["loss/total"] for r in recs if "loss/total" in r]

    workers = losses("workers", [f"data.train_shards={shapes_dir / 'train'}"])
    device = losses("device", [f"data.train_shards={shapes_dir / 'train'}", "data.encode_on=device"])
    cached = losses("cached", [f"data.train_shards={tmp_path / 'lat'}"])
    # the same fp32 latents up to the convolutions' summation order at other batch shapes
    for run in (device, cached):
        assert len(run) == 3 and all(abs(a - b) <= 1e-6 * abs(b) for a, b in zip(run, workers)), (workers, run)
