# Sourced by the workflows/ scripts (not run by itself): settings, the venv, and the requeue-on-signal wrapper.
# The scripts hold no medsass logic: every step is a medsass-prep / medsass-train command.

# Settings: workflows/medsass.env (or $MEDSASS_ENV); values already in the environment win.
_medsass_here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=/dev/null
[ -f "${MEDSASS_ENV:-$_medsass_here/medsass.env}" ] && . "${MEDSASS_ENV:-$_medsass_here/medsass.env}"
: "${MEDSASS_VENV:=}" "${GPUS:=auto}" "${MEDSASS_RDZV_PORT:=29500}" "${MEDSASS_GRACE:=100}" "${MEDSASS_REQUEUE:=1}"
if [ -n "$MEDSASS_VENV" ]; then
  # shellcheck source=/dev/null
  . "$MEDSASS_VENV/bin/activate"
fi

MEDSASS_PREEMPT_EXIT=75  # what medsass-train exits with after writing its pre-emption checkpoint (trainer/preempt.py)

medsass_log() { echo "[$(date '+%F %T')] medsass: $*" >&2; }

# Processes per node: $GPUS, or (auto) the GPUs SLURM gave this job on this node (outside SLURM: the visible
# GPUs); no GPU -> 1 (CPU) process.
medsass_nproc() {
  local n=$GPUS
  if [ "$n" = auto ]; then
    if [ -n "${SLURM_JOB_ID:-}" ]; then
      n=${SLURM_GPUS_ON_NODE:-0}  # not nvidia-smi: a job sees the node's GPUs even when it was given none
    elif [ -n "${CUDA_VISIBLE_DEVICES+set}" ]; then
      n=$(echo "$CUDA_VISIBLE_DEVICES" | tr ',' '\n' | grep -c '^[0-9a-zA-Z]')
    elif command -v nvidia-smi >/dev/null 2>&1; then
      n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
    fi
  fi
  [ "${n:-0}" -ge 1 ] 2>/dev/null && echo "$n" || echo 1
}

# torchrun flags shared by both training scripts: forward USR1 (SLURM's warning) to the workers as well as
# TERM/INT/HUP/QUIT, and give them MEDSASS_GRACE seconds to write last.pt before SIGKILL (torch >= 2.8 flags).
medsass_torchrun_signal_flags() {
  echo "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --shutdown-timeout=$MEDSASS_GRACE"
}

# medsass_requeueable CMD...: run CMD (the trainer, or torchrun / srun around it) in the background so this shell
# takes signals at once. On USR1 or TERM (#SBATCH --signal=B:USR1@120, `scancel --signal=USR1 --batch`, SLURM's
# TERM) it sends USR1 to CMD: the trainer finishes its step, writes last.pt and exits 75. Then, if CMD exited 75
# (or failed after a signal), the job is requeued; the requeued job runs this script again and the trainer
# resumes from last.pt. Returns CMD's exit status.
medsass_requeueable() {
  local rc
  _medsass_signal=""
  trap '_medsass_forward USR1' USR1
  trap '_medsass_forward TERM' TERM
  "$@" &
  _medsass_child=$!
  while :; do
    wait "$_medsass_child"; rc=$?
    kill -0 "$_medsass_child" 2>/dev/null || break  # still running: a trapped signal interrupted `wait`
  done
  trap - USR1 TERM
  if [ "$rc" -eq "$MEDSASS_PREEMPT_EXIT" ] || { [ -n "$_medsass_signal" ] && [ "$rc" -ne 0 ]; }; then
    medsass_log "stopped for pre-emption (signal ${_medsass_signal:-none}, exit $rc)"
    if [ "$MEDSASS_REQUEUE" = 1 ] && [ -n "${SLURM_JOB_ID:-}" ]; then
      # Logged first: SLURM ends this shell as soon as the requeue is accepted.
      medsass_log "requeueing job $SLURM_JOB_ID; the same command will resume from last.pt"
      scontrol requeue "$SLURM_JOB_ID" || medsass_log "scontrol requeue $SLURM_JOB_ID failed; resubmit the same command to resume"
    fi
    return "$MEDSASS_PREEMPT_EXIT"
  fi
  return "$rc"
}

_medsass_forward() {
  [ -n "$_medsass_signal" ] && return 0  # once is enough
  _medsass_signal=$1
  medsass_log "got SIG$1; asking the trainer to finish its step, write last.pt and stop"
  kill -USR1 "$_medsass_child" 2>/dev/null || true
}
