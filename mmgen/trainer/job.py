# The job schema (the trainer's input): component configs assembled, cross-field checks.
"""``JobConfig`` is the root schema. Each component owns its dataclass next to its code
(STYLE habit 4); this module only assembles them and runs the cross-field checks. Composition
(Hydra, OmegaConf) lives in ``mmgen/compose.py``, which only the entry points use:
nothing below them sees a DictConfig, and this schema imports neither.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import yaml

from mmgen.checkpoint.config import CheckpointConfig
from mmgen.data.config import DataConfig
from mmgen.metrics.config import MetricsConfig
from mmgen.models.config import ModelConfig
from mmgen.models.tokenizers import build_tokenizer
from mmgen.objectives.config import ObjectiveConfig
from mmgen.optim import OptimConfig
from mmgen.parallel.config import ParallelConfig
from mmgen.sampling.config import SamplerConfig
from mmgen.trainer.config import TrainerConfig


from mmgen.errors import ConfigError

__all__ = ["ConfigError", "JobConfig", "to_yaml"]


@dataclass
class JobConfig:
    name: str = "default"
    run_dir: str = ""  # filled from Hydra's output dir (runs/<name>) when empty
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)

    def validate(self) -> None:
        """Per-component checks, then the ones that span components."""
        for part in (self.model, self.objective, self.data, self.parallel, self.optim,
                     self.trainer, self.checkpoint, self.metrics, self.sampler):
            check = getattr(part, "validate", None)
            if check is not None:
                try:
                    check()
                except (ValueError, TypeError) as e:
                    raise ConfigError(str(e)) from e
        self._validate_cross()

    def _validate_cross(self) -> None:
        from mmgen.models import check_registered

        d, m = self.data, self.model
        self._validate_family()   # first: a transformer objective on a codec model has no heads
        try:
            check_registered(m)
        except ValueError as e:
            raise ConfigError(str(e)) from e
        # geometry and vocabulary come from the codec and the tokenizer, never assumed here
        codec, tokenizer = d.visual_codec(), build_tokenizer(d.tokenizer)
        if m.patch_dim != codec.payload_dim:
            raise ConfigError(f"model.patch_dim={m.patch_dim} must equal the {d.codec} codec's payload_dim "
                              f"{codec.payload_dim} (data.patch_size={d.patch_size})")
        _, grid_h, grid_w = codec.grid(d.image_size)
        if m.visual_pos != "none" and (grid_h > m.max_grid[1] or grid_w > m.max_grid[2]):
            raise ConfigError(f"data.image_size={d.image_size} gives a {grid_h}x{grid_w} grid under the {d.codec} codec, "
                              f"beyond model.max_grid {list(m.max_grid)}")
        self._validate_codec_geometry(codec, tokenizer)
        if m.vocab_size < tokenizer.vocab_size:
            raise ConfigError(f"model.vocab_size={m.vocab_size} is smaller than the {d.tokenizer} tokenizer's "
                              f"{tokenizer.vocab_size} ids")
        self._validate_heads()
        self._validate_fp8()
        try:
            self.parallel.validate_model(m, d.seq_len)
        except ValueError as e:
            raise ConfigError(str(e)) from e
        sharded = self.parallel.name in ("zero3", "fsdp2", "megatron")
        if (sharded or self.parallel.ep > 1) and (self.trainer.sample_every or self.trainer.eval_at_end):
            # (expert parallelism: a forward on rank 0 alone would wait for its EP peers' all-to-all)
            layout = f"parallel={self.parallel.name}" + (f" parallel.ep={self.parallel.ep}" if self.parallel.ep > 1 else "")
            raise ConfigError("trainer.sample_every / trainer.eval_at_end sample on rank 0 alone, which needs the "
                              f"whole model: not available under {layout} (use `mmgen sample` / "
                              "`mmgen eval` on the run's checkpoint instead)")
        if not self.name or "/" in self.name:
            raise ConfigError(f"name='{self.name}' must be a non-empty run name without '/'")


    def _validate_codec_geometry(self, codec, tokenizer) -> None:
        """Video grids against the learned position tables (frames vs ``max_grid[0]``, the
        frame grid vs ``max_grid[1:]``) and discrete codes against the vocabulary: a run that
        would index past a table fails here, not at its first video batch."""
        from mmgen.batch import DISCRETE
        from mmgen.data.config import VIDEO

        d, m = self.data, self.model
        video = any(s.type == VIDEO and d.raw_weight(n) > 0 for n, s in d.sources.items())
        if video and m.visual_pos != "none":
            t, gh, gw = codec.grid(d.frame_size, frames=d.video_frames)
            if t > m.max_grid[0]:
                raise ConfigError(f"data.video_frames={d.video_frames} gives {t} frames per clip, beyond model.max_grid[0]="
                                  f"{m.max_grid[0]} (the learned time table): raise model.max_grid or lower data.video_frames")
            if gh > m.max_grid[1] or gw > m.max_grid[2]:
                raise ConfigError(f"video frames of {d.frame_size} px give a {gh}x{gw} grid under the {d.codec} codec "
                                  f"(downsampling {codec.downsample} x patch {codec.patch_size}), beyond model.max_grid "
                                  f"{list(m.max_grid)}")
        from mmgen.objectives import OBJECTIVES

        wants = getattr(OBJECTIVES.get(self.objective.name), "codec_kind", None)
        if wants is not None and codec.kind != wants:
            # e.g. discrete-token AR on pixel patches: there would be no codes to predict
            raise ConfigError(f"objective={self.objective.name} needs a {'discrete' if wants == DISCRETE else 'continuous'} "
                              f"codec (data.codec=vq:<run> or a diffusers VQModel, data.patch_size=1), got "
                              f"data.codec={d.codec}")
        if codec.kind == DISCRETE:
            need = tokenizer.vocab_size + int(getattr(codec, "codebook_size", 0))
            # masked discrete diffusion: a mask token, the first id above the codes
            mask = bool(getattr(OBJECTIVES.get(self.objective.name), "mask_token", False))
            if mask and self.objective.mask_id != need:
                raise ConfigError(f"objective.mask_id={self.objective.mask_id} must be the first id above the "
                                  f"{d.codec} codec's codes: {need} ({tokenizer.vocab_size} text ids + "
                                  f"{need - tokenizer.vocab_size} codes)")
            if m.vocab_size < need + mask:
                token = f" and objective={self.objective.name}'s mask token" if mask else ""
                raise ConfigError(f"model.vocab_size={m.vocab_size} cannot hold the {d.codec} codec's "
                                  f"{getattr(codec, 'codebook_size', 0)} codes above the {tokenizer.vocab_size} "
                                  f"text ids{token} (needs >= {need + mask})")

    def _validate_family(self) -> None:
        """A codec family (model.family vae / vq) trains with its own objective, on pixels, under
        DDP (its model has no transformer blocks to shard, checkpoint or compile one by one)."""
        from mmgen.objectives import objective_family

        try:
            family = objective_family(self.objective.name)
        except ValueError as e:
            raise ConfigError(f"objective.name: {e}") from e
        m = self.model
        if family != m.family:
            raise ConfigError(f"objective={self.objective.name} trains model.family={family}, but "
                              f"model.family={m.family}")
        if m.family == "transformer":
            return
        p = self.parallel
        if self.data.codec != "pixels":
            raise ConfigError(f"model.family={m.family} learns from pixels: data.codec must be pixels, "
                              f"got {self.data.codec}")
        if p.name != "ddp" or p.activation_checkpointing != "none" or self.trainer.compile or self.trainer.fp8 != "none":
            raise ConfigError(f"model.family={m.family} trains under parallel=ddp without "
                              f"activation checkpointing, trainer.compile or trainer.fp8 (got parallel={p.name}, "
                              f"activation_checkpointing={p.activation_checkpointing}, "
                              f"compile={self.trainer.compile}, fp8={self.trainer.fp8})")

    def _validate_fp8(self) -> None:
        """``trainer.fp8`` converts the transformer trunk's linears inside the plain model: a
        backend that builds its own layers, or a codec family, has none to convert."""
        fp8 = self.trainer.fp8
        if fp8 == "none":
            return
        from mmgen.parallel.float8 import check_backend

        check_backend(fp8, self.parallel.name)

    def _validate_heads(self) -> None:
        from mmgen.objectives import objective_heads

        try:
            need = objective_heads(self.objective.name)
        except ValueError as e:
            raise ConfigError(f"objective.name: {e}") from e
        have, name = list(self.model.heads), self.objective.name
        missing = [h for h in need if h not in have]
        if missing:
            raise ConfigError(f"objective {name} runs head(s) {missing} that model.heads={have} lacks "
                              f"(leave model.heads unset: it follows the objective)")
        extra = [h for h in have if h not in need]
        if extra and not self.parallel.find_unused_parameters:
            raise ConfigError(f"model.heads={have} has {extra}, which objective {name} never runs: their "
                              f"parameters would get no gradient (DDP stops at step 2); leave model.heads unset "
                              f"(it follows the objective) or set parallel.find_unused_parameters=true")


def to_yaml(job: JobConfig) -> str:
    """The resolved job as YAML (``runs/<name>/config.yaml``), in schema field order."""
    return yaml.safe_dump(dataclasses.asdict(job), sort_keys=False)
