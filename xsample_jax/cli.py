"""What the two entry points (`main.py`, `evaluate.py`) share: huge pages for the host's malloc, flag parsing with
readable errors, joining the processes of a multi-process run, quiet logs."""
from __future__ import annotations

import logging
import os
import sys
import threading
import traceback

from absl import flags
from absl import logging as absl_logging

# glibc's malloc asks the kernel for transparent huge pages (2 MB) on what it maps (glibc >= 2.35; older ignore it).
HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"
_THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"


def huge_pages_environ(environ, thp_mode: str | None, platform: str = sys.platform) -> dict | None:
  """The environment to restart with so glibc's malloc uses transparent huge pages, or None where there is nothing
  to change: not Linux, the kernel's THP mode (`thp_mode`, the text of /sys/kernel/mm/transparent_hugepage/enabled)
  is [never] or unknown, GLIBC_TUNABLES already sets glibc.malloc.hugetlb, or XSAMPLE_HUGE_PAGES=0 opts out."""
  if not platform.startswith("linux") or environ.get("XSAMPLE_HUGE_PAGES") == "0":
    return None
  if thp_mode is None or not ("[always]" in thp_mode or "[madvise]" in thp_mode):
    return None
  tunables = environ.get("GLIBC_TUNABLES", "")
  if "glibc.malloc.hugetlb" in tunables:
    return None
  return dict(environ, GLIBC_TUNABLES=f"{tunables}:{HUGE_PAGES_TUNABLE}" if tunables else HUGE_PAGES_TUNABLE)


def use_huge_pages() -> None:
  """Restart this process (same command line, same pid) with `huge_pages_environ`, once; call it first thing.

  XLA:CPU allocates a step's temporaries afresh every step, and glibc maps large blocks from the kernel and hands
  them back when freed, so every 4 KB page of them faulted on first touch again each step (0.07 of the smoke
  step's 0.34 CPU-s went to the kernel). With 2 MB pages, on 2 cores: the smoke step 0.189 -> 0.158 s; ResNet-18
  at 64 px 1.94 -> 1.71 s and ViT-S/16 3.45 -> 3.14 s (benchmarks/train_bench.py; PyTorch, whose allocator keeps
  its memory, 1.42 -> 1.42 and 2.48 -> 2.34 s in the same runs). glibc reads GLIBC_TUNABLES only at start, hence
  the restart; child processes (grain workers) inherit it.
  """
  try:
    with open(_THP_MODE) as f:
      thp_mode = f.read()
  except OSError:
    thp_mode = None
  env = huge_pages_environ(os.environ, thp_mode)
  if env is not None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)


def parse_flags(argv):
  """absl's parser, with config_flags' own errors (a misspelt or ill-typed key) as one line instead of a trace."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    sys.exit(f"error: {e}\nPass --helpfull to see the flags.")
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    sys.exit(f"error: bad --config override: {str(e).strip(chr(39))}")


def run_checked(fn, *args):
  """fn(*args) with quiet logs; a ConfigError (raised before anything is compiled or written) ends the program
  with its message instead of a trace."""
  from xsample_jax import train  # after flag parsing: a --help never pays for importing jax
  import jax
  quiet_logs()
  try:
    return fn(*args)
  except (train.ConfigError, train.NonFiniteError, train.CheckpointError) as e:
    sys.exit(f"error: {e}")
  except jax.errors.JaxRuntimeError as e:
    if jax.process_count() == 1:
      raise
    # Usually a collective whose peer died. Exit now: a normal exit would wait in jax's shutdown barrier for the
    # dead process until the heartbeat timeout, and nothing of this run is left to save.
    traceback.print_exc()
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    sys.stderr.write(f"error: process {jax.process_index()} of {jax.process_count()} stops: {first}\n"
                     "With several processes this usually means another one failed or was killed: see its log. "
                     "Rerun the same command on every host to resume from the latest checkpoint.\n")
    sys.stderr.flush()
    os._exit(1)


def _several_processes() -> bool:
  return bool(os.environ.get("JAX_COORDINATOR_ADDRESS")) or int(os.environ.get("SLURM_NTASKS", "1")) > 1


def init_distributed(mode: str, coordinator_timeout_s: int, heartbeat_timeout_s: int) -> None:
  """jax.distributed.initialize() per `mode` (main.py's --distributed), before anything touches a jax backend.

  With JAX_COORDINATOR_ADDRESS set (launch/local.sh, or any launcher), JAX_NUM_PROCESSES and JAX_PROCESS_ID give
  the group; otherwise jax detects the cluster (Cloud TPU, SLURM). A group that does not form within
  --coordinator_timeout_s ends every process with a message saying so, rather than jax's abort deep in C++.
  """
  if mode == "off" or (mode == "auto" and not _several_processes()):
    return
  import jax
  kw, env = {}, os.environ
  if env.get("JAX_COORDINATOR_ADDRESS"):
    try:
      kw = dict(num_processes=int(env["JAX_NUM_PROCESSES"]), process_id=int(env["JAX_PROCESS_ID"]))
    except (KeyError, ValueError):
      sys.exit("error: JAX_COORDINATOR_ADDRESS is set, so JAX_NUM_PROCESSES and JAX_PROCESS_ID must be integers "
               f"(got {env.get('JAX_NUM_PROCESSES')!r} and {env.get('JAX_PROCESS_ID')!r})")
  where = env.get("JAX_COORDINATOR_ADDRESS") or "the detected coordinator"
  who = f"process {kw['process_id']} of {kw['num_processes']}" if kw else "this process"

  def give_up():
    sys.stderr.write(f"error: {who} could not join the run's processes at {where} within "
                     f"{coordinator_timeout_s} s: a process did not start or failed, or the coordinator address "
                     "cannot be reached (check the address, port and firewall; --coordinator_timeout_s waits "
                     "longer)\n")
    sys.stderr.flush()
    os._exit(1)

  watchdog = threading.Timer(coordinator_timeout_s, give_up)
  watchdog.daemon = True
  watchdog.start()
  try:  # jax's own deadline comes later, so the watchdog's message is the one the user sees
    jax.distributed.initialize(initialization_timeout=coordinator_timeout_s + 60,
                               heartbeat_timeout_seconds=heartbeat_timeout_s, **kw)
  except (RuntimeError, ValueError) as e:
    sys.exit(f"error: jax.distributed.initialize() failed for {who}: {e}")
  finally:
    watchdog.cancel()


def quiet_logs():
  """INFO logs on process 0 (warnings only on the others), without orbax's narration of every save and restore."""
  import jax
  absl_logging.set_verbosity(absl_logging.INFO if jax.process_index() == 0 else absl_logging.WARNING)
  absl_logging.get_absl_handler().addFilter(lambda r: r.levelno >= logging.WARNING or "/orbax/" not in r.pathname)
