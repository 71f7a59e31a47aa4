"""The launch scripts: syntax, the gcloud commands tpu.sh would send, and the shell logic that
runs on the machines (start, stop, requeue), exercised locally with fake gcloud-side tools.

Nothing here touches the network or a cluster: tpu.sh runs with DRY_RUN=1 (it prints each gcloud
command), and the remote scripts it would send run here under a temporary $HOME with a fake
metadata server (`curl`) and a fake training process in place of the venv's python.
"""

import os
import pathlib
import shlex
import signal
import subprocess
import textwrap
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
TPU = LAUNCH / "tpu.sh"
SBATCH = LAUNCH / "slurm_gpu.sbatch"
GPU_LOCAL = LAUNCH / "gpu_local.sh"
SCRIPTS = sorted(p for p in LAUNCH.iterdir() if p.suffix in (".sh", ".sbatch"))

# Settings tpu.sh reads from the environment; cleared so that the caller's shell cannot leak in.
_TPU_SETTINGS = ("TPU_NAME", "ZONE", "PROJECT", "ACCELERATOR", "RUNTIME", "SPOT", "PREEMPTIBLE",
                 "QUEUED", "REPO_URL", "REPO_REF", "STOP_GRACE", "REMOTE_DIR", "REMOTE_VENV",
                 "REMOTE_LOGS", "JAX_PIP", "COORDINATOR_PORT", "DRY_RUN")


def _clean_env(**extra):
  env = {k: v for k, v in os.environ.items() if k not in _TPU_SETTINGS and not k.startswith("SLURM")}
  env.pop("VIRTUAL_ENV", None)
  env.update(extra)
  return env


def tpu(*args, **env):
  """Runs `DRY_RUN=1 launch/tpu.sh ARGS`; returns (returncode, printed commands, stderr)."""
  settings = {"DRY_RUN": "1", "ZONE": "us-central2-b", "TPU_NAME": "deb-test"}
  settings.update(env)
  proc = subprocess.run(["bash", str(TPU), *args], cwd=ROOT, env=_clean_env(**settings),
                        capture_output=True, text=True, timeout=30)
  commands = [shlex.split(line[2:]) for line in proc.stdout.splitlines() if line.startswith("+ ")]
  return proc.returncode, commands, proc.stderr


def gcloud_commands(commands):
  return [c for c in commands if c[0] == "gcloud"]


def remote_command(argv):
  """The --command=... text of a `gcloud compute tpus tpu-vm ssh` call."""
  (text,) = [a[len("--command="):] for a in argv if a.startswith("--command=")]
  return text


# --- syntax --------------------------------------------------------------------------------------


def test_every_launch_script_is_found():
  assert {p.name for p in SCRIPTS} >= {"tpu.sh", "gpu_local.sh", "slurm_gpu.sbatch"}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script):
  proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_strict_mode(script):
  assert "set -euo pipefail" in script.read_text()


# --- tpu.sh: the gcloud commands ---------------------------------------------------------------


def test_create_pod_slice():
  rc, commands, _ = tpu("create", "--accelerator=v4-64", "--spot")
  assert rc == 0
  assert commands == [["gcloud", "compute", "tpus", "tpu-vm", "create", "deb-test",
                       "--zone=us-central2-b", "--accelerator-type=v4-64",
                       "--version=tpu-ubuntu2204-base", "--spot"]]


@pytest.mark.parametrize("accelerator,runtime", [
    ("v4-8", "tpu-ubuntu2204-base"), ("v5p-64", "v2-alpha-tpuv5"),
    ("v5litepod-16", "v2-alpha-tpuv5-lite"), ("v6e-8", "v2-alpha-tpuv6e")])
def test_create_default_runtime_per_generation(accelerator, runtime):
  rc, commands, _ = tpu("create", f"--accelerator={accelerator}")
  assert rc == 0
  assert f"--version={runtime}" in commands[0]
  assert f"--accelerator-type={accelerator}" in commands[0]
  assert "--spot" not in commands[0] and "--preemptible" not in commands[0]


def test_create_settings_from_environment():
  rc, commands, _ = tpu("create", ACCELERATOR="v5p-64", RUNTIME="v2-alpha-tpuv5",
                        PROJECT="my-proj", PREEMPTIBLE="1", TPU_NAME="other")
  assert rc == 0
  (cmd,) = commands
  assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "other"]
  assert {"--project=my-proj", "--accelerator-type=v5p-64", "--version=v2-alpha-tpuv5",
          "--preemptible"} <= set(cmd)


def test_create_queued_resource():
  rc, commands, _ = tpu("create", "--queued", "--spot", "--accelerator=v5p-64")
  assert rc == 0
  assert commands == [["gcloud", "compute", "tpus", "queued-resources", "create", "deb-test",
                       "--zone=us-central2-b", "--node-id=deb-test",
                       "--accelerator-type=v5p-64", "--runtime-version=v2-alpha-tpuv5",
                       "--spot"]]


def test_create_unknown_accelerator_needs_a_runtime():
  rc, commands, err = tpu("create", "--accelerator=v9z-8")
  assert rc == 2 and not commands and "--runtime" in err
  rc, commands, _ = tpu("create", "--accelerator=v9z-8", "--runtime=some-image")
  assert rc == 0 and "--version=some-image" in commands[0]


def test_create_rejects_spot_and_preemptible_together():
  rc, commands, err = tpu("create", "--spot", "--preemptible")
  assert rc == 2 and not commands and "--spot" in err


def test_setup_copies_checkout_and_installs_on_all_workers():
  rc, commands, _ = tpu("setup")
  assert rc == 0
  scp, ssh = gcloud_commands(commands)
  assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
  assert "deb-test:deberta_jax_src.tar.gz" in scp and "--worker=all" in scp
  assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "deb-test"]
  assert "--worker=all" in ssh
  script = remote_command(ssh)
  assert "tar -xzf" in script
  assert "-m venv" in script and "sys.version_info < (3, 11)" in script
  assert "pip\" install -q -U jax\\[tpu\\]" in script
  assert 'pip" install -q -r "$code/requirements.txt"' in script
  # The remote script is valid shell.
  assert subprocess.run(["bash", "-n", "-c", script]).returncode == 0


def test_setup_clones_a_pinned_commit():
  rc, commands, _ = tpu("setup", "--repo-url=https://example.com/deberta_jax.git",
                        "--repo-ref=0123abc")
  assert rc == 0
  (ssh,) = gcloud_commands(commands)  # no scp when cloning
  assert "--worker=all" in ssh
  script = remote_command(ssh)
  assert "git clone -q https://example.com/deberta_jax.git" in script
  assert "checkout -q 0123abc" in script


def test_run_starts_the_same_command_on_all_workers():
  rc, commands, _ = tpu("run", "configs/large.py", "gs://bucket/runs/large",
                        "--config.mesh.fsdp=-1", "--config.mesh.per_device_microbatch=8",
                        "--env=TFDS_DATA_DIR=gs://bucket/tfds")
  assert rc == 0
  check, start = gcloud_commands(commands)
  for ssh in (check, start):
    assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "deb-test"]
    assert "--worker=all" in ssh and "--zone=us-central2-b" in ssh
  assert "still running" in remote_command(check)
  script = remote_command(start)
  assert ("-m deberta_jax.main --config=configs/large.py --workdir=gs://bucket/runs/large "
          "--config.mesh.fsdp=-1 --config.mesh.per_device_microbatch=8") in script
  assert 'log="$logs/train.w$w.log"' in script  # one log per worker, named by its index
  assert "setsid nohup" in script
  assert "export TFDS_DATA_DIR=gs://bucket/tfds" in script
  assert subprocess.run(["bash", "-n", "-c", script]).returncode == 0


def test_run_quotes_overrides_for_the_remote_shell():
  rc, commands, _ = tpu("run", "configs/small.py", "gs://b/r", "--config.data.text_files=/d/*.txt")
  assert rc == 0
  script = remote_command(gcloud_commands(commands)[1])
  assert "--config.data.text_files=/d/\\*.txt" in script


@pytest.mark.parametrize("args,message", [
    (("configs/large.py", "/tmp/run"), "gs://"),
    (("configs/large.py",), "CONFIG WORKDIR"),
    (("configs/nope.py", "gs://b/r"), "no config file"),
    (("large", "gs://b/r"), "config file"),
])
def test_run_rejects_bad_arguments(args, message):
  rc, commands, err = tpu("run", *args)
  assert rc == 2 and not commands
  assert message in err


def test_run_local_workdir_on_request():
  rc, commands, _ = tpu("run", "configs/tiny.py", "/tmp/run", "--local-workdir")
  assert rc == 0
  assert "--workdir=/tmp/run" in remote_command(gcloud_commands(commands)[1])


def test_logs_follow_one_worker():
  rc, commands, _ = tpu("logs", "--worker=3")
  assert rc == 0
  (ssh,) = commands
  assert "--worker=3" in ssh
  assert remote_command(ssh) == 'tail -n 100 -F "$HOME/deberta_jax_logs/train.w3.log"'


def test_logs_default_worker_zero_and_no_follow():
  rc, commands, _ = tpu("logs", "--no-follow", "--lines=20")
  assert rc == 0
  (ssh,) = commands
  assert "--worker=0" in ssh
  assert remote_command(ssh) == 'tail -n 20 "$HOME/deberta_jax_logs/train.w0.log"'


def test_logs_all_workers():
  rc, commands, _ = tpu("logs", "--worker=all")
  assert rc == 0
  (ssh,) = commands
  assert "--worker=all" in ssh
  assert "train.w*.log" in remote_command(ssh) and "tail -n 100 -F" in remote_command(ssh)


def test_status():
  rc, commands, _ = tpu("status", "--queued")
  assert rc == 0
  qr, describe, ssh = commands
  assert qr[:6] == ["gcloud", "compute", "tpus", "queued-resources", "describe", "deb-test"]
  assert describe[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "describe", "deb-test"]
  assert "--worker=all" in ssh


def test_stop_sends_sigterm_before_sigkill_on_all_workers():
  rc, commands, _ = tpu("stop", "--grace=120")
  assert rc == 0
  (ssh,) = commands
  assert "--worker=all" in ssh
  script = remote_command(ssh)
  assert script.index("kill -TERM") < script.index("kill -KILL")
  assert "-lt 120" in script


@pytest.mark.parametrize("queued,expected", [
    ((), ["gcloud", "compute", "tpus", "tpu-vm", "delete", "deb-test", "--zone=us-central2-b",
          "--quiet"]),
    (("--queued",), ["gcloud", "compute", "tpus", "queued-resources", "delete", "deb-test",
                     "--zone=us-central2-b", "--force", "--quiet"]),
])
def test_delete(queued, expected):
  rc, commands, _ = tpu("delete", *queued)
  assert rc == 0 and commands == [expected]


def test_exec_on_all_workers():
  rc, commands, _ = tpu("exec", "--", "gcloud", "storage", "cp", "gs://b/spm.model", ".")
  assert rc == 0
  (ssh,) = commands
  assert "--worker=all" in ssh
  assert remote_command(ssh).endswith("gcloud storage cp gs://b/spm.model .")


@pytest.mark.parametrize("args", [("launch",), ("frobnicate", "x"), ()])
def test_bad_subcommand_prints_usage(args):
  rc, commands, err = tpu(*args)
  assert rc != 0 and not commands
  assert "usage: launch/tpu.sh" in err


@pytest.mark.parametrize("args", [("status", "extra"), ("logs", "--worker=x"), ("stop", "--grace"),
                                  ("create", "--zone", "us-central2-b")])
def test_bad_options(args):
  rc, commands, _ = tpu(*args)
  assert rc == 2 and not commands


def test_zone_is_required():
  rc, commands, err = tpu("create", ZONE="")
  assert rc == 2 and not commands and "ZONE" in err


def test_help():
  proc = subprocess.run(["bash", str(TPU), "help"], capture_output=True, text=True, env=_clean_env())
  assert proc.returncode == 0
  for command in ("create", "setup", "run", "logs", "status", "stop", "delete"):
    assert f"\n  {command}" in proc.stdout


# --- tpu.sh: the remote scripts, run here ------------------------------------------------------

_FAKE_CURL = """\
#!/usr/bin/env bash
# Fake TPU VM metadata server: worker 1 of a two-worker slice.
case "${@: -1}" in
  */agent-worker-number) echo -n 1 ;;
  */worker-network-endpoints) echo -n "w-0:0:10.1.2.3,w-1:1:10.1.2.4" ;;
  *) exit 22 ;;
esac
"""

# Stands in for the venv's python: records its arguments and environment, then "trains" until
# SIGTERM, when it "checkpoints" and exits with the preemption code.
_FAKE_PYTHON = """\
#!/usr/bin/env bash
{ echo "args: $*"; echo "coordinator=${JAX_COORDINATOR_ADDRESS:-} processes=${JAX_NUM_PROCESSES:-}"\
" id=${JAX_PROCESS_ID:-} extra=${EXTRA:-} cwd=$PWD"; } > "$HOME/fake_python.txt"
trap 'echo "checkpointed at step 7"; exit 4' TERM
echo "step 1"
while :; do sleep 0.1; done
"""


def _write_exe(path, text):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text)
  path.chmod(0o755)


@pytest.fixture
def fake_worker(tmp_path):
  home = tmp_path / "home"
  _write_exe(tmp_path / "bin" / "curl", _FAKE_CURL)
  _write_exe(home / "deberta_jax_venv" / "bin" / "python", _FAKE_PYTHON)
  (home / "deberta_jax").mkdir(parents=True)
  env = _clean_env(HOME=str(home), PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}")

  def remote(*args, which=-1):
    """Runs here what `tpu.sh ARGS` would send to the workers (its last ssh, or `which`)."""
    _, commands, _ = tpu(*args)
    script = remote_command(gcloud_commands(commands)[which])
    return subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True,
                          timeout=30)

  yield home, remote
  # A failed test must not leave the fake training behind; only a process whose command line
  # says it is one is killed (a test may plant another pid in the pid file).
  pidfile = home / "deberta_jax_logs" / "train.w1.pid"
  try:
    pid = int(pidfile.read_text())
    if b"deberta_jax.main" in pathlib.Path(f"/proc/{pid}/cmdline").read_bytes():
      os.killpg(pid, signal.SIGKILL)
  except (OSError, ValueError):
    pass


def test_remote_run_status_stop_cycle(fake_worker):
  home, remote = fake_worker
  logs = home / "deberta_jax_logs"

  started = remote("run", "configs/large.py", "gs://b/runs/large", "--config.mesh.fsdp=-1",
                   "--env=EXTRA=a b")
  assert started.returncode == 0, started.stderr
  assert "worker 1: started" in started.stdout
  deadline = time.time() + 10
  while not (home / "fake_python.txt").exists() and time.time() < deadline:
    time.sleep(0.05)
  record = (home / "fake_python.txt").read_text()
  assert ("args: -m deberta_jax.main --config=configs/large.py --workdir=gs://b/runs/large "
          "--config.mesh.fsdp=-1") in record
  # The coordinator is worker 0 of the metadata's list; this process is worker 1 of 2.
  assert "coordinator=10.1.2.3:8476 processes=2 id=1 extra=a b" in record
  assert f"cwd={home / 'deberta_jax'}" in record

  status = remote("status")
  assert status.returncode == 0 and "worker 1: training (pid" in status.stdout

  # While it runs, `run` refuses to start a second one.
  precheck = remote("run", "configs/large.py", "gs://b/r", which=0)
  assert precheck.returncode == 1 and "still running" in precheck.stderr

  stopped = remote("stop", "--grace=10")
  assert stopped.returncode == 0, stopped.stderr
  assert "worker 1: SIGTERM sent" in stopped.stdout
  assert "worker 1: stopped: checkpointed at step 7" in stopped.stdout
  assert not (logs / "train.w1.pid").exists()
  log = (logs / "train.w1.log").read_text()
  assert "worker 1 of 2: starting" in log and "step 1" in log and "checkpointed" in log

  again = remote("stop")
  assert "worker 1: not running" in again.stdout
  status = remote("status")
  assert "worker 1: not training" in status.stdout


def test_remote_stale_pid_file_is_not_a_run(fake_worker):
  home, remote = fake_worker
  logs = home / "deberta_jax_logs"
  logs.mkdir()
  # A pid that is alive but is not training (this test process) must not count as a run.
  (logs / "train.w1.pid").write_text(str(os.getpid()))
  status = remote("status")
  assert "worker 1: not training" in status.stdout
  stopped = remote("stop", "--grace=1")
  assert "worker 1: not running" in stopped.stdout


# --- slurm_gpu.sbatch ----------------------------------------------------------------------------


def test_sbatch_directives_and_srun_line():
  text = SBATCH.read_text()
  for directive in ("--nodes=", "--ntasks-per-node=1", "--gpus-per-node=8", "--exclusive",
                    "--time=", "--requeue", "--signal=TERM@"):
    assert f"#SBATCH {directive}" in text, directive
  assert "srun --ntasks-per-node=1" in text
  assert 'python -m deberta_jax.main --config="$config" --workdir="$workdir" "$@"' in text
  assert "scontrol requeue" in text
  assert "--xla_gpu_enable_latency_hiding_scheduler=true" in text
  # Every #SBATCH line comes before the first command (SLURM stops reading them there).
  lines = text.splitlines()
  first_command = next(i for i, l in enumerate(lines) if l.strip() and not l.startswith("#"))
  assert all(i < first_command for i, l in enumerate(lines) if l.startswith("#SBATCH"))


_FAKE_SRUN = """\
#!/usr/bin/env bash
# Fake srun: one task (rank 0) on this machine; honours --output=...%t...
out=/dev/stdout
while [[ $1 == -* ]]; do
  case $1 in --output=*) out=${1#*=}; out=${out//%t/0} ;; esac
  echo "srun option: $1" >> "$HOME/srun.txt"
  shift
done
SLURM_PROCID=0 SLURM_LOCALID=0 "$@" >> "$out" 2>&1
"""

_FAKE_TRAIN = """\
#!/usr/bin/env bash
echo "args: $* devices=$JAX_LOCAL_DEVICE_IDS xla=$XLA_FLAGS venv=$VIRTUAL_ENV" > "$HOME/python.txt"
# With FAKE_HOLD=1, keep "training" until the test creates $HOME/release (at most 10 s).
for _ in $(seq 200); do [[ ${FAKE_HOLD:-0} == 1 && ! -e $HOME/release ]] || break; sleep 0.05; done
exit "${FAKE_RC:-0}"
"""


@pytest.fixture
def fake_slurm(tmp_path):
  _write_exe(tmp_path / "bin" / "srun", _FAKE_SRUN)
  _write_exe(tmp_path / "bin" / "scontrol", '#!/usr/bin/env bash\necho "$*" >> "$HOME/scontrol.txt"\n')
  venv = tmp_path / "venv"
  _write_exe(venv / "bin" / "python", _FAKE_TRAIN)

  def submit(fake_rc, restart_count=0, wait=True, **extra_env):
    env = _clean_env(HOME=str(tmp_path), PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}",
                     VENV=str(venv), SLURM_JOB_ID="4242", SLURM_SUBMIT_DIR=str(ROOT),
                     SLURM_GPUS_ON_NODE="8", SLURM_CPUS_ON_NODE="96", SLURM_JOB_NUM_NODES="4",
                     SLURM_RESTART_COUNT=str(restart_count), FAKE_RC=str(fake_rc), **extra_env)
    argv = ["bash", str(SBATCH), "configs/large.py", str(tmp_path / "run"),
            "--config.mesh.per_device_microbatch=32"]
    if not wait:
      return subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    return subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30)

  return tmp_path, submit


def test_sbatch_runs_training_with_all_gpus_per_process(fake_slurm):
  tmp, submit = fake_slurm
  proc = submit(0)
  assert proc.returncode == 0, proc.stderr
  record = (tmp / "python.txt").read_text()
  assert (f"args: -m deberta_jax.main --config=configs/large.py --workdir={tmp / 'run'} "
          "--config.mesh.per_device_microbatch=32") in record
  assert "devices=0,1,2,3,4,5,6,7" in record
  assert "--xla_gpu_enable_latency_hiding_scheduler=true" in record
  assert f"venv={tmp / 'venv'}" in record
  srun = (tmp / "srun.txt").read_text()
  assert "--cpus-per-task=96" in srun and f"--output={tmp / 'run' / 'logs'}/train.w%t.log" in srun
  assert not (tmp / "scontrol.txt").exists()


@pytest.mark.parametrize("fake_rc", [4, 143])
def test_sbatch_requeues_after_a_preemption_checkpoint(fake_slurm, fake_rc):
  tmp, submit = fake_slurm
  proc = submit(fake_rc)
  assert proc.returncode == 0, proc.stderr
  assert (tmp / "scontrol.txt").read_text() == "requeue 4242\n"


def test_sbatch_stops_requeueing_after_max_requeues(fake_slurm):
  tmp, submit = fake_slurm
  proc = submit(4, restart_count=20)
  assert proc.returncode == 4
  assert not (tmp / "scontrol.txt").exists()


def test_sbatch_does_not_requeue_when_the_job_itself_is_cancelled(fake_slurm):
  # scancel / scheduler preemption also signal the batch shell: then the job must not put itself
  # back in the queue (SLURM's own PreemptMode decides), though training still checkpoints.
  tmp, submit = fake_slurm
  proc = submit(4, wait=False, FAKE_HOLD="1")
  deadline = time.time() + 10
  while not (tmp / "python.txt").exists() and time.time() < deadline:
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)  # to the batch shell only
  time.sleep(0.2)
  (tmp / "release").touch()
  out, _ = proc.communicate(timeout=20)
  assert proc.returncode == 4, out
  assert not (tmp / "scontrol.txt").exists()


@pytest.mark.parametrize("fake_rc", [1, 2, 3])
def test_sbatch_does_not_requeue_failures(fake_slurm, fake_rc):
  tmp, submit = fake_slurm
  proc = submit(fake_rc)
  assert proc.returncode == fake_rc
  assert not (tmp / "scontrol.txt").exists()


# --- gpu_local.sh --------------------------------------------------------------------------------


def test_gpu_local_passes_sigterm_to_training_and_keeps_its_exit_code(tmp_path):
  venv = tmp_path / "venv"
  _write_exe(venv / "bin" / "python", textwrap.dedent("""\
      #!/usr/bin/env bash
      echo "args: $* xla=$XLA_FLAGS"
      trap 'echo "checkpointed"; exit 4' TERM
      echo ready
      while :; do sleep 0.1; done
      """))
  workdir = tmp_path / "run"
  proc = subprocess.Popen(["bash", str(GPU_LOCAL), "configs/tiny.py", str(workdir),
                           "--config.seed=1"],
                          env=_clean_env(VENV=str(venv)), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  log = workdir / "logs" / "train.w0.log"
  deadline = time.time() + 10
  while not (log.exists() and "ready" in log.read_text()) and time.time() < deadline:
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=10)
  assert proc.returncode == 4, out
  text = log.read_text()
  assert (f"args: -m deberta_jax.main --config=configs/tiny.py --workdir={workdir} "
          "--config.seed=1 xla=--xla_gpu_enable_latency_hiding_scheduler=true") in text
  assert "checkpointed" in text
  assert "rerun the same command" in out


def test_gpu_local_usage():
  proc = subprocess.run(["bash", str(GPU_LOCAL)], capture_output=True, text=True)
  assert proc.returncode == 2 and "usage:" in proc.stderr
