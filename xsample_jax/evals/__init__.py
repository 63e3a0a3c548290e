"""Evaluators of frozen representations, chosen by name in `config.evals.NAME = {...}` (big_vision's style).

Each evaluator is a module in REGISTRY with one entry, `evaluator(data: Features, settings) -> dict[str, float]`,
and a `SETTINGS` dict of its own settings with their defaults (beyond the COMMON ones below); `settings_for` merges
them with what a config gives, so every documented setting can be overridden from the command line.
that asks `data` for the frozen features it needs and computes its metrics with the array-level functions of its
module (`linear_probe.run`, `knn.run`, ...), which know nothing of models or data pipelines. The trainer runs every
configured evaluator every `eval_every_steps` and at the end; `python -m xsample_jax.evaluate` runs them on any
saved checkpoint. Metrics are logged as `eval/NAME/METRIC`.

An evaluator's data default to the run's: `data.train` (un-augmented: resize + centre crop) to fit, `data.eval` to
test; `settings.train_data` / `settings.eval_data` (and `_split`) point it elsewhere.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Callable

import ml_collections
import numpy as np

from xsample_jax.evals import attributes, background, fewshot, graph_alignment, knn, linear_probe, objectnet

REGISTRY = {"linear_probe": linear_probe, "fewshot": fewshot, "knn": knn, "background": background,
            "attributes": attributes, "graph_alignment": graph_alignment, "objectnet": objectnet}
# Settings every evaluator has: its data ("" = the run's data.train / data.eval and their splits), how many rows
# to fit on and to test on, and the int field to predict.
COMMON = dict(train_data="", train_split="", eval_data="", eval_split="", train_examples=10_000,
              eval_examples=10_000, label="label")


def settings_for(name: str, given=None) -> ml_collections.ConfigDict:
  """COMMON, then the evaluator's SETTINGS, then what the config gives; unknown keys are refused by name."""
  if name not in REGISTRY:
    raise ValueError(f"evals.{name}: unknown evaluator; valid: {', '.join(sorted(REGISTRY))}")
  out = ml_collections.ConfigDict({**COMMON, **REGISTRY[name].SETTINGS})
  for key, value in (given or {}).items():
    if key not in out:
      raise ValueError(f"evals.{name}.{key}: no such setting; valid: {', '.join(sorted(out))}")
    out[key] = value
  return out

# (spec, split, max_examples) -> {"features": [n, D], "projections": [n, P], "caption_emb": [n, E], int fields}
ExtractFn = Callable[[str, str, int], dict]


@dataclasses.dataclass
class Features:
  """Frozen features of one model state, extracted on request and cached for the evaluators of one round."""
  extract: ExtractFn
  config: object  # the run's ConfigDict
  mesh: object = None
  _cache: dict = dataclasses.field(default_factory=dict)

  def get(self, spec: str, split: str, max_examples: int) -> dict:
    key = (spec, split, int(max_examples))
    if key not in self._cache:
      self._cache[key] = self.extract(spec, split, int(max_examples))
    return self._cache[key]

  def train(self, settings) -> dict:
    """The fitting rows: settings.train_data or the run's data.train, its first settings.train_examples."""
    return self.get(settings.train_data or self.config.data.train,
                    settings.train_split or self.config.data.train_split, settings.train_examples)

  def classification(self, settings) -> tuple[dict, dict, str, int]:
    """(fitting rows, testing rows, the label field settings.label (default "label"), number of classes)."""
    train, test = self.train(settings), self.test(settings)
    return train, test, settings.label, num_classes(train[settings.label], test[settings.label])

  def test(self, settings) -> dict:
    """The testing rows: settings.eval_data or the run's data.eval, its first settings.eval_examples."""
    return self.get(settings.eval_data or self.config.data.eval,
                    settings.eval_split or self.config.data.eval_split, settings.eval_examples)


def num_classes(*labels: np.ndarray) -> int:
  return int(max(np.max(y) for y in labels if len(y))) + 1


def run_all(data: Features, evals, names=None) -> dict[str, float]:
  """Every evaluator in `evals` (a name -> settings mapping), or those in `names`, as eval/NAME/METRIC."""
  out = {}
  for name in names or list(evals):
    settings = settings_for(name, evals.get(name))
    t0 = time.perf_counter()
    metrics = REGISTRY[name].evaluator(data, settings)
    logging.info("eval/%s in %.1f s: %s", name, time.perf_counter() - t0, metrics)
    out.update({f"eval/{name}/{k}": float(v) for k, v in metrics.items()})
  return out
