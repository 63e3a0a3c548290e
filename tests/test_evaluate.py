"""Evaluators by name on a trained state, and the evaluate CLI on a saved checkpoint (--step, --eval, overrides)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import ml_collections
import pytest

from tests.helpers import objectnet_folder, tiny_config
from xsample_jax import evals, train
from xsample_jax.data import procedural

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(train_examples=128, eval_examples=64)


def tiny_objectnet(root) -> dict:
  """objectnet settings for an ObjectNet-like release whose "ImageNet" is the procedural shapes (the run's training
  labels); the run embeds its folders' three class captions with the sentence encoder."""
  objectnet_folder(root, {"box": 2, "other": 1, "round_thing": 3},
                   {"box": "Box", "other": "Other", "round_thing": "Round thing"},
                   {"Box": "square", "Round thing": "circle; ring"})
  (root / "shapes.txt").write_text("\n".join(procedural.SHAPES))
  return {"folder": str(root), "imagenet_class_index": str(root / "shapes.txt")}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  """A 4-step run with a checkpoint at steps 2 and 4, evaluated by every evaluator at the end."""
  workdir = tmp_path_factory.mktemp("run")
  config = tiny_config(total_steps=4, checkpoint_every_steps=2)
  for name in evals.REGISTRY:
    config.evals[name] = ml_collections.ConfigDict(SMALL)
  config.evals.fewshot.shots = (1, 5)
  config.evals.objectnet.update(tiny_objectnet(tmp_path_factory.mktemp("objectnet")))
  return workdir, train.train_and_evaluate(config, str(workdir))


def test_every_evaluator_reports_at_the_end_of_training(tiny_run):
  workdir, out = tiny_run
  names = {k.split("/")[1] for k in out if k.startswith("eval/")}
  assert names == set(evals.REGISTRY)
  for key in ("eval/linear_probe/top1", "eval/fewshot/5shot", "eval/knn/top1", "eval/background/bg_gap", "eval/background/mixed_rand/top1",
              "eval/attributes/attribute_top1", "eval/graph_alignment/spearman", "eval/graph_alignment/kl",
              "eval/objectnet/top1", "eval/objectnet/top1_subset"):
    assert key in out, sorted(out)
  assert out["eval/objectnet/images"] == 5  # box and round_thing; "other" is outside the mapping
  last = json.loads((workdir / "metrics.jsonl").read_text().splitlines()[-1])
  assert last["step"] == 4 and last["eval/linear_probe/top1"] == out["eval/linear_probe/top1"]


def test_unknown_evaluator_is_a_config_error():
  config = tiny_config()
  config.evals.nearest = ml_collections.ConfigDict()
  with pytest.raises(train.ConfigError, match="config.evals.nearest: unknown evaluator"):
    train.check_config(config)
  config = tiny_config()
  config.evals.knn = ml_collections.ConfigDict(dict(kk=3))
  with pytest.raises(train.ConfigError, match="config.evals.knn.kk: no such setting; valid: .*k, label"):
    train.check_config(config)


@pytest.mark.slow
def test_evaluate_cli_on_an_earlier_checkpoint(tiny_run):
  workdir, _ = tiny_run
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "-m", "xsample_jax.evaluate", f"--workdir={workdir}", "--step=2", "--eval=linear_probe",
         "--eval=graph_alignment", "--eval", "knn", "--config.evals.linear_probe.train_examples=96",
         "--config.evals.knn.temperature=0.1"]  # a setting the run's config never wrote down
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "step 2" in proc.stdout and "linear_probe top1" in proc.stdout
  printed = json.loads(proc.stdout.strip().splitlines()[-1])
  assert printed["step"] == 2
  assert {k.split("/")[1] for k in printed if "/" in k} == {"linear_probe", "graph_alignment", "knn"}
  logged = json.loads((workdir / "metrics.jsonl").read_text().splitlines()[-1])
  assert logged == printed  # appended to the run's metrics at the checkpoint's step

  bad = subprocess.run([sys.executable, "-m", "xsample_jax.evaluate", f"--workdir={workdir}", "--step=3"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert bad.returncode != 0 and "no checkpoint at step 3" in bad.stderr + bad.stdout


def test_a_saved_config_without_a_newer_key_takes_its_default(tmp_path):
  """A run saved before a config key existed still evaluates: the key comes from today's defaults, everything the
  run saved (and keys only it has, such as a retired one) stays as saved."""
  import orbax.checkpoint as ocp

  from xsample_jax import evaluate
  saved = tiny_config(batch_size=24).to_dict()
  del saved["data"]["prefetch_priority"], saved["data"]["data_dir"], saved["cpu_matmuls"]
  saved["data"]["prefetch_nice"] = 19  # retired since
  with ocp.CheckpointManager(tmp_path / "checkpoints", item_names=("config",)) as mngr:
    mngr.save(3, args=ocp.args.Composite(config=ocp.args.JsonSave(saved)))
  config, step = evaluate.saved_config(str(tmp_path))
  assert step == 3
  assert config.data.prefetch_priority == "idle" and config.cpu_matmuls == "auto"
  assert config.batch_size == 24 and config.data.prefetch_nice == 19 and config.model.variant == "resnet_tiny"
  assert config.augment.crop_scale == (0.5, 1.0)  # tuples stay tuples
  assert config.data.data_dir is None
  train.check_config(config)
  config.data.data_dir = "/elsewhere"  # an optional (None) key taken from the defaults can still be set
  with pytest.raises(TypeError):
    config.data.data_dir = 3  # and keeps its type
