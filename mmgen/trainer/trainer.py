# The training loop: build_* steps, then a short loop that delegates to train_step.
from __future__ import annotations

import hashlib
import json
import logging
import math
import time
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from mmgen.checkpoint.manager import CheckpointManager
from mmgen.trainer.job import JobConfig
from mmgen.data import build_dataloader
from mmgen.data.streams import stream_index
from mmgen.metrics.flops import training_flops, unit_costs
from mmgen.metrics.logger import MetricsLogger, detect_peak_tflops
from mmgen.models import build_model, num_params
from mmgen.models.moe import aux_loss_weights, collect_router_stats, moe_layer_ids, step_loads, update_expert_bias
from mmgen.models.tokenizers import build_tokenizer
from mmgen.objectives import build_objective, weighted_total
from mmgen.objectives.base import is_per_source
from mmgen.optim import build_scheduler
from mmgen.parallel import EngineContext, ParallelDims, build_engine
from mmgen.parallel.dist import DistInfo, all_reduce_sum
from mmgen.trainer.hooks import build_hooks
from mmgen.trainer.signals import Preempted, PreemptionFlag

log = logging.getLogger(__name__)


def noise_seed(seed: int, step: int, stream: int) -> int:
    """Seed of the objective's noise for micro-batch ``stream`` of optimizer step ``step``: a
    function of the global batch position only (not of rank, world size or resume point)."""
    digest = hashlib.blake2b(f"{seed}/{step}/{stream}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def build_device_encoder(job: JobConfig, device: torch.device):
    """The frozen codec that encodes each micro-batch's pixels on ``device`` before the step
    (``data.encode_on=device``), None otherwise. bf16 where the run trains in bf16: a VAE
    encoder is robust to it, and the latents come back in fp32."""
    if job.data.encode_on != "device":
        return None
    from mmgen.models.codecs.device import DeviceEncoder

    p = job.trainer.precision
    return DeviceEncoder(job.data.visual_codec(), device,
                         bf16=p == "bf16" or (p == "auto" and device.type == "cuda"))


class NonFiniteLossError(RuntimeError):
    """Too many consecutive non-finite losses."""


def new_window() -> dict:
    return {"tokens": 0.0, "positions": 0.0, "flops": 0.0, "step_s": 0.0, "wait_s": 0.0, "steps": 0}


def add_to_window(w: dict, tokens: float, step_s: float, wait_s: float, work: dict) -> dict:
    """``work``: this rank's ``positions`` and model ``flops`` of the step (next_batches)."""
    return {"tokens": w["tokens"] + tokens, "positions": w["positions"] + work["positions"],
            "flops": w["flops"] + work["flops"], "step_s": w["step_s"] + step_s,
            "wait_s": w["wait_s"] + wait_s, "steps": w["steps"] + 1}


@dataclass
class TrainState:
    """Scalar progress saved in every checkpoint."""

    step: int = 0
    tokens_seen: int = 0
    visual_positions_seen: int = 0
    elapsed_s: float = 0.0
    nonfinite_steps: int = 0
    nonfinite_in_a_row: int = 0


@dataclass
class PendingStep:
    """One optimizer step whose results are still on the device (``trainer.sync_every``):
    ``values`` = [losses (``keys``), tokens, global counts (``names``), grad norm, finite]."""

    step: int
    keys: list[str]
    names: list[str]
    values: torch.Tensor
    lr: float
    metrics: set[str]


class Trainer:
    def __init__(self, job: JobConfig, dist: DistInfo):
        self.job, self.dist = job, dist
        self.run_dir = Path(job.run_dir)
        self.tokenizer = build_tokenizer(job.data.tokenizer)
        self.state = TrainState()
        # the layout is arithmetic on (config, world): the data loader gets its data-parallel
        # rank and size from it before any model exists, and the engine is built from it
        self.dims = ParallelDims.from_config(job.parallel, dist.world_size, dist.rank)
        self.build_data()  # first: a bad shard pattern fails before any model is built
        self.hooks = build_hooks(job, self.tokenizer)  # samples and final eval; checks held-out data
        self.build_model_and_engine()
        self.build_objective()
        self.build_checkpointing()
        self.maybe_resume()
        self.build_metrics()

    # -- build steps --------------------------------------------------------------------
    def build_model_and_engine(self) -> None:
        job, dev = self.job, self.dist.device
        with torch.device("meta"):
            model = build_model(job.model)
        self.num_params = num_params(model)  # before the backend: sharding leaves parts behind

        def init(module: torch.nn.Module) -> None:
            # the engine calls this on an unsharded, materialised plain model (the model
            # itself, or a copy the shards are cut from): same seed -> same weights under any
            # layout
            torch.manual_seed(job.trainer.seed)
            module.init_weights()
            if job.checkpoint.init_from:
                from mmgen.checkpoint.export import load_model_weights

                load_model_weights(module, job.checkpoint.init_from, trust=job.checkpoint.trust)

        if job.checkpoint.init_from.startswith("hf:"):  # a Hugging Face LLM, into each rank's shards
            from mmgen.parallel.pretrained import pretrained_init

            init = pretrained_init(model, job.checkpoint.init_from[len("hf:"):], job.trainer.seed)
        ctx = EngineContext(self.dist, self.dims, precision=job.trainer.precision,
                            micro_batch_size=job.data.batch_size, grad_accum=job.trainer.grad_accum,
                            fp8=job.trainer.fp8, fp8_emulate=job.trainer.fp8_emulate)
        optim = job.optim
        if job.trainer.sync_every > 1 and dev.type == "cpu":
            optim = dataclasses.replace(optim, fused_cpu=True)  # the step that skips on the device
        self.engine = build_engine(model, job.parallel, optim, ctx, init=init, compile=job.trainer.compile)
        self.sync_every = self.resolve_sync_every()
        self.pending: list[PendingStep] = []
        self.window: dict | None = None   # the perf window of train()
        self.scheduler = build_scheduler(job.optim, self.engine.optimizer, job.trainer.steps)
        log.info("model %s: %.2fM parameters (non-embedding), %s, %s %s", job.model.name,
                 self.num_params / 1e6, dev, job.parallel.name, self.dims.degrees())

    def resolve_sync_every(self) -> int:
        """``trainer.sync_every`` for this run: 1 where the engine must read every step's loss
        before it steps (or the MoE bias update needs the loss on the host), else the
        configured value (0: ``log_every`` on a GPU, 1 on a CPU)."""
        cfg = self.job.trainer
        if not self.engine.can_step_on_device or moe_layer_ids(self.job.model):
            if cfg.sync_every > 1:
                log.info("trainer.sync_every=%d: the %s engine (or an MoE model) reads every step's loss; "
                         "reading every step", cfg.sync_every, self.engine.name)
            return 1
        if cfg.sync_every:
            return cfg.sync_every
        return cfg.log_every if self.dist.device.type == "cuda" else 1

    def build_objective(self) -> None:
        # per-source losses (loss/<name>/<source>) for a mixture; the names are the same on
        # every rank, so the loss all-reduce stacks the same keys everywhere
        # per-source losses name the loader's sources (a trainer fed fixed batches has no loader)
        sources = tuple(s.name for s in self.loader.sources) if self.loader is not None else ()
        self.objective = build_objective(self.job.objective, sources)
        # on the training device: drawing ~1M normals per step on the CPU and copying them
        # cost ~10% of a 1b step on an H100. Re-seeded for every micro-batch from (seed, step,
        # stream) (noise_seed), so it has no state to save and 1 GPU x grad_accum N draws the
        # same noise as N GPUs.
        self.generator = torch.Generator(device=self.dist.device)

    def build_data(self) -> None:
        # data-parallel peers read different data; tensor/pipeline peers the same
        self.loader = build_dataloader(self.job.data, self.tokenizer, self.dims.dp_rank,
                                       self.dims.dp, split="train",
                                       grad_accum=self.job.trainer.grad_accum,
                                       unit_costs=unit_costs(self.job.model))  # compute-balanced packing
        self.data_iter = None
        self.key_log = None
        self.device_encoder = build_device_encoder(self.job, self.dist.device)

    def stream(self, micro: int) -> int:
        """The data stream of micro-batch ``micro`` of a step on this rank (AccumLoader)."""
        return stream_index(self.engine.dp_rank, self.engine.dp_size, micro)

    def build_checkpointing(self) -> None:
        from mmgen.trainer.provenance import git_sha

        layout = self.engine.layout()
        layout["versions"]["mmgen"] = git_sha()
        self.ckpt = CheckpointManager(self.job.checkpoint, self.run_dir, self.dist.rank,
                                      self.dist.world_size, layout=layout)

    def build_metrics(self) -> None:
        job = self.job
        self.peak_tflops = job.metrics.peak_tflops or detect_peak_tflops(self.dist.device)
        self.metrics = MetricsLogger(
            job.metrics, self.run_dir, self.dist.is_main, name=job.name,
            config=dataclasses.asdict(job), total_steps=job.trainer.steps,
            tags=[job.model.name, job.objective.name, job.parallel.name, job.data.name])
        self.metrics.set_progress(self.state.step)
        self.router_monitor = None
        if moe_layer_ids(job.model):
            from mmgen.metrics.router import RouterMonitor

            self.router_monitor = RouterMonitor(job.metrics.router_dead_intervals,
                                                log_bias=job.model.moe_bias_update_rate > 0)

    def maybe_resume(self) -> None:
        path = self.ckpt.resume_path()
        if path is None:
            return
        train_state, rank_state = self.ckpt.load(path, self.engine)
        saved = train_state["state"]  # a plain dict (the checkpoint holds no pickled objects)
        self.state = TrainState(**{f.name: saved[f.name] for f in dataclasses.fields(TrainState) if f.name in saved})
        self.scheduler.load_state_dict(train_state["scheduler"])
        self.resume_data(path, rank_state.get("data"))
        log.info("resumed from %s at step %d", path, self.state.step)

    def resume_data(self, path, data: dict | None) -> None:
        """Exact per-rank resume; after a change of world size or worker count, every old
        rank's cursor goes to the loader, which re-splits the unfinished part of the epoch."""
        if self.loader.same_layout(data):
            self.loader.load_state_dict(data)
            return
        states = self.ckpt.data_states(path)
        if all(s is not None for s in states):
            log.info("data layout changed (%d old ranks): re-splitting the remaining samples", len(states))
            self.loader.load_state_dict({"ranks": states})

    # -- the loop -----------------------------------------------------------------------
    def train(self, stop_at: int | None = None) -> TrainState:
        """Run to ``trainer.steps`` (or stop early at ``stop_at``, with a checkpoint).

        Raises ``Preempted`` after checkpointing when a preemption signal arrived."""
        job = self.job.trainer
        self.data_iter = iter(self.loader)
        if job.record_keys:
            path = self.run_dir / "data_keys" / f"rank_{self.dist.rank:05d}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            self.key_log = open(path, "a")
        self.start_time = time.time() - self.state.elapsed_s
        end = min(job.steps, stop_at or job.steps)
        self.preemption = PreemptionFlag(list(job.preemption_signals))
        self.window = new_window()
        try:
            while self.state.step < end:
                t0 = time.perf_counter()
                step_input, wait, work = self.next_batches()
                self.pending.append(self.launch_step(step_input))
                self.state.step += 1
                self.state.elapsed_s = time.time() - self.start_time
                self.window = add_to_window(self.window, 0.0, time.perf_counter() - t0, wait, work)
                stats = self.resolve_pending() if self.must_read(end) else None
                if stats is not None:
                    stats.pop("_tokens", None)   # counted into the window by resolve_pending
                if self.after_step(stats, end):
                    break
            if self.job.checkpoint.enabled and not self.ckpt_is_current():
                self.save_checkpoint()
        finally:
            self.preemption.restore()
            self.metrics.close()
            if self.key_log is not None:
                self.key_log.close()
                self.key_log = None
        return self.state

    def must_read(self, end: int) -> bool:
        """Whether the host reads the pending steps now: every ``sync_every`` steps, and before
        whatever needs their results (a log record, a checkpoint, samples, the last step)."""
        step, job = self.state.step, self.job
        every = job.trainer.sample_every
        return (step % self.sync_every == 0 or step % job.trainer.log_every == 0 or step == end
                or step % job.checkpoint.every == 0 or bool(every and step % every == 0))

    def after_step(self, stats: dict | None, end: int) -> bool:
        """Log, sample, checkpoint; returns True when the run must stop now. ``stats``: the
        step's results if the host read them (:meth:`must_read`), else None."""
        job = self.job.trainer
        step = self.state.step
        if stats is None:
            # the stop signals: a single process knows them without the device; ranks agree
            # through an all-reduce, i.e. at the reads
            if self.dist.world_size > 1:
                return False
            preempted, out_of_time = self.stop_flags()
            if not (preempted or out_of_time):
                return False
            self.resolve_pending()   # before the checkpoint
        if stats is not None and (step % job.log_every == 0 or step == end):
            self.metrics.log(step, {**stats, **self.perf_stats(self.window), **self.data_stats(),
                                    **self.router_stats(step)})
            self.window = new_window()
        self.log_samples()
        preempted, out_of_time = self.stop_flags()
        if step % self.job.checkpoint.every == 0 or preempted or out_of_time:
            self.save_checkpoint()
        if preempted:
            raise Preempted(step, self.preemption.received or "a peer rank's signal")
        if out_of_time:
            log.info("trainer.max_minutes=%s reached at step %d", job.max_minutes, step)
        return out_of_time

    def stop_flags(self) -> tuple[bool, bool]:
        """(preempted, out of time), agreed by all ranks with one all-reduce (a single
        process decides alone, without the device)."""
        budget = self.job.trainer.max_minutes
        late = bool(budget) and time.time() - self.start_time > budget * 60
        if self.dist.world_size == 1:
            return self.preemption.received is not None, late
        flags = torch.tensor([float(self.preemption.received is not None), float(late)], device=self.dist.device)
        flags = all_reduce_sum(flags)  # over every rank (not only data-parallel peers): all stop together
        return bool(flags[0] > 0), bool(flags[1] > 0)

    def next_batches(self):
        """``grad_accum`` micro-batches on the device, with their loss counts, token counts and
        model FLOPs (mmgen.metrics.flops) taken on the host first (no device sync for bookkeeping)."""
        t0 = time.perf_counter()
        dev = self.dist.device
        batches, counts, tokens = [], [], 0
        work = {"positions": 0, "flops": 0}
        for i in range(self.job.trainer.grad_accum):
            b = next(self.data_iter)
            if self.key_log is not None:
                self.record_keys(i, b)
            counts.append(self.objective.local_counts(b))
            tokens += b.num_tokens()
            work["positions"] += b.tokens.numel()
            # an objective that changes the batch before the model (VQ-AR: causal image spans,
            # the lm head at codes) says how, so the count is of the work actually done
            view = getattr(self.objective, "model_view", None)
            work["flops"] += training_flops(self.job.model, view(b) if view else b)
            # the head and loss rows as indices, found here on the host: on the device the
            # boolean masks would make the host wait for the GPU at every step
            b = b.with_row_index().to(dev, non_blocking=True)
            batches.append(self.device_encoder(b) if self.device_encoder else b)
        return (batches, counts, tokens), time.perf_counter() - t0, work

    def record_keys(self, micro: int, batch) -> None:
        """One JSON line per micro-batch: step, stream, logical worker, and (source, epoch, key)
        of every document in it. After a resume, steps past the checkpoint may appear twice:
        the later line is what was trained on."""
        rec = {"step": self.state.step + 1, "stream": self.stream(micro),
               "worker": batch.meta["data_state"]["worker"],
               "docs": [[s, e, k] for s, e, k in zip(batch.meta["source"], batch.meta["epoch"],
                                                     batch.meta["key"])]}
        self.key_log.write(json.dumps(rec) + "\n")
        self.key_log.flush()

    def train_step(self, step_input) -> dict:
        """One optimizer step over ``grad_accum`` micro-batches; losses use global counts.
        Returns its results (read on the host, with any steps still pending before it)."""
        self.pending.append(self.launch_step(step_input))
        return self.resolve_pending()

    def to_device(self, t: torch.Tensor) -> torch.Tensor:
        """A host tensor on the training device without a synchronising copy (page-locked)."""
        if self.dist.device.type == "cuda":
            return t.pin_memory().to(self.dist.device, non_blocking=True)
        return t.to(self.dist.device)

    def launch_step(self, step_input) -> PendingStep:
        """Queue one optimizer step. With ``sync_every`` > 1 nothing here waits for the device:
        losses, counts, gradient norm and the finite flag stay there until
        :meth:`resolve_pending`; else the step is read and finished here (the engine steps
        only after the host knows the loss is finite)."""
        batches, counts, tokens = step_input
        dp_group = self.engine.dp_group
        names = sorted(counts[0])
        local = torch.tensor([[float(c[n]) for n in names] for c in counts]).sum(0)
        # data-parallel peers hold different positions; tensor/pipeline peers the same ones
        global_counts = all_reduce_sum(self.to_device(local), dp_group)
        denominators = dict(zip(names, global_counts.clamp(min=1)))
        seed, step = self.job.trainer.seed, self.state.step + 1
        # MoE auxiliary losses get model.moe_*_weight unless objective.weights names them
        weights = {**aux_loss_weights(self.job.model), **self.job.objective.weights}
        # an objective's metrics (codec PSNR, codebook usage) come back beside its losses,
        # detached: logged as metric/<name>, never part of the total
        metrics = set(getattr(self.objective, "metric_names", ()))

        def loss_fn(model, batch, micro: int) -> dict[str, torch.Tensor]:
            self.generator.manual_seed(noise_seed(seed, step, self.stream(micro)))
            losses = self.objective(model, batch, denominators, self.generator)
            trained = {k: v for k, v in losses.items() if k not in metrics}
            return {**losses, "total": weighted_total(trained, weights)}

        loss_sums = self.engine.forward_backward(batches, loss_fn)
        keys = sorted(loss_sums)
        reduced = all_reduce_sum(torch.stack([loss_sums[k] for k in keys] + [
            self.to_device(torch.tensor(float(tokens)))]), dp_group)
        lr = self.scheduler.get_last_lr()[0]
        if self.sync_every > 1:
            total = reduced[keys.index("total")]
            finite = torch.isfinite(total)     # same value on every rank: all agree
            grad_norm = self.engine.step_on_device(self.job.optim.grad_clip, finite)
            self.scheduler.step()
            values = torch.cat([reduced.float(), global_counts.float(),
                                torch.stack([grad_norm.float(), finite.float()])])
            return PendingStep(step, keys, names, values, lr, metrics)
        host = reduced.tolist()
        if math.isfinite(host[keys.index("total")]):
            grad_norm = float(self.engine.step(self.job.optim.grad_clip))
            finite = True
        else:
            grad_norm, finite = float("nan"), False
            self.engine.skip_step()
        self.update_expert_bias(finite)
        self.scheduler.step()
        values = torch.tensor([*host, *global_counts.tolist(), grad_norm, float(finite)], dtype=torch.float64)
        return PendingStep(step, keys, names, values, lr, metrics)

    def resolve_pending(self) -> dict:
        """Read every pending step (one device synchronisation for all), account for each in
        order (tokens seen, non-finite steps skipped and counted; the abort after
        ``max_nonfinite_steps`` in a row) and return the last one's results."""
        read = self.read_pending()
        return read[-1] if read else {}

    def read_pending(self) -> list[dict]:
        """:meth:`resolve_pending`, returning every pending step's results in order."""
        pending, self.pending = self.pending, []
        rows = torch.cat([p.values.to("cpu", torch.float64) for p in pending]).tolist() if pending else []
        out, at = [], 0
        for p in pending:
            n_keys, n_names = len(p.keys), len(p.names)
            row = rows[at:at + n_keys + 1 + n_names + 2]
            at += len(row)
            losses, tokens = row[:n_keys], row[n_keys]
            counts, (grad_norm, finite) = row[n_keys + 1:n_keys + 1 + n_names], row[-2:]
            stats = {f"{'metric' if k in p.metrics else 'loss'}/{k}": v for k, v in zip(p.keys, losses)}
            for n, c in zip(p.names, counts):   # a source absent from the step has
                if c == 0 and is_per_source(n, p.names):   # no loss/<name>/<source>, not a 0
                    stats.pop(f"loss/{n}", None)
            if finite:
                self.state.nonfinite_in_a_row = 0
            else:
                grad_norm = float("nan")
                self.count_nonfinite_step(p.step)
            self.state.tokens_seen += int(tokens)
            self.state.visual_positions_seen += int(dict(zip(p.names, counts)).get("visual", 0))
            if self.window is not None:
                self.window["tokens"] += tokens
            stats.update({"optim/grad_norm": grad_norm, "optim/lr": p.lr, "_tokens": tokens,
                          "optim/nonfinite_steps": self.state.nonfinite_steps})
            out.append(stats)
        return out

    def update_expert_bias(self, stepped: bool) -> None:
        """MoE aux-loss-free balancing, once per optimizer step: the step's per-expert loads
        summed over data-parallel peers (so every replica's bias moves alike); the counters
        reset whether or not the update was applied."""
        if self.router_monitor is None:
            return
        loads = step_loads(self.engine.module)
        rate = self.job.model.moe_bias_update_rate
        if loads is not None and rate > 0 and stepped:
            loads = all_reduce_sum(loads.to(self.dist.device), self.engine.dp_group)
        update_expert_bias(self.engine.module, loads, rate if stepped else 0.0)

    def router_stats(self, step: int) -> dict:
        """MoE router metrics of the log interval (mmgen.metrics.router), counters summed over
        data-parallel peers; every ``metrics.router_heatmap_every`` steps a load heat map."""
        if self.router_monitor is None:
            return {}
        stats = collect_router_stats(self.engine.module)
        if not stats:
            return {}
        # the same layers and keys on every rank (one model, one code path): one all-reduce
        keys = ("load", "kept", "tokens", "entropy_sum", "modality_load")
        flat = torch.cat([stats[layer][k].reshape(-1).float() for layer in sorted(stats) for k in keys
                          if k in stats[layer]])
        flat = all_reduce_sum(flat.to(self.dist.device), self.engine.dp_group).cpu()
        at = 0
        for layer in sorted(stats):
            for k in [k for k in keys if k in stats[layer]]:
                n = stats[layer][k].numel()
                stats[layer][k] = flat[at:at + n].view(stats[layer][k].shape)
                at += n
        out = self.router_monitor.metrics(stats, step)
        every = self.job.metrics.router_heatmap_every
        last = getattr(self, "_last_heatmap", 0)
        if self.dist.is_main and every and step - last >= every:
            path = self.router_monitor.heatmap(self.run_dir / "router" / f"step_{step:07d}.png",
                                               f"{self.job.name}: expert load at step {step}")
            if path is not None:
                self.metrics.log_image(step, "router/load", path)
                self._last_heatmap = step
        return out

    def count_nonfinite_step(self, step: int) -> None:
        """Step ``step`` had a non-finite loss: its update was skipped (the engine's
        skip_step, or on the device); count it and abort after too many in a row."""
        self.state.nonfinite_steps += 1
        self.state.nonfinite_in_a_row += 1
        limit = self.job.trainer.max_nonfinite_steps
        log.warning("step %d: non-finite loss, update skipped (%d in a row, %d in total)",
                    step, self.state.nonfinite_in_a_row, self.state.nonfinite_steps)
        if self.state.nonfinite_in_a_row > limit:
            raise NonFiniteLossError(
                f"aborting at step {step}: {self.state.nonfinite_in_a_row} consecutive steps with a "
                f"non-finite loss (trainer.max_nonfinite_steps={limit}); lower optim.lr or check the data")

    def data_stats(self) -> dict:
        s = self.loader.stats()
        out = {"data/samples_read": s["samples_read"], "data/skipped_total": s["skipped_total"],
               "data/padding_fraction": s["padding_fraction"], "data/epoch": s["epoch"]}
        out.update({f"data/skipped/{k}": v for k, v in s["skipped"].items()})
        out.update({f"data/{k}": v for k, v in s.items() if k.startswith("source/")})  # per-source mixing counters
        return out

    def perf_stats(self, window: dict) -> dict:
        """Throughput over the steps since the last record (not just the last step): tokens
        (non-padding) and positions (all) per second, model TFLOP/s counted from the batches
        (summed over data-parallel ranks) and MFU against the peak of all ranks' devices."""
        step_s = max(window["step_s"], 1e-9)
        # positions and FLOPs were counted per rank from its batches, summed here once per record:
        # over data-parallel peers only, since tensor/pipeline peers work on the same batches
        positions, flops = all_reduce_sum(torch.tensor(
            [window["positions"], window["flops"]], dtype=torch.float64, device=self.dist.device),
            self.engine.dp_group).tolist()
        out = {"perf/tokens_per_s": window["tokens"] / step_s, "perf/positions_per_s": positions / step_s,
               "perf/model_tflops": flops / step_s / 1e12,
               "perf/step_s": window["step_s"] / max(window["steps"], 1),
               "perf/data_wait_frac": window["wait_s"] / step_s,
               "progress/tokens_seen": self.state.tokens_seen}
        if self.peak_tflops:
            out["perf/mfu"] = out["perf/model_tflops"] / (self.peak_tflops * self.dist.world_size)
        if self.dist.device.type == "cuda":
            out["perf/max_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        return out

    # -- checkpoints and samples ----------------------------------------------------------
    def ckpt_is_current(self) -> bool:
        from mmgen.checkpoint.manager import complete_checkpoints

        done = complete_checkpoints(self.ckpt.root)
        return bool(done) and done[-1].name == f"step_{self.state.step:07d}"

    def save_checkpoint(self) -> None:
        if not self.job.checkpoint.enabled:
            return
        if self.pending:   # the state to save counts every step taken
            self.resolve_pending()
        # plain values only: the checkpoint loads with weights_only=True (no pickled TrainState)
        train_state = {"state": dataclasses.asdict(self.state), "scheduler": self.scheduler.state_dict()}
        rank_state = {"data": self.loader.state_dict()}
        path = self.ckpt.save(self.state.step, self.engine, train_state, rank_state)
        log.info("checkpoint %s", path)

    def log_samples(self) -> None:
        """The sample hook (every ``trainer.sample_every`` steps), on rank 0: it needs the whole
        model. Each grid also goes to the dashboards as ``samples/<task>``."""
        if not self.dist.is_main:
            return
        for task, path in self.hooks.after_step(self.state.step, self.engine.module).items():
            self.metrics.log_image(self.state.step, f"samples/{task}", path)
