# Many DeepSpeed cases in one torchrun launch (each launch + `import deepspeed` costs ~15 s here).
"""Run by tests/test_deepspeed.py as
``torchrun --nproc-per-node 2 tests/deepspeed_worker.py --shapes DIR --out DIR [--only a,b]``.

Every case trains the ``debug`` flavor through the real Trainer (same code as ``mmgen-train``)
on both ranks and records what the test asserts on: per-step losses, grad norms and LRs,
whether tensors match bit for bit, largest differences. Rank 0 writes ``OUT/results.json``;
the assertions live in the test, this file only measures.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmgen.cli.preflight import compose_job  # noqa: E402
from mmgen.parallel.dist import DistInfo, barrier  # noqa: E402
from tests.worker_main import run_cases  # noqa: E402

TINY = ["experiment=smoke", "data.seq_len=128", "data.batch_size=4", "trainer.log_every=1",
        "metrics.progress=false", "optim.warmup_steps=2", "trainer.num_threads=1", "data.num_workers=0",
        "checkpoint.every=100", "trainer.steps=20"]
# tiny test models do not really partition under ZeRO-3 unless every parameter is sharded
ZERO3 = ["parallel=zero3", "parallel.stage3_param_persistence_threshold=0"]
SMALL_BUCKETS = ["parallel.reduce_bucket_size=200000", "parallel.allgather_bucket_size=200000"]


class Cases:
    def __init__(self, shapes: Path, out: Path, dist: DistInfo):
        self.shapes, self.out, self.dist = shapes, out, dist
        self.results: dict = {}
        self.trainers: dict = {}

    # -- helpers ------------------------------------------------------------------------
    def job(self, name: str, extra: list[str]):
        return compose_job([*TINY, f"data.train_shards={self.shapes}/train", f"data.val_shards={self.shapes}/val",
                            f"run_dir={self.out / name}", f"name={name}", *SMALL_BUCKETS, *extra])

    def trainer(self, name: str, extra: list[str]):
        from mmgen.trainer.trainer import Trainer

        job = self.job(name, extra)
        if self.dist.is_main:
            Path(job.run_dir).mkdir(parents=True, exist_ok=True)
        barrier()
        return Trainer(job, self.dist)

    def train(self, name: str, extra: list[str], stop_at: int | None = None):
        t = self.trainer(name, extra)
        t.train(stop_at=stop_at)
        self.trainers[name] = t
        return t

    def record(self, name: str, **values) -> None:
        self.results.setdefault(name, {}).update(values)

    def losses(self, name: str) -> dict:
        out = {}
        for line in (self.out / name / "metrics.jsonl").read_text().splitlines():
            rec = json.loads(line)
            out[rec["step"]] = {k: v for k, v in rec.items() if k.startswith(("loss/", "optim/"))}
        return out

    def run_training(self, name: str, extra: list[str]) -> None:
        t0 = time.time()
        self.train(name, extra)
        self.record(name, losses=self.losses(name), seconds=round(time.time() - t0, 2))

    def val_batch(self, job):
        from mmgen.data import build_dataloader
        from mmgen.models.tokenizers import build_tokenizer

        # the same batch on every rank (the val split may hold a single shard)
        loader = build_dataloader(job.data, build_tokenizer(job.data.tokenizer), 0, 1, split="val")
        return next(iter(loader))

    # -- cases --------------------------------------------------------------------------
    def parity(self) -> None:
        """DDP and ZeRO-1/2/3 (fp32) from the same seed on the same data."""
        self.run_training("ddp", ["parallel=ddp"])
        self.run_training("zero1", ["parallel=zero1"])
        self.run_training("zero2", ["parallel=zero2"])
        self.run_training("zero3", ZERO3)
        for name in ("ddp", "zero1", "zero2", "zero3"):
            opt = self.trainers[name].engine.optimizer
            self.record(name, final_lr=[g["lr"] for g in opt.param_groups])

    def grad_accum(self) -> None:
        """Two micro-batches per step: the loss normalisation must survive DeepSpeed's GAS."""
        extra = ["trainer.grad_accum=2", "data.batch_size=2", "trainer.steps=10"]
        self.run_training("ddp_ga2", ["parallel=ddp", *extra])
        self.run_training("zero2_ga2", ["parallel=zero2", *extra])
        self.run_training("zero3_ga2", [*ZERO3, *extra])

    def resume(self) -> None:
        """Interrupted after step 7 (checkpoint), restarted: must equal the uninterrupted run."""
        for name, extra in (("zero1", ["parallel=zero1"]), ("zero2", ["parallel=zero2"]), ("zero3", ZERO3)):
            run = f"{name}_resume"
            self.train(run, extra, stop_at=7)
            again = self.trainer(run, extra)
            start = again.state.step
            again.train()
            self.trainers[run] = again
            self.record(run, resumed_at=start, losses=self.losses(run))
            equal = all(torch.equal(a, b) for a, b in zip(
                self.trainers[name].engine.model_state_dict().values(), again.engine.model_state_dict().values()))
            self.record(run, weights_equal=equal)

    def export(self) -> None:
        """`mmgen export` of each stage -> plain model: same weights and same logits as the engine."""
        from mmgen.checkpoint.export import export_safetensors, load_model_weights
        from mmgen.models import build_model

        for name in ("zero1", "zero2", "zero3", "zero2_bf16", "zero1_bf16"):
            if name not in self.trainers:
                continue
            t = self.trainers[name]
            out = self.out / "export" / f"{name}.safetensors"
            if self.dist.is_main:
                export_safetensors(self.out / name, out)
            barrier()
            engine_state = t.engine.model_state_dict()  # collective (gathers ZeRO shards)
            batch = self.val_batch(t.job)
            with torch.no_grad():
                ref = t.engine.model(batch)  # collective under ZeRO-3
            if self.dist.is_main:
                plain = build_model(t.job.model, device="cpu")
                load_model_weights(plain, out)
                weights_equal = all(torch.equal(plain.state_dict()[k], v) for k, v in engine_state.items())
                with torch.no_grad():
                    got = plain(batch)
                diff = max(float((got[k].float() - ref[k].float()).abs().max()) for k in ("lm", "flow"))
                scale = float(ref["lm"].float().abs().max())
                self.record(f"export_{name}", weights_equal=weights_equal, logits_max_abs_diff=diff,
                            logits_scale=scale, keys=len(plain.state_dict()))
            barrier()

    def export_stage0(self) -> None:
        """A checkpoint of DeepSpeed without ZeRO (stage 0) is not a ZeRO checkpoint: export reads
        the module from mp_rank_00_model_states.pt instead of running zero_to_fp32."""
        import deepspeed

        from mmgen.checkpoint.export import consolidated_state_dict
        from mmgen.models import build_model

        model = build_model(self.job("stage0", ["parallel=ddp"]).model, device="cpu")
        engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()),
                                          config={"train_micro_batch_size_per_gpu": 1, "steps_per_print": None,
                                                  "zero_optimization": {"stage": 0}}, dist_init_required=False)
        ckpt = self.out / "stage0" / "step_0000001"
        engine.save_checkpoint(str(ckpt), tag="deepspeed", save_latest=False)
        barrier()
        if self.dist.is_main:
            state = consolidated_state_dict(ckpt)
            self.record("export_stage0", weights_equal=state.keys() == model.state_dict().keys() and all(
                torch.equal(state[k], v) for k, v in model.state_dict().items()))
        barrier()

    def init_from(self) -> None:
        """Weights only, across backends: DDP run -> ZeRO-3 run, ZeRO-2 run -> DDP run."""
        ddp_state = {k: v.detach().clone() for k, v in self.trainers["ddp"].engine.module.state_dict().items()}
        t = self.trainer("zero3_from_ddp", [*ZERO3, f"checkpoint.init_from={self.out / 'ddp'}"])
        got = t.engine.model_state_dict()
        self.record("init_from", ddp_to_zero3=all(torch.equal(got[k], v) for k, v in ddp_state.items()))
        zero2_state = self.trainers["zero2"].engine.model_state_dict()
        t = self.trainer("ddp_from_zero2", ["parallel=ddp", f"checkpoint.init_from={self.out / 'zero2'}"])
        got = t.engine.module.state_dict()
        self.record("init_from", zero2_to_ddp=all(torch.equal(got[k], v) for k, v in zero2_state.items()))

    def offload(self) -> None:
        self.run_training("zero2_offload", ["parallel=zero2", "parallel.offload=cpu"])
        self.run_training("zero3_offload", ["parallel=zero3_offload", "parallel.stage3_param_persistence_threshold=0"])

    def checkpointing(self) -> None:
        """Activation checkpointing recomputes the same math; tied heads under ZeRO-3."""
        tied = ["model.tie_embeddings=true", "trainer.steps=10"]
        self.run_training("ddp_ac_torch", ["parallel=ddp", "parallel.activation_checkpointing=torch"])
        self.run_training("ddp_tied", ["parallel=ddp", *tied])
        self.run_training("zero3_tied_ac_ds", [*ZERO3, "parallel.activation_checkpointing=deepspeed", *tied])
        self.run_training("zero3_tied_ac_torch", [*ZERO3, "parallel.activation_checkpointing=torch", *tied])

    def skip(self) -> None:
        """A non-finite loss: skip_step leaves the weights alone and no residue behind (the next
        step equals that of a run that never saw the bad micro-batch)."""
        for name, extra in (("zero2", ["parallel=zero2"]), ("zero3", ZERO3),
                            ("zero2_bf16", ["parallel=zero2", "trainer.precision=bf16"])):
            clean = self.trainer(f"skip_{name}_clean", [*extra, "trainer.steps=4"])
            hit = self.trainer(f"skip_{name}_hit", [*extra, "trainer.steps=4"])
            before = hit.engine.model_state_dict()
            batch = self.val_batch(hit.job)
            with hit.engine.accumulate(True):
                out = hit.engine.model(batch)
                hit.engine.backward(out["lm"].float().mean() * float("nan"))
            hit.engine.skip_step()
            after = hit.engine.model_state_dict()
            unchanged = all(torch.equal(before[k], after[k]) for k in before)
            stats = []
            for t in (clean, hit):
                t.data_iter = iter(t.loader)
                s = t.train_step(t.next_batches()[0])
                stats.append([s["loss/total"], s["optim/grad_norm"]])
            final = [t.engine.model_state_dict() for t in (clean, hit)]
            self.record(f"skip_{name}", unchanged=unchanged, next_step=stats,
                        same_after=all(torch.equal(final[0][k], final[1][k]) for k in final[0]))

    def bf16(self) -> None:
        extra = ["trainer.precision=bf16", "trainer.steps=10"]
        self.run_training("ddp_bf16", ["parallel=ddp", *extra])
        self.run_training("zero2_bf16", ["parallel=zero2", *extra])
        self.run_training("zero1_bf16", ["parallel=zero1", *extra])


ORDER = ["parity", "grad_accum", "resume", "offload", "checkpointing", "bf16", "export", "export_stage0", "init_from",
         "skip"]


def main() -> None:
    run_cases(Cases, ORDER)


if __name__ == "__main__":
    main()
