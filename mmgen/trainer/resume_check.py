# Before a run directory is written: no mixing of two runs' checkpoints, start-over, resume config comparison.
"""What ``prepare_run_dir`` decides (rank 0, lock held, nothing written yet):

* ``checkpoint.resume=none``, or a checkpoint other than the run's newest, in a run directory
  that holds complete checkpoints would mix two runs (the new one's checkpoints pruned as
  "older", same-step ones overwritten, the next auto-resume continuing the old run): refused
  in one line, unless ``checkpoint.start_over=true``, which moves the old run's outputs
  (``MOVED_ASIDE``) into ``previous-<UTC time>/`` (with a copy of its ``config.yaml``, so that
  folder is itself a run directory for ``mmgen sample`` / ``export``) and never deletes
  anything. A start-over happens once per job: a requeued Slurm job or restarted torchrun
  workers with the same command find their own ``moved.json`` and resume instead.
* Resuming compares the new job with the config the checkpoint was trained with (its run's
  launch history, ``configs/``, else its ``config.yaml``): fields of the architecture
  (``ARCHITECTURE``) or of the data order the loader's saved position depends on
  (``DATA_ORDER``) that differ are refused in one line listing them (old -> new); other
  differing fields, data and schedule, are one warning line; fields that only steer this
  process (``IGNORED``) are not compared.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

import yaml

from mmgen.checkpoint.manager import complete_checkpoints
from mmgen.errors import ConfigError
from mmgen.trainer.lock import Owner, earlier_incarnation

LAUNCHES = "launches.jsonl"  # in configs/: one line per launch (written by run.keep_config)

# what a run writes about its own history; launch/, configs/, command.txt, logs/ stay: they
# record launches (the current one included), not one run's state
MOVED_ASIDE = ("checkpoints", "metrics.jsonl", "wandb_id.txt", "wandb", "samples", "eval", "data_keys", "report.png")

# fields that decide which tensors a checkpoint holds or what they mean: a resumed checkpoint
# with other values fails to load (size mismatch) or silently computes something else
ARCHITECTURE = ("model.", "objective.name", "objective.prediction", "data.patch_size", "data.tokenizer")
# fields the data loader's saved position depends on: it refuses to continue with others
DATA_ORDER = ("data.seed", "data.shuffle_samples")
# fields that only steer this process (speed, logging, where it runs): free to change on resume;
# parallel.* included because each backend says itself whether it reads another layout
IGNORED = ("name", "run_dir", "checkpoint.", "metrics.", "sampler.", "parallel.", "model.attention",
           "model.init_std", "data.num_workers", "data.prefetch_factor", "data.pin_memory", "trainer.log_every",
           "trainer.num_threads", "trainer.device", "trainer.compile", "trainer.sample_every",
           "trainer.num_samples", "trainer.eval_at_end", "trainer.eval_task", "trainer.eval_samples",
           "trainer.max_minutes", "trainer.max_nonfinite_steps", "trainer.preemption_signals",
           "trainer.record_keys", "trainer.deterministic", "trainer.force_unlock", "trainer.sync_every",
           "optim.fused", "optim.fused_cpu")


def prepare_run_dir(job, run_dir: Path, me: Owner) -> tuple[str, list[str]]:
    """Check the run directory against the job; move the old run aside if asked.

    Args:
        job: the validated JobConfig.
        run_dir: its run directory (locked by this process).
        me: this process's lock record (who started a run over, for requeues).
    Returns:
        (the ``checkpoint.resume`` value to train with, lines to log as warnings).
    Raises:
        ConfigError: the job would mix two runs, or changes the architecture of the
            checkpoint it resumes; nothing has been written.
    """
    cp, notes = job.checkpoint, []
    own = complete_checkpoints(run_dir / "checkpoints")
    resume, move = cp.resume, False
    if cp.start_over:
        done, record = started_over_by(run_dir, me)
        if done:
            notes.append(f"checkpoint.start_over: {done}; continuing this job's run")
            resume = "auto" if own else record.get("resume", "none")
        else:
            move = bool(own)
    if own and not move:
        refuse_mixing(run_dir, own, resume)
    source = resume_source(resume, [] if move else own)
    if source is not None:
        notes += compare_with_saved(job, source)
    if move:
        dest, moved = move_aside(run_dir)
        checkpoints = (run_dir / "checkpoints").resolve()
        if source is not None and source.resolve().is_relative_to(checkpoints):
            resume = str(dest / "checkpoints" / source.resolve().relative_to(checkpoints))
        record = {"time": time.time(), "reason": "checkpoint.start_over=true", "moved": moved, "resume": resume,
                  "by": dataclasses.asdict(me)}
        (dest / "moved.json").write_text(json.dumps(record, indent=1) + "\n")  # last: see move_aside
        notes.append(f"checkpoint.start_over=true: the earlier run (checkpoints up to {own[-1].name}) moved to {dest}")
    return resume, notes


def refuse_mixing(run_dir: Path, own: list[Path], resume: str) -> None:
    """Raise unless ``resume`` continues the run that wrote ``own`` (its complete checkpoints)."""
    newest = own[-1]
    aside = f"checkpoint.start_over=true to move them into {run_dir}/previous-<time>/ first"
    if resume == "auto" or (resume != "none" and Path(resume).resolve() == newest.resolve()):
        return
    if resume == "none":
        raise ConfigError(f"checkpoint.resume=none: {run_dir} holds the checkpoints of a run (newest {newest.name}); "
                          f"a new run there would mix with it: continue it with checkpoint.resume=auto, use another "
                          f"name=, or {aside}")
    raise ConfigError(f"checkpoint.resume={resume}: {run_dir} holds checkpoints of its own, up to {newest.name}, "
                      f"which would mix with a run continued from another checkpoint: use another name=, or {aside}")


def resume_source(resume: str, own: list[Path]) -> Path | None:
    """The checkpoint the Trainer will resume from (``CheckpointManager.resume_path``'s rule)."""
    if resume == "none":
        return None
    if resume == "auto":
        return own[-1] if own else None
    path = Path(resume)
    if not (path / "meta.json").is_file():
        raise FileNotFoundError(f"checkpoint.resume={resume}: not a complete checkpoint (no meta.json)")
    return path


def started_over_by(run_dir: Path, me: Owner) -> tuple[str | None, dict]:
    """(which earlier incarnation of this job already moved an earlier run aside, or None;
    its ``moved.json`` record)."""
    for done in sorted(run_dir.glob("previous-*/moved.json")):
        try:
            record = json.loads(done.read_text())
            by = Owner.from_json(json.dumps(record["by"]))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
        why = earlier_incarnation(by, me)
        if why:
            return f"{why}, which moved the earlier run to {done.parent}", record
    return None, {}


def move_aside(run_dir: Path) -> tuple[Path, list[str]]:
    """Rename the run's outputs into a new ``previous-<UTC time>/`` (same filesystem: atomic
    renames, nothing copied but ``config.yaml``, nothing deleted). The caller writes
    ``moved.json`` into it last, so a move interrupted by a crash is redone by the requeued job.

    Returns:
        (the new folder, the names moved).
    """
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    dest, n = run_dir / f"previous-{stamp}", 1
    while dest.exists():
        n += 1
        dest = run_dir / f"previous-{stamp}-{n}"
    dest.mkdir()
    moved = []
    for name in MOVED_ASIDE:
        if (run_dir / name).exists():
            (run_dir / name).rename(dest / name)
            moved.append(name)
    if (run_dir / "config.yaml").is_file():
        shutil.copy2(run_dir / "config.yaml", dest / "config.yaml")
    if (run_dir / "configs").is_dir():  # which config wrote which of the moved checkpoints
        shutil.copytree(run_dir / "configs", dest / "configs")
    return dest, moved


# -- config comparison ---------------------------------------------------------------------
def flat(cfg: dict) -> dict:
    """``section.field -> value`` (dict-valued fields such as data.sources compare whole)."""
    out = {}
    for key, value in cfg.items():
        if isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            out[key] = value
    return out


def kind_of(key: str) -> str:
    """``ignored``, ``architecture``, ``data order`` or ``settings`` (data, schedule, seeds,
    precision, ...)."""
    def hit(prefixes):
        return any(key == p or (p.endswith(".") and key.startswith(p)) for p in prefixes)
    for kind, prefixes in (("ignored", IGNORED), ("architecture", ARCHITECTURE), ("data order", DATA_ORDER)):
        if hit(prefixes):
            return kind
    return "settings"


def config_changes(old: dict, new: dict) -> dict[str, list[str]]:
    """Fields whose values differ, by kind, each as ``key old -> new``. Fields absent from
    either side (another mmgen version's schema) are not compared.

    Args:
        old: the saved ``config.yaml`` as loaded.
        new: ``dataclasses.asdict`` of the new job.
    """
    old, new = flat(old), flat(new)
    out = {"architecture": [], "data order": [], "settings": []}
    for key in new:
        if key in old and old[key] != new[key] and kind_of(key) != "ignored":
            out[kind_of(key)].append(f"{key} {_show(old[key])} -> {_show(new[key])}")
    return out


def _show(value) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def saved_config(source: Path) -> Path:
    """The config checkpoint ``source`` was trained with: the last launch of its run that
    started before the checkpoint was written (``configs/launches.jsonl``; launches of one
    run directory never overlap, see the lock), else the run's ``config.yaml``."""
    run = source.parent.parent
    try:
        written = float(json.loads((source / "meta.json").read_text())["time"])
        launches = [json.loads(line) for line in (run / "configs" / LAUNCHES).read_text().splitlines() if line]
        before = [e for e in launches if float(e["time"]) <= written]
        found = run / "configs" / before[-1]["config"]
        if found.is_file():
            return found
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        pass  # an older run without launch history
    return run / "config.yaml"


def compare_with_saved(job, source: Path) -> list[str]:
    """Compare ``job`` with the config checkpoint ``source`` was trained with; raise on a
    change of architecture or data order, return a warning line for other changes."""
    saved = saved_config(source)
    if not saved.is_file():
        return []
    try:
        old = yaml.safe_load(saved.read_text())
        if not isinstance(old, dict):
            raise ValueError("not a mapping")
    except (OSError, ValueError, yaml.YAMLError) as e:
        return [f"cannot compare the job with {saved} ({str(e).splitlines()[0]}): resuming {source.name} unchecked"]
    changes = config_changes(old, dataclasses.asdict(job))
    refused = [k for k in ("architecture", "data order") if changes[k]]
    if refused:
        listed = ", ".join(c for k in refused for c in changes[k])
        raise ConfigError(f"cannot resume {source} with another {' and '.join(refused)} than it was trained with "
                          f"({saved}): {listed}; keep those values to continue, or start a new run (another name=, "
                          f"or checkpoint.start_over=true)")
    if changes["settings"]:
        listed = ", ".join(changes["settings"])
        return [f"resuming {source.name} with settings other than it was trained with ({saved}): {listed}"]
    return []
