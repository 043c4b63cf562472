# Every dataset recipe in data_recipes/ validates against the schema; the schema rejects bad ones.
from __future__ import annotations

import copy

import pytest
import yaml

from mmgen.data.tools.recipes import (Recipe, _build, load_recipe, recipe_names, recipes_dir,
                                validate)

# the datasets the issue asks for (name -> mmgen sample type)
REQUIRED = {
    "relaion5b": "pair", "laion400m": "pair", "laion_coco": "pair", "coyo700m": "pair",
    "cc3m": "pair", "cc12m": "pair", "datacomp1b": "pair", "mscoco": "pair", "sbu": "pair",
    "mmc4": "interleaved", "obelics": "interleaved", "webvid10m": "video",
    "hdvila100m": "video", "panda70m": "video", "internvid": "video", "howto100m": "video",
    "msrvtt": "video",
}


def test_every_required_dataset_has_a_recipe():
    assert set(REQUIRED) <= set(recipe_names())


@pytest.mark.parametrize("name", recipe_names())
def test_recipe_validates(name):
    r = load_recipe(name)
    assert isinstance(r, Recipe) and r.name == name
    if name in REQUIRED:
        assert r.sample_type == REQUIRED[name]
    if r.use == "eval":
        assert name in ("mscoco", "sbu", "msrvtt")
    if r.download.tool == "img2dataset":
        assert "--output_format webdataset" in r.download.command
    if r.download.tool == "video2dataset":
        assert "--output_format=webdataset" in r.download.command
        if f"{{out}}/{name}-video2dataset.yaml" in r.download.command:   # written by prepare
            assert r.download.config_yaml.strip()
            yaml.safe_load(r.download.config_yaml)
    assert all("{out}" in c or c.startswith("#") or "huggingface-cli" in c or "git clone" in c
               or "pip install" in c for c in r.download.metadata_commands), \
        "metadata commands write under {out}"


def test_withdrawn_and_gated_recipes_name_a_replacement():
    for name in recipe_names():
        r = load_recipe(name)
        if r.availability.status != "available":
            assert r.availability.replacement
    assert load_recipe("laion400m").availability.status == "withdrawn"
    assert load_recipe("webvid10m").availability.status == "withdrawn"
    assert load_recipe("laion_coco").availability.status == "withdrawn"


def _raw(name="cc3m") -> dict:
    with open(recipes_dir() / f"{name}.yaml") as f:
        return yaml.safe_load(f)


@pytest.mark.parametrize("edit,needle", [
    (lambda d: d.update(colour="blue"), "unknown key(s) colour"),
    (lambda d: d.pop("licence"), "cc3m.licence: missing"),
    (lambda d: d["licence"].update(name=3), "cc3m.licence.name: expected a string"),
    (lambda d: d["expected"].update(samples="many"), "cc3m.expected.samples: expected an integer"),
    (lambda d: d.update(sample_type="video"), "does not fit family 'image_text'"),
    (lambda d: d.update(family="audio"), "'audio' is not one of"),
    (lambda d: d["availability"].update(status="withdrawn"), "must name a replacement"),
    (lambda d: d["availability"].update(as_of="last year"), "is not YYYY-MM"),
    (lambda d: d["download"].update(command="img2dataset --url_list x --output_format webdataset"),
     "does not use url_col 'url'"),
    (lambda d: d["download"].update(command=d["download"]["command"].replace("webdataset", "files")),
     "does not write WebDataset shards"),
    (lambda d: d.update(references=["see the paper"]), "only URLs"),
    (lambda d: d["layout"].update(members=["txt"]), "a pair sample needs one of"),
])
def test_schema_rejects_bad_recipes_in_one_line(edit, needle):
    data = copy.deepcopy(_raw())
    edit(data)
    with pytest.raises(ValueError) as e:
        validate(_build(Recipe, data, "cc3m"), "cc3m")
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_load_recipe_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="known: cc12m, cc3m"):
        load_recipe("nope")
    bad = tmp_path / "x.yaml"
    bad.write_text("name: [unclosed")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_recipe(str(bad))
    other = tmp_path / "renamed.yaml"
    other.write_text(yaml.safe_dump(_raw()))
    with pytest.raises(ValueError, match="differs from the file name"):
        load_recipe(str(other))
