"""The entry point, the same on a laptop, a CPU box and every TPU worker.

  python -m xsample_jax.main --config configs/smoke.py --workdir runs/smoke [--config.KEY=VALUE ...]

Rerunning the same command resumes from the latest checkpoint in the workdir. A config arg follows the file after a
colon (`configs/imagenet.py:loss=simclr,runlocal`). Exit status 0 also after a SIGTERM (the run saved and can resume).
"""
from __future__ import annotations

import logging
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "config file, optionally with ':arg'", lock_config=True)
flags.DEFINE_string("workdir", None, "checkpoints, metrics.jsonl and TensorBoard events go here (local or gs://)")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from xsample_jax import train  # after flag parsing: a --help never pays for importing jax
  absl_logging.set_verbosity(absl_logging.INFO)
  # orbax narrates every save at INFO; keep its warnings, drop the narration.
  absl_logging.get_absl_handler().addFilter(lambda r: r.levelno >= logging.WARNING or "/orbax/" not in r.pathname)
  config = flags.FLAGS.config
  try:
    train.check_config(config)
  except train.ConfigError as e:
    sys.exit(f"error: {e}")
  out = train.train_and_evaluate(config, flags.FLAGS.workdir)
  if out.get("preempted"):
    print(f"preempted at step {out['step']}: checkpoint saved in {flags.FLAGS.workdir}; rerun to resume")
    return
  probe = {k.split("/")[-1]: v for k, v in out.items() if k.startswith("eval/linear_probe/")}
  summary = f"done: {out['step']} steps" + (f", final loss {out['loss']:.4f}" if "loss" in out else "")
  if "top1" in probe:
    summary += f", linear probe top-1 {100 * probe['top1']:.1f}%"
  print(summary + f" (workdir {flags.FLAGS.workdir})")


def parse_flags(argv):
  """absl's parser, with config_flags' own errors (a misspelt or ill-typed key) as one line instead of a trace."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    sys.exit(f"error: {e}\nPass --helpfull to see the flags.")
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    sys.exit(f"error: bad --config override: {str(e).strip(chr(39))}")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
