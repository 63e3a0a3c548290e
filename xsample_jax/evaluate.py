"""Evaluates a saved checkpoint with the evaluators of its run's config (or others), and prints a table.

  python -m xsample_jax.evaluate --workdir DIR [--step N] [--eval NAME ...] [--config.KEY=VALUE ...]

The config is the one saved with the checkpoint; `--config.*` overrides apply to it (e.g. `--config.data.eval=
folder:/data/imagenet9/mixed_rand` to evaluate on any labelled folder, or `--config.evals.knn.k=50`). `--eval`
chooses evaluators from it (default: all of config.evals). Results are appended to DIR/metrics.jsonl and TensorBoard
as eval/NAME/METRIC at the checkpoint's step.
"""
from __future__ import annotations

import json
import logging
import sys

import ml_collections


def _as_tuples(d):
  """JSON turned the config's tuples into lists; a ConfigDict field keeps the type it is built with."""
  if isinstance(d, dict):
    return {k: _as_tuples(v) for k, v in d.items()}
  return tuple(_as_tuples(v) for v in d) if isinstance(d, list) else d


def saved_config(workdir: str, step: int | None = None) -> tuple[ml_collections.ConfigDict, int]:
  """(config, step) of the checkpoint at `step` (default: the latest) in workdir/checkpoints; keys added to the
  project's configs since the run was saved take their defaults."""
  import orbax.checkpoint as ocp
  from etils import epath
  mngr = ocp.CheckpointManager(epath.Path(workdir).resolve() / "checkpoints", item_names=("config",))
  steps = mngr.all_steps()
  if not steps:
    raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints")
  step = max(steps) if step is None else step
  if step not in steps:
    raise ValueError(f"no checkpoint at step {step} in {workdir}/checkpoints; saved steps: {sorted(steps)}")
  saved = mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
  config = ml_collections.ConfigDict(_as_tuples(saved))
  from configs import common  # every key a config may have, at its default
  filled = _fill_missing(config, common.base())
  if filled:  # a run saved before these keys existed
    logging.info("keys the saved config lacks, taken at today's defaults: %s", ", ".join(filled))
  return config, step


def _fill_missing(config, defaults, prefix="") -> list[str]:
  """Adds to `config` every key of `defaults` it lacks (a run saved before the key existed), in place; returns
  their dotted names. Keys the saved config has, and keys only it has, stay as saved."""
  filled = []
  for key in defaults:
    default = defaults[key]
    if key not in config:
      # A reference keeps the field's type: an unset optional string stays a string field.
      config[key] = default if isinstance(default, ml_collections.ConfigDict) else defaults.get_ref(key)
      filled.append(prefix + key)
    elif isinstance(default, ml_collections.ConfigDict) and isinstance(config[key], ml_collections.ConfigDict):
      filled += _fill_missing(config[key], default, f"{prefix}{key}.")
  return filled


def restore(config, workdir: str, step: int):
  """(graphdef, state, mesh): the checkpoint's train state on the mesh of `config`."""
  import orbax.checkpoint as ocp
  from etils import epath

  from xsample_jax import train
  mesh = train.make_mesh(config)
  graphdef, target, _ = train.abstract_state(config, mesh)
  mngr = train.checkpoint_manager(epath.Path(workdir).resolve(), config)
  state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
  return graphdef, state, mesh


def evaluate(config, workdir: str, step: int, names=None) -> dict[str, float]:
  """Runs the evaluators on the checkpoint at `step` and logs them there; returns eval/NAME/METRIC."""
  from etils import epath

  from xsample_jax import train
  train.check_config(config)
  workdir = epath.Path(workdir).resolve()
  graphdef, state, mesh = restore(config, workdir, step)
  results = train.run_evals(config, graphdef, state, mesh, workdir, names)
  writer = train.MetricWriter(workdir, None)
  writer.write(step, results)
  writer.close()
  return results


def table(results: dict[str, float], step: int) -> str:
  rows = [(k.split("/")[1], k.split("/", 2)[2], v) for k, v in sorted(results.items())]
  width = max([len(f"{e} {m}") for e, m, _ in rows] + [10])
  lines = [f"{'step ' + str(step):<{width}}  value", "-" * (width + 9)]
  lines += [f"{e + ' ' + m:<{width}}  {v:.4f}" for e, m, v in rows]
  return "\n".join(lines)


def _flag_values(argv, name) -> list[str]:
  """Every value of --name=V and --name V in argv (read before absl parses, to load the saved config)."""
  out = [a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}=")]
  return out + [v for a, v in zip(argv, argv[1:]) if a == f"--{name}"]


def main():
  from absl import app, flags
  from ml_collections import config_flags

  from xsample_jax import cli

  workdir, step = (next(iter(_flag_values(sys.argv, f)), None) for f in ("workdir", "step"))
  if not workdir:
    sys.exit("error: --workdir DIR is required (a training run's directory)")
  try:
    config, step = saved_config(workdir, int(step) if step else None)
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f"error: {e}")
  # Every evaluator to run gets its full settings before the flags are parsed, so any of them can be overridden
  # (`--config.evals.knn.k=50`, also for an evaluator the run never configured).
  from xsample_jax import evals
  try:
    for name in dict.fromkeys([*config.evals, *_flag_values(sys.argv, "eval")]):
      config.evals[name] = evals.settings_for(name, config.evals.get(name))
  except ValueError as e:
    sys.exit(f"error: {e}")
  flags.DEFINE_string("workdir", None, "the run's directory (holds checkpoints/)")
  flags.DEFINE_integer("step", None, "the checkpoint to evaluate (default: the latest)")
  flags.DEFINE_multi_string("eval", None, "evaluators to run (default: every one in config.evals)")
  config_flags.DEFINE_config_dict("config", config, "the run's saved config; --config.KEY=VALUE overrides")

  def run(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    results = cli.run_checked(evaluate, flags.FLAGS.config, workdir, step, flags.FLAGS.eval)
    print(table(results, step))
    print(json.dumps({"step": step, **results}))

  app.run(run, flags_parser=cli.parse_flags)


if __name__ == "__main__":
  from xsample_jax import cli
  cli.use_huge_pages()
  main()
