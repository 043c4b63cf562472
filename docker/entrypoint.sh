#!/usr/bin/env bash
# Container entry point: when srun starts one process per GPU (no torchrun), map Slurm's
# per-task variables to the ones torch.distributed reads, then exec the command unchanged.
# Under torchrun (or with RANK already set) nothing is touched. Bash builtins only, so it
# also works where the image has no Slurm client (scontrol is used when present).
set -euo pipefail

first_host() {  # first host of a Slurm node list: "gpu[017-020,031],cpu1" -> "gpu017"
  local list=$1
  if [[ $list =~ ^([^,\[]+)\[([^],-]+) ]]; then
    printf '%s\n' "${BASH_REMATCH[1]}${BASH_REMATCH[2]}"
  else
    printf '%s\n' "${list%%,*}"
  fi
}

if [[ -z ${TORCHELASTIC_RUN_ID:-} && -z ${RANK:-} && -n ${SLURM_PROCID:-} && ${SLURM_NTASKS:-1} -gt 1 ]]; then
  export RANK=$SLURM_PROCID
  export WORLD_SIZE=$SLURM_NTASKS
  export LOCAL_RANK=${SLURM_LOCALID:-0}
  tasks_per_node=${SLURM_NTASKS_PER_NODE:-${SLURM_TASKS_PER_NODE:-1}}
  export LOCAL_WORLD_SIZE=${tasks_per_node%%[(,]*}   # "4(x2)" -> 4
  if [[ -z ${MASTER_ADDR:-} ]]; then
    if command -v scontrol >/dev/null 2>&1; then
      # whole output first: reading one line from a pipe can SIGPIPE scontrol, and pipefail +
      # set -e would then end this script silently
      hosts=$(scontrol show hostnames "$SLURM_JOB_NODELIST")
      MASTER_ADDR=${hosts%%$'\n'*}
    else
      MASTER_ADDR=$(first_host "${SLURM_JOB_NODELIST:-localhost}")
    fi
  fi
  export MASTER_ADDR
  export MASTER_PORT=${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-9500} % 20000))}
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
fi

if [[ $# -eq 0 ]]; then
  set -- mmgen-train --help
fi
exec "$@"
