# `mmgen data ...`: make embedded datasets, prepare recipes, check / index / inspect shards.
"""Sub-commands of ``mmgen data`` (``add_data_commands`` adds them to the top-level parser):

* ``make-shapes``, ``make-shapes-video``, ``make-shapes-docs``: the embedded generated datasets.
* ``prepare RECIPE``: print (or ``--run``) the commands that download a recipe into shards;
  ``--metadata FILE`` converts parquet/jsonl/json/csv/tsv metadata into the tool's input first.
* ``check SHARDS...``: read and decode every member; one line per problem; exit 1 when a shard is
  unusable or missing (or, with ``--strict``, when anything is wrong).
* ``index SHARDS...``: sample counts per shard, written next to the shards (``shardindex.json``).
* ``stats SHARDS...``: shards, samples, bytes, member types, caption lengths, image sizes; video
  resolution, frame rate and duration.
* ``preview SHARDS...``: a PNG contact sheet of the first samples with their captions.
* ``encode SHARDS... --codec C --out DIR --image-size S``: latent shards of a frozen codec
  (``mmgen/data/tools/encode.py``), tagged with its fingerprint for the loader's check.

``SHARDS...`` is one or more shard files, directories, globs or brace patterns (or several
joined by "::"), so a list the shell expanded (``/data/laion/{00000..00099}.tar``) works too.

Bad input (no such shards, recipe or file) is one ``mmgen: error:`` line and exit code 2
(handled by ``mmgen.cli.main``).
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path


# ----------------------------------------------------------------------------------------------
# Embedded datasets
# ----------------------------------------------------------------------------------------------

def cmd_make_shapes(a) -> None:
    from mmgen.data.synthetic.shapes import make_splits

    paths = make_splits(a.out, num_train=a.train, num_val=a.val, image_size=a.image_size,
                        seed=a.seed, samples_per_shard=a.per_shard)
    counts = ", ".join(f"{len(v)} {k} shards" for k, v in paths.items())
    print(f"wrote {counts} under {Path(a.out).resolve()}")


def cmd_train_tokenizer(a) -> None:
    from mmgen.data.tools.tokenizer import shard_texts, train_bpe
    from mmgen.models.tokenizers import build_tokenizer

    paths, _ = shard_paths(a.shards)
    path = train_bpe(shard_texts(paths), a.out, vocab_size=a.vocab_size, min_frequency=a.min_frequency)
    tok = build_tokenizer(f"hf:{a.out}")
    print(f"wrote {path} ({tok.vocab_size} ids with mmgen's specials; data.tokenizer=hf:{a.out}) "
          f"from {len(paths)} shards")


def cmd_make_shapes_video(a) -> None:
    from mmgen.data.synthetic.shapes_video import make_video_splits

    paths = make_video_splits(a.out, a.train, a.val, a.per_shard, a.image_size, a.frames, a.fps,
                              a.seed)
    counts = ", ".join(f"{len(v)} {k} shards" for k, v in paths.items())
    print(f"wrote {counts} of {a.frames}-frame {a.image_size}-px clips under {Path(a.out).resolve()}")


def cmd_make_shapes_docs(a) -> None:
    from mmgen.data.synthetic.shapes_docs import write_document_shards

    out = Path(a.out)
    tr = write_document_shards(str(out / "train"), a.train, a.per_shard, a.image_size, a.seed,
                               prefix="shapes-docs-train")
    va = write_document_shards(str(out / "val"), a.val, a.per_shard, a.image_size, a.seed + 1,
                               prefix="shapes-docs-val")
    print(f"wrote {len(tr)} train shards, {len(va)} val shards of interleaved documents under "
          f"{out.resolve()}")


# ----------------------------------------------------------------------------------------------
# prepare
# ----------------------------------------------------------------------------------------------

def _steps(recipe, out: str) -> list[str]:
    d = recipe.download
    steps = [f"mkdir -p {shlex.quote(out)}"]
    steps += [c.replace("{out}", out).strip() for c in d.metadata_commands]
    steps.append(" ".join(d.command.replace("{out}", out).split()))
    steps.append(f"mmgen data check {shlex.quote(out)}")
    steps.append(f"mmgen data index {shlex.quote(out)}")
    return steps


def cmd_prepare(a) -> None:
    from mmgen.data.tools.recipes import convert_metadata, load_recipe

    r = load_recipe(a.recipe)
    out = a.out or f"data/{r.name}"
    av = r.availability
    print(f"# {r.title} ({r.name}): {r.family}, yields mmgen '{r.sample_type}' samples, for {r.use}")
    print(f"# licence: {r.licence.name}; media: {r.licence.media}")
    print(f"# availability ({av.as_of}): {av.status}. {av.notes}".rstrip())
    if av.replacement:
        print(f"# instead / access: {av.replacement}")
    print(f"# expected: {r.expected.samples:,} listed; {r.expected.downloadable}; {r.expected.size}")
    if a.metadata:
        columns = dict(kv.split("=", 1) for kv in a.map) if a.map else {
            k: k for k in [r.download.url_col, r.download.caption_col] if k}
        dst = a.convert_to or str(Path(out) / "metadata.jsonl")
        n = convert_metadata(a.metadata, dst, columns, a.explode)
        print(f"# converted {a.metadata} -> {dst} ({n} rows, columns {', '.join(columns)})")
    if r.download.config_yaml:
        cfg_path = Path(out) / f"{r.name}-video2dataset.yaml"
        if a.run:
            cfg_path.parent.mkdir(parents=True, exist_ok=True)
            cfg_path.write_text(r.download.config_yaml)
        print(f"# video2dataset config ({cfg_path}):")
        for line in r.download.config_yaml.rstrip().splitlines():
            print(f"#   {line}")
    steps = _steps(r, out)
    if not a.run:
        print("\n".join(steps))
        return
    if av.status == "withdrawn" and not a.force:
        why = re.split(r"[.;] ", av.notes.strip())[0]
        raise ValueError(f"recipe {r.name} is withdrawn ({why}); "
                         f"use {av.replacement.strip()} or pass --force")
    tool = r.download.tool
    if tool != "script" and shutil.which(tool) is None:
        raise ValueError(f"{tool} is not installed (pip install {tool}); the commands above show "
                         f"what would run")
    for step in steps:
        print(f"+ {step}", flush=True)
        rc = subprocess.run(step, shell=True).returncode
        if rc != 0:
            print(f"mmgen: error: step failed with exit code {rc}: {step}", file=sys.stderr)
            sys.exit(1)


# ----------------------------------------------------------------------------------------------
# check / index / stats / preview
# ----------------------------------------------------------------------------------------------

def shard_paths(patterns: list[str], require_tar: bool = True) -> tuple[list[str], list[str]]:
    """Every shard named by the command's arguments, sorted, each once, and the arguments that
    name none (``[]`` unless ``require_tar`` is False: then FileNotFoundError for the first).

    Args:
        patterns: files, directories, globs or brace patterns (or "::"-joined lists of those).
        require_tar: refuse (ConfigError) a named file that is not a tar; ``check`` passes
            False and reports such a file as an unusable shard instead.
    """
    from mmgen.data.sources import expand_shards

    paths: dict[str, None] = {}
    missing: list[str] = []
    for pattern in patterns:
        try:
            paths.update(dict.fromkeys(expand_shards(pattern, require_tar=require_tar)))
        except FileNotFoundError:
            if require_tar:
                raise
            missing.append(pattern)
    return sorted(paths), missing


def cmd_check(a) -> None:
    import json

    from mmgen.data.tools.check import ShardReport, Problem, check_shard

    paths, missing = shard_paths(a.shards, require_tar=False)
    if not paths and missing:  # nothing to check: the one-line error of a bad pattern
        shard_paths(missing[:1])
    reports = []
    for pattern in missing:
        rep = ShardReport(pattern, unusable="no such shard file")
        rep.problems.append(Problem(pattern, None, "missing_shard", "no shard file matches this name"))
        reports.append(rep)
        print(rep.problems[0].line())
        print(rep.summary(), flush=True)
    for path in paths:
        rep = _check_one(path, a.type, check_shard, ShardReport, Problem)
        reports.append(rep)
        sample_problems = [p for p in rep.problems if p.key is not None]
        for p in [p for p in rep.problems if p.key is None] + sample_problems[:a.max_lines]:
            print(p.line())
        if len(sample_problems) > a.max_lines:
            print(f"{path}: ... {len(sample_problems) - a.max_lines} more problems "
                  f"(--max-lines, or --json for all)")
        print(rep.summary(), flush=True)
    samples = sum(r.samples for r in reports)
    ok = sum(r.ok for r in reports)
    unusable = [r for r in reports if r.unusable]
    problems = sum(len(r.problems) for r in reports)
    print(f"checked {len(reports)} shards, {samples} samples: {ok} ok, {samples - ok} with "
          f"problems; {len(unusable)} unusable shard(s)"
          + (": " + ", ".join(os.path.basename(r.path) for r in unusable) if unusable else ""))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"shards": [r.to_json() for r in reports]}, f, indent=1)
    if unusable or (a.strict and problems):
        sys.exit(1)


def _check_one(path: str, kind: str, check_shard, ShardReport, Problem):
    """``check_shard`` of a local or remote shard (a remote one is downloaded to a temporary
    file first; the report names the URL)."""
    from mmgen.data.config import RemoteConfig
    from mmgen.data.remote import ShardUnavailable, is_remote
    from mmgen.data.remote_shards import local_copy

    if not is_remote(path):
        return check_shard(path, kind)
    try:
        with local_copy(path, RemoteConfig()) as local:
            rep = check_shard(local, kind)
    except ShardUnavailable as exn:
        rep = ShardReport(path, unusable=f"unreachable: {exn.reason}")
        rep.problems.append(Problem(path, None, "unreachable_shard", exn.reason))
        return rep
    rep.path = path
    for p in rep.problems:
        p.shard = path
    return rep


def cmd_index(a) -> None:
    import json

    from mmgen.data.tools.check import INDEX_NAME, build_index

    from mmgen.data.remote import is_remote

    by_dir: dict[str, list[str]] = {}
    paths = shard_paths(a.shards)[0]
    remote = [p for p in paths if is_remote(p)]
    if remote:   # the index is written next to the shards, where they are made
        raise ValueError(f"data index: {remote[0]} is remote; index the shards where they are "
                         f"written, then upload the folder with its index files")
    for p in paths:
        by_dir.setdefault(os.path.dirname(os.path.abspath(p)), []).append(p)
    for folder, paths in sorted(by_dir.items()):
        index = build_index(paths, a.name, offsets=not a.no_offsets)
        target = os.path.join(folder, INDEX_NAME)
        tmp = target + ".tmp"
        with open(tmp, "w") as f:
            json.dump(index, f, indent=1)
        os.replace(tmp, target)
        total = sum(e["nsamples"] for e in index["shardlist"])
        damaged = [e["url"] for e in index["shardlist"] if "error" in e]
        print(f"{target}: {len(paths)} shards, {total} samples"
              + (f"; damaged: {', '.join(damaged)}" if damaged else ""))


def cmd_stats(a) -> None:
    import io

    import numpy as np
    from PIL import Image

    from mmgen.data.tools.check import caption_of, detect_type, read_index, video_info
    from mmgen.data.decode import IMAGE_EXTS, VIDEO_EXTS
    from mmgen.data.sources import ShardFile

    from mmgen.data.config import RemoteConfig
    from mmgen.data.remote import folder_index, is_remote, shard_name
    from mmgen.data.remote_shards import local_copy

    rc = RemoteConfig()
    paths = shard_paths(a.shards)[0]
    total = size = 0
    indexed = 0
    exts: Counter = Counter()
    types: Counter = Counter()
    captions: list[int] = []
    sides: list[int] = []
    image_sizes: Counter = Counter()
    videos: list[dict] = []
    unreadable_videos = 0
    damaged = []
    for url in paths:
        if is_remote(url):
            entry = folder_index(url, rc).get(shard_name(url)) if a.sample == 0 else None
            if entry is not None:   # counts from the store's index, nothing downloaded
                total += int(entry["nsamples"])
                size += int(entry.get("filesize", 0))
                indexed += 1
                continue
        with local_copy(url, rc) as path:
            size += os.path.getsize(path)
            entry = read_index(os.path.dirname(os.path.abspath(path))).get(os.path.basename(path))
            sf = None
            if entry is not None and entry.get("filesize") == os.path.getsize(path) and a.sample == 0:
                total += int(entry["nsamples"])
                indexed += 1
                continue
            sf = ShardFile(path)
            total += len(sf)
            if sf.error:
                damaged.append(f"{shard_name(url)} ({sf.error})")
            for s in sf.samples:
                exts.update(list(s.members))
            for i in range(min(a.sample, len(sf))):
                m = sf.load(i)
                types[detect_type(m)] += 1
                cap = caption_of(m)
                if cap is not None:
                    captions.append(len(cap))
                ext = next((e for e in IMAGE_EXTS if e in m), None)
                if ext:
                    try:
                        with Image.open(io.BytesIO(m[ext])) as im:   # header only: cheap
                            sides.append(min(im.size))
                            image_sizes[f"{im.size[0]}x{im.size[1]}"] += 1
                    except Exception:  # noqa: BLE001 - check reports it; stats only counts
                        pass
                vext = next((e for e in VIDEO_EXTS if e in m), None)
                if vext:
                    info = video_info(m[vext])
                    if info is None:
                        unreadable_videos += 1
                    else:
                        videos.append(info)
            sf.close()
    print(f"shards: {len(paths)} ({indexed} from {('shardindex.json')})   samples: {total:,}   "
          f"bytes: {size / 2**20:,.1f} MiB   per sample: {size / max(total, 1) / 1024:,.1f} KiB")
    if exts:
        print("members: " + ", ".join(f".{e} {n:,}" for e, n in exts.most_common()))
    if types:
        print("types (first samples of each shard): " + ", ".join(f"{t} {n}" for t, n in types.items()))
    if captions:
        c = np.array(captions)
        print(f"caption characters: mean {c.mean():.1f}, median {np.median(c):.0f}, "
              f"p95 {np.percentile(c, 95):.0f}, max {c.max()}  (~ byte tokens)")
    if sides:
        s = np.array(sides)
        print(f"image short side (px): median {np.median(s):.0f}, min {s.min()}, max {s.max()}")
        print("image sizes (px): " + _most_common(image_sizes))
    for line in _video_lines(videos, unreadable_videos):
        print(line)
    if damaged:
        print("damaged: " + "; ".join(damaged))


def _most_common(counts: Counter, n: int = 3) -> str:
    text = ", ".join(f"{k} ({v})" for k, v in counts.most_common(n))
    return text + (f", {len(counts) - n} other sizes" if len(counts) > n else "")


def _video_lines(videos: list[dict], unreadable: int) -> list[str]:
    """Resolution, frame rate, duration and frame count of the sampled clips (median, range)."""
    import numpy as np

    if not videos and not unreadable:
        return []
    out = [f"video clips read: {len(videos)}" + (f" ({unreadable} unreadable)" if unreadable else "")]
    if not videos:
        return out
    out.append("video resolution (px): " + _most_common(Counter(f"{v['width']}x{v['height']}" for v in videos)))

    def spread(key: str, unit: str, fmt: str) -> str | None:
        vals = np.array([v[key] for v in videos if v.get(key)], dtype=float)
        if not len(vals):
            return None
        return (f"{key} ({unit}): median {np.median(vals):{fmt}}, min {vals.min():{fmt}}, "
                f"max {vals.max():{fmt}}")

    parts = [spread("fps", "frames/s", ".3g"), spread("duration", "s", ".2f"), spread("frames", "count", ".0f")]
    out += [f"video {p}" for p in parts if p]
    return out


def cmd_preview(a) -> None:
    from mmgen.data.tools.preview import contact_sheet

    out = contact_sheet(shard_paths(a.shards)[0], a.out, a.num, a.size, a.type)
    print(f"wrote {out} ({a.num} samples at most)")


def cmd_encode(a) -> None:
    from mmgen.data.tools.encode import encode_shards
    from mmgen.models.codecs import build_codec

    # latents are cached unpatched, so the codec's geometry at patch size 1 is all it needs
    codec = build_codec(a.codec, 1)
    info = encode_shards(" :: ".join(a.shards), codec, a.image_size, a.out, a.batch_size, a.device)
    skipped = ", ".join(f"{k} {v}" for k, v in sorted(info["skipped"].items())) or "none"
    print(f"encoded {info['samples']} samples with {a.codec} (fingerprint {info['fingerprint']}) "
          f"into {Path(a.out).resolve()}; skipped: {skipped}")


# ----------------------------------------------------------------------------------------------
# The parser
# ----------------------------------------------------------------------------------------------

def add_data_commands(subparsers) -> None:
    """Add ``mmgen data`` and its sub-commands to the top-level sub-parsers."""
    data = subparsers.add_parser("data", help="datasets and shards").add_subparsers(
        dest="data_command", required=True)

    ms = data.add_parser("make-shapes", help="write the embedded captioned-shapes dataset as WebDataset shards")
    ms.add_argument("--out", default="data/shapes")
    ms.add_argument("--train", type=int, default=20000, help="training samples")
    ms.add_argument("--val", type=int, default=1000, help="held-out samples")
    ms.add_argument("--image-size", type=int, default=32)
    ms.add_argument("--per-shard", type=int, default=1000)
    ms.add_argument("--seed", type=int, default=0)
    ms.set_defaults(func=cmd_make_shapes)

    tk = data.add_parser("train-tokenizer", help="train a byte-level BPE tokenizer.json on the shards' captions "
                         "and texts (for data.tokenizer=hf:DIR)")
    tk.add_argument("shards", nargs="+", help="shard files, directories, globs or brace patterns")
    tk.add_argument("--out", required=True, help="directory for tokenizer.json")
    tk.add_argument("--vocab-size", type=int, default=512, help="at most this many ids, the 256 bytes included")
    tk.add_argument("--min-frequency", type=int, default=2)
    tk.set_defaults(func=cmd_train_tokenizer)

    mv = data.add_parser("make-shapes-video", help="write captioned moving-shape mp4 clips as shards")
    mv.add_argument("--out", default="data/shapes_video")
    mv.add_argument("--train", type=int, default=2000)
    mv.add_argument("--val", type=int, default=200)
    mv.add_argument("--image-size", type=int, default=32)
    mv.add_argument("--frames", type=int, default=16)
    mv.add_argument("--fps", type=int, default=8)
    mv.add_argument("--per-shard", type=int, default=100)
    mv.add_argument("--seed", type=int, default=0)
    mv.set_defaults(func=cmd_make_shapes_video)

    md = data.add_parser("make-shapes-docs", help="write interleaved text+shape-image documents as shards")
    md.add_argument("--out", default="data/shapes_docs")
    md.add_argument("--train", type=int, default=5000)
    md.add_argument("--val", type=int, default=500)
    md.add_argument("--image-size", type=int, default=32)
    md.add_argument("--per-shard", type=int, default=500)
    md.add_argument("--seed", type=int, default=0)
    md.set_defaults(func=cmd_make_shapes_docs)

    pr = data.add_parser("prepare", help="print (or --run) a recipe's download commands")
    pr.add_argument("recipe", help="recipe name (data_recipes/<name>.yaml) or path")
    pr.add_argument("--out", default="", help="output folder of the shards (default data/<name>)")
    pr.add_argument("--run", action="store_true", help="run the commands (needs the download tool)")
    pr.add_argument("--force", action="store_true", help="run even a withdrawn recipe")
    pr.add_argument("--metadata", default="", help="convert this parquet/jsonl/json/csv/tsv first")
    pr.add_argument("--convert-to", default="", help="converted file (.jsonl or .csv)")
    pr.add_argument("--map", action="append", default=[], help="output column=input column (repeatable)")
    pr.add_argument("--explode", default="", help="list column to turn into one row per element")
    pr.set_defaults(func=cmd_prepare)

    ck = data.add_parser("check", help="decode every member; report problems; exit 1 if a shard is unusable")
    ck.add_argument("shards", nargs="+", help="shard files, directories, globs or brace patterns (or several joined by '::')")
    ck.add_argument("--type", default="auto", choices=["auto", "pair", "video", "interleaved"])
    ck.add_argument("--max-lines", type=int, default=50, help="problem lines printed per shard")
    ck.add_argument("--json", default="", help="also write the full report here")
    ck.add_argument("--strict", action="store_true", help="exit 1 on any problem, not only unusable shards")
    ck.set_defaults(func=cmd_check)

    ix = data.add_parser("index", help="write sample counts per shard (shardindex.json) and sample "
                                       "byte ranges (<shard>.offsets.json) next to the shards")
    ix.add_argument("shards", nargs="+", help="shard files, directories, globs or brace patterns (or several joined by '::')")
    ix.add_argument("--name", default="")
    ix.add_argument("--no-offsets", action="store_true",
                    help="do not write <shard>.offsets.json (sample byte ranges for remote reading)")
    ix.set_defaults(func=cmd_index)

    st = data.add_parser("stats", help="sample counts, sizes, member types, caption lengths, video "
                                       "resolution / fps / duration")
    st.add_argument("shards", nargs="+", help="shard files, directories, globs or brace patterns (or several joined by '::')")
    st.add_argument("--sample", type=int, default=50, help="samples per shard to read for content stats "
                                                          "(0: counts only, from shardindex.json when fresh)")
    st.set_defaults(func=cmd_stats)

    en = data.add_parser("encode", help="cache a frozen codec's latents/codes of pair shards as latent shards "
                                        "(keyed by the source keys, tagged with the codec's fingerprint)")
    en.add_argument("shards", nargs="+", help="shard files, directories, globs or brace patterns (or several joined by '::')")
    en.add_argument("--codec", required=True, help="the codec, as data.codec (e.g. diffusers:/models/vae)")
    en.add_argument("--out", required=True, help="output directory (empty or new)")
    en.add_argument("--image-size", type=int, required=True, help="side the images are decoded at (= data.image_size)")
    en.add_argument("--batch-size", type=int, default=32, help="images per encoder call")
    en.add_argument("--device", default="cpu", help="where the codec runs (cpu, cuda)")
    en.set_defaults(func=cmd_encode)

    pv = data.add_parser("preview", help="PNG contact sheet of the first samples with captions")
    pv.add_argument("shards", nargs="+", help="shard files, directories, globs or brace patterns (or several joined by '::')")
    pv.add_argument("--out", default="preview.png")
    pv.add_argument("--num", type=int, default=16)
    pv.add_argument("--size", type=int, default=128, help="tile side in pixels")
    pv.add_argument("--type", default="auto", choices=["auto", "pair", "video", "interleaved"])
    pv.set_defaults(func=cmd_preview)

