# The plain-PyTorch Transfusion-style reference step that bench/gpu_throughput.py compares mmgen with.
# Provenance: vendored on 2026-12-01 from the project's shared bench folder
# (/work/shared/bench/h100_baseline.py, the `../shared/bench/` beside a checkout; sha256 of that
# original: a4418ede72241521749125deb0406b82f3755e2053546948b20d1f993e0b35b8). Measured with
# the original on the lent H100 80GB (../shared/PLATFORM.md, 1.2B, seq 2048 x 4, bf16):
# eager + SDPA causal 39.2k tok/s (32.9% MFU vs 989 TFLOP/s), torch.compile + SDPA causal 52.9k
# (44.3%), torch.compile + FlexAttention with the Transfusion mask 51.8k (43.4%); ~37 GiB peak.
# Those tok/s are all positions / s, and their MFU is the PaLM estimate below (6N + 12 L d T per
# position, attention as if full); bench/gpu_throughput.py --like-for-like recounts the work with
# mmgen.metrics.flops instead.
# Changes from the original (run without options it does what the original did):
# * options --device, --shape, --runs, --iters/--warm, --no-ceilings, so the same step runs at a
#   tiny size on a CPU for a test;
# * a run "eager_sdpa_transfusion_mask": the Transfusion mask (causal | same image) as an SDPA
#   boolean mask, which runs on a CPU (FlexAttention has no backward there);
# * every result carries "params" and "layout" (rows, length, image spans, mask), from which
#   bench/gpu_throughput.py builds mmgen's equivalent batch.
"""Reference baseline for mmgen's GPU benchmark: hardware ceilings (bf16 matmul, copy bandwidth)
and a plain, torch.compile'd PyTorch training step of a 1.2B Transfusion-style model (text
next-token + image-patch diffusion loss in one transformer). Run it on the GPU machine in the
same call as mmgen's benchmark and compare tokens/s. On a CPU it runs a tiny version."""
import argparse, math, os, sys, time, json, subprocess
import torch, torch.nn as nn, torch.nn.functional as F

ALL_RUNS = ("eager_sdpa_causal", "compiled_sdpa_causal", "compiled_flex_transfusion_mask",
            "eager_sdpa_transfusion_mask")
ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
ap.add_argument("--shape", default="{}", help='JSON overrides of d, L, h, ffn, vocab, T, B, patch_dim')
ap.add_argument("--runs", default=",".join(ALL_RUNS[:3]), help=f"comma-separated, of {', '.join(ALL_RUNS)}")
ap.add_argument("--iters", type=int, default=0, help="timed steps (0: 10 on a GPU, 3 on a CPU)")
ap.add_argument("--warm", type=int, default=0, help="untimed steps after the first two (0: 3 / 1)")
ap.add_argument("--no-ceilings", action="store_true", help="skip the matmul and copy ceilings")
args = ap.parse_args()
RUNS = args.runs.split(",")
if not set(RUNS) <= set(ALL_RUNS):
    sys.exit(f"h100_baseline.py: error: --runs {args.runs}: unknown run (known: {', '.join(ALL_RUNS)})")

dev = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
SMALL = dev == "cpu"
res = {}

def bench(fn, iters=20, warm=5):
    for _ in range(warm): fn()
    if dev == "cuda": torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        if dev == "cuda":
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record(); fn(); e.record(); torch.cuda.synchronize(); ts.append(s.elapsed_time(e) / 1e3)
        else:
            t = time.perf_counter(); fn(); ts.append(time.perf_counter() - t)
    ts.sort(); return ts[len(ts) // 2]

# 1. ceilings
if not args.no_ceilings:
    n = 1024 if SMALL else 8192
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16); b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    t = bench(lambda: a @ b)
    res["bf16_matmul_tflops"] = 2 * n**3 / t / 1e12
    x = torch.randn(2**28 if not SMALL else 2**20, device=dev); y = torch.empty_like(x)
    t = bench(lambda: y.copy_(x))
    res["copy_GBps"] = 2 * x.numel() * 4 / t / 1e9
    print(json.dumps(res), flush=True)

# 2. model
class RMS(nn.Module):
    def __init__(s, d): super().__init__(); s.w = nn.Parameter(torch.ones(d))
    def forward(s, x): return F.rms_norm(x, (x.shape[-1],), s.w, 1e-6)

def rope(T, hd, device):
    inv = 1.0 / (10000 ** (torch.arange(0, hd, 2, device=device).float() / hd))
    f = torch.outer(torch.arange(T, device=device).float(), inv)
    return torch.cos(f), torch.sin(f)

def apply_rope(x, cos, sin):
    x1, x2 = x[..., ::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), -1).flatten(-2)

class Block(nn.Module):
    def __init__(s, d, h, ffn, attn_fn):
        super().__init__(); s.h = h; s.n1 = RMS(d); s.n2 = RMS(d); s.attn_fn = attn_fn
        s.qkv = nn.Linear(d, 3 * d, bias=False); s.o = nn.Linear(d, d, bias=False)
        s.w13 = nn.Linear(d, 2 * ffn, bias=False); s.w2 = nn.Linear(ffn, d, bias=False)
    def forward(s, x, cos, sin, mask):
        B, T, D = x.shape
        q, k, v = s.qkv(s.n1(x)).view(B, T, 3, s.h, D // s.h).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        x = x + s.o(s.attn_fn(q, k, v, mask).transpose(1, 2).reshape(B, T, D))
        g, u = s.w13(s.n2(x)).chunk(2, -1)
        return x + s.w2(F.silu(g) * u)

class Unified(nn.Module):
    def __init__(s, d, L, h, ffn, vocab, patch_dim, attn_fn):
        super().__init__()
        s.emb = nn.Embedding(vocab, d); s.pin = nn.Linear(patch_dim, d); s.tin = nn.Linear(256, d)
        s.blocks = nn.ModuleList(Block(d, h, ffn, attn_fn) for _ in range(L))
        s.norm = RMS(d); s.head = nn.Linear(d, vocab, bias=False); s.pout = nn.Linear(d, patch_dim)
        s.hd = d // h
    def forward(s, tokens, patches, img_mask, t, mask):
        x = s.emb(tokens)
        half = 128; fr = torch.exp(-math.log(1e4) * torch.arange(half, device=t.device) / half)
        temb = s.tin(torch.cat([torch.sin(t[:, None] * fr), torch.cos(t[:, None] * fr)], -1))
        x = torch.where(img_mask[..., None], s.pin(patches) + temb[:, None], x)
        cos, sin = rope(x.shape[1], s.hd, x.device)
        for blk in s.blocks: x = blk(x, cos, sin, mask)
        x = s.norm(x)
        return s.head(x), s.pout(x)

def sdpa_causal(q, k, v, mask): return F.scaled_dot_product_attention(q, k, v, is_causal=True)

if SMALL: d, L, h, ffn, vocab, T, B = 128, 2, 4, 256, 1000, 256, 2
else: d, L, h, ffn, vocab, T, B = 2048, 22, 16, 5632, 32000, 2048, 4
patch_dim = 16
shape = json.loads(args.shape)
if not set(shape) <= {"d", "L", "h", "ffn", "vocab", "T", "B", "patch_dim"}:
    sys.exit(f"h100_baseline.py: error: --shape {args.shape}: keys must be among d, L, h, ffn, vocab, T, B, patch_dim")
d, L, h, ffn, vocab, T, B = (shape.get(k, v) for k, v in
                             zip(("d", "L", "h", "ffn", "vocab", "T", "B"), (d, L, h, ffn, vocab, T, B)))
patch_dim = shape.get("patch_dim", patch_dim)
img_len = T // 8  # two images of T/8 patches each
def make_batch():
    tokens = torch.randint(0, vocab, (B, T), device=dev)
    img_mask = torch.zeros(B, T, dtype=torch.bool, device=dev)
    spans = [(T // 8, T // 8 + img_len), (T // 2, T // 2 + img_len)]
    for s0, s1 in spans: img_mask[:, s0:s1] = True
    return tokens, torch.randn(B, T, patch_dim, device=dev), img_mask, torch.rand(B, device=dev), spans

def run(name, attn_fn, mask_builder, compile_=True):
    torch.manual_seed(0)
    m = Unified(d, L, h, ffn, vocab, patch_dim, attn_fn).to(dev)
    N = sum(p.numel() for p in m.parameters()) - m.emb.weight.numel()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4, fused=(dev == "cuda"))
    tokens, patches, img_mask, tt, spans = make_batch()
    mask = mask_builder(spans)
    fwd = torch.compile(m) if compile_ else m
    def step():
        with torch.autocast(dev, dtype=torch.bfloat16):
            logits, pred = fwd(tokens, patches, img_mask, tt, mask)
            lm = F.cross_entropy(logits[:, :-1].float().reshape(-1, vocab), tokens[:, 1:].reshape(-1))
            dif = F.mse_loss(pred.float()[img_mask], patches[img_mask])
            loss = lm + 5.0 * dif
        loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
    t0 = time.perf_counter(); step(); step()
    if dev == "cuda": torch.cuda.synchronize()
    compile_s = time.perf_counter() - t0
    t = bench(step, iters=args.iters or (10 if not SMALL else 3), warm=args.warm or (3 if not SMALL else 1))
    flops_tok = 6 * N + 12 * L * d * T  # PaLM accounting, full attention
    tps = B * T / t
    r = {"name": name, "params_M": N / 1e6, "step_s": t, "tokens_per_s": tps,
         "model_tflops": flops_tok * tps / 1e12, "first_2_steps_s": compile_s,
         "max_mem_GiB": torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else None}
    r["mfu_vs_989"] = r["model_tflops"] / 989.0
    # what ran, for a like-for-like count of the same work (bench/gpu_throughput.py)
    r["params"] = N
    r["layout"] = {"rows": B, "length": T, "image_spans": [list(s) for s in spans], "patch_dim": patch_dim,
                   "mask": "causal" if attn_fn is sdpa_causal else "transfusion", "device": dev}
    print(json.dumps(r), flush=True); res[name] = r
    del m, opt
    if dev == "cuda": torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()

def dense_transfusion_mask(spans):
    # the same rule as the FlexAttention mask_mod below, as a boolean [T, T] (True = attend)
    img_id = torch.full((T,), -1, device=dev)
    for i, (s0, s1) in enumerate(spans): img_id[s0:s1] = i
    idx = torch.arange(T, device=dev)
    return (idx[:, None] >= idx[None, :]) | ((img_id[:, None] >= 0) & (img_id[:, None] == img_id[None, :]))

if "eager_sdpa_causal" in RUNS:
    run("eager_sdpa_causal", sdpa_causal, lambda spans: None, compile_=False)
if "compiled_sdpa_causal" in RUNS:
    run("compiled_sdpa_causal", sdpa_causal, lambda spans: None)
if "compiled_flex_transfusion_mask" in RUNS:
    try:
        from torch.nn.attention.flex_attention import flex_attention, create_block_mask
        flex = torch.compile(flex_attention)
        def build(spans):
            img_id = torch.full((T,), -1, device=dev, dtype=torch.int32)
            for i, (s0, s1) in enumerate(spans): img_id[s0:s1] = i
            def mm(b, hh, q, k): return (q >= k) | ((img_id[q] >= 0) & (img_id[q] == img_id[k]))
            return create_block_mask(mm, None, None, T, T, device=dev)
        run("compiled_flex_transfusion_mask", lambda q, k, v, m: flex(q, k, v, block_mask=m), build)
    except Exception as e:
        print("flex failed", repr(e)[:500])
if "eager_sdpa_transfusion_mask" in RUNS:
    run("eager_sdpa_transfusion_mask", lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m),
        dense_transfusion_mask, compile_=False)
print("SUMMARY", json.dumps(res))
