# Captioned-shapes dataset and its scorers: determinism, layout, scorer accuracy and robustness.
import hashlib
import tarfile

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from mmgen.data.synthetic import shapes as S
from mmgen.evaluation import shapes as E


def _digest(paths):
    return [hashlib.sha256(open(p, "rb").read()).hexdigest() for p in paths]


def test_shards_are_deterministic_and_img2dataset_layout(tmp_path):
    a = S.write_shards(str(tmp_path / "a"), 25, samples_per_shard=10, seed=3)
    b = S.write_shards(str(tmp_path / "b"), 25, samples_per_shard=10, seed=3)
    c = S.write_shards(str(tmp_path / "c"), 25, samples_per_shard=10, seed=4)
    assert len(a) == 3 and _digest(a) == _digest(b) and _digest(a) != _digest(c)
    names = tarfile.open(a[0]).getnames()
    assert names[:3] == ["000000000.jpg", "000000000.txt", "000000000.json"]
    assert len(names) == 30
    # webdataset groups the members into samples
    samples = list(wds.WebDataset(a, shardshuffle=False))
    assert len(samples) == 25 and samples[12]["__key__"] == "000000012"
    s = list(S.iter_shard(a[1]))[2]
    assert s["key"] == "000000012" and s["caption"] == s["spec"].caption()
    assert s["meta"]["seed"] == 3 and s["meta"]["image_size"] == 32
    assert s["image"].shape == (32, 32, 3) and s["image"].dtype == np.uint8
    # a sample depends only on (seed, index), not on the sharding
    other = list(S.iter_shard(S.write_shards(str(tmp_path / "d"), 13, 13, seed=3)[0]))[12]
    assert other["spec"] == s["spec"] and np.array_equal(other["image"], s["image"])


def test_make_splits_differ(tmp_path):
    splits = S.make_splits(str(tmp_path), num_train=20, num_val=10, samples_per_shard=10)
    assert len(splits["train"]) == 2 and len(splits["val"]) == 1
    train = list(S.iter_shard(splits["train"][0]))
    val = list(S.iter_shard(splits["val"][0]))
    assert not all(np.array_equal(t["image"], v["image"]) for t, v in zip(train, val))


def test_spec_caption_and_json():
    spec = S.ShapeSpec("circle", "red", "large", 0, 0)
    assert spec.caption() == "a large red circle at the top left"
    assert S.ShapeSpec("square", "blue", "small", 1, 1).caption() == "a small blue square in the center"
    assert S.ShapeSpec.from_json(spec.to_json()) == spec
    assert len(set(s.caption() for s in S.all_specs())) == 324
    with pytest.raises(ValueError):
        S.ShapeSpec("hexagon", "red", "large", 0, 0)


@pytest.mark.parametrize("image_size", [32, 24])
def test_scorer_reads_real_images_after_jpeg(image_size):
    specs, images = [], []
    for i in range(400):
        spec, img = S.make_sample(i, 11, image_size)
        specs.append(spec)
        images.append(S.decode_jpeg(S.encode_jpeg(img)))
    r = E.score_images(images, specs)
    assert r["n"] == 400
    for k in ("color", "shape", "size", "position", "all", "detected"):
        assert r[k] >= 0.99, (k, r)


def test_scorer_accepts_float_tensors():
    import torch
    from mmgen.data.patches import to_unit
    spec, img = S.make_sample(0, 0)
    assert E.score_images([to_unit(img)], [spec])["all"] == 1.0
    assert E.read_image(torch.zeros(3, 32, 32) - 1)["color"] is None  # black ~ background


def test_scorer_rejects_garbage():
    rng = np.random.default_rng(0)
    spec, img = S.make_sample(5, 0)
    # the right colour sprinkled over the image: no shape, no position
    for density in (0.05, 0.2, 0.5):
        noise = np.full_like(img, S.BACKGROUND)
        noise[rng.random((32, 32)) < density] = S.COLORS[spec.color]
        p = E.read_image(noise)
        assert p["color"] == spec.color and p["shape"] is None and p["row"] is None
    # the right colour in several 4x4 patches (the "colour scattered over patches" failure)
    patches = np.full_like(img, S.BACKGROUND)
    for y, x in ((0, 0), (12, 20), (24, 8)):
        patches[y:y + 4, x:x + 4] = S.COLORS[spec.color]
    assert E.read_image(patches)["shape"] is None
    # uniform RGB noise and a blank image
    assert E.read_image(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))["shape"] is None
    blank = np.full_like(img, S.BACKGROUND)
    assert E.read_image(blank) == {"color": None, "shape": None, "size": None, "row": None,
                                   "col": None}
    assert E.score_images([blank], [spec])["all"] == 0.0


def test_scorer_catches_wrong_colour_and_position():
    spec = S.ShapeSpec("triangle", "green", "large", 0, 2)
    wrong_colour = S.render(S.ShapeSpec("triangle", "cyan", "large", 0, 2))
    wrong_place = S.render(S.ShapeSpec("triangle", "green", "large", 2, 0))
    r = E.score_images([wrong_colour, wrong_place], [spec, spec])
    assert r["color"] == 0.5 and r["position"] == 0.5 and r["shape"] == 1.0
    assert r["all"] == 0.0


def test_caption_parser_round_trip():
    for spec in S.all_specs():
        p = E.parse_caption(spec.caption())
        assert p == {"color": spec.color, "shape": spec.shape, "size": spec.size,
                     "row": spec.row, "col": spec.col}
    assert E.parse_caption("  A small  red circle at the   bottom right.\n")["col"] == 2
    assert E.parse_caption("a small red circle at the middle") is None
    assert E.parse_caption("") is None
    specs = [S.ShapeSpec("circle", "red", "small", 2, 2)] * 3
    r = E.score_captions(["a small red circle at the bottom right",
                          "a small red square at the bottom right", "garbage"], specs)
    assert r["exact"] == pytest.approx(1 / 3) and r["color"] == pytest.approx(2 / 3)
    assert r["shape"] == pytest.approx(1 / 3) and r["parsed"] == pytest.approx(2 / 3)


def test_save_grid(tmp_path):
    imgs = [S.make_sample(i, 0)[1] for i in range(10)]
    caps = [S.make_sample(i, 0)[0].caption() for i in range(10)]
    path = tmp_path / "grid.png"
    E.save_grid(imgs, caps, str(path), ncols=4)
    grid = Image.open(path)
    assert grid.width > 4 * 32 * 4 and grid.height > 3 * 32 * 4
