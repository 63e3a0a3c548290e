"""The pieces fit: procedural data -> global batch -> sharded model forward -> X-Sample loss in shard_map -> optax.

Not the trainer (that has its own issue): the smallest honest version of its step, to show that the data layout,
the models' global BatchNorm and the losses' axis semantics agree.
"""
import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import PartitionSpec as P

from xsample_jax import losses, models
from xsample_jax.data import augment, pipeline, sources
from xsample_jax.sharding import DATA


def test_sharded_xsample_step_on_the_procedural_default(mesh):
  src = sources.procedural_source("train", 64, image_size=32)
  ds = pipeline.train_dataset(src, global_batch_size=16, augment=augment.SimCLRAugment(size=16), seed=0, mesh=mesh)
  batch = next(iter(ds))
  assert batch["image"].shape == (32, 16, 16, 3) and batch["image"].sharding.spec == P(DATA)

  model = models.make_image_encoder("resnet_tiny", (64, 32), rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.sgd(0.05), wrt=nnx.Param)
  loss_fn = jax.shard_map(lambda z, c: losses.xsample_loss(z, c, axis_name=DATA, impl="blockwise"),
                          mesh=mesh, in_specs=(P(DATA), P(DATA)), out_specs=P())

  @nnx.jit
  def step(model, optimizer, images, caption_emb):
    def loss_of(model):
      _, z = model(augment.normalize(images))
      return loss_fn(z, caption_emb)
    loss, grads = nnx.value_and_grad(loss_of)(model)
    optimizer.update(model, grads)
    return loss

  # The same loss on one device, whole batch, for the starting parameters.
  _, z0 = nnx.clone(model)(augment.normalize(np.asarray(batch["image"])))
  expected = losses.xsample_loss(z0, np.asarray(batch["caption_emb"]))
  history = [float(step(model, optimizer, batch["image"], batch["caption_emb"])) for _ in range(8)]
  np.testing.assert_allclose(history[0], expected, rtol=1e-4)
  assert all(np.isfinite(history)) and history[-1] < 0.75 * history[0], history
