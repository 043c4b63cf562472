# Data-pipeline throughput: samples/s per worker process for 256-px JPEG pairs and short mp4 clips.
"""Writes one shard of ~1,000 image-text pairs (256-px JPEGs, photo-like noise texture, ~60-char
captions) and one of ~1,000 short clips (2 s, 12 fps, 256x144 H.264 with a keyframe every
second), then times, in one process (= one DataLoader worker):

* ``read``: tar index + member reads only;
* ``decode``: + Pillow / PyAV decode and resize (clips: 8 frames at 4 fps from a random start);
* ``pipeline``: the real loader (decode + resize + patchify + tokenise + pack into batches).

It converts the GPU's consumption into samples/s with the packing measured here (positions per
document and padding) and prints how many worker processes keep up. Defaults follow
``experiment=gpu_1b`` / ``data=mix_v1`` (128-px images, 8-px patches, 64-px 8-frame clips,
seq_len 2048); the 1b flavor trains at ~55k tokens/s on one H100 (PLATFORM.md, torch.compile).

    python bench/data_throughput.py            # ~1 minute on a free core
    python bench/data_throughput.py --pairs 300 --clips 200   # quicker
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import tarfile
import tempfile
import time

import numpy as np
from PIL import Image

WORDS = ("a photo of the old red house near river with two dogs playing in green grass under "
         "blue sky at sunset city street car people walking market wooden table coffee cup book "
         "mountain lake snow winter beach").split()


def _caption(rng) -> str:
    return " ".join(rng.choice(WORDS, int(rng.integers(8, 14))))


def _photo(rng, w: int, h: int) -> np.ndarray:
    """Smooth colour fields plus grain: JPEG sizes like real 256-px photos (~20-40 KB)."""
    low = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(low).resize((w, h), Image.Resampling.BICUBIC), np.float32)
    img += rng.normal(0, 14, img.shape)
    return img.clip(0, 255).astype(np.uint8)


def _add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_pair_shard(path: str, n: int, seed: int = 0) -> float:
    rng = np.random.default_rng(seed)
    total = 0
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            w = int(rng.integers(256, 384))      # img2dataset-style: short side 256, any aspect
            buf = io.BytesIO()
            Image.fromarray(_photo(rng, w, 256)).save(buf, format="JPEG", quality=90)
            total += buf.tell()
            key = f"{i:09d}"
            cap = _caption(rng)
            _add(tar, f"{key}.jpg", buf.getvalue())
            _add(tar, f"{key}.txt", cap.encode())
            _add(tar, f"{key}.json", json.dumps({"caption": cap, "width": w}).encode())
    return total / n


def _clip_bytes(rng, frames=24, fps=12, w=256, h=144) -> bytes:
    import av

    base = _photo(rng, w + 64, h)
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as c:
        s = c.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        s.options = {"crf": "23", "preset": "veryfast", "g": str(fps), "threads": "1"}
        for t in range(frames):
            f = base[:, 2 * t:2 * t + w].copy()             # a slow pan
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return buf.getvalue()


def write_clip_shard(path: str, n: int, distinct: int = 50, seed: int = 0) -> float:
    """``n`` clips; ``distinct`` different encodes are repeated (decode work is identical, the
    encode is what would take minutes)."""
    rng = np.random.default_rng(seed)
    clips = [_clip_bytes(rng) for _ in range(distinct)]
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            key = f"{i:09d}"
            _add(tar, f"{key}.mp4", clips[i % distinct])
            _add(tar, f"{key}.txt", _caption(rng).encode())
    return float(np.mean([len(c) for c in clips]))


# ----------------------------------------------------------------------------------------------

def time_read(path: str) -> float:
    from mmgen.data.sources import ShardFile

    t = time.perf_counter()
    sf = ShardFile(path)
    for i in range(len(sf)):
        sf.load(i)
    return len(sf) / (time.perf_counter() - t)


def time_decode(path: str, kind: str, cfg) -> float:
    from mmgen.data import decode as dec
    from mmgen.data.sources import ShardFile

    sf = ShardFile(path)
    t = time.perf_counter()
    for i in range(len(sf)):
        raw = sf.load(i)
        if kind == "pair":
            out = dec.decode_sample(raw, cfg.image_size)
        else:
            out = dec.decode_video_sample(raw, cfg.frame_size, cfg.video_frames, cfg.video_fps,
                                          cfg.video_clip_start, cfg.seed)
        assert not isinstance(out, tuple), out
    return len(sf) / (time.perf_counter() - t)


def time_pipeline(path: str, kind: str, cfg, num_workers: int, docs: int) -> dict:
    """Documents/s through the real loader, and the packing it achieved."""
    from mmgen.data import build_dataloader
    from mmgen.data.config import SourceConfig
    from mmgen.models.tokenizers.text import ByteTokenizer

    run = cfg.__class__(**{**cfg.__dict__, "num_workers": num_workers,
                           "sources": {kind: SourceConfig(path, type=kind)}, "weights": {}})
    loader = build_dataloader(run, ByteTokenizer(), 0, 1)
    it = iter(loader)
    next(it)                               # start-up (worker fork, first shard index) excluded
    start_docs = loader.stats()["documents"]
    t = time.perf_counter()
    for _ in it:
        if loader.stats()["documents"] - start_docs >= docs:
            break
    elapsed = time.perf_counter() - t
    s = loader.stats()
    n = s["documents"] - start_docs
    positions = s["batches"] * run.batch_size * run.seq_len
    return {"docs_per_s": n / elapsed, "padding": s["padding_fraction"],
            "positions_per_doc": positions * (1 - s["padding_fraction"]) / s["documents"]}


def remote_rows(root: str, pair_path: str, cfg, n: int, workers: int) -> dict:
    """The pair shard served over loopback HTTP (the tests' Range-capable server): read by
    byte ranges from its stored offsets (``mmgen data index``), and spooled (no index)."""
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from mmgen.data.config import RemoteConfig
    from mmgen.data.remote_shards import RangeShard, open_remote_shard
    from mmgen.data.tools.check import build_index
    from tests.remote_servers import ShardHTTPServer

    with open(os.path.join(root, "shardindex.json"), "w") as f:
        json.dump(build_index([pair_path], offsets=True), f)
    out = {}
    with ShardHTTPServer(root) as srv:
        url = f"{srv.url}/{os.path.basename(pair_path)}"
        for label, use_index in (("pair http ranges", True), ("pair http spooled", False)):
            rc = RemoteConfig(ranges="always" if use_index else "never")
            t = time.perf_counter()
            sf = open_remote_shard(url, rc)
            assert isinstance(sf, RangeShard) == use_index
            for i in range(len(sf)):
                if use_index:   # as the loader does: the next reads in flight
                    sf.prefetch(list(range(i + 1, min(len(sf), i + 1 + rc.read_ahead))))
                sf.load(i)
            read = len(sf) / (time.perf_counter() - t)
            sf.close()
            run = cfg.__class__(**{**cfg.__dict__, "remote": rc})
            r = {"read": read, "decode": float("nan")}
            r.update(time_pipeline(url, "pair", run, 0, int(n * 0.8)))
            if workers > 1:
                r[f"pipeline_{workers}w"] = time_pipeline(url, "pair", run, workers, int(n * 0.8))["docs_per_s"]
            out[label] = r
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=1000)
    p.add_argument("--clips", type=int, default=1000)
    p.add_argument("--gpu-tokens-per-s", type=float, default=55_000.0,
                   help="positions/s the GPU consumes (1b flavor, one H100, compiled)")
    p.add_argument("--workers", type=int, default=2, help="also time the loader with this many worker processes")
    p.add_argument("--image-size", type=int, default=128, help="training image side (gpu_1b: 128)")
    p.add_argument("--patch-size", type=int, default=8)
    p.add_argument("--out", default="", help="keep the generated shards here")
    p.add_argument("--no-remote", dest="remote", action="store_false",
                   help="skip the rows that read the pair shard over loopback HTTP")
    a = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    from mmgen.data.config import DataConfig

    cfg = DataConfig(image_size=a.image_size, patch_size=a.patch_size, seq_len=2048, batch_size=4, video_size=64,
                     video_frames=8, video_fps=4.0, video_clip_start="random", num_workers=0)
    root = a.out or tempfile.mkdtemp(prefix="mmgen-bench-")
    os.makedirs(root, exist_ok=True)
    pair_path, clip_path = os.path.join(root, "pairs-000000.tar"), os.path.join(root, "clips-000000.tar")
    t = time.perf_counter()
    jpeg_kb = write_pair_shard(pair_path, a.pairs) / 1024
    mp4_kb = write_clip_shard(clip_path, a.clips) / 1024
    print(f"generated {a.pairs} pairs (mean JPEG {jpeg_kb:.1f} KB) and {a.clips} clips "
          f"(mean mp4 {mp4_kb:.1f} KB, 2 s 12 fps 256x144) in {time.perf_counter() - t:.1f} s")

    results = {}
    for kind, path, n in (("pair", pair_path, a.pairs), ("video", clip_path, a.clips)):
        r = {"read": time_read(path), "decode": time_decode(path, kind, cfg)}
        r.update(time_pipeline(path, kind, cfg, 0, int(n * 0.8)))
        if a.workers > 1:
            r[f"pipeline_{a.workers}w"] = time_pipeline(path, kind, cfg, a.workers, int(n * 0.8))["docs_per_s"]
        results[kind] = r
    if a.remote:
        results.update(remote_rows(root, pair_path, cfg, a.pairs, a.workers))

    print(f"\nper worker process (1 core; {os.cpu_count()} cores here, shared):")
    print(f"{'':18} {'tar read/s':>11} {'+decode/s':>10} {'pipeline/s':>11} {'pos/doc':>8} {'padding':>8}"
          + (f" {str(a.workers) + ' workers/s':>12}" if a.workers > 1 else ""))
    for kind, r in results.items():
        extra = f" {r[f'pipeline_{a.workers}w']:12.0f}" if a.workers > 1 else ""
        print(f"{kind:18} {r['read']:11.0f} {r['decode']:10.0f} {r['docs_per_s']:11.0f} "
              f"{r['positions_per_doc']:8.0f} {r['padding']:8.1%}{extra}")

    print(f"\nGPU demand at {a.gpu_tokens_per_s:,.0f} positions/s (seq_len {cfg.seq_len}, padding as measured):")
    for kind, r in results.items():
        per_doc = r["positions_per_doc"] / (1 - r["padding"])     # positions incl. padding
        need = a.gpu_tokens_per_s / per_doc
        workers = int(np.ceil(need / r["docs_per_s"]))
        print(f"  {kind:18}: {need:6.0f} docs/s needed; one worker makes {r['docs_per_s']:.0f}/s "
              f"-> {workers} worker process(es) per GPU keep up")
    print(json.dumps({"results": results, "jpeg_kb": jpeg_kb, "mp4_kb": mp4_kb}))
    if not a.out:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
