#!/usr/bin/env bash
# The GPU measurements of docs/benchmarks.md ("The one device call") as one script.
#
#   PYTHON=/work/venv/bin/python bash experiments/gpu_benchmarks.sh prepare
#                                                # here: copy the pure-Python packages the GPU
#                                                # machine lacks into .whl/py (git-ignored)
#   bash experiments/gpu_benchmarks.sh           # there: carry .whl; results go to $OUT
#   bash experiments/gpu_benchmarks.sh more      # there: the second call's runs
#
# Each step has its own timeout and its own log under $OUT, so one failing step (a kernel that
# does not compile, a torch reference that runs out of memory) does not lose the others.
set -u
cd "$(dirname "$0")/.." || exit 1

if [[ "${1:-}" == "prepare" ]]; then
  site=$("${PYTHON:-python}" -c "import ml_collections, os; print(os.path.dirname(os.path.dirname(ml_collections.__file__)))")
  mkdir -p .whl/py
  for pkg in ml_collections pytest _pytest pluggy iniconfig py.py packaging pygments yaml; do
    if [[ -e "$site/$pkg" ]]; then cp -r "$site/$pkg" .whl/py/; fi
  done
  du -sh .whl
  exit 0
fi

OUT=${OUT:-/tmp/gpu_benchmarks}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/.whl/py:$PWD XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
B=(python -m benchmarks.bench)
A=(python -m benchmarks.attention_bench --batch 32 --seq_len 512 --heads 12 --head_dim 64)

step() {  # step NAME SECONDS COMMAND...: run with a timeout, keep stdout+stderr in $OUT/NAME.txt
  local name=$1 limit=$2; shift 2
  echo "=== $name: $*"
  timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
  echo "=== $name: exit $? ($(date +%T))"
  grep -v '^{' "$OUT/$name.txt" | tail -n 12
}

nvidia-smi -L
python -c "import jax, torch, transformers; print(jax.__version__, jax.devices(), torch.__version__, torch.cuda.is_available(), transformers.__version__)"

if [[ "${1:-}" == "more" ]]; then
  impl=${ATTENTION_IMPL:-flash}
  step small 120 "${B[@]}" --config=configs/small.py --seq_len 512 --batch 32 --reference=torch --config.model.attention_impl="$impl"
  step tiny 60 "${B[@]}" --config=configs/tiny.py --seq_len 128 --batch 16 --reference=torch --config.model.attention_impl="$impl"
  step large 180 "${B[@]}" --config=configs/large.py --seq_len 512 --batch 16 --reference=torch --config.model.attention_impl="$impl"
  step base_dots64 150 "${B[@]}" --config=configs/base.py --seq_len 512 --batch 64 --config.model.remat=dots --config.model.attention_impl="$impl"
  exit 0
fi

JAX_PLATFORMS=cuda step flash_tests 90 python -m pytest -q -x tests/test_flash_attention.py -k "not lower"
step attn 120 "${A[@]}" --impls skew,flash,plain,dpa_cudnn
step attn_block32 45 "${A[@]}" --impls flash --check=false --flash_block 32
step base_flash 200 "${B[@]}" --config=configs/base.py --seq_len 512 --batch 32 --reference=torch --config.model.attention_impl=flash
step base_skew 120 "${B[@]}" --config=configs/base.py --seq_len 512 --batch 32 --profile
