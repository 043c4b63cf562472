# Where a frozen codec runs: in the workers, on the device before the step, or offline into latent shards.
from __future__ import annotations

import json
import shutil

import pytest
import torch

from mmgen.batch import CONTINUOUS, IMAGE, VIDEO
from mmgen.cli.main import main as mmgen_main
from mmgen.cli.preflight import compose_job
from mmgen.data import build_dataloader
from mmgen.data.latents import MANIFEST
from mmgen.documents import Visual, build_document, pack_documents
from mmgen.errors import ConfigError
from mmgen.models.codecs import build_codec
from mmgen.models.codecs.device import DeviceEncoder
from mmgen.models.tokenizers import build_tokenizer
from tests.codec_assets import make_kl

pytest.importorskip("diffusers")

# on-the-fly and cached latents are the same fp32 numbers up to the conv kernels' summation
# order for different batch shapes (measured: <= 1e-7 relative over the run)
RTOL = 1e-6
STEPS = 3


@pytest.fixture(scope="module")
def env(tmp_path_factory, shapes_dir):
    root = tmp_path_factory.mktemp("pipeline")
    make_kl(root / "kl")
    make_kl(root / "kl_other", seed=1)
    raw = root / "raw"
    raw.mkdir()
    for name in ("shapes-train-000000.tar", "shapes-train-000001.tar"):
        shutil.copy(shapes_dir / "train" / name, raw / name)
    # the CLI as a user runs it (returns normally on success)
    mmgen_main(["data", "encode", str(raw), "--codec", f"diffusers:{root / 'kl'}",
                "--out", str(root / "lat"), "--image-size", "32", "--batch-size", "16"])
    return {"root": root, "raw": raw, "lat": root / "lat", "val": shapes_dir / "val"}


def _base(env, codec: str = "kl") -> list[str]:
    return ["experiment=smoke", "model=debug", "data.seq_len=128", "data.batch_size=4",
            "data.num_workers=0", f"trainer.steps={STEPS}", "trainer.log_every=1",
            "trainer.num_threads=1", "trainer.precision=fp32", "trainer.device=cpu",
            "metrics.progress=false", "optim.warmup_steps=2", "checkpoint.enabled=false",
            "trainer.seed=1234", f"data.codec=diffusers:{env['root'] / codec}", "data.patch_size=2",
            f"data.val_shards={env['val']}"]


def _losses(env, name: str, extra: list[str]) -> list[float]:
    from mmgen.parallel.dist import init_distributed
    from mmgen.trainer.trainer import Trainer

    run = env["root"] / "runs" / name
    job = compose_job([*_base(env), *extra, f"run_dir={run}", f"name={name}"])
    Trainer(job, init_distributed("cpu", "gloo", 5.0)).train()
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss/total"] for r in recs if "loss/total" in r]


def _close(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) == STEPS and all(abs(x - y) <= RTOL * abs(y) for x, y in zip(a, b))


def test_manifest_tags_the_latent_shards(env):
    manifest = json.loads((env["lat"] / MANIFEST).read_text())
    codec = build_codec(f"diffusers:{env['root'] / 'kl'}", 2)
    assert manifest["fingerprint"] == codec.fingerprint() and manifest["samples"] == 200
    assert (manifest["image_size"], manifest["kind"], manifest["channels"]) == (32, "continuous", 4)
    assert sorted(p.name for p in env["lat"].glob("*.tar")) == sorted(p.name for p in env["raw"].glob("*.tar"))


def test_encoded_shards_train_like_encoding_on_the_fly(env):
    raw, lat = f"data.train_shards={env['raw']}", f"data.train_shards={env['lat']}"
    workers = _losses(env, "workers", [raw])
    device = _losses(env, "device", [raw, "data.encode_on=device"])
    cached = _losses(env, "cached", [lat])
    cached_device = _losses(env, "cached_device", [lat, "data.encode_on=device"])
    assert _close(device, workers) and _close(cached, workers) and _close(cached_device, workers), \
        (workers, device, cached, cached_device)
    # a cached and a raw source mixed in one run train like the same two sources raw
    a0, a1 = (f"{d}/shapes-train-000000.tar" for d in (env["lat"], env["raw"]))
    b = f"{env['raw']}/shapes-train-000001.tar"
    mixed = lambda a: [f"+data.sources.a={{shards:'{a}'}}", f"+data.sources.b={{shards:'{b}'}}"]  # noqa: E731
    both_raw = _losses(env, "mix_raw", mixed(a1))
    assert _close(_losses(env, "mix_cached", mixed(a0)), both_raw)
    assert _close(_losses(env, "mix_cached_device", [*mixed(a0), "data.encode_on=device"]), both_raw)


def test_device_batches_keep_the_contract(env):
    """Device encoding changes only ``patches``: the same batch as the workers' encoding."""
    tok = build_tokenizer("bytes")
    cfg = compose_job([*_base(env), f"data.train_shards={env['raw']}"]).data
    ref = next(iter(build_dataloader(cfg, tok, 0, 1)))
    cfg.encode_on = "device"
    pix = next(iter(build_dataloader(cfg, tok, 0, 1)))
    assert pix.patches.shape[1] == 3 * 4 * 4             # one 4x4 pixel patch per latent patch
    got = DeviceEncoder(cfg.visual_codec(), "cpu")(pix)
    for f in ("tokens", "targets", "positions", "modality", "document_ids", "span_ids", "coords"):
        assert torch.equal(getattr(got, f), getattr(ref, f)), f
    assert got.patches.shape == ref.patches.shape and torch.allclose(got.patches, ref.patches, atol=1e-6)


def test_device_encoder_takes_clips_frame_by_frame(env):
    codec = build_codec(f"diffusers:{env['root'] / 'kl'}", 2)
    proxy = build_codec("pixels", 4)
    gen = torch.Generator().manual_seed(0)
    clip, image = torch.rand(3, 3, 16, 16, generator=gen) * 2 - 1, torch.rand(3, 32, 16, generator=gen) * 2 - 1
    docs = []
    for pixels, modality in ((clip, VIDEO), (image, IMAGE)):
        rows, grid = proxy.encode(pixels)
        docs.append(build_document([[1, 2], Visual(rows, grid, modality, True, CONTINUOUS), [3]], 0))
    batch = pack_documents([(0, 0, docs[0]), (1, 0, docs[1])], 2, 64, 0, proxy.payload_dim)
    out = DeviceEncoder(codec, "cpu", max_frames=2)(batch)
    want = torch.cat([codec.encode(clip)[0], codec.encode(image)[0]])
    assert out.patches.shape == want.shape == (3 * 16 + 32, 16)
    assert torch.allclose(out.patches, want, atol=1e-6)


def test_latents_of_another_codec_are_refused(env, tmp_path):
    tok = build_tokenizer("bytes")
    cfg = compose_job([*_base(env, "kl_other"), f"data.train_shards={env['lat']}"]).data
    with pytest.raises(ConfigError, match="holds latents of codec fingerprint diffusers-.*re-encode") as err:
        build_dataloader(cfg, tok, 0, 1)
    assert "\n" not in str(err.value)
    cfg = compose_job([*_base(env), f"data.train_shards={env['lat']}", "data.image_size=64",
                       "data.seq_len=512"]).data
    with pytest.raises(ConfigError, match="latents of 32-px images, data.image_size is 64"):
        build_dataloader(cfg, tok, 0, 1)
    cfg = compose_job([*_base(env), f"data.train_shards={env['lat']}::{env['raw']}"]).data
    with pytest.raises(ConfigError, match="mixes latent shards .* and raw ones"):
        build_dataloader(cfg, tok, 0, 1)


def test_encode_command_errors_are_one_line(env, capsys):
    for argv, msg in (
            (["--codec", "pixels"], "has no latents to cache"),
            (["--codec", f"diffusers:{env['root']}/nope"], "no such directory"),
            (["--codec", f"diffusers:{env['root'] / 'kl'}", "--out", str(env["lat"])], "already holds latent shards")):
        argv = ["data", "encode", str(env["raw"]), "--image-size", "32", "--out",
                str(env["root"] / "out_err"), *argv]
        with pytest.raises(SystemExit) as e:
            mmgen_main(argv)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and msg in err and "\n" not in err, err


def test_encode_on_device_needs_a_latent_codec():
    with pytest.raises(ConfigError, match="encode_on=device runs a continuous latent codec"):
        compose_job(["data.encode_on=device"])
    with pytest.raises(ConfigError, match="encode_on='gpu' is not one of workers, device"):
        compose_job(["data.encode_on=gpu"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_device_encoding_in_bf16_on_the_gpu_stays_close_to_fp32(env):
    tok = build_tokenizer("bytes")
    cfg = compose_job([*_base(env), f"data.train_shards={env['raw']}", "data.encode_on=device"]).data
    batch = next(iter(build_dataloader(cfg, tok, 0, 1))).to("cuda")
    fp32 = DeviceEncoder(cfg.visual_codec(), "cuda")(batch).patches
    bf16 = DeviceEncoder(cfg.visual_codec(), "cuda", bf16=True)(batch).patches
    assert fp32.dtype == bf16.dtype == torch.float32 and fp32.device.type == "cuda"
    rel = ((bf16 - fp32).norm() / fp32.norm()).item()
    print(f"bf16 vs fp32 latents: relative error {rel:.2e}")
    assert rel < 2e-2
