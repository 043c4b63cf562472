# Transfusion on VAE latents (flow and DDPM), DDPM's schedules and sampler, codec geometry at start-up.
from __future__ import annotations

import json

import pytest
import torch

from mmgen.cli.preflight import compose_job
from mmgen.errors import ConfigError
from mmgen.objectives import build_objective
from mmgen.objectives.ddpm import alpha_bars, ddpm_target, to_x0_eps, DDPMSample
from mmgen.sampling import SampleContext, get_sampler
from mmgen.sampling.ddpm import ddpm_timesteps
from tests.conftest import BIN, ROOT, run_cli
from tests.codec_assets import make_kl

pytest.importorskip("diffusers")


def test_schedules_start_clean_and_end_in_noise():
    for schedule in ("cosine", "linear"):
        a = alpha_bars(schedule, 1000)
        assert a.shape == (1001,) and a[0] == 1 and bool((a[1:] < a[:-1]).all())
        assert a[-1] < 1e-3
    lin = alpha_bars("linear", 1000)
    assert abs(lin[1] - (1 - 1e-4)) < 1e-12 and abs(lin[2] / lin[1] - (1 - (1e-4 + 19.9e-3 / 999))) < 1e-9
    assert ddpm_timesteps(1000, 4) == [1000, 750, 500, 250, 0]


@pytest.mark.parametrize("prediction", ["eps", "v", "x"])
def test_each_prediction_recovers_x0_and_eps(prediction):
    gen = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(6, 5, generator=gen), torch.randn(6, 5, generator=gen)
    abar = alpha_bars("cosine", 1000)[torch.tensor([1, 10, 200, 500, 900, 999])].float()
    x_t = abar.sqrt()[:, None] * x0 + (1 - abar).sqrt()[:, None] * eps
    s = DDPMSample(x0=x0, noise=eps, span_t=torch.zeros(1), abar=abar, x_t=x_t,
                   is_loss=torch.ones(6, dtype=torch.bool))
    got_x0, got_eps = to_x0_eps(ddpm_target(s, prediction), x_t, abar, prediction)
    assert torch.allclose(got_x0, x0, atol=2e-3) and torch.allclose(got_eps, eps, atol=2e-3)
    # so one deterministic DDIM step with the exact prediction lands on the marginal at k'
    a_next = abar[0]
    assert torch.allclose(a_next.sqrt() * got_x0 + (1 - a_next).sqrt() * got_eps,
                          a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps, atol=2e-3)


@pytest.fixture(scope="module")
def kl(tmp_path_factory):
    path = tmp_path_factory.mktemp("ddpm") / "kl"
    make_kl(path)
    return path


def _train(kl, shapes_dir, tmp_path, name, extra, steps=4):
    from mmgen.models.tokenizers import build_tokenizer
    from mmgen.parallel.dist import init_distributed
    from mmgen.trainer.trainer import Trainer

    job = compose_job(["experiment=smoke", "model=debug", "data.seq_len=128", "data.batch_size=4",
                       "data.num_workers=0", f"trainer.steps={steps}", "trainer.log_every=1",
                       "trainer.num_threads=1", "trainer.precision=fp32", "trainer.device=cpu",
                       "metrics.progress=false", "checkpoint.enabled=false",
                       f"data.codec=diffusers:{kl}", "data.patch_size=2", "data.encode_on=device",
                       f"data.train_shards={shapes_dir}/train", f"data.val_shards={shapes_dir}/val",
                       f"run_dir={tmp_path / name}", f"name={name}", "sampler.steps=3", *extra])
    trainer = Trainer(job, init_distributed("cpu", "gloo", 5.0))
    trainer.train()
    recs = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    ctx = SampleContext(build_tokenizer("bytes"), 32, job.data.visual_codec(), job.sampler, "fp32")
    return job, trainer.engine.module, [r for r in recs if "loss/total" in r], ctx


@pytest.mark.parametrize("objective,sampler", [("transfusion", "flow_t2i"),
                                               ("transfusion_ddpm", "ddpm_t2i")])
def test_transfusion_on_latents_trains_and_samples_through_the_codec(kl, shapes_dir, tmp_path,
                                                                     objective, sampler):
    job, model, recs, ctx = _train(kl, shapes_dir, tmp_path, objective, [f"objective={objective}"])
    assert job.model.patch_dim == 16 and ctx.grid_hw == (8, 8)     # 4-channel latents in 2x2 patches
    assert len(recs) == 4 and all(torch.isfinite(torch.tensor(r["loss/visual"])) for r in recs)
    assert sampler in build_objective(job.objective).samplers
    images = get_sampler(sampler)(model, ["a red circle", ""], ctx)
    assert images.shape == (2, 3, 32, 32) and images.abs().max() <= 1
    assert torch.equal(images, get_sampler(sampler)(model, ["a red circle", ""], ctx))  # seeded


def test_ddpm_eps_loss_starts_near_the_noise_variance(kl, shapes_dir, tmp_path):
    # an untrained head outputs ~0, so eps-prediction's MSE is E[eps^2] = 1 at step 1 and falls
    _, _, recs, _ = _train(kl, shapes_dir, tmp_path, "ddpm_eps", [
        "objective=transfusion_ddpm", "objective.schedule=linear", "optim.lr=3e-3"], steps=12)
    first, last = recs[0]["loss/visual"], min(r["loss/visual"] for r in recs[-3:])
    assert 0.8 < first < 1.3 and last < first, (first, last)


def test_geometry_is_checked_at_start_up(kl):
    base = [f"data.codec=diffusers:{kl}", "data.patch_size=2", "+data.sources.clips={type:video,shards:/x/a.tar}",
            "+data.sources.pairs={shards:/x/b.tar}", "data.seq_len=2048"]
    with pytest.raises(ConfigError, match=r"video_frames=20 gives 20 frames per clip, beyond model.max_grid\[0\]=16"):
        compose_job([*base, "data.video_frames=20"])
    with pytest.raises(ConfigError, match=r"video frames of 48 px give a 12x12 grid .*\(downsampling 2 x patch 2\)"):
        compose_job([*base, "data.video_size=48", "model.max_grid=[16,8,8]", "data.video_frames=2"])
    compose_job([*base, "data.video_frames=16"])     # at the table's size: fine
    with pytest.raises(ConfigError, match="image_size 36 does not fit .* downsampling 2 x patch size 4 = 8"):
        compose_job([f"data.codec=diffusers:{kl}", "data.patch_size=4", "data.image_size=36"])


def test_geometry_error_exits_2_with_one_line(kl, tmp_path):
    r = run_cli([str(BIN / "mmgen-train"), f"data.codec=diffusers:{kl}", "data.patch_size=2",
                 "+data.sources.clips={type:video,shards:/x/a.tar}", "data.video_frames=40",
                 "data.seq_len=4096"], ROOT, timeout=120, env={"PYTHONPATH": str(ROOT)})
    err = r.stderr.strip()
    assert r.returncode == 2 and "max_grid[0]=16" in err and len(err.splitlines()) == 1, err
