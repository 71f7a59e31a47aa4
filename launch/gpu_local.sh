#!/usr/bin/env bash
# Pre-training on one multi-GPU host: one process sees every local GPU; the mesh spans them all.
#   launch/gpu_local.sh configs/base.py /scratch/runs/base [--config.field=value ...]
# Restarting the same command resumes from the newest checkpoint in the workdir.
set -euo pipefail
config=${1:?usage: gpu_local.sh CONFIG WORKDIR [overrides...]}
workdir=${2:?usage: gpu_local.sh CONFIG WORKDIR [overrides...]}
shift 2
cd "$(dirname "$0")/.."
mkdir -p "$workdir"
python -m deberta_jax.main --config="$config" --workdir="$workdir" "$@" 2>&1 | tee -a "$workdir/train.$(hostname).log"
