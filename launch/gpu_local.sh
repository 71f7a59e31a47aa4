#!/usr/bin/env bash
# Pre-training on one multi-GPU host: one process drives every local GPU; the mesh spans them all.
#
#   launch/gpu_local.sh CONFIG WORKDIR [--config.field=value ...]
#   e.g. launch/gpu_local.sh configs/large.py /scratch/runs/large --config.mesh.per_device_microbatch=32
#
# Rerunning the same command resumes from the newest checkpoint in WORKDIR. Ctrl-C, or SIGTERM to
# this script (kill, docker stop, a scheduler), is passed on to training, which checkpoints the
# current step and exits with code 4; rerun to resume.
#
# Environment:
#   VENV        venv with jax[cuda12] + requirements (default: the active one, else ./.venv, else
#               the python on PATH)
#   LOG_DIR     where train.w0.log goes (default: WORKDIR/logs; ~/deberta_jax_logs for gs://)
#   XLA_FLAGS   appended to the flags set below
#   XLA_PYTHON_CLIENT_MEM_FRACTION  JAX takes 75% of each GPU by default; 0.9 on a host of your own
#   DEBERTA_JAX_CACHE  token caches (default ~/.cache/deberta_jax)
set -euo pipefail

usage="usage: launch/gpu_local.sh CONFIG WORKDIR [--config.field=value ...]"
case ${1:-} in -h | --help) echo "$usage"; exit 0 ;; esac
(($# >= 2)) || { echo "$usage" >&2; exit 2; }
config=$1
workdir=$2
shift 2

cd "$(dirname "${BASH_SOURCE[0]}")/.."
[[ -f $config ]] || { echo "no config file '$config' in $PWD" >&2; exit 2; }

VENV=${VENV:-${VIRTUAL_ENV:-}}
[[ -n $VENV || ! -x .venv/bin/python ]] || VENV=$PWD/.venv
python=python3
[[ -z $VENV ]] || python=$VENV/bin/python

if [[ $workdir == gs://* ]]; then
  LOG_DIR=${LOG_DIR:-$HOME/deberta_jax_logs}
else
  mkdir -p "$workdir"
  LOG_DIR=${LOG_DIR:-$workdir/logs}
fi
mkdir -p "$LOG_DIR"
log=$LOG_DIR/train.w0.log

# Lets XLA overlap collectives with compute (the one flag NVIDIA's JAX containers set by default).
export XLA_FLAGS="--xla_gpu_enable_latency_hiding_scheduler=true ${XLA_FLAGS:-}"

echo "=== $(date -u +%Y-%m-%dT%H:%M:%SZ) $(hostname): $config -> $workdir $*" >>"$log"
# Training runs in the background so that this shell can pass SIGTERM/SIGINT on to it (a shell
# waiting on a foreground command would act on the signal only after the command ended). The tee
# that copies output to the log ignores those signals: if it died first, training would die of
# SIGPIPE on its next line of output, before it could checkpoint.
"$python" -m deberta_jax.main --config="$config" --workdir="$workdir" "$@" \
  > >(trap '' INT TERM; exec tee -a "$log") 2>&1 &
pid=$!
trap 'kill -TERM "$pid" 2>/dev/null || true' INT TERM

# `wait` returns early when a trapped signal arrives; wait again until training has exited.
rc=0
while :; do
  wait "$pid" && rc=0 || rc=$?
  kill -0 "$pid" 2>/dev/null || break
done
if ((rc == 4)); then
  echo "Stopped at a checkpoint; rerun the same command to resume." >&2
fi
exit "$rc"
