# What the Slurm job scripts share; launch/slurm_single_node.sbatch and launch/slurm_multi_node.sbatch
# source it from the repository (Slurm runs a copy of the batch script from its spool folder, so the
# script cannot look next to itself: it takes TL_DIST_REPO, else the submit folder). Each job script keeps
# only what differs: how many processes, on which nodes, started by which launcher.
#
#   slurm_prepare_run "$@"             the run folder and the training options, the device, the precision
#   slurm_run_training LAUNCHER...     start LAUNCHER with the training options, turn signals into the
#                                      STOP file, wait, then requeue, exit 75 or exit with its code
#
# Reads REPO and JOB_SCRIPT (set by the job script), PYTHON (default: python on PATH) and MIXED_PRECISION
# (default: bf16 on CUDA, no on the CPU).
# Sets TRAIN, ACCELERATE_CONFIGS, JOB_ID, OUTPUT_DIR, TRAIN_ARGS, ON_CUDA (1 or 0) and MIXED.
# shellcheck shell=bash disable=SC2034 # the job scripts read what this file sets

TRAIN=$REPO/tl_dist/train.py
# The launchers take their settings from these files and the command line only: `accelerate launch`
# without --config_file would merge in the user's default config (~/.cache/huggingface/accelerate or
# $HF_HOME/accelerate), where a one-GPU workstation's `gpu_ids: '0'` stops every multi-process job.
ACCELERATE_CONFIGS=$REPO/accelerate_configs
PYTHON=${PYTHON:-python}
export COLUMNS=${COLUMNS:-160} # the job log is no terminal: without this, lines wrap at 80 columns

slurm_prepare_run() {
  JOB_ID=${SLURM_JOB_ID:?not inside a Slurm job: submit this script with sbatch}
  # ---- the run folder: --output-dir as given, else runs/slurm-<job id>; always resume what is there
  TRAIN_ARGS=("$@")
  OUTPUT_DIR=""
  local i has_resume=0
  for ((i = 0; i < ${#TRAIN_ARGS[@]}; i++)); do
    case ${TRAIN_ARGS[i]} in
      --output-dir) OUTPUT_DIR=${TRAIN_ARGS[i + 1]:-} ;;
      --output-dir=*) OUTPUT_DIR=${TRAIN_ARGS[i]#*=} ;;
      --resume | --resume=*) has_resume=1 ;;
    esac
  done
  if [[ -z $OUTPUT_DIR ]]; then
    OUTPUT_DIR=runs/slurm-$JOB_ID
    TRAIN_ARGS+=(--output-dir "$OUTPUT_DIR")
  fi
  if ((has_resume == 0)); then
    TRAIN_ARGS+=(--resume auto)
  fi
  mkdir -p "$OUTPUT_DIR"
  STOP_FILE=$OUTPUT_DIR/STOP
  rm -f "$STOP_FILE" # a leftover would stop the resumed run at once

  # ---- the device: CUDA when it finds a GPU (no nvidia-smi: no NVIDIA GPU, and no need to wait for
  # torch's import to find out), else the CPU, where several processes talk over gloo
  ON_CUDA=0
  if nvidia-smi -L >/dev/null 2>&1 &&
    "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    ON_CUDA=1
  fi
  if ((ON_CUDA)); then MIXED=${MIXED_PRECISION:-bf16}; else MIXED=${MIXED_PRECISION:-no}; fi
  export ACCELERATE_MIXED_PRECISION=$MIXED
}

# ---- signals: USR1 (time limit ahead, or scancel --signal=USR1 --batch) and TERM (preemption, scancel).
# Neither srun nor torchrun passes USR1 on to the training processes, so the STOP file tells them: they
# finish the step, save a checkpoint and exit. After USR1 the job requeues itself and resumes from there.
# shellcheck disable=SC2317 # invoked by the traps in slurm_run_training
slurm_on_signal() {
  got_signal=$1
  trapped=1
  echo "$(date '+%F %T') SIG$1: asking the training to save a checkpoint and stop"
  touch "$SIGNAL_MARK" "$STOP_FILE" || true
}

slurm_run_training() {
  got_signal=""
  trapped=0
  SIGNAL_MARK=${TMPDIR:-/tmp}/tl_dist-signal-$JOB_ID-$$ # its time tells checkpoints saved after the signal
  trap 'slurm_on_signal USR1' USR1
  trap 'slurm_on_signal TERM' TERM
  local log log_start=0 pid status="" rc
  log=$(readlink -f "/proc/$$/fd/2" || true) # the job's log; what the training adds to it starts here
  if [[ -f $log ]]; then log_start=$(stat -c %s "$log"); fi
  "$@" "${TRAIN_ARGS[@]}" &
  pid=$!
  while [[ -z $status ]]; do # a trapped signal interrupts `wait`: wait again until the launcher is done
    trapped=0
    rc=0
    wait "$pid" || rc=$?
    if ((trapped == 0 || rc < 128)); then status=$rc; fi
  done
  trap - USR1 TERM
  rm -f "$STOP_FILE"
  echo "$(date '+%F %T') training exited with code $status$(slurm_error_line "$log" "$log_start" "$status")"
  slurm_finish "$status"
}

# ": <the training's error: line>" when it failed (exit code $3) after printing one into the log $1 past
# byte $2: the log then ends with it, not with the ChildFailedError report torchrun prints after it.
slurm_error_line() {
  local line=""
  if [[ $3 != 0 && -f $1 ]]; then line=$(tail -c +$(($2 + 1)) "$1" | grep -a '^error: ' | tail -n 1 || true); fi
  echo "${line:+: $line}"
}

# Requeue after USR1, exit 75 after a checkpoint on TERM, else exit with the training's code.
slurm_finish() {
  local status=$1 saved="" state # saved: the checkpoint saved after the signal, if any
  if [[ -n $got_signal ]]; then
    for state in "$OUTPUT_DIR"/checkpoints/step_*/train_state.json; do
      if [[ $state -nt $SIGNAL_MARK && (-z $saved || $state -nt $saved/train_state.json) ]]; then
        saved=${state%/train_state.json}
      fi
    done
    rm -f "$SIGNAL_MARK"
  fi
  if [[ $got_signal == USR1 && $status != 0 ]]; then
    echo "$(date '+%F %T') requeueing job $JOB_ID; it resumes from the latest checkpoint in $OUTPUT_DIR" \
      "(${saved:+saved after the signal: }${saved:-none saved after the signal})"
    scontrol requeue "$JOB_ID"
    exit 0
  fi
  if [[ -n $saved && $status != 0 ]]; then
    echo "$(date '+%F %T') stopped with a checkpoint, $saved; continue with" \
      "sbatch $JOB_SCRIPT <the same options> --output-dir $OUTPUT_DIR"
    exit 75 # EX_TEMPFAIL, as tl_dist.train: checkpointed, run again to continue
  fi
  exit "$status"
}
