# The megatron backend's 2-rank cases in one torchrun launch: TP/SP/PP parity, checkpoints, export.
"""Run by tests/test_megatron.py as
``torchrun --nproc-per-node 2 tests/megatron_worker.py --shapes DIR --out DIR``.

Each case trains through the real Trainer (the code path of ``mmgen-train``). TP=2, TP=2+SP and
PP=2 on 2 ranks are one data-parallel rank, so they read the one-process data stream and must
reproduce tests/goldens/single.json. One launch: ``import megatron.core`` costs 8-14 s a process.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmgen.cli.preflight import compose_job  # noqa: E402
from mmgen.parallel.dist import DistInfo, barrier  # noqa: E402
from tests.worker_main import run_cases  # noqa: E402
from tests.goldens.worker import BASE, curve  # noqa: E402

MEGATRON = ["parallel=megatron"]


class Cases:
    def __init__(self, shapes: Path, out: Path, dist: DistInfo):
        self.shapes, self.out, self.dist = shapes, out, dist
        self.results: dict = {}

    def trainer(self, name: str, overrides: list[str], base: list[str] = BASE):
        from mmgen.trainer.trainer import Trainer

        job = compose_job([*base, "data.num_workers=0", *overrides, f"data.train_shards={self.shapes}/train",
                           f"data.val_shards={self.shapes}/val", f"run_dir={self.out / name}", f"name={name}"])
        if self.dist.is_main:
            Path(job.run_dir).mkdir(parents=True, exist_ok=True)
        barrier()
        return Trainer(job, self.dist)

    def record(self, name: str, **values) -> None:
        self.results.setdefault(name, {}).update(values)

    def train_curve(self, name: str, overrides: list[str]):
        t = self.trainer(name, overrides)
        t.train()
        if self.dist.is_main:
            self.record(name, curve=curve(self.out / name / "metrics.jsonl"))
        barrier()
        return t

    # -- cases --------------------------------------------------------------------------
    def compat(self) -> None:
        """The CPU compatibility layer's megatron sources are what it was written for; a changed
        one is named (checked here: this process has imported megatron anyway)."""
        from mmgen.parallel.megatron import cpu_compat

        try:
            cpu_compat.check_megatron_sources()
            ok = None
        except RuntimeError as e:
            ok = str(e)
        target = "megatron.core.optimizer.clip_grads:get_grad_norm_fp32"
        saved = dict(cpu_compat.PATCHED)
        cpu_compat.PATCHED[target] = "a fragment no megatron has"
        try:
            cpu_compat.check_megatron_sources()
            tampered = None
        except RuntimeError as e:
            tampered = str(e)
        finally:
            cpu_compat.PATCHED.clear()
            cpu_compat.PATCHED.update(saved)
        self.record("compat", error=ok, tampered=tampered, target=target)

    def tp2(self) -> None:
        """TP=2 (dp=1): the one-process golden, 20 steps."""
        t = self.train_curve("tp2", [*MEGATRON, "parallel.tp=2"])
        self.record("tp2", dims=t.engine.dims.degrees(),
                    local_qkv_rows=t.engine.stage.layers[0].attention.linear_qkv.weight.shape[0])

    def tp2_sp(self) -> None:
        self.train_curve("tp2_sp", [*MEGATRON, "parallel.tp=2", "parallel.sequence_parallel=true"])

    def pp2(self) -> None:
        """PP=2 with 2 micro-batches per step (1F1B), against the grad_accum=2 golden."""
        t = self.train_curve("pp2", [*MEGATRON, "parallel.pp=2", "trainer.grad_accum=2"])
        self.record("pp2", layer_ids=[list(t.engine.stage.layer_ids)], first=t.engine.stage.first)


    def reshard(self) -> None:
        """Weights saved at TP=2 (dist_checkpointing), loaded at TP=1 x DP=2: the same logits."""
        from mmgen.checkpoint.export import consolidated_state_dict

        t = self.trainer("reshard_tp2", [*MEGATRON, "parallel.tp=2", "trainer.steps=3", "checkpoint.enabled=true",
                                         "checkpoint.every=3"])
        t.train()
        batch = next(iter(t.loader)).to(t.dist.device)
        with torch.no_grad():
            before = t.engine.model(batch)["lm"]
        ckpt = self.out / "reshard_tp2" / "checkpoints" / "step_0000003"
        engine_state = t.engine.model_state_dict()
        del t
        t1 = self.trainer("reshard_tp1", [*MEGATRON, "checkpoint.enabled=false"])
        t1.engine.load_weights(ckpt)
        with torch.no_grad():
            after = t1.engine.model(batch)["lm"]
        self.record("reshard", max_abs_diff=float((before - after).abs().max()), logits_scale=float(before.abs().max()),
                    tp1_dims=t1.engine.dims.degrees())
        if self.dist.is_main:  # export: one plain state dict, no process group
            exported = consolidated_state_dict(ckpt)
            self.record("reshard", export_equal=_equal(exported, engine_state))
        barrier()

    def resume(self) -> None:
        """megatron DDP + distributed optimizer (DP=2): a run resumed at step 2 continues bit for bit."""
        extra = [*MEGATRON, "parallel.distributed_optimizer=true", "trainer.steps=4", "checkpoint.enabled=true",
                 "checkpoint.every=2"]
        self.train_curve("resume_a", extra)
        if self.dist.is_main:
            src = self.out / "resume_a" / "checkpoints" / "step_0000002"
            shutil.copytree(src, self.out / "resume_b_src" / "step_0000002")
        barrier()
        t = self.train_curve("resume_b", [*extra, f"checkpoint.resume={self.out / 'resume_b_src' / 'step_0000002'}"])
        self.record("resume", dims=t.engine.dims.degrees(), start_step=2)

    def from_ddp(self) -> None:
        """checkpoint.init_from a DDP run into megatron TP=2; the megatron checkpoint exports the same weights."""
        from mmgen.checkpoint.export import consolidated_state_dict

        self.trainer("ddp_src", ["parallel=ddp", "trainer.steps=2", "checkpoint.enabled=true",
                                 "checkpoint.every=2"]).train()
        ddp_ckpt = self.out / "ddp_src" / "checkpoints" / "step_0000002"
        t = self.trainer("from_ddp", [*MEGATRON, "parallel.tp=2", "checkpoint.enabled=true",
                                      f"checkpoint.init_from={ddp_ckpt}"])
        t.save_checkpoint()
        barrier()
        if self.dist.is_main:
            ddp = consolidated_state_dict(ddp_ckpt)
            back = consolidated_state_dict(self.out / "from_ddp" / "checkpoints" / "step_0000000")
            meta = json.loads((self.out / "from_ddp" / "checkpoints" / "step_0000000" / "meta.json").read_text())
            self.record("from_ddp", equal=_equal(ddp, back), meta={k: meta.get(k) for k in ("backend", "parallel")},
                        versions=meta.get("versions", {}))
        barrier()

    def hf_tp2(self) -> None:
        """checkpoint.init_from=hf:<dir> under TP=2: a tiny Qwen2 (q/k/v biases in the fused
        QKV, tied head), Qwen3 (qk-norm, n_heads * head_dim != dim) and Llama (llama3 RoPE
        scaling) give transformers' text logits; the Qwen2 run then steps (bias gradients
        through megatron DDP)."""
        from mmgen.models.tokenizers import build_tokenizer
        from mmgen.sampling.batching import build_batch
        from tests.hf_assets import TEXT, VOCAB, make_hf_model

        for kind in ("qwen2", "qwen3", "llama"):
            hf = self.out / f"hf_{kind}"
            ref = make_hf_model(hf, kind) if self.dist.is_main else None   # rank 0 writes, both read
            barrier()
            t = self.trainer(f"hf_{kind}", [*MEGATRON, "parallel.tp=2", f"model=hf:{hf}", f"data.tokenizer=hf:{hf}",
                                            f"checkpoint.init_from=hf:{hf}", "trainer.steps=1"],
                             base=[o for o in BASE if not o.startswith("model=")])
            tok = build_tokenizer(f"hf:{hf}")
            ids = tok.encode(TEXT)[:100]
            batch = build_batch([[ids]], tok, patch_dim=t.job.model.patch_dim)
            with torch.no_grad():
                ours = t.engine.model(batch, heads={"lm": batch.document_ids >= 0})["lm"][:, :VOCAB]
            attn = t.engine.stage.layers[0].attention
            bias = attn.linear_qkv.bias
            self.record(f"hf_{kind}", dims=t.engine.dims.degrees(), head_dim=attn.head_dim,
                        local_qkv=list(attn.linear_qkv.weight.shape), local_bias=None if bias is None else bias.numel())
            if self.dist.is_main:
                with torch.no_grad():
                    theirs = ref(torch.tensor([ids])).logits[0]
                self.record(f"hf_{kind}", max_abs_diff=float((ours - theirs).abs().max()),
                            logits_scale=float(theirs.abs().max()))
            if kind == "qwen2":
                t.train()
                if self.dist.is_main:
                    self.record("hf_qwen2", curve=curve(self.out / "hf_qwen2" / "metrics.jsonl"))
            del t
            barrier()


    # -- expert parallelism (model=moe_debug: 4 experts top-2, a shared expert, aux-free bias) ---
    def moe_ep2(self) -> None:
        """EP=2 (tp=1, dp=2, 2 experts a rank, alltoall dispatcher): the training curve equals
        plain DDP's (the plain MoE code on each rank, same data streams and weights); then, on
        each rank's own batch, the trained megatron model's outputs and aux losses equal the plain
        one-process model's with the same (exported) weights; the checkpoint exports every expert."""
        moe = ["model=moe_debug", "trainer.steps=4"]
        self.train_curve("moe_ddp", ["parallel=ddp", *moe])
        t = self.train_curve("moe_ep2", [*MEGATRON, *moe, "parallel.ep=2", "checkpoint.enabled=true",
                                         "checkpoint.every=4"])
        self.record("moe_ep2", local_experts=list(t.engine.stage.layers[0].feed_forward.local_experts),
                    dims=t.engine.dims.degrees(), same_batch=_same_batch(t))
        if self.dist.is_main:
            last = json.loads((self.out / "moe_ep2" / "metrics.jsonl").read_text().splitlines()[-1])
            self.record("moe_ep2", router_keys=sorted(k for k in last if k.startswith("router/")))
        engine_state = t.engine.model_state_dict()
        barrier()
        if self.dist.is_main:   # export: one plain state dict, every expert, the plain layout
            from mmgen.checkpoint.export import consolidated_state_dict
            from mmgen.models import build_model

            exported = consolidated_state_dict(self.out / "moe_ep2" / "checkpoints" / "step_0000004")
            plain_keys = sorted(build_model(t.job.model, device="meta").state_dict())
            self.record("moe_ep2", export_equal=_equal(exported, engine_state),
                        export_keys_are_plain=sorted(exported) == plain_keys,
                        expert_shape=list(exported["layers.0.feed_forward.experts.w1"].shape))
        barrier()

    def moe_tp2_ep2(self) -> None:
        """TP=2 x EP=2 (SP, allgather dispatcher) against TP=2 x EP=1 (SP, alltoall), both dp=1
        (the one-process data stream), and against the plain one-process model on the same batch."""
        moe = [*MEGATRON, "model=moe_debug", "parallel.tp=2", "parallel.sequence_parallel=true", "trainer.steps=3"]
        self.train_curve("moe_tp2", moe)
        t = self.train_curve("moe_tp2_ep2", [*moe, "parallel.ep=2", "parallel.moe_token_dispatcher=allgather"])
        self.record("moe_tp2_ep2", same_batch=_same_batch(t), dims=t.engine.dims.degrees())


def _same_batch(t) -> dict:
    """The megatron engine and the plain one-process model with the engine's weights (gathered,
    every expert) on this rank's next batch, both in eval mode (no router statistics): max abs
    differences of every head output and aux loss."""
    import torch.distributed as tdist

    from mmgen.models import build_model

    full = [t.engine.model_state_dict()]      # rank 0 has the full plain weights
    tdist.broadcast_object_list(full, src=0)
    plain = build_model(t.job.model, device="cpu")
    plain.load_state_dict(full[0])
    plain.eval()
    t.engine.model.eval()
    batch = next(iter(t.loader)).to(t.dist.device)
    out = {}
    with torch.no_grad():
        a, b = t.engine.model(batch), plain(batch)
        for key in b:
            if key != "aux":
                out[key] = float((a[key] - b[key]).abs().max())
        for key in b["aux"]:
            out[f"aux/{key}"] = float((a["aux"][key] - b["aux"][key]).abs().max())
            out[f"aux_value/{key}"] = float(b["aux"][key])
    out["lm_scale"] = float(b["lm"].abs().max())
    return out


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k].float(), b[k].float()) for k in a)


ORDER = ["compat", "tp2", "tp2_sp", "pp2", "reshard", "resume", "from_ddp", "hf_tp2", "moe_ep2", "moe_tp2_ep2"]


def main() -> None:
    run_cases(Cases, ORDER)


if __name__ == "__main__":
    main()
