#!/usr/bin/env bash
# Start a one-node Slurm (munged + slurmctld + slurmd on loopback) for the Slurm tests.
# Idempotent: installs Debian's packages if missing, (re)writes slurm.conf, starts only the
# daemons that are not already running from this state dir, and waits until the node is idle.
# Stop everything with .ci/slurm_down.sh (by PID file). Needs root; ~15-25 s from nothing.
set -euo pipefail

STATE=${MMGEN_SLURM_STATE:-/tmp/mmgen-slurm}
CONF=/etc/slurm/slurm.conf
MARK="# written by mmgen .ci/slurm_up.sh"
WAIT_S=${MMGEN_SLURM_WAIT_S:-90}

say() { echo "slurm_up: $*" >&2; }

if [[ $(id -u) -ne 0 ]]; then
  say "needs root (starts munged/slurmctld/slurmd); Slurm tests will be skipped"
  exit 1
fi

# ---- packages ----------------------------------------------------------------------------
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
    || ! command -v munged >/dev/null; then
  command -v apt-get >/dev/null || { say "apt-get not found: cannot install slurm-wlm"; exit 1; }
  say "installing slurm-wlm and munge (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurm-wlm slurmctld slurmd slurm-client munge >/dev/null
fi

mkdir -p "$STATE"/{ctld,spool,log,munge}
chown munge:munge "$STATE/munge"

alive() {  # alive NAME: the daemon recorded in $STATE/NAME.pid is running
  local f="$STATE/$1.pid"
  [[ -s $f ]] && kill -0 "$(cat "$f")" 2>/dev/null
}

# ---- munge ------------------------------------------------------------------------------
if [[ ! -s /etc/munge/munge.key ]]; then
  say "creating /etc/munge/munge.key"
  mkdir -p /etc/munge
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=128 status=none
  chown munge:munge /etc/munge/munge.key
  chmod 400 /etc/munge/munge.key
fi
if ! alive munge/munged; then
  mkdir -p /run/munge && chown munge:munge /run/munge
  runuser -u munge -- munged --force --pid-file="$STATE/munge/munged.pid"
fi

# ---- slurm.conf -------------------------------------------------------------------------
HOST=$(hostname -s)
if [[ -f $CONF ]] && ! grep -qF "$MARK" "$CONF"; then
  say "$CONF exists and was not written by this script; not touching it"
  exit 1
fi
NEW=$(cat <<EOF
$MARK (state: $STATE)
ClusterName=mmgen-ci
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# a requeued job would otherwise wait 120 s for its old credential to expire
AuthInfo=cred_expire=5
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SchedulerParameters=bf_interval=1,sched_interval=2
KillWait=5
MinJobAge=300
JobRequeue=1
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$(nproc) RealMemory=8000 State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
)
if [[ ! -f $CONF ]] || [[ "$(cat "$CONF")" != "$NEW" ]]; then
  printf '%s\n' "$NEW" > "$CONF"
  if alive slurmctld; then scontrol reconfigure || true; fi
fi

# ---- daemons ----------------------------------------------------------------------------
if ! alive slurmctld; then
  slurmctld -c -i   # -c: jobs of an earlier CI run are stale
fi
if ! alive slurmd; then
  slurmd
fi

# ---- wait for an idle node ----------------------------------------------------------------
state=""
for _ in $(seq 1 "$WAIT_S"); do
  state=$(sinfo -h -N -n "$HOST" -o %T 2>/dev/null | head -n 1 || true)
  if [[ $state == idle ]]; then
    say "node $HOST idle (state dir $STATE)"
    exit 0
  fi
  if [[ $state == down* || $state == drain* ]]; then
    scontrol update NodeName="$HOST" State=RESUME 2>/dev/null || true
  fi
  sleep 1
done
say "node $HOST not idle after ${WAIT_S}s (state '${state:-none}'); see $STATE/log/"
exit 1
