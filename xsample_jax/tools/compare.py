"""Trains every method with one budget at several data fractions and seeds, evaluates each with the same
evaluators, and writes a table shaped like the paper's (mean ± std over seeds).

  python -m xsample_jax.tools.compare --config configs/compare.py --workdir runs/compare

Each run lives in WORKDIR/METHOD-fFRACTION-sSEED (its checkpoints and metrics.jsonl) and leaves result.json there;
a rerun skips finished runs, so an interrupted comparison continues. The untrained network's features are a row of
their own ("random init"): on simple images they are a strong baseline that every method has to beat.
"""
from __future__ import annotations

import json
import math
import sys
import time

import ml_collections
import numpy as np
from absl import app, flags
from etils import epath
from ml_collections import config_flags

from xsample_jax import cli

config_flags.DEFINE_config_file("config", None, "the comparison's config (configs/compare.py)", lock_config=True)
flags.DEFINE_string("workdir", None, "every run, results.json and table.md go here")
flags.mark_flags_as_required(["config", "workdir"])

# (column, metric): the paper's axes (object and attribute probes, background shifts), then k-NN, few-shot and
# how well the learned similarities match the caption graph.
COLUMNS = (("object probe", "eval/linear_probe/top1"), ("attribute probe", "eval/attributes/attribute_top1"),
           ("mixed_same", "eval/background/mixed_same/top1"), ("mixed_rand", "eval/background/mixed_rand/top1"),
           ("BG-gap", "eval/background/bg_gap"), ("k-NN", "eval/knn/top1"), ("10-shot", "eval/fewshot/10shot"),
           ("graph ρ", "eval/graph_alignment/spearman"))
RANDOM_INIT = "random init"


def run_config(cmp, method: str, fraction: float, seed: int) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict(cmp.train.to_dict())
  c.loss.name, c.seed, c.data.train_fraction = method, seed, fraction
  if method in ("clip", "siglip"):  # their learnable logit scale starts where CLIP / SigLIP start it
    c.loss.temperature = 0.07 if method == "clip" else 0.1
  return c


def train_one(config, workdir: epath.Path) -> dict[str, float]:
  from xsample_jax import train
  out = train.train_and_evaluate(config, str(workdir))
  return {k: float(v) for k, v in out.items() if isinstance(v, (int, float))}


def evaluate_init(config, workdir: epath.Path) -> dict[str, float]:
  """The evaluators on the freshly initialised network (no step taken)."""
  from xsample_jax import train
  mesh = train.make_mesh(config)
  graphdef, _, shardings = train.abstract_state(config, mesh)
  state = train.init_state(config, shardings)
  return train.run_evals(config, graphdef, state, mesh, workdir)


def compare(cmp, workdir: epath.Path) -> dict[str, dict]:
  """{run name: {"method", "fraction", "seed", metrics...}} for every run, trained or read back."""
  jobs = [(RANDOM_INIT, None, s) for s in cmp.seeds if cmp.random_init]
  jobs += [(m, f, s) for f in cmp.fractions for m in cmp.methods for s in cmp.seeds]
  results = {}
  for i, (method, fraction, seed) in enumerate(jobs):
    name = f"random_init-s{seed}" if fraction is None else f"{method}-f{fraction:g}-s{seed}"
    done = workdir / name / "result.json"
    if done.exists():
      results[name] = json.loads(done.read_text())
      continue
    t0 = time.perf_counter()
    config = run_config(cmp, "xclr" if fraction is None else method, fraction or 1.0, seed)
    metrics = (evaluate_init(config, workdir / name) if fraction is None else train_one(config, workdir / name))
    results[name] = {"method": method, "fraction": fraction, "seed": seed, **metrics,
                     "seconds": time.perf_counter() - t0}
    (workdir / name).mkdir(parents=True, exist_ok=True)
    done.write_text(json.dumps(results[name], indent=1))
    print(f"[{i + 1}/{len(jobs)}] {name}: {time.perf_counter() - t0:.0f} s", flush=True)
  return results


def table(results: dict[str, dict], command: str) -> str:
  """Markdown: one row per (method, fraction), mean ± std (over seeds, ddof 1) of each column, in percent."""
  groups: dict[tuple, list[dict]] = {}
  for r in results.values():
    groups.setdefault((r["method"], r["fraction"]), []).append(r)
  order = sorted(groups, key=lambda g: (g[1] is not None, g[1] or 0, g[0] != RANDOM_INIT, g[0]))
  head = "| method | data | " + " | ".join(c for c, _ in COLUMNS) + " |"
  lines = [head, "|" + "---|" * (len(COLUMNS) + 2)]
  for method, fraction in order:
    rows = groups[(method, fraction)]
    cells = []
    for _, key in COLUMNS:
      vals = np.array([r[key] for r in rows if key in r and math.isfinite(r[key])], np.float64)
      if not len(vals):
        cells.append("—")
        continue
      scale, digits = (1.0, 2) if key.endswith("spearman") else (100.0, 1)  # a correlation, else a percentage
      spread = f" ± {scale * vals.std(ddof=1):.{digits}f}" if len(vals) > 1 else ""
      cells.append(f"{scale * vals.mean():.{digits}f}{spread}")
    data = "—" if fraction is None else f"{fraction:.0%}"
    lines.append(f"| {method} | {data} | " + " | ".join(cells) + " |")
  seeds = max(len(v) for v in groups.values())
  lines += ["", f"Accuracies in %, mean ± std over {seeds} seeds; graph ρ: Spearman correlation of the learned "
            "cosine similarities with the caption graph. Made by:", "", f"    {command}"]
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cli.quiet_logs()
  from xsample_jax import train
  cmp = flags.FLAGS.config
  workdir = epath.Path(flags.FLAGS.workdir).resolve()
  for method in cmp.methods:  # every run's config is checked before the first one trains
    for fraction in cmp.fractions:
      try:
        train.check_config(run_config(cmp, method, fraction, 0))
      except train.ConfigError as e:
        sys.exit(f"error: {method} at {fraction:g}: {e}")
  workdir.mkdir(parents=True, exist_ok=True)
  # Identical programs across seeds compile once: XLA's persistent cache lives beside the runs.
  train.use_xla_cache(str(workdir / "xla_cache"))
  results = compare(cmp, workdir)
  args, skip = [], False
  for a in sys.argv[1:]:  # the command that made the table, less where it was written
    if skip or a.startswith("--workdir"):
      skip = a == "--workdir"
      continue
    args.append(a)
  command = "python -m xsample_jax.tools.compare " + " ".join(args)
  text = table(results, command)
  (workdir / "results.json").write_text(json.dumps(results, indent=1))
  (workdir / "table.md").write_text(text + "\n")
  print(text)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
