#!/usr/bin/env bash
# Pre-training on a Cloud TPU VM or a TPU pod slice with `gcloud compute tpus`.
#
# A pod slice is several VMs ("workers"), and every worker must run the same training command at
# the same time: a process started on worker 0 alone waits for the others until it times out. So
# each step below acts on all workers at once (`--worker=all`). A single-host VM (v4-8) is the
# one-worker case of the same commands. Run `launch/tpu.sh help` for the usage.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/tpu.sh COMMAND [options]

commands:
  create                 create the TPU VM / pod slice (a queued resource with --queued)
  setup                  on every worker: copy this checkout (or clone REPO_URL), create a
                         Python >= 3.11 venv, pip install jax[tpu] and requirements.txt
  run CONFIG WORKDIR [--config.field=value ...]
                         start the same training command on every worker in the background;
                         worker N logs to ~/deberta_jax_logs/train.wN.log. WORKDIR must be gs://.
                         Rerunning the same command resumes from the newest checkpoint.
  logs                   follow a worker's log (--worker=N, default 0; --worker=all for all)
  status                 the TPU's state, and whether training runs on each worker
  stop                   SIGTERM training on every worker (it checkpoints the current step and
                         exits), SIGKILL whatever is left after --grace seconds
  exec -- COMMAND...     run a shell command on every worker (or --worker=N), in the code dir
  delete                 delete the TPU VM (and its queued resource); gs:// data is kept
  help                   this text

options (each also settable as the environment variable in brackets):
  --name=NAME            TPU name                                    [TPU_NAME, default deberta]
  --zone=ZONE            zone, e.g. us-central2-b for v4             [ZONE, required]
  --project=PROJECT      project; default: gcloud's configured one   [PROJECT]
  --accelerator=TYPE     v4-8, v4-64, v5p-64, v5litepod-16, v6e-8... [ACCELERATOR, default v4-8]
  --runtime=VERSION      TPU software version; default by generation [RUNTIME]
                         (v4: tpu-ubuntu2204-base, v5p: v2-alpha-tpuv5,
                          v5e: v2-alpha-tpuv5-lite, v6e: v2-alpha-tpuv6e)
  --spot                 spot capacity (cheap, can be preempted)     [SPOT=1]
  --preemptible          preemptible capacity (older TPU types)      [PREEMPTIBLE=1]
  --queued               create/delete through a queued resource     [QUEUED=1]
  --repo-url=URL         setup clones URL instead of copying this    [REPO_URL]
                         checkout with `tpu-vm scp`
  --repo-ref=REF         commit/branch/tag to check out (pin a SHA)  [REPO_REF]
  --env=KEY=VALUE        export KEY=VALUE for training (repeatable)
  --worker=N|all         logs: worker to follow (default 0); exec: workers (default all)
  --lines=N              logs: lines of history to show             [default 100]
  --no-follow            logs: print and exit instead of following
  --grace=SECONDS        stop: wait this long for the checkpoint     [STOP_GRACE, default 600]
  --local-workdir        run: allow a WORKDIR that is not on gs:// (single-host VM only)
  DRY_RUN=1              print every gcloud command instead of running it

example (v4-64 = 32 chips on 8 workers):
  export TPU_NAME=deberta-large ZONE=us-central2-b ACCELERATOR=v4-64
  launch/tpu.sh create --spot && launch/tpu.sh setup
  launch/tpu.sh run configs/large.py gs://BUCKET/runs/large --config.mesh.per_device_microbatch=8
  launch/tpu.sh logs; launch/tpu.sh stop; launch/tpu.sh delete
EOF
}

die() {
  echo "tpu.sh: $*" >&2
  echo "Run 'launch/tpu.sh help' for the usage." >&2
  exit 2
}

# ---------------------------------------------------------------------------------------------
# Settings: environment first, then command-line options.

TPU_NAME=${TPU_NAME:-deberta}
ZONE=${ZONE:-}
PROJECT=${PROJECT:-}
ACCELERATOR=${ACCELERATOR:-v4-8}
RUNTIME=${RUNTIME:-}
SPOT=${SPOT:-0}
PREEMPTIBLE=${PREEMPTIBLE:-0}
QUEUED=${QUEUED:-0}
REPO_URL=${REPO_URL:-}
REPO_REF=${REPO_REF:-}
STOP_GRACE=${STOP_GRACE:-600}
DRY_RUN=${DRY_RUN:-0}
# Locations on the workers, relative to the remote $HOME. The venv lives outside the code
# directory so that copying a new version of the code never touches it. Logs stay on the
# worker's disk (small, but text logs are small); checkpoints and metrics go to the gs:// workdir.
REMOTE_DIR=${REMOTE_DIR:-deberta_jax}
REMOTE_VENV=${REMOTE_VENV:-deberta_jax_venv}
REMOTE_LOGS=${REMOTE_LOGS:-deberta_jax_logs}
# What `setup` installs before requirements.txt (requirements.txt holds the CPU jax).
JAX_PIP=${JAX_PIP:-jax[tpu]}
# The port of the JAX coordination service on worker 0 (JAX's own default for TPU pods).
COORDINATOR_PORT=${COORDINATOR_PORT:-8476}

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

command_name=${1:-}
[[ -n $command_name ]] || { usage >&2; exit 2; }
shift

worker=""
lines=100
follow=1
local_workdir=0
train_env=()
positional=()
passthrough=()
while (($#)); do
  arg=$1
  shift
  case $arg in
    --name=*) TPU_NAME=${arg#*=} ;;
    --zone=*) ZONE=${arg#*=} ;;
    --project=*) PROJECT=${arg#*=} ;;
    --accelerator=*) ACCELERATOR=${arg#*=} ;;
    --runtime=*) RUNTIME=${arg#*=} ;;
    --spot) SPOT=1 ;;
    --preemptible) PREEMPTIBLE=1 ;;
    --queued) QUEUED=1 ;;
    --repo-url=*) REPO_URL=${arg#*=} ;;
    --repo-ref=*) REPO_REF=${arg#*=} ;;
    --env=*) train_env+=("${arg#*=}") ;;
    --worker=*) worker=${arg#*=} ;;
    --lines=*) lines=${arg#*=} ;;
    --no-follow) follow=0 ;;
    --grace=*) STOP_GRACE=${arg#*=} ;;
    --local-workdir) local_workdir=1 ;;
    --name | --zone | --project | --accelerator | --runtime | --repo-url | --repo-ref | --env | \
      --worker | --lines | --grace)
      die "write $arg=VALUE (with '=')" ;;
    --)
      positional+=("$@")
      break
      ;;
    -h | --help) usage; exit 0 ;;
    --*)
      # Anything else that looks like a flag belongs to the training command (`run` only).
      passthrough+=("$arg") ;;
    *) positional+=("$arg") ;;
  esac
done

[[ $worker =~ ^([0-9]+|all)?$ ]] || die "--worker must be a worker number or 'all', got '$worker'"
[[ $lines =~ ^[0-9]+$ ]] || die "--lines must be a number, got '$lines'"
[[ $STOP_GRACE =~ ^[0-9]+$ ]] || die "--grace must be a number of seconds, got '$STOP_GRACE'"
for kv in "${train_env[@]+"${train_env[@]}"}"; do
  [[ $kv =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env wants KEY=VALUE, got '$kv'"
done

default_runtime() {
  # Google's recommended software versions for JAX, by TPU generation.
  case $ACCELERATOR in
    v5p-*) echo v2-alpha-tpuv5 ;;
    v5litepod-* | v5e-*) echo v2-alpha-tpuv5-lite ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    v2-* | v3-* | v4-*) echo tpu-ubuntu2204-base ;;
    *) die "no default --runtime for accelerator '$ACCELERATOR'; pass --runtime=VERSION" ;;
  esac
}

# ---------------------------------------------------------------------------------------------
# Running commands. With DRY_RUN=1 each command is printed (as a line that could be pasted into
# a shell) instead of run; that is how the tests check what would be sent to gcloud.

quote() {
  # Single-quotes an argument when the shell would otherwise split or expand it.
  if [[ $1 =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

x() {
  if [[ $DRY_RUN == 1 ]]; then
    local out="+" a
    for a in "$@"; do out+=" $(quote "$a")"; done
    printf '%s\n' "$out"
    return 0
  fi
  "$@"
}

gcloud_common() {
  # Flags every gcloud call takes: zone and (optional) project.
  [[ -n $ZONE ]] || die "ZONE is not set (e.g. export ZONE=us-central2-b, or --zone=...)"
  common=("--zone=$ZONE")
  [[ -z $PROJECT ]] || common+=("--project=$PROJECT")
}

tpu_ssh() {
  # tpu_ssh WORKER REMOTE_COMMAND: run a command on one worker or on all of them at once.
  gcloud_common
  x gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${common[@]}" "--worker=$1" "--command=$2"
}

# Shell text run on the workers. `md` reads the TPU VM metadata server, which says which worker
# this is (`agent-worker-number`) and lists all workers in process order
# (`worker-network-endpoints`); JAX reads the same two keys. Single-quoted on purpose: $HOME
# and friends must expand on the worker, not here.
# shellcheck disable=SC2016
REMOTE_PRELUDE='md() { curl -sf -m 10 -H Metadata-Flavor:Google "http://metadata.google.internal/computeMetadata/v1/instance/attributes/$1"; }; w=$(md agent-worker-number || echo 0)'
remote_paths() {
  # Remote variables for the code dir, venv, log dir, and this worker's log and pid files.
  # shellcheck disable=SC2016
  printf 'code="$HOME/%s"; venv="$HOME/%s"; logs="$HOME/%s"; log="$logs/train.w$w.log"; pidfile="$logs/train.w$w.pid"' \
    "$REMOTE_DIR" "$REMOTE_VENV" "$REMOTE_LOGS"
}
# True on a worker while the training process that `run` started there is alive. The command
# line is checked too: after a reboot the pid in a stale pid file may belong to anything.
# shellcheck disable=SC2016
REMOTE_RUNNING='[ -f "$pidfile" ] && pid=$(cat "$pidfile") && kill -0 "$pid" 2>/dev/null && grep -qa deberta_jax.main "/proc/$pid/cmdline"'

# ---------------------------------------------------------------------------------------------
# Commands.

no_positional() {
  ((${#positional[@]} == 0 && ${#passthrough[@]} == 0)) ||
    die "$command_name takes no arguments, got: ${positional[*]-} ${passthrough[*]-}"
}

cmd_create() {
  no_positional
  gcloud_common
  local runtime capacity=()
  # A plain assignment, so that a failing default_runtime stops the script (set -e).
  runtime=${RUNTIME:-$(default_runtime)}
  [[ $SPOT == 1 && $PREEMPTIBLE == 1 ]] && die "choose one of --spot and --preemptible"
  [[ $SPOT == 1 ]] && capacity+=(--spot)
  if [[ $QUEUED == 1 ]]; then
    # A queued resource waits for capacity instead of failing when none is free right now;
    # `status` shows when it turns ACTIVE. Only spot (not preemptible) capacity exists here.
    [[ $PREEMPTIBLE == 1 ]] && die "--queued takes --spot, not --preemptible"
    x gcloud compute tpus queued-resources create "$TPU_NAME" "${common[@]}" \
      "--node-id=$TPU_NAME" "--accelerator-type=$ACCELERATOR" "--runtime-version=$runtime" \
      "${capacity[@]+"${capacity[@]}"}"
  else
    [[ $PREEMPTIBLE == 1 ]] && capacity+=(--preemptible)
    x gcloud compute tpus tpu-vm create "$TPU_NAME" "${common[@]}" \
      "--accelerator-type=$ACCELERATOR" "--version=$runtime" "${capacity[@]+"${capacity[@]}"}"
  fi
}

pack_checkout() {
  # The files git would commit (tracked plus untracked-but-not-ignored), so local edits travel
  # and .venv, caches and workdirs do not. Sets `tarball`.
  tarball="${TMPDIR:-/tmp}/deberta_jax_src.$$.tar.gz"
  if [[ $DRY_RUN == 1 ]]; then
    x tar -czf "$tarball" -C "$REPO_ROOT" "(git ls-files --cached --others --exclude-standard)"
    return
  fi
  pack_list=$(mktemp)
  trap 'rm -f "$tarball" "$pack_list"' EXIT
  if git -C "$REPO_ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    # Skip tracked files deleted in the working tree; tar would fail on them.
    (cd "$REPO_ROOT" && git ls-files -z --cached --others --exclude-standard |
      while IFS= read -r -d '' f; do if [[ -e $f ]]; then printf '%s\0' "$f"; fi; done) >"$pack_list"
    tar -czf "$tarball" -C "$REPO_ROOT" --null -T "$pack_list"
  else
    tar -czf "$tarball" -C "$REPO_ROOT" --exclude=.venv --exclude=.git --exclude=__pycache__ .
  fi
}

cmd_setup() {
  no_positional
  gcloud_common
  local fetch
  if [[ -n $REPO_URL ]]; then
    # Clone once, then fetch; check out REPO_REF when given (a SHA pins every worker to the
    # same code), else fast-forward the default branch.
    local ref_step="git -C \"\$code\" pull -q --ff-only"
    [[ -z $REPO_REF ]] || ref_step="git -C \"\$code\" checkout -q $(printf %q "$REPO_REF")"
    fetch="if [ -d \"\$code/.git\" ]; then git -C \"\$code\" fetch -q --all --tags; else git clone -q $(printf %q "$REPO_URL") \"\$code\"; fi; $ref_step"
  else
    pack_checkout
    x gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME:deberta_jax_src.tar.gz" \
      "${common[@]}" --worker=all
    fetch="mkdir -p \"\$code\" && tar -xzf \"\$HOME/deberta_jax_src.tar.gz\" -C \"\$code\" && rm -f \"\$HOME/deberta_jax_src.tar.gz\""
  fi
  # jax >= 0.8 needs Python >= 3.11; tpu-ubuntu2204-base ships 3.10, so take a newer python
  # when one is installed and apt-get python3.11 otherwise. The dpkg lock timeout covers the
  # unattended upgrades that often hold the lock on a freshly booted VM.
  local remote
  # shellcheck disable=SC2016
  remote="set -e; $REMOTE_PRELUDE; $(remote_paths); $fetch"'
py=""; for c in python3.13 python3.12 python3.11 python3; do if command -v "$c" >/dev/null && "$c" -c "import sys, ensurepip, venv; sys.exit(sys.version_info < (3, 11))" 2>/dev/null; then py=$c; break; fi; done
if [ -z "$py" ]; then sudo apt-get -o DPkg::Lock::Timeout=600 update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq python3.11 python3.11-venv; py=python3.11; fi
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
"$venv/bin/pip" install -q -U pip'"
\"\$venv/bin/pip\" install -q -U $(printf %q "$JAX_PIP")"'
"$venv/bin/pip" install -q -r "$code/requirements.txt"
"$venv/bin/pip" install -q --no-deps -e "$code"
echo "worker $w: $("$venv/bin/python" -c "import sys, jax; print(sys.version.split()[0], jax.__version__)") ready in $code"'
  # One line, like the other remote commands (and one command per line in DRY_RUN output).
  tpu_ssh all "${remote//$'\n'/; }"
}

workdir_of() {
  # The WORKDIR positional argument of `run`.
  printf '%s' "${positional[1]}"
}

cmd_run() {
  ((${#positional[@]} == 2)) ||
    die "run wants CONFIG WORKDIR [--config.field=value ...], got: ${positional[*]-}"
  local config=${positional[0]} workdir
  workdir=$(workdir_of)
  [[ $config == *.py ]] || die "CONFIG should be a config file such as configs/large.py, got '$config'"
  [[ -f $REPO_ROOT/$config ]] || [[ -n $REPO_URL ]] ||
    die "no config file '$config' in $REPO_ROOT (paths are relative to the repository root)"
  # Every worker writes its own shards of each checkpoint into WORKDIR, so it must be storage
  # all workers share; and a TPU VM's boot disk is too small for checkpoints of large anyway.
  if [[ $workdir != gs://* && $local_workdir != 1 ]]; then
    die "WORKDIR must be on gs:// (shared by all workers), got '$workdir'; --local-workdir overrides this on a single-host VM"
  fi
  local train_args=("--config=$config" "--workdir=$workdir" "${passthrough[@]+"${passthrough[@]}"}")

  # 1. Refuse to start anywhere while a run is alive on any worker or a worker lacks setup: a
  #    second run on some workers would hold their TPU and leave the others waiting forever.
  # shellcheck disable=SC2016
  tpu_ssh all "$REMOTE_PRELUDE; $(remote_paths); "'if '"$REMOTE_RUNNING"'; then echo "worker $w: training is still running (pid $pid); run launch/tpu.sh stop first" >&2; exit 1; fi; if [ ! -x "$venv/bin/python" ] || [ ! -d "$code" ]; then echo "worker $w: not set up; run launch/tpu.sh setup" >&2; exit 1; fi'

  # 2. Start the same command on every worker, detached (setsid + nohup + no terminal) so that
  #    it outlives the ssh session. The child writes its own pid before exec'ing python, so the
  #    pid file names the training process, which also leads its own process group for `stop`.
  #    On a pod slice the JAX coordinator is given explicitly (worker 0, process id = worker
  #    number from the metadata server), so that every worker joins the same jax.distributed
  #    cluster whatever the auto-detection in deberta_jax/runtime/distributed.py recognises; the
  #    coordination service is also what lets all workers agree on a checkpoint step when
  #    SIGTERM arrives.
  local exports="" kv
  for kv in "${train_env[@]+"${train_env[@]}"}"; do
    exports+="export ${kv%%=*}=$(printf %q "${kv#*=}"); "
  done
  local quoted_args
  quoted_args=$(printf '%q ' "${train_args[@]}")
  local remote
  # shellcheck disable=SC2016
  remote="set -e; $REMOTE_PRELUDE; $(remote_paths); "'mkdir -p "$logs"; cd "$code"; eps=$(md worker-network-endpoints || true); n=$(printf "%s" "$eps" | tr "," "\n" | grep -c . || true); if [ "${n:-0}" -gt 1 ]; then first=${eps%%,*}; export JAX_COORDINATOR_ADDRESS="${first##*:}:'"$COORDINATOR_PORT"'" JAX_NUM_PROCESSES="$n" JAX_PROCESS_ID="$w"; fi; '"$exports"'echo "=== $(date -u +%Y-%m-%dT%H:%M:%SZ) worker $w of ${n:-1}: starting" >> "$log"; setsid nohup bash -c '"'"'echo $$ > "$0"; exec "$@"'"'"' "$pidfile" "$venv/bin/python" -m deberta_jax.main '"$quoted_args"'>> "$log" 2>&1 < /dev/null & echo "worker $w: started, log $log"'
  tpu_ssh all "$remote"
  echo "Started on all workers of $TPU_NAME. Follow with: launch/tpu.sh logs [--worker=N|all]"
}

cmd_logs() {
  no_positional
  local target=${worker:-0} tail_flags="-n $lines"
  ((follow)) && tail_flags+=" -F"
  local remote
  if [[ $target == all ]]; then
    # Each worker holds only its own log; prefix every line with the worker's file name.
    # shellcheck disable=SC2016
    remote="$REMOTE_PRELUDE; $(remote_paths); "'for f in "$logs"/train.w*.log; do tail '"$tail_flags"' "$f" | sed -u "s|^|${f##*/}: |" & done; wait'
  else
    # shellcheck disable=SC2016
    remote="tail $tail_flags \"\$HOME/$REMOTE_LOGS/train.w$target.log\""
  fi
  tpu_ssh "$target" "$remote"
}

cmd_status() {
  no_positional
  gcloud_common
  if [[ $QUEUED == 1 ]]; then
    x gcloud compute tpus queued-resources describe "$TPU_NAME" "${common[@]}" \
      "--format=value(state.state)"
  fi
  x gcloud compute tpus tpu-vm describe "$TPU_NAME" "${common[@]}" \
    "--format=table(name.basename(), acceleratorType, state, health)"
  # shellcheck disable=SC2016
  tpu_ssh all "$REMOTE_PRELUDE; $(remote_paths); "'if '"$REMOTE_RUNNING"'; then echo "worker $w: training (pid $pid): $(tail -n 1 "$log" 2>/dev/null)"; else echo "worker $w: not training; last log line: $(tail -n 1 "$log" 2>/dev/null)"; fi' ||
    echo "(could not reach every worker; is the TPU READY?)" >&2
}

cmd_stop() {
  no_positional
  # SIGTERM goes to the training process group on every worker at once: JAX's preemption
  # notifier agrees on a step across workers, each writes its shards of that step's checkpoint,
  # and the process exits with code 4. SIGKILL only after the grace period.
  local remote
  # shellcheck disable=SC2016
  remote="$REMOTE_PRELUDE; $(remote_paths); "'if '"$REMOTE_RUNNING"'; then kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid"; echo "worker $w: SIGTERM sent to $pid; waiting up to '"$STOP_GRACE"' s for its checkpoint"; t=0; while kill -0 "$pid" 2>/dev/null && [ "$t" -lt '"$STOP_GRACE"' ]; do sleep 1; t=$((t + 1)); done; if kill -0 "$pid" 2>/dev/null; then kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid"; echo "worker $w: killed after '"$STOP_GRACE"' s"; else echo "worker $w: stopped: $(tail -n 1 "$log")"; fi; else echo "worker $w: not running"; fi; rm -f "$pidfile"'
  tpu_ssh all "$remote"
}

cmd_exec() {
  ((${#passthrough[@]} == 0 && ${#positional[@]} > 0)) ||
    die "exec wants a command after '--': launch/tpu.sh exec [--worker=N] -- COMMAND..."
  local user_command="${positional[*]}"
  # shellcheck disable=SC2016
  tpu_ssh "${worker:-all}" "$REMOTE_PRELUDE; $(remote_paths); cd \"\$code\" 2>/dev/null || true; $user_command"
}

cmd_delete() {
  no_positional
  gcloud_common
  echo "Deleting $TPU_NAME: a run still training there stops without a final checkpoint (launch/tpu.sh stop first)." >&2
  if [[ $QUEUED == 1 ]]; then
    # --force deletes the TPU VM along with the queued resource that holds it.
    x gcloud compute tpus queued-resources delete "$TPU_NAME" "${common[@]}" --force --quiet
  else
    x gcloud compute tpus tpu-vm delete "$TPU_NAME" "${common[@]}" --quiet
  fi
}

case $command_name in
  create) cmd_create ;;
  setup) cmd_setup ;;
  run) cmd_run ;;
  logs) cmd_logs ;;
  status) cmd_status ;;
  stop) cmd_stop ;;
  exec) cmd_exec ;;
  delete) cmd_delete ;;
  help | -h | --help) usage ;;
  *)
    echo "tpu.sh: unknown command '$command_name'" >&2
    usage >&2
    exit 2
    ;;
esac
