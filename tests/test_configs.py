"""Every shipped config passes the trainer's checks; the paper's configs run end to end at runlocal size; warm
starts from another run's checkpoint or a backbone file load exactly those parameters."""
import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from flax import nnx

from configs import cc, common, finetune, imagenet, smoke
from tests.helpers import tiny_config
from xsample_jax import train

ARGS = [
    (smoke, [None] + [f"loss={loss}" for loss in train.LOSSES]),
    (imagenet, ["loss=xclr", "loss=simclr", "loss=supcon", "loss=xclr,variant=vit_b16", "loss=xclr,runlocal"]),
    (cc, ["data=cc3m,loss=xclr", "data=cc3m,loss=clip", "data=cc12m,loss=simclr", "data=cc12m,loss=xclr",
          "data=cc3m,loss=xclr,variant=vit_b16", "data=cc3m,loss=siglip,runlocal"]),
    (finetune, ["init=/runs/a", "backbone=/x/resnet50.npz", "init=/runs/a,runlocal"]),
]


@pytest.mark.parametrize("module,arg", [(m, a) for m, args in ARGS for a in args])
def test_shipped_configs_pass_the_checks(module, arg):
  c = module.get_config(arg)
  train.check_config(c, device_count=8)
  assert module.__doc__ and "python -m xsample_jax.main --config configs/" in module.__doc__  # a ready command
  c.lock()  # what config_flags does: the keys are the public surface
  assert set(c.keys()) == set(common.base().keys())


def test_paper_settings():
  c = imagenet.get_config("loss=xclr")
  assert (c.model.variant, tuple(c.model.head), c.loss.graph) == ("resnet50", (2048, 2048, 128), "class")
  assert train.learning_rate(c)(c.optimizer.warmup_steps) == pytest.approx(0.3 * 1024 / 256)  # SimCLR's rule
  assert c.total_steps == 100 * 1_281_167 // 1024
  assert cc.get_config("data=cc3m,loss=clip").optimizer.name == "adamw"
  with pytest.raises(ValueError, match="exactly one of"):
    finetune.get_config("init=/a,backbone=/b.npz")


@pytest.mark.slow
def test_imagenet_runlocal_trains_with_the_class_table_on_tfds_mock_data(tmp_path):
  c = imagenet.get_config("loss=xclr,runlocal")
  c.model.variant, c.model.head, c.image_size = "resnet_tiny", (64, 32), 32  # seconds on CPU, the same code path
  c.data.cache_dir = str(tmp_path / "cache")
  with tfds.testing.mock_data(num_examples=64, policy=tfds.testing.MockPolicy.USE_CODE):
    out = train.train_and_evaluate(c, str(tmp_path / "run"))
  assert out["step"] == 4 and np.isfinite(out["loss"])
  assert 0.0 <= out["eval/linear_probe/top1"] <= 1.0
  assert len(list((tmp_path / "cache").iterdir())) == 1  # the 1000 class-name embeddings, computed once


def test_warm_start_from_a_checkpoint_or_a_backbone_file(tmp_path):
  source = train.train_and_evaluate(tiny_config("simclr", total_steps=3, checkpoint_every_steps=3),
                                    str(tmp_path / "source"))
  trained = nnx.merge(source["graphdef"], source["state"]).model
  train.save_backbone(str(tmp_path / "tower.npz"), trained)

  for key, value in [("init.checkpoint", str(tmp_path / "source")), ("init.backbone", str(tmp_path / "tower.npz"))]:
    config = tiny_config("xclr", **{key: value})
    mesh = train.make_mesh(config)
    graphdef, target, shardings = train.abstract_state(config, mesh)
    fresh = train.init_state(config, shardings)
    started = nnx.merge(graphdef, train.warm_start(config, graphdef, fresh, target, shardings)).model
    same = [started.image.tower] if key == "init.backbone" else [started.image.tower, started.image.head]
    want = [trained.image.tower] if key == "init.backbone" else [trained.image.tower, trained.image.head]
    for got, ref in zip(same, want):
      for a, b in zip(jax.tree.leaves(nnx.state(got)), jax.tree.leaves(nnx.state(ref))):
        np.testing.assert_array_equal(a, b)
    if key == "init.backbone":  # the head is not in a backbone file: it keeps its fresh initialisation
      fresh_head = nnx.merge(graphdef, fresh).model.image.head
      for a, b in zip(jax.tree.leaves(nnx.state(started.image.head)), jax.tree.leaves(nnx.state(fresh_head))):
        np.testing.assert_array_equal(a, b)


def test_a_backbone_file_of_another_tower_is_refused(tmp_path):
  other = train.Model(tiny_config("xclr", **{"model.variant": "resnet18"}), rngs=nnx.Rngs(0))
  train.save_backbone(str(tmp_path / "r18.npz"), other)
  config = tiny_config("xclr", **{"init.backbone": str(tmp_path / "r18.npz")})
  mesh = train.make_mesh(config)
  graphdef, target, shardings = train.abstract_state(config, mesh)
  with pytest.raises(ValueError, match="config.init.backbone"):
    train.warm_start(config, graphdef, train.init_state(config, shardings), target, shardings)
