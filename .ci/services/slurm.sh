#!/usr/bin/env bash
# A real single-node SLURM for tests/workflows (tests marked `slurm`), set up as /work/shared/FIELD_NOTES.md describes
# (no systemd, no cgroups: proctrack/linuxproc, task/none, so no cgroup.conf is needed).
#   start: install Debian's slurm-wlm + munge when missing (root + apt-get only), write slurm.conf into the state dir
#          ($MEDSASS_SLURM_STATE, default /tmp/medsass-slurm; /etc/slurm/slurm.conf becomes a link to it), start
#          munged (as the munge user), slurmctld and slurmd, and wait until `sinfo` shows the node idle.
#   stop:  cancel the jobs still queued, then stop the three daemons by the PIDs start recorded.
#   status: print the node state.
# Exits non-zero with a message when SLURM cannot be had here; the slurm tests then skip.
# The daemons run with the repo's .venv/bin first on PATH; jobs get the submitter's environment (sbatch's
# default --export=ALL), so a test that runs inside the venv submits jobs that find medsass-prep / medsass-train.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
STATE=${MEDSASS_SLURM_STATE:-/tmp/medsass-slurm}
CONF=$STATE/slurm.conf
NODE=$(hostname -s)
export PATH="$REPO/.venv/bin:$PATH"

say() { echo "slurm.sh: $*" >&2; }

alive() { [ -s "$STATE/$1.pid" ] && kill -0 "$(cat "$STATE/$1.pid")" 2>/dev/null; }

node_state() { SLURM_CONF=$CONF timeout 5 sinfo -h -n "$NODE" -o %T 2>/dev/null | head -n1; }

install_packages() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null && command -v munged >/dev/null; then
    return 0
  fi
  if [ "$(id -u)" != "0" ]; then
    say "slurm-wlm/munge are not installed and this is not root; install them (apt-get install slurm-wlm munge) to run the SLURM tests"
    return 1
  fi
  if ! command -v apt-get >/dev/null; then
    say "slurm-wlm/munge are not installed and there is no apt-get to install them"
    return 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y -q --no-install-recommends slurm-wlm munge >/dev/null 2>&1; then
    apt-get update -q >/dev/null 2>&1 || true
    apt-get install -y -q --no-install-recommends slurm-wlm munge >/dev/null || { say "apt-get install slurm-wlm munge failed"; return 1; }
  fi
}

start_munge() {
  if alive munged && munge -n </dev/null | unmunge >/dev/null 2>&1; then
    return 0
  fi
  install -d -o munge -g munge -m 0755 /run/munge
  install -d -o munge -g munge -m 0700 /var/log/munge /var/lib/munge /etc/munge
  if [ ! -s /etc/munge/munge.key ]; then
    runuser -u munge -- mungekey --create --keyfile=/etc/munge/munge.key >/dev/null 2>&1 ||
      { dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 2>/dev/null && chown munge:munge /etc/munge/munge.key; }
    chmod 0400 /etc/munge/munge.key
  fi
  if [ -s /run/munge/munged.pid ] && kill -0 "$(cat /run/munge/munged.pid)" 2>/dev/null; then
    :  # a munged we did not start is running: use it, never stop it
  else
    rm -f /run/munge/munged.pid
    runuser -u munge -- munged  # forks into the background (as root it refuses its log file)
    for _ in $(seq 50); do [ -s /run/munge/munged.pid ] && break; sleep 0.1; done
    cp /run/munge/munged.pid "$STATE/munged.pid"
  fi
  munge -n </dev/null | unmunge >/dev/null || { say "munge does not work (see /var/log/munge/munged.log)"; return 1; }
}

write_conf() {
  local cpus mem
  cpus=${MEDSASS_SLURM_CPUS:-$(nproc)}
  mem=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' | head -n1)
  mem=$(( mem > 1024 ? mem - 512 : mem ))  # at most what slurmd -C reports, or slurmd marks the node invalid
  mkdir -p "$STATE/ctld" "$STATE/d"
  cat >"$CONF" <<EOF
# Written by .ci/services/slurm.sh: a single-node test cluster (see /work/shared/FIELD_NOTES.md).
ClusterName=medsass
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
SchedulerType=sched/backfill
ReturnToService=2
JobRequeue=1
MinJobAge=3600
KillWait=30
InactiveLimit=0
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.daemon.pid
SlurmdPidFile=$STATE/slurmd.daemon.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
  # Clients (sbatch, scontrol, dask-jobqueue's sbatch, jobs calling scontrol requeue) read /etc/slurm/slurm.conf;
  # point it here unless it is someone else's file.
  mkdir -p /etc/slurm
  if [ -L /etc/slurm/slurm.conf ] || [ ! -e /etc/slurm/slurm.conf ]; then
    ln -sfn "$CONF" /etc/slurm/slurm.conf
  elif ! cmp -s /etc/slurm/slurm.conf "$CONF"; then
    say "note: /etc/slurm/slurm.conf is not ours; clients need SLURM_CONF=$CONF"
  fi
}

start() {
  if alive slurmctld && alive slurmd; then
    local now
    now=$(node_state)
    case "$now" in idle|mixed|allocated) say "already running (node $NODE $now)"; return 0 ;; esac
  fi
  if ! alive slurmctld && ! [ -e "$CONF" ] && command -v sinfo >/dev/null && timeout 5 sinfo -h >/dev/null 2>&1; then
    say "a SLURM cluster not started by this script answers sinfo; leaving it alone"
    return 0
  fi
  install_packages
  mkdir -p "$STATE"
  start_munge
  stop_daemons
  rm -rf "$STATE/ctld" "$STATE/d"
  write_conf
  export SLURM_CONF=$CONF
  setsid slurmctld -D -i -f "$CONF" >>"$STATE/slurmctld.out" 2>&1 </dev/null &
  echo $! >"$STATE/slurmctld.pid"
  setsid slurmd -D -f "$CONF" >>"$STATE/slurmd.out" 2>&1 </dev/null &
  echo $! >"$STATE/slurmd.pid"
  local st=""
  for i in $(seq 60); do
    st=$(node_state)
    case "$st" in
      idle) say "node $NODE idle after ${i}x0.5 s (conf $CONF)"; return 0 ;;
      down*|drain*) scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true ;;
    esac
    alive slurmctld || { say "slurmctld exited; see $STATE/slurmctld.log"; tail -5 "$STATE/slurmctld.log" >&2 || true; return 1; }
    alive slurmd || { say "slurmd exited; see $STATE/slurmd.log"; tail -5 "$STATE/slurmd.log" >&2 || true; return 1; }
    sleep 0.5
  done
  say "node $NODE not idle after 30 s (state '${st}'); see $STATE/*.log"
  return 1
}

stop_daemons() {
  local name pid
  for name in slurmd slurmctld; do
    if alive "$name"; then
      pid=$(cat "$STATE/$name.pid")
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$STATE/$name.pid"
  done
}

stop() {
  if alive slurmctld; then
    local jobs
    jobs=$(SLURM_CONF=$CONF squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ' || true)
    if [ -n "${jobs// /}" ]; then
      # shellcheck disable=SC2086
      SLURM_CONF=$CONF scancel $jobs 2>/dev/null || true
      for _ in $(seq 20); do [ -z "$(SLURM_CONF=$CONF squeue -h 2>/dev/null)" ] && break; sleep 0.5; done
    fi
  fi
  stop_daemons
  if alive munged; then
    kill "$(cat "$STATE/munged.pid")" 2>/dev/null || true
  fi
  rm -f "$STATE/munged.pid"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) echo "${NODE}: $(node_state || true)" ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
