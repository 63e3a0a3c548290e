"""What the two entry points (`main.py`, `evaluate.py`) share: flag parsing with readable errors, quiet logs."""
from __future__ import annotations

import logging
import sys

from absl import flags
from absl import logging as absl_logging


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
  quiet_logs()
  try:
    return fn(*args)
  except train.ConfigError as e:
    sys.exit(f"error: {e}")


def quiet_logs():
  """INFO logs, without orbax's narration of every save and restore (its warnings stay)."""
  absl_logging.set_verbosity(absl_logging.INFO)
  absl_logging.get_absl_handler().addFilter(lambda r: r.levelno >= logging.WARNING or "/orbax/" not in r.pathname)
