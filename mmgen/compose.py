# Hydra/OmegaConf composition of the job schema (mmgen/trainer/job.py); used by the entry points only.
"""Registers the root schema and the model flavors (``mmgen.models.FLAVORS``, the one flavor
registry: ``model=<flavor>``) in Hydra's ConfigStore, and turns a composed DictConfig into the
validated ``JobConfig`` dataclasses, rejecting keys that no schema declares."""
from __future__ import annotations

import dataclasses
import math
import typing

from omegaconf import DictConfig, OmegaConf, open_dict

from mmgen.errors import ConfigError
from mmgen.trainer.job import JobConfig

# model.patch_dim is the data codec's payload_dim, model.heads the objective's (the heads it
# trains: a head without a loss would leave parameters without gradients); resolvers
# registered by mmgen.cli.preflight
PATCH_DIM = "${patch_dim:${data.codec},${data.patch_size}}"
HEADS = "${objective_heads:${objective.name}}"
FAMILY = "${objective_family:${objective.name}}"   # the transformer, or a codec (objective vae / vq)


def register_configs() -> None:
    """Register the root schema so configs/config.yaml can use it as its first default."""
    from hydra.core.config_store import ConfigStore

    from mmgen.models import FLAVORS

    cs = ConfigStore.instance()
    cs.store(name="job_schema", node=JobConfig)
    for name, flavor in FLAVORS.items():
        cs.store(group="model", name=name, node={**dataclasses.asdict(flavor), "patch_dim": PATCH_DIM,
                                               "heads": HEADS, "family": FAMILY})
    from mmgen.models.hf.config import hf_flavor_node

    # `model=hf:<dir>` (rewritten to model=hf model.from_hf=<dir>): the shape from config.json
    cs.store(group="model", name="hf", node={**hf_flavor_node(PATCH_DIM, HEADS), "family": FAMILY})


def group_options(group: str) -> list[str]:
    """Options of a config group registered in the ConfigStore (model flavors)."""
    from hydra.core.config_store import ConfigStore

    register_configs()
    try:
        entries = ConfigStore.instance().list(group)
    except (OSError, ValueError):
        return []
    return sorted(e[:-len(".yaml")] for e in entries if e.endswith(".yaml"))


def to_job_config(cfg: DictConfig) -> JobConfig:
    """Composed DictConfig -> validated dataclasses (raises ConfigError with one line)."""
    if "hydra" in cfg:
        cfg = cfg.copy()
        with open_dict(cfg):
            cfg.pop("hydra")
    _reject_unknown_keys(cfg, JobConfig, "")
    job = OmegaConf.to_object(cfg)
    if not isinstance(job, JobConfig):
        raise ConfigError("the composed config is not a JobConfig (configs/config.yaml must start from job_schema)")
    _reject_non_finite(job, "")
    job.validate()
    return job


def _reject_non_finite(value, path: str) -> None:
    """No field of any schema means something with NaN or inf (limits use 0 for "none"), and
    a NaN passes every ``x < bound`` check written as "refuse if bad": catch both, anywhere."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{path}={value} is not a finite number")
    if dataclasses.is_dataclass(value):
        for f in dataclasses.fields(value):
            _reject_non_finite(getattr(value, f.name), f"{path}.{f.name}" if path else f.name)
    elif isinstance(value, dict):
        for k, v in value.items():
            _reject_non_finite(v, f"{path}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _reject_non_finite(v, f"{path}[{i}]")


def _reject_unknown_keys(node: DictConfig, schema: type, prefix: str) -> None:
    """``+key=value`` can add keys that no schema declares; to_object would drop them silently."""
    fields = typing.get_type_hints(schema)
    for key in node.keys():
        if key not in fields:
            raise ConfigError(f"unknown key '{prefix}{key}' (not a field of {schema.__name__})")
        sub = fields[key]
        if dataclasses.is_dataclass(sub) and isinstance(node[key], DictConfig):
            _reject_unknown_keys(node[key], sub, f"{prefix}{key}.")


