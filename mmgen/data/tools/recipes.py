# Dataset recipes (data_recipes/*.yaml): the schema, a strict loader, and metadata conversion.
"""A recipe says where a surveyed dataset comes from, under which licence, whether it can still
be had, how to download it into WebDataset shards (the exact img2dataset / video2dataset
command), what filters apply, how big it is, and which mmgen sample type it yields.

``load_recipe(name_or_path)`` parses a YAML file into ``Recipe`` and validates it: unknown keys,
missing fields, wrong types and inconsistent values are one-line ``ValueError``s naming the field.
"""
from __future__ import annotations

import csv
import dataclasses
import gzip
import json
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path

FAMILIES = ("image_text", "interleaved", "video")
USES = ("pretrain", "eval")
SAMPLE_TYPES = ("pair", "interleaved", "video")
STATUSES = ("available", "gated", "withdrawn", "restricted")
TOOLS = ("img2dataset", "video2dataset", "script")
FAMILY_TYPE = {"image_text": "pair", "interleaved": "interleaved", "video": "video"}


@dataclass
class SourceInfo:
    """Where the metadata (URL lists, captions) comes from."""
    homepage: str
    paper: str
    metadata: list[str]            # URLs or Hugging Face ids of the metadata files
    metadata_format: str           # parquet, tsv, csv, json, jsonl, zip, ...
    hf_id: str = ""


@dataclass
class Licence:
    name: str                      # of the metadata / annotations
    media: str                     # who owns the images / videos
    notes: str = ""


@dataclass
class Availability:
    status: str                    # STATUSES
    notes: str
    as_of: str                     # when the cited sources said so (YYYY-MM)
    replacement: str = ""          # what to use instead (withdrawn / restricted / gated)


@dataclass
class Download:
    tool: str                      # TOOLS
    metadata_commands: list[str]   # fetch (and fix up) the metadata
    command: str                   # the exact download-to-shards command
    input_format: str
    url_col: str
    caption_col: str = ""
    save_additional_columns: list[str] = field(default_factory=list)
    image_size: int = 0            # resize target (img2dataset); 0 = not resized
    samples_per_shard: int = 10000
    config_yaml: str = ""          # video2dataset config file contents, when the command uses one
    notes: str = ""


@dataclass
class Expected:
    samples: int                   # rows / documents / clips listed in the metadata
    downloadable: str              # what share still downloads, as reported
    size: str                      # size of the shards the command writes
    time: str = ""                 # reported download time and hardware


@dataclass
class Layout:
    members: list[str]             # member extensions of one sample
    caption: str                   # where the caption / text lives
    notes: str = ""


@dataclass
class Recipe:
    name: str
    title: str
    family: str                    # FAMILIES
    use: str                       # USES
    sample_type: str               # SAMPLE_TYPES (mmgen's loader type for the source)
    description: str
    source: SourceInfo
    licence: Licence
    availability: Availability
    download: Download
    filters: list[str]             # filters the dataset applied, and recommended ones
    layout: Layout
    expected: Expected
    references: list[str]          # where the facts above come from
    mmgen_notes: str = ""


# ----------------------------------------------------------------------------------------------
# Strict loading
# ----------------------------------------------------------------------------------------------

def _build(cls, data, where: str):
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(fields)})")
    kwargs = {}
    for name, f in fields.items():
        sub = f"{where}.{name}"
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ValueError(f"{sub}: missing")
            continue
        kwargs[name] = _value(hints[name], data[name], sub)
    return cls(**kwargs)


def _value(tp, value, where: str):
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    origin = typing.get_origin(tp)
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ValueError(f"{where}: expected a list, got {type(value).__name__}")
        return [_value(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{where}: expected a string, got {value!r}")
        return value
    raise TypeError(f"{where}: unsupported schema type {tp}")


def _passes(command: str, option: str, value: str) -> bool:
    """Whether ``command`` passes ``--option value`` (or ``--option=value``, quoted or not)."""
    pattern = rf"--{option}[= ]([\"']?){re.escape(value)}\1(\s|$)"
    return re.search(pattern, command) is not None


def validate(r: Recipe, where: str = "recipe") -> Recipe:
    """Cross-field checks; ValueError naming the field."""
    def need(ok: bool, field_: str, msg: str) -> None:
        if not ok:
            raise ValueError(f"{where}.{field_}: {msg}")

    for name in ("name", "title", "description"):
        need(bool(getattr(r, name).strip()), name, "empty")
    need(r.family in FAMILIES, "family", f"{r.family!r} is not one of {', '.join(FAMILIES)}")
    need(r.use in USES, "use", f"{r.use!r} is not one of {', '.join(USES)}")
    need(r.sample_type in SAMPLE_TYPES, "sample_type",
         f"{r.sample_type!r} is not one of {', '.join(SAMPLE_TYPES)}")
    need(r.sample_type == FAMILY_TYPE[r.family], "sample_type",
         f"{r.sample_type!r} does not fit family {r.family!r} (expected {FAMILY_TYPE[r.family]!r})")
    need(r.source.homepage.startswith("http"), "source.homepage", "not a URL")
    need(bool(r.source.metadata), "source.metadata", "empty")
    need(r.availability.status in STATUSES, "availability.status",
         f"{r.availability.status!r} is not one of {', '.join(STATUSES)}")
    need(len(r.availability.as_of) == 7 and r.availability.as_of[4] == "-", "availability.as_of",
         f"{r.availability.as_of!r} is not YYYY-MM")
    if r.availability.status in ("withdrawn", "restricted", "gated"):
        need(bool(r.availability.replacement.strip()), "availability.replacement",
             f"a {r.availability.status} dataset must name a replacement or the way to get access")
    need(bool(r.licence.name.strip()) and bool(r.licence.media.strip()), "licence", "empty")
    d = r.download
    need(d.tool in TOOLS, "download.tool", f"{d.tool!r} is not one of {', '.join(TOOLS)}")
    if d.tool in ("img2dataset", "video2dataset"):
        need(d.tool in d.command, "download.command", f"does not run {d.tool}")
        need("webdataset" in d.command, "download.command", "does not write WebDataset shards")
        need(_passes(d.command, "url_col", d.url_col), "download.command",
             f"does not use url_col {d.url_col!r}")
        if d.caption_col:
            need(_passes(d.command, "caption_col", d.caption_col), "download.command",
                 f"does not use caption_col {d.caption_col!r}")
        for col in d.save_additional_columns:
            need(col in d.command, "download.command", f"does not save column {col!r}")
    need(bool(d.command.strip()), "download.command", "empty")
    need(d.samples_per_shard > 0, "download.samples_per_shard", "must be > 0")
    need(r.expected.samples > 0, "expected.samples", "must be > 0")
    need(bool(r.filters), "filters", "empty (say 'none' explicitly)")
    need(bool(r.layout.members), "layout.members", "empty")
    media = {"pair": ("jpg", "png", "webp"), "video": ("mp4", "webm", "mkv"),
             "interleaved": ("json",)}[r.sample_type]
    need(any(m in r.layout.members for m in media), "layout.members",
         f"a {r.sample_type} sample needs one of {', '.join(media)}")
    need(bool(r.references) and all(u.startswith("http") for u in r.references), "references",
         "needs at least one URL, and only URLs")
    return r


def recipes_dir() -> Path:
    """The repository's ``data_recipes/`` (editable install), or ``$MMGEN_RECIPES_DIR``."""
    env = os.environ.get("MMGEN_RECIPES_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[3] / "data_recipes"


def recipe_names() -> list[str]:
    return sorted(p.stem for p in recipes_dir().glob("*.yaml"))


def load_recipe(name_or_path: str) -> Recipe:
    """A recipe by name (``data_recipes/<name>.yaml``) or path; ValueError / FileNotFoundError
    in one line when it does not exist or does not validate."""
    import yaml

    path = Path(name_or_path)
    if not path.suffix:
        path = recipes_dir() / f"{name_or_path}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"no recipe '{name_or_path}' (known: {', '.join(recipe_names())})")
    with open(path) as f:
        try:
            data = yaml.safe_load(f)
        except yaml.YAMLError as exn:
            raise ValueError(f"{path}: not valid YAML: {str(exn).splitlines()[0]}") from exn
    recipe = validate(_build(Recipe, data, path.stem), path.stem)
    if recipe.name != path.stem:
        raise ValueError(f"{path.stem}.name: {recipe.name!r} differs from the file name")
    return recipe


# ----------------------------------------------------------------------------------------------
# Metadata conversion: parquet / jsonl / json / csv / tsv -> the download tool's input
# ----------------------------------------------------------------------------------------------

def read_table(path: str) -> list[dict]:
    """Rows of a metadata file as dicts. Parquet needs pyarrow (not a dependency of mmgen)."""
    p = path.lower()
    opener = gzip.open if p.endswith(".gz") else open
    base = p[:-3] if p.endswith(".gz") else p
    if base.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError as exn:
            raise ValueError(f"reading {path} needs pyarrow (pip install pyarrow)") from exn
        return pq.read_table(path).to_pylist()
    with opener(path, "rt", encoding="utf-8", newline="") as f:
        if base.endswith(".jsonl"):
            return [json.loads(line) for line in f if line.strip()]
        if base.endswith(".json"):
            data = json.load(f)
            if isinstance(data, dict):   # column-oriented {"col": [...], ...}
                cols = list(data)
                return [dict(zip(cols, vals)) for vals in zip(*(data[c] for c in cols))]
            return list(data)
        if base.endswith((".csv", ".tsv")):
            return list(csv.DictReader(f, delimiter="\t" if base.endswith(".tsv") else ","))
    raise ValueError(f"{path}: unknown metadata format (parquet, jsonl, json, csv, tsv, optionally .gz)")


def convert_metadata(src: str, dst: str, columns: dict[str, str], explode: str = "") -> int:
    """Write ``dst`` (.jsonl or .csv) with the columns ``{new: old}`` of ``src``; returns rows.

    ``explode``: a list column (OBELICS ``images``, MMC4 ``image_info``) to turn into one row per
    non-null element, with ``file`` (basename of ``src``), ``doc`` (row number) and ``index``
    (position in the list) added, together unique across files (a
    dict element adds its scalar fields, e.g. ``raw_url``, ``image_name``): the URL list
    img2dataset needs for the images of interleaved documents.
    """
    rows = read_table(src)
    missing = sorted({old for old in columns.values()} - set(rows[0])) if rows else []
    if missing:
        raise ValueError(f"{src}: no column(s) {', '.join(missing)} (columns: {', '.join(rows[0])})")
    out: list[dict] = []
    for i, row in enumerate(rows):
        if explode:
            values = row.get(explode)
            if not isinstance(values, list):
                raise ValueError(f"{src}: row {i}: column {explode!r} is not a list")
            for j, v in enumerate(values):
                if v is None:
                    continue
                # a dict element (MMC4's image_info entries) contributes its fields
                fields = {k: x for k, x in v.items() if isinstance(x, (str, int, float))} \
                    if isinstance(v, dict) else {explode: v}
                out.append({"file": os.path.basename(src), "doc": i, "index": j, **fields,
                            **{new: row[old] for new, old in columns.items()}})
        else:
            out.append({new: row[old] for new, old in columns.items()})
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    if dst.endswith(".jsonl"):
        with open(dst, "w", encoding="utf-8") as f:
            for r in out:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    elif dst.endswith(".csv"):
        with open(dst, "w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(out[0]) if out else list(columns))
            writer.writeheader()
            writer.writerows(out)
    else:
        raise ValueError(f"{dst}: write .jsonl or .csv (both img2dataset and video2dataset read them)")
    return len(out)
