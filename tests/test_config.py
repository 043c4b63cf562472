# The config surface: every shipped config composes and validates; bad input fails in one line.
from __future__ import annotations


import pytest

from mmgen.cli.preflight import compose_job, config_dir, one_line
from mmgen.compose import group_options
from mmgen.models import FLAVORS
from tests.conftest import BIN, run_cli

GROUPS = ["model", "objective", "data", "parallel", "optim", "trainer", "checkpoint", "metrics", "experiment"]


def shipped(group: str) -> list[str]:
    return sorted({p.stem for p in (config_dir() / group).glob("*.yaml")} | set(group_options(group)))


# options whose data.codec names a codec run (runs/codec_*_shapes) that a fresh clone lacks
NEEDS_CODEC = {("objective", "vq_ar"): "vq", ("experiment", "shapes_vqar_cpu"): "vq",
               ("objective", "masked_vq"): "vq", ("experiment", "shapes_maskgit_cpu"): "vq",
               ("experiment", "shapes_latent_cpu"): "vae", ("experiment", "shapes_vqar_gpu"): "vq",
               ("experiment", "shapes_latent_gpu"): "vae", ("experiment", "shapes_video_vqar_cpu"): "vq"}


# options whose data.tokenizer is the caption BPE `make data` writes (data/shapes/tokenizer)
NEEDS_TOKENIZER = {("experiment", "shapes_fast_cpu")}


def tokenizer_overrides(tmp_path) -> list[str]:
    """``data.tokenizer`` pointing at a byte-level BPE learnt here from the shapes captions."""
    from mmgen.data.synthetic.shapes import all_specs
    from mmgen.data.tools.tokenizer import train_bpe

    train_bpe([s.caption() for s in all_specs()] * 2, tmp_path / "tok")
    return [f"data.tokenizer=hf:{tmp_path / 'tok'}"]


def codec_overrides(kind: str, tmp_path) -> list[str]:
    """``data.codec`` (+ vocabulary) overrides pointing at a tiny random mmgen codec of ``kind``."""
    from mmgen.models.codecs.config import AutoencoderConfig
    from mmgen.models.codecs.load import save_codec
    from mmgen.models.codecs.vae import ConvVAE
    from mmgen.models.codecs.vq import ConvVQ

    cfg = AutoencoderConfig(base_channels=8, channel_mult=[1, 2, 2], latent_channels=4, codebook_size=16)
    module = (ConvVQ if kind == "vq" else ConvVAE)(cfg)
    module.init_weights()
    path = save_codec(module, tmp_path / f"{kind}.safetensors")
    vocab = ["model.vocab_size=281"] if kind == "vq" else []   # 264 text ids + 16 codes + a mask token
    return [f"data.codec={kind}:{path}", "data.patch_size=1", *vocab]


@pytest.mark.parametrize("group", GROUPS)
def test_every_shipped_config_composes(group, tmp_path):
    options = shipped(group)
    assert options, f"configs/{group}/ is empty"
    for opt in options:
        extra = []
        if (group, opt) == ("model", "hf"):  # the one option with an argument: a HF directory
            from tests.hf_assets import make_hf_model

            make_hf_model(tmp_path / "hf", "qwen2")
            extra = [f"model.from_hf={tmp_path / 'hf'}"]
            with pytest.raises(Exception, match="model=hf needs the directory"):
                compose_job(["model=hf"])
        if (group, opt) in NEEDS_CODEC:   # options that read a trained codec: a tiny one made here
            extra = codec_overrides(NEEDS_CODEC[group, opt], tmp_path)
        if (group, opt) in NEEDS_TOKENIZER:   # options that read `make data`'s caption BPE
            extra = tokenizer_overrides(tmp_path)
        job = compose_job([f"{group}={opt}", *extra])
        job.validate()


def test_model_flavors_match_the_baseline_shape():
    job = compose_job(["model=1b"])
    m = job.model
    assert (m.dim, m.n_layers, m.n_heads, m.ffn_dim, m.vocab_size) == (2048, 22, 16, 5632, 32000)


@pytest.mark.parametrize("name", sorted(FLAVORS))
def test_model_option_is_the_registered_flavor(name):
    """One flavor registry: ``model=<name>`` composes exactly ``FLAVORS[name]`` (patch_dim aside,
    which follows data.patch_size), and no configs/model/*.yaml can disagree with it."""
    import dataclasses

    job = compose_job([f"model={name}"])
    want = dataclasses.replace(FLAVORS[name], patch_dim=job.model.patch_dim)
    assert job.model == want
    assert not list((config_dir() / "model").glob("*.yaml"))


def test_patch_dim_follows_data_patch_size():
    assert compose_job(["data.patch_size=8", "data.image_size=32"]).model.patch_dim == 192


@pytest.mark.parametrize("override,needle", [
    ("model.dimm=3", "dimm"),
    ("model.dim=abc", "model.dim"),
    ("model=nope", "model/nope"),
    ("trainer.steps=0", "trainer.steps"),
    ("optim.decay=sideways", "optim.decay"),
    ("data.patch_size=5", "patch"),
    ("+foo=1", "foo"),
    ("+model.foo=1", "foo"),
])
def test_bad_override_is_one_line_exit_2(tmp_path, override, needle):
    r = run_cli([str(BIN / "mmgen-train"), override], cwd=tmp_path, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("mmgen-train: error:") and needle in lines[0], lines[0]
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "runs").exists(), "nothing may be written for a bad config"


def test_bad_value_inside_a_sweep_is_caught_before_launch(tmp_path):
    r = run_cli([str(BIN / "mmgen-train"), "-m", "optim.lr=1e-3,-1"], cwd=tmp_path, timeout=120)
    assert r.returncode == 2 and "optim.lr" in r.stderr


def test_cfg_job_prints_resolved_config(tmp_path):
    r = run_cli([str(BIN / "mmgen-train"), "--cfg", "job", "model.dim=96", "data.patch_size=8"],
                cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "dim: 96" in r.stdout and "patch_dim: 192" in r.stdout
    assert not (tmp_path / "runs").exists()


def test_one_line_condenses_chained_errors():
    try:
        compose_job(["model.dimm=3"])
    except Exception as e:  # noqa: BLE001
        msg = one_line(e)
    assert "\n" not in msg and "dimm" in msg


def test_missing_shards_is_one_line_exit_2(tmp_path):
    r = run_cli([str(BIN / "mmgen-train"), "data.train_shards=nowhere/*.tar", "trainer.steps=1"],
                cwd=tmp_path, timeout=120)
    assert r.returncode == 2, r.stderr
    err = [l for l in r.stderr.splitlines() if "error" in l]
    assert err and "nowhere" in err[-1] and "Traceback" not in r.stderr
