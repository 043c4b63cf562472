# Entry point `mmgen-train`: compose the Hydra config -> dataclasses -> validate -> Trainer.
"""Usage: ``mmgen-train [overrides...]``, ``mmgen-train -m key=a,b`` (sweep),
``mmgen-train --cfg job`` (print the resolved config). A bad key or value stops the run
before anything starts, with one line naming it and exit code 2."""
from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from mmgen.cli.preflight import check_overrides, config_dir, register_resolvers
from mmgen.compose import register_configs, to_job_config
from mmgen.errors import ConfigError

register_resolvers()
register_configs()


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from mmgen.trainer.run import run_training

    try:
        job = to_job_config(cfg)
        if not job.run_dir:
            job.run_dir = HydraConfig.get().runtime.output_dir
        run_training(job, argv=_launch_argv or [Path(sys.argv[0]).name, *sys.argv[1:]])
    except (ConfigError, FileNotFoundError) as e:  # bad input: one line, exit 2, no traceback
        print(f"mmgen-train: error: {e}", file=sys.stderr)
        sys.exit(2)


_launch_argv: list[str] = []  # the command as typed (recorded in the run), before the rewrite below


def main() -> None:
    _launch_argv[:] = [Path(sys.argv[0]).name, *sys.argv[1:]]
    sys.argv[1:] = check_overrides(sys.argv[1:])  # exits 2 with one line on a bad override
    if any(a in ("--cfg", "-c") or a.startswith("--cfg=") for a in sys.argv) and "--resolve" not in sys.argv:
        sys.argv.append("--resolve")  # show values, not ${...} interpolations
    _hydra_main()


if __name__ == "__main__":
    main()
