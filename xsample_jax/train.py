"""The trainer: config -> mesh -> grain pipeline -> sharded state -> jitted step -> loop -> orbax checkpoints.

Read top to bottom, `train_and_evaluate` is the whole run:
  1. check the config (every error before anything is compiled or written), make the workdir;
  2. the ('data', 'model') mesh; one device order for everything;
  3. the data: a grain iterator yielding global batches sharded over 'data' (images stay uint8 until on device),
     assembled two batches ahead in a background thread;
  4. shapes first: the model and optimizer from `nnx.eval_shape`, shardings from the partitioning rules, then the
     parameters created by `jax.jit(init, out_shardings=...)`, so nothing full-size ever sits on one device;
  5. the step: forward under jit (BatchNorm statistics span the global batch), the loss inside `jax.shard_map` over
     'data' (the losses all-gather the rows' inputs and build the global graph), optax; state donated;
  6. restore the latest checkpoint (train state + the data iterator + config) or start fresh;
  7. the loop: the next batch is fetched while the device runs the current step; metrics stay on device until they
     are logged (with throughput, data-wait, each device's TFLOP/s and mfu); checkpoints every
     `checkpoint_every_steps`; SIGTERM saves at the next step boundary and returns; an optional profile window;
  8. the final checkpoint and evaluation, and one closing line.
"""
from __future__ import annotations

import errno
import functools
import json
import logging
import math
import queue
import signal
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx
from jax.sharding import PartitionSpec as P

from xsample_jax import losses, models, sharding, utilization
from xsample_jax.data import augment, pipeline, sources

LOSSES = ("xclr", "simclr", "supcon", "clip", "siglip", "xclr_cross_modal")
TEXT_LOSSES = ("clip", "siglip", "xclr_cross_modal")  # need a text tower fed with caption tokens
OPTIMIZERS = ("lars", "adamw", "sgd")
GRAPHS = ("auto", "caption", "class")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
CPU_MATMULS = ("auto", "eigen", "ynnpack")


class ConfigError(ValueError):
  """A config value that cannot work; the message names the key and the fix."""


class NonFiniteError(FloatingPointError):
  """A step's loss or gradient was NaN/Inf under config.nonfinite='stop' (the step was not applied)."""


# ----------------------------------------------------------------------------------------------------------
# 1. The config, checked before anything is compiled or written.


def check_config(config: ml_collections.ConfigDict, device_count: int | None = None) -> None:
  """Raises ConfigError naming the key and the fix for every value that cannot work."""
  def need(ok, key, msg):
    if not ok:
      raise ConfigError(f"config.{key}: {msg}")

  for key in ("total_steps", "batch_size", "image_size", "log_every_steps", "checkpoint_every_steps",
              "keep_checkpoints"):
    need(config[key] > 0, key, f"must be > 0, got {config[key]}")
  need(config.eval_every_steps >= 0, "eval_every_steps", "must be >= 0 (0: at the end only)")
  need(config.data.num_workers >= -1, "data.num_workers",
       f"must be >= 0 (worker processes; 0: threads in the training process) or -1 (by the host's cores), got "
       f"{config.data.num_workers}")
  need(config.data.read_threads >= -1, "data.read_threads",
       f"must be >= 0, or -1 (by the worker count and the host's cores), got {config.data.read_threads}")
  need(config.data.prefetch_priority in pipeline.PREFETCH_PRIORITIES, "data.prefetch_priority",
       f"must be one of {pipeline.PREFETCH_PRIORITIES}, got {config.data.prefetch_priority!r}")
  need(config.data.procedural_keep_mb >= 0, "data.procedural_keep_mb",
       f"must be >= 0 (MB; 0 keeps nothing), got {config.data.procedural_keep_mb}")
  need(0 < config.data.train_fraction <= 1, "data.train_fraction", f"must be in (0, 1], got {config.data.train_fraction}")
  need(config.model.variant in models.IMAGE_TOWERS, "model.variant",
       f"unknown image tower {config.model.variant!r}; valid: {', '.join(models.IMAGE_TOWERS)}")
  need(len(config.model.head) > 0 and min(config.model.head) > 0, "model.head",
       f"must be positive widths, got {config.model.head}")
  need(config.model.dtype in DTYPES, "model.dtype", f"must be one of {sorted(DTYPES)}")
  need(config.cpu_matmuls in CPU_MATMULS, "cpu_matmuls",
       f"unknown {config.cpu_matmuls!r}; valid: {', '.join(CPU_MATMULS)}")
  need(len(config.profile_steps) == 2 and min(config.profile_steps) >= 0
       and (config.profile_steps[0] > 0) == (config.profile_steps[1] > 0), "profile_steps",
       f"must be (first step, count), both >= 1, or (0, 0) for no profile; got {tuple(config.profile_steps)}")
  need(config.peak_tflops is None or config.peak_tflops > 0, "peak_tflops",
       f"must be > 0 (one device's peak TFLOP/s) or None (by the device kind), got {config.peak_tflops}")
  need(config.loss.name in LOSSES, "loss.name", f"unknown loss {config.loss.name!r}; valid: {', '.join(LOSSES)}")
  if config.loss.name in TEXT_LOSSES:
    need(config.model.text in models.TEXT_TOWERS, "model.text",
         f"unknown text tower {config.model.text!r}; valid: {', '.join(models.TEXT_TOWERS)}")
  need(config.loss.temperature > 0, "loss.temperature", f"must be > 0, got {config.loss.temperature}")
  need(config.loss.target_temperature > 0, "loss.target_temperature",
       f"must be > 0, got {config.loss.target_temperature}")
  need(config.loss.graph in GRAPHS, "loss.graph", f"must be one of {GRAPHS}")
  need(config.loss.impl in losses.IMPLS, "loss.impl", f"must be one of {losses.IMPLS}")
  need(config.nonfinite in ("stop", "skip"), "nonfinite", f"must be 'stop' or 'skip', got {config.nonfinite!r}")
  need(config.data.unlabelled in ("error", "instance"), "data.unlabelled",
       f"must be 'error' or 'instance', got {config.data.unlabelled!r}")
  need(config.optimizer.name in OPTIMIZERS, "optimizer.name",
       f"unknown optimizer {config.optimizer.name!r}; valid: {', '.join(OPTIMIZERS)}")
  need(config.optimizer.lr > 0, "optimizer.lr", f"must be > 0, got {config.optimizer.lr}")
  need(0 <= config.optimizer.warmup_steps < config.total_steps, "optimizer.warmup_steps",
       f"must be in [0, total_steps={config.total_steps}), got {config.optimizer.warmup_steps}")
  need(config.partitioning in models.RULES, "partitioning", f"must be one of {sorted(models.RULES)}")
  for key in ("train", "eval"):
    try:
      sources.parse_spec(config.data[key])
    except ValueError as e:
      raise ConfigError(f"config.data.{key}: {e}") from None
  if config.data.train.startswith("shards:"):
    need(config.loss.graph != "class", "loss.graph",
         "'class' needs a label dataset (tfds: or folder:); caption shards have 'caption' graphs")
    need(config.loss.name != "supcon", "loss.name", "supcon needs labels; caption shards have none")
  from xsample_jax import evals
  for name in config.evals:
    try:
      evals.settings_for(name, config.evals[name])
    except ValueError as e:  # its message starts with evals.NAME
      raise ConfigError(f"config.{e}") from None
  need(not (config.init.checkpoint and config.init.backbone), "init",
       "set init.checkpoint or init.backbone, not both")

  devices = jax.device_count() if device_count is None else device_count
  data, model = config.mesh.data, config.mesh.model
  need(model >= 1 and devices % model == 0, "mesh.model", f"{model} does not divide the {devices} devices")
  data = devices // model if data == -1 else data
  need(1 <= data and data * model <= devices, "mesh.data",
       f"data={config.mesh.data} x model={model} needs more than the {devices} devices; use -1 for all")
  need(2 * config.batch_size % data == 0, "batch_size",
       f"the {2 * config.batch_size} rows of a batch of {config.batch_size} images (two views each) do not split "
       f"over mesh.data={data} devices; use a multiple of {data // math.gcd(data, 2)}")
  if config.loss.name in TEXT_LOSSES:  # one view per image: the B rows must split too
    need(config.batch_size % data == 0, "batch_size",
         f"{config.loss.name} uses one view per image: batch_size={config.batch_size} must be a multiple of "
         f"mesh.data={data}")
  need(config.batch_size % jax.process_count() == 0, "batch_size",
       f"{config.batch_size} images do not split over {jax.process_count()} processes")


def make_mesh(config) -> jax.sharding.Mesh:
  """The mesh of config.mesh; fewer devices than exist only in a single-process run (a test, a smaller trial)."""
  data = jax.device_count() // config.mesh.model if config.mesh.data == -1 else config.mesh.data
  n = data * config.mesh.model
  if n < jax.device_count() and jax.process_count() > 1:
    raise ConfigError(f"config.mesh: data x model = {n} must use all {jax.device_count()} devices of a "
                      "multi-process run")
  return sharding.make_mesh(data, config.mesh.model, devices=jax.devices()[:n])


# ----------------------------------------------------------------------------------------------------------
# 3. Data.


def _embed_fn(texts):
  from xsample_jax.models import sentence_encoder  # the frozen encoder loads only when a table is missing
  return sentence_encoder.embed_texts(texts)


def _embed_identity():  # the caption tables' cache key (sources.caption_table): the encoder's weights and width
  from xsample_jax.models import sentence_encoder
  return sentence_encoder.encoder_identity()


_embed_fn.identity = _embed_identity


def get_source(config, spec: str, split: str, workdir: epath.Path | None = None):
  """A data source string (data.train, data.eval, an evaluator's) as a random-access source; class-name caption
  embeddings are computed once (by the frozen sentence encoder) and cached."""
  kind, _ = sources.parse_spec(spec)
  if kind == "procedural":  # the training split gets data.procedural_examples, the others a tenth (>= 1000)
    train = split == "train"
    num = config.data.procedural_examples if train else max(config.data.procedural_examples // 10, 1000)
    size = config.data.procedural_image_size
    # The training split is read every epoch: kept in memory once rendered when it fits data.procedural_keep_mb.
    keep = train and num * size * size * 3 <= config.data.procedural_keep_mb * 2**20
    return sources.get_source(spec, split, num_examples=num, image_size=size,
                              seed=config.seed if train else config.seed + 1, keep_rendered=keep)
  if kind in ("tfds", "folder"):
    cache = config.data.cache_dir
    if cache is None and config.data.data_dir is None and workdir is not None:
      cache = str(epath.Path(workdir) / "caption_emb")
    kw = dict(template=config.data.template, cache_dir=cache)
    if spec == config.data.train:  # the training dataset's own settings (also where evaluators read it)
      kw.update(class_names=config.data.class_names)
      if kind == "tfds":
        kw.update(unlabelled=config.data.unlabelled)
    return _process_zero_first(lambda: sources.get_source(
        spec, split, embed_fn=_embed_fn, data_dir=config.data.data_dir, **kw), f"caption table {spec} {split}")
  if kind == "shards":
    return sources.get_source(spec, split, allow_incomplete=config.data.allow_incomplete_shards)
  return sources.get_source(spec, split)


def _process_zero_first(fn, what: str):
  """fn() on process 0, then on the others: one process computes and writes what is cached on shared storage
  (the class-name embeddings), the rest read it. Every process must call this, in the same order."""
  if jax.process_count() == 1:
    return fn()
  from jax.experimental import multihost_utils
  out = error = None
  if jax.process_index() == 0:
    try:
      out = fn()
    except Exception as e:  # re-raised after the barrier, so the others are not left waiting for process 0
      error = e
  multihost_utils.sync_global_devices(what)
  if error is not None:
    raise error
  return out if jax.process_index() == 0 else fn()


def tokenize_fn(config):
  """Caption -> (ids, mask) of config.data.context_length, with the MiniLM WordPiece vocabulary."""
  from xsample_jax.models import sentence_encoder, tokenizer
  path = str(sentence_encoder.default_model_dir() / "tokenizer.json")
  return functools.partial(tokenizer.tokenize_one, path=path, length=config.data.context_length)


def train_iterator(config, source, mesh, start_batch: int = 0, state: dict | None = None):
  """The loop's batches: global arrays assembled and copied to the devices two batches ahead in a background
  thread (`pipeline.Prefetch`), from global batch `start_batch` or from a saved iterator `state`."""
  aug = augment.SimCLRAugment(size=config.image_size, crop_scale=tuple(config.augment.crop_scale),
                              jitter_strength=config.augment.jitter_strength,
                              jitter_prob=config.augment.jitter_prob, grayscale_prob=config.augment.grayscale_prob,
                              blur_prob=config.augment.blur_prob, solarize_prob=config.augment.solarize_prob)
  ds = pipeline.train_dataset(source, global_batch_size=config.batch_size, augment=aug, seed=config.seed, mesh=mesh,
                              num_workers=config.data.num_workers, read_threads=config.data.read_threads,
                              strict=config.data.strict, start_batch=start_batch,
                              max_bad_in_a_row=config.data.max_bad_in_a_row,
                              max_bad_fraction=config.data.max_bad_fraction,
                              tokenize_fn=tokenize_fn(config) if config.loss.name in TEXT_LOSSES else None)
  it = iter(ds)
  if state is not None:  # before the read-ahead starts, so nothing is read twice
    it.set_state(state)
  prerender = getattr(source, "prerender", None)
  if prerender is not None:  # a procedural training set kept in memory: rendered while XLA compiles the step
    prerender()
  return pipeline.Prefetch(it, priority=config.data.prefetch_priority)


class _DataState:
  """The iterator's state as of the last batch the step consumed (the loop fetches one batch ahead), in the form
  grain's orbax handler saves per process."""

  def __init__(self, state=None):
    self.state = state

  def get_state(self) -> bytes:
    return json.dumps(self.state).encode()

  def set_state(self, state: bytes) -> None:
    self.state = json.loads(state)

  def start_prefetch(self) -> None:  # called by grain's handler after a restore
    pass


# ----------------------------------------------------------------------------------------------------------
# 4. Model, optimizer, state.


class Model(nnx.Module):
  """What a run trains: the image encoder (tower + projection head), and for image-text losses a text tower and
  the learnable logit scale (and SigLIP's bias)."""

  def __init__(self, config, *, rngs: nnx.Rngs):
    dtype = DTYPES[config.model.dtype]
    kw = {}
    if config.model.variant.startswith("resnet"):
      kw = dict(zero_init_residual=config.model.zero_init_residual)
      if config.model.stem:
        kw["stem"] = config.model.stem
    else:
      kw = dict(image_size=config.image_size, pool=config.model.pool)
    self.image = models.make_image_encoder(config.model.variant, tuple(config.model.head), rngs=rngs,
                                           head_bn=config.model.head_bn, bn_momentum=config.model.bn_momentum,
                                           dtype=dtype, **kw)
    text = log_scale = bias = None
    if config.loss.name in TEXT_LOSSES:
      text = models.make_text_tower(config.model.text, out_dim=config.model.head[-1], rngs=rngs, dtype=dtype,
                                    max_len=config.data.context_length, pool=config.model.text_pool)
    if config.loss.name in ("clip", "siglip"):
      log_scale = nnx.Param(jnp.log(1.0 / jnp.float32(config.loss.temperature)))
    if config.loss.name == "siglip":
      bias = nnx.Param(jnp.float32(config.loss.siglip_bias))
    # Assigned once each: an attribute first set to None would be static for nnx.
    self.text, self.log_scale, self.bias = nnx.data(text), nnx.data(log_scale), nnx.data(bias)


class TrainState(nnx.Module):
  def __init__(self, model: Model, optimizer: nnx.Optimizer):
    self.model, self.optimizer = model, optimizer
    self.nonfinite_steps = nnx.Variable(jnp.zeros((), jnp.int32))  # steps not applied: NaN/Inf loss or gradient


def learning_rate(config) -> optax.Schedule:
  """Linear warmup to the peak, then cosine decay to end_lr_fraction x peak at total_steps."""
  opt = config.optimizer
  peak = opt.lr * (config.batch_size / opt.lr_batch if opt.lr_batch > 0 else 1.0)
  return optax.warmup_cosine_decay_schedule(0.0, peak, opt.warmup_steps, config.total_steps,
                                            end_value=peak * opt.end_lr_fraction)


def _decay_mask(params):
  """Weight decay and LARS adaptation on kernels and embeddings only: not on biases, norms or scalars."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(config) -> optax.GradientTransformation:
  opt, lr = config.optimizer, learning_rate(config)
  if opt.name == "lars":
    tx = optax.lars(lr, weight_decay=opt.weight_decay, weight_decay_mask=_decay_mask,
                    trust_coefficient=opt.trust_coefficient, trust_ratio_mask=_decay_mask, momentum=opt.momentum)
  elif opt.name == "adamw":
    tx = optax.adamw(lr, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay, mask=_decay_mask)
  else:
    tx = optax.chain(optax.add_decayed_weights(opt.weight_decay, _decay_mask),
                     optax.sgd(lr, momentum=opt.momentum))
  if opt.grad_clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(opt.grad_clip_norm), tx)
  return tx


def make_train_state(config) -> TrainState:
  model = Model(config, rngs=nnx.Rngs(config.seed))
  return TrainState(model, nnx.Optimizer(model, make_optimizer(config), wrt=nnx.Param))


def abstract_state(config, mesh):
  """(graphdef, abstract state with shardings as ShapeDtypeStructs, shardings) without allocating anything."""
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: make_train_state(config)))
  shardings = models.state_shardings(abstract, mesh, config.partitioning)
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  return graphdef, target, shardings


def init_state(config, shardings):
  """The fresh state, each array created directly with its sharding."""
  return jax.jit(lambda: nnx.split(make_train_state(config))[1], out_shardings=shardings)()


# ----------------------------------------------------------------------------------------------------------
# 5. The step.


def graph_kind(config, source) -> str:
  """'class' (labels + a K x K table, no N^2 E matmul) for label datasets, else 'caption'."""
  if config.loss.graph != "auto":
    return config.loss.graph
  return "class" if isinstance(source, sources.LabelSource) else "caption"


def class_similarity(source) -> np.ndarray:
  """[K, K] cosine similarities of the source's class-name caption embeddings."""
  table = np.asarray(source.table, np.float64)
  table /= np.maximum(np.linalg.norm(table, axis=1, keepdims=True), 1e-12)
  return (table @ table.T).astype(np.float32)


def class_table(config, source, mesh) -> jax.Array | None:
  """The class graph's K x K table, replicated on the mesh, when X-CLR trains on it (else None)."""
  if config.loss.name != "xclr" or graph_kind(config, source) != "class":
    return None
  if not isinstance(source, sources.LabelSource):
    raise ConfigError(f"config.loss.graph: 'class' needs a label dataset (tfds: or folder:), not {config.data.train!r}")
  return jax.device_put(class_similarity(source), sharding.replicated(mesh))


def make_loss_fn(config, mesh, table: jax.Array | None):
  """(model, batch) -> (loss, aux metrics). The towers run under jit on the sharded batch; the objective runs in
  shard_map over 'data' on this device's rows, and the losses gather the global batch."""
  lc = config.loss
  kw = dict(axis_name=sharding.DATA, impl=lc.impl)
  text = lc.name in TEXT_LOSSES
  # The per-row graph input: a class table is looked up by label, else caption embeddings; ids / labels for the
  # baselines' hard graphs.
  graph_field = {"simclr": "id", "supcon": "label"}.get(lc.name, "label" if table is not None else "caption_emb")

  def objective(rows, shared):
    """rows: this device's [n, ...] inputs; shared: the replicated logit scale, bias and class table."""
    z, y = rows["z"], rows.get("graph")
    if lc.name == "xclr":
      return losses.xsample_loss(z, y, temperature=lc.temperature, target_temperature=lc.target_temperature,
                                 mask_self=lc.mask_self, class_similarity=shared.get("table"), **kw)
    if lc.name in ("simclr", "supcon"):
      fn = losses.simclr_loss if lc.name == "simclr" else losses.supcon_loss
      return fn(z, y, temperature=lc.temperature, **kw)
    if lc.name == "clip":
      return losses.clip_loss(z, rows["text"], shared["log_scale"], **kw)
    if lc.name == "siglip":
      return losses.siglip_loss(z, rows["text"], shared["log_scale"], shared["bias"], axis_name=sharding.DATA)
    return losses.xsample_cross_modal_loss(z, rows["text"], y, temperature=lc.temperature,
                                           target_temperature=lc.target_temperature, **kw)

  objective = jax.shard_map(objective, mesh=mesh, in_specs=(P(sharding.DATA), P()), out_specs=P())

  def loss_fn(model: Model, batch):
    views = slice(None, None, 2) if text else slice(None)  # image-text: one view per image (both share a caption)
    _, z = model.image(augment.normalize(batch["image"][views]).astype(DTYPES[config.model.dtype]))
    rows, shared, aux = {"z": z}, {}, {"temperature": jnp.float32(lc.temperature)}
    if lc.name not in ("clip", "siglip"):
      rows["graph"] = batch[graph_field][views]
    if text:
      rows["text"] = model.text(batch["tokens"][views], batch["token_mask"][views])
    if table is not None:
      shared["table"] = table
    if model.log_scale is not None:
      shared["log_scale"] = model.log_scale[...]
      aux["temperature"] = 1.0 / jnp.exp(shared["log_scale"])
    if model.bias is not None:
      shared["bias"] = aux["bias"] = model.bias[...]
    return objective(rows, shared), aux

  return loss_fn


# jax 0.10's XLA:CPU hands dots, convolutions and reductions to YNNPACK. On an AVX2 host (AMD EPYC, Zen 3, 2 cores)
# its float32 convolutions ran forward+backward at 30-95 GFLOP/s against 135-160 in Eigen (ResNet-18's 3x3 convs at
# 64 px), and its matmuls were slower too: the X-CLR step took 2.18 against 2.60 s for ResNet-18 and 4.15 against
# 4.51 s for ViT-S/16 with dots and convolutions in Eigen (benchmarks/train_bench.py --cpu-matmuls auto ynnpack).
# Reductions (BatchNorm's statistics) stay YNNPACK's: with them in Eigen too the ResNet step took 2.52 against
# 2.20 s. On an earlier AVX-512 host YNNPACK's matmuls measured faster than Eigen's (280 against 230 GFLOP/s), so
# 'auto' leaves XLA's choice alone on such hosts. It also does with several CPU devices in the process (the tests'
# 8 fake devices on 2 cores): their computations run at once and share Eigen's thread pool, and the ImageNet
# runlocal test took 127 s with Eigen against 40 s with YNNPACK.
_YNN_ONLY_REDUCTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}


def x86_avx512(cpuinfo: str | None) -> bool | None:
  """Whether the CPU described by /proc/cpuinfo's text has AVX-512 (avx512f); None if it is not an x86 text."""
  flags = next((line.split(":", 1)[1].split() for line in (cpuinfo or "").splitlines() if line.startswith("flags")),
               None)
  return None if flags is None or "sse2" not in flags else "avx512f" in flags


@functools.lru_cache(maxsize=1)
def _host_cpuinfo() -> str | None:
  """/proc/cpuinfo's text, read once per process (the train step and every evaluation's extraction ask)."""
  try:
    return epath.Path("/proc/cpuinfo").read_text()
  except OSError:
    return None


def compiler_options(cpu_matmuls: str, backend: str | None = None, cpuinfo: str | None = None,
                     local_devices: int | None = None) -> dict | None:
  """`jax.jit`'s compiler_options for the model's jits (the train step, feature extraction): config.cpu_matmuls.

  'eigen': XLA:CPU's Eigen kernels for dots and convolutions, YNNPACK only for reductions. 'ynnpack': XLA's own
  default. 'auto': 'eigen' on an x86 CPU without AVX-512 with one CPU device in this process, else XLA's default.
  None off CPU.
  """
  if (backend or jax.default_backend()) != "cpu" or cpu_matmuls == "ynnpack":
    return None
  if cpu_matmuls == "auto":
    if (local_devices or jax.local_device_count()) != 1:
      return None
    if x86_avx512(_host_cpuinfo() if cpuinfo is None else cpuinfo) is not False:
      return None
  return dict(_YNN_ONLY_REDUCTIONS)


def make_train_step(config, graphdef, shardings, mesh, loss_fn):
  schedule = learning_rate(config)

  inject = tuple(config.debug.inject_nonfinite_steps)

  def train_step(state, batch):
    before = jax.tree.map(lambda x: x, state)  # the arrays to keep if this step turns out non-finite
    ts = nnx.merge(graphdef, state)
    step = ts.optimizer.step[...]
    grad_fn = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.Param), has_aux=True)
    (loss, aux), grads = grad_fn(ts.model, batch)
    if inject:  # fault testing: a NaN loss and NaN gradients at the chosen steps
      bad = jnp.isin(step + 1, jnp.asarray(inject))
      loss, grads = jax.tree.map(lambda x: jnp.where(bad, jnp.nan, x), (loss, grads))
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    ts.optimizer.update(ts.model, grads)
    # A non-finite step leaves everything as it was (BatchNorm statistics too) except the step count, so the
    # schedule and the data stream move on and the count says what was not applied.
    new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), nnx.state(ts), before)
    ts = nnx.merge(graphdef, new)
    ts.optimizer.step[...] = step + 1
    ts.nonfinite_steps[...] += (~finite).astype(jnp.int32)
    metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(step), **aux,
               "nonfinite_steps": ts.nonfinite_steps[...]}
    return nnx.state(ts), metrics

  return jax.jit(train_step, donate_argnums=0, out_shardings=(shardings, sharding.replicated(mesh)),
                 compiler_options=compiler_options(config.cpu_matmuls))


# ----------------------------------------------------------------------------------------------------------
# 6. Checkpoints: train state + data iterator state + config, in DIR/checkpoints.


def checkpoint_manager(workdir: epath.Path, config) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True,
                                         enable_async_checkpointing=True)
  return ocp.CheckpointManager(workdir / "checkpoints", item_names=("state", "data", "config"), options=options)


def save_checkpoint(mngr, step, state, data_state, config):
  import grain
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          data=grain.checkpoint.CheckpointSave(_DataState(data_state)),
                                          config=ocp.args.JsonSave(config.to_dict())), force=True)


def restore_checkpoint(mngr, step, target):
  """(state, data iterator state, config) of `step`, the state placed on the current mesh per `target`'s
  shardings. The data state is None when the checkpoint was written by another number of processes (each process
  saved its own iterator) or by an older input pipeline: the run then restarts the stream at global batch `step`
  (see pipeline.ProcessRows)."""
  import grain
  i, n = jax.process_index(), jax.process_count()
  saved = sorted(p.name for p in (mngr.directory / str(step) / "data").glob("process_*-of-*.json"))
  data = _DataState() if f"process_{i}-of-{n}.json" in saved else None
  args = dict(state=ocp.args.StandardRestore(target), config=ocp.args.JsonRestore())
  if data is not None:
    args["data"] = grain.checkpoint.CheckpointRestore(data)
  else:
    logging.warning("the checkpoint's data iterators are %s, this run has %d process(es): the data stream "
                    "continues at global batch %d (the same batches, unless bad records were skipped)",
                    saved or "missing", n, step)
  out = mngr.restore(step, args=ocp.args.Composite(**args))
  data_state = data and data.state
  if data_state is not None and not pipeline.can_restore(data_state):
    logging.warning("the checkpoint's data iterator was saved by an older version of the input pipeline: the data "
                    "stream continues at global batch %d (other examples and augmentations than that version's)",
                    step)
    data_state = None
  return out["state"], data_state, out["config"]


class CheckpointError(RuntimeError):
  """No checkpoint of the workdir restores (a different model or config, or damaged files)."""


def restore_latest(mngr, target):
  """(step, state, data state, config) of the newest checkpoint that restores, or None when there is none.

  A checkpoint that fails to restore while an older one restores is damaged (an interrupted copy, a disk error):
  it is moved to DIR/corrupt_checkpoints/STEP (kept, not deleted) so that the run continues from the older one and
  can save that step again. When none restores, the cause is the run, not the files: CheckpointError, nothing moved.
  """
  failed = []
  for step in sorted(mngr.all_steps(), reverse=True):
    try:
      out = restore_checkpoint(mngr, step, target)
    except Exception as e:  # orbax and tensorstore raise many kinds; each is reported, none is swallowed silently
      logging.error("checkpoint %d in %s does not restore: %s: %s", step, mngr.directory, type(e).__name__, e)
      failed.append((step, e))
      continue
    if failed:
      _set_aside(mngr, [s for s, _ in failed])
      logging.warning("resuming from step %d, the newest checkpoint that restores; damaged: %s, moved to %s",
                      step, [s for s, _ in failed], mngr.directory.parent / "corrupt_checkpoints")
    return (step, *out)
  if failed:
    step, e = failed[0]
    raise CheckpointError(
        f"no checkpoint in {mngr.directory} restores (newest: step {step}: {type(e).__name__}: {e}). If the "
        "model or config differs from the run that wrote them (see DIR/config.json), use that config or a new "
        "workdir; init.checkpoint starts a new run from another run's model")
  return None


def _write_failed(mngr, what: str, error: Exception) -> CheckpointError:
  """The error a failed write to the workdir (a checkpoint save, the metrics) ends the run with: what failed, and
  the newest complete checkpoint, which orbax's write-then-rename leaves intact (an unfinished save is a
  *.orbax-checkpoint-tmp directory, never restored)."""
  text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
  full = getattr(error, "errno", None) == errno.ENOSPC or "RESOURCE_EXHAUSTED" in text or "No space left" in text
  mngr.reload()
  return CheckpointError(
      f"{what} failed{' because the disk is full' if full else ''} "
      f"({type(error).__name__}: {text[:300]}); the newest complete checkpoint, step {mngr.latest_step()}, is "
      f"intact: {'free space or choose another workdir' if full else 'fix the cause'} and rerun the same command to "
      "resume from it")


def _set_aside(mngr, steps):
  if jax.process_index() == 0:
    aside = mngr.directory.parent / "corrupt_checkpoints"
    aside.mkdir(parents=True, exist_ok=True)
    for step in steps:
      (mngr.directory / str(step)).rename(aside / f"{step}.{int(time.time())}")
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("corrupt checkpoints set aside")
  mngr.reload()


def config_changes(saved: dict, config) -> list[str]:
  """'key: saved -> now' for every leaf that differs between a checkpoint's config and the current one."""
  def flat(d, prefix=""):
    out = {}
    for k, v in d.items():
      out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out
  old, new = flat(saved), flat(json.loads(config.to_json_best_effort()))
  return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def _checkpoint_dir(path: str) -> epath.Path:
  path = epath.Path(path)
  return path / "checkpoints" if (path / "checkpoints").exists() else path


def model_from_checkpoint(path: str, target_model_state):
  """The model part of the latest checkpoint under `path` (a run's workdir or its checkpoints/ dir)."""
  mngr = ocp.CheckpointManager(_checkpoint_dir(path), item_names=("state",))
  step = mngr.latest_step()
  if step is None:
    raise FileNotFoundError(f"config.init.checkpoint: no checkpoint under {path}")
  # Restore only the model's arrays: the optimizer state of another run is not wanted (and may not match).
  restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
      item={"model": target_model_state}, partial_restore=True)))
  return restored["state"]["model"]


def _tower_variables(tower: nnx.Module) -> dict[str, nnx.Variable]:
  """The tower's parameters and statistics by '/'-joined path: the names of a backbone file."""
  return {"/".join(map(str, k)): v for k, v in nnx.to_flat_state(nnx.state(tower))}


def save_backbone(path: str, model: Model) -> None:
  """Writes the image tower's parameters and statistics as an .npz (for init.backbone)."""
  with epath.Path(path).open("wb") as f:
    np.savez(f, **{k: np.asarray(v) for k, v in _tower_variables(model.image.tower).items()})


def load_backbone(path: str, tower: nnx.Module) -> None:
  """Loads `save_backbone`'s file into `tower` in place; every array must be there with its shape."""
  with epath.Path(path).open("rb") as f:
    arrays = dict(np.load(f))
  variables = _tower_variables(tower)
  missing = sorted(set(variables) - set(arrays))
  if missing:
    raise ValueError(f"config.init.backbone: {path} lacks {len(missing)} tower arrays, e.g. {missing[:3]}")
  for name, v in variables.items():
    if arrays[name].shape != v.shape:
      raise ValueError(f"config.init.backbone: {name} has shape {arrays[name].shape}, the tower {v.shape}")
    v[...] = jnp.asarray(arrays[name], v.dtype)


# ----------------------------------------------------------------------------------------------------------
# Metrics: metrics.jsonl + TensorBoard, written by process 0.


def _logged_step(line: str) -> float:
  """The step of a metrics.jsonl line; a line torn by a kill counts as after every checkpoint."""
  try:
    return json.loads(line)["step"]
  except (ValueError, KeyError, TypeError):
    return math.inf


class MetricWriter:
  """One JSON object per logged step in DIR/metrics.jsonl, and TensorBoard events in DIR/tensorboard.

  Events are written in the caller's thread (tensorboardX's SummaryWriter hands them to a thread that, once a write
  fails, e.g. on a full disk, leaves the next call blocked forever): a failed write raises OSError here.
  """

  def __init__(self, workdir: epath.Path, resume_step: int | None):
    """resume_step: the step training (re)starts from, whose later lines are dropped; None appends only."""
    self.enabled = jax.process_index() == 0
    if not self.enabled:
      return
    self.path = workdir / "metrics.jsonl"
    if self.path.exists() and resume_step is not None:  # a resumed run logs the steps after its checkpoint again
      kept = [l for l in self.path.read_text().splitlines() if _logged_step(l) <= resume_step]
      self.path.write_text("".join(l + "\n" for l in kept))
    from tensorboardX.event_file_writer import EventsWriter
    from tensorboardX.proto import event_pb2
    (workdir / "tensorboard").mkdir(parents=True, exist_ok=True)
    self.tb, self._event, self._flushed = EventsWriter(str(workdir / "tensorboard" / "events")), event_pb2, 0.0
    if resume_step:  # TensorBoard then drops the events an earlier attempt logged after the checkpoint
      self.tb.write_event(event_pb2.Event(step=resume_step + 1, wall_time=time.time(), session_log=event_pb2.SessionLog(
          status=event_pb2.SessionLog.START)))

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    if not self.enabled or not metrics:
      return
    from tensorboardX import summary
    row = {"step": int(step), **{k: float(v) if not isinstance(v, (int, str)) else v for k, v in metrics.items()}}
    with self.path.open("a") as f:
      f.write(json.dumps(row) + "\n")
    now = time.time()
    for k, v in row.items():
      if k != "step" and isinstance(v, (int, float)):
        self.tb.write_event(self._event.Event(step=int(step), wall_time=now, summary=summary.scalar(k, v)))
    if now - self._flushed > 10:  # TensorBoard sees the events within seconds, without an fsync per step
      self.tb.flush()
      self._flushed = now

  def close(self):
    if self.enabled:
      self.tb.close()


# ----------------------------------------------------------------------------------------------------------
# Evaluation: the frozen features the evaluators (xsample_jax/evals, chosen by name in config.evals) ask for.


@functools.lru_cache(maxsize=4)
def embed_fn(graphdef, mesh, cpu_matmuls="auto"):
  """(state, images uint8) -> (backbone features, projections), BatchNorm on its running averages. Cached, so
  every evaluation round of a run reuses one compiled function."""
  def embed(state, images):
    encoder = nnx.view(nnx.merge(graphdef, state).model.image, use_running_average=True)
    h, z = encoder(augment.normalize(images))
    return h.astype(jnp.float32), z.astype(jnp.float32)
  return jax.jit(embed, out_shardings=(sharding.batch_sharding(mesh),) * 2,
                 compiler_options=compiler_options(cpu_matmuls))


def make_extract(config, graphdef, state, mesh, workdir=None):
  """An `evals.ExtractFn`: (data spec, split, max examples) -> host arrays of every process's rows, in source
  order: "features", "projections", "caption_emb" and the source's int fields. Un-augmented (resize + centre
  crop), sharded over the mesh like training batches; every process takes part."""
  from jax.experimental import multihost_utils
  embed = embed_fn(graphdef, mesh, config.cpu_matmuls)
  shards = mesh.shape[sharding.DATA]
  batch_size = max(shards, config.eval_batch_size // shards * shards)

  def gather(x):
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))

  def extract(spec, split, max_examples):
    source = sources.Head(get_source(config, spec, split, workdir), max_examples)
    ds = pipeline.eval_dataset(source, global_batch_size=batch_size, image_size=config.image_size, mesh=mesh,
                               read_threads=config.data.read_threads)
    parts = []
    # The next batches are read and copied while the towers run; at the process's own priority, since this loop syncs
    # on every batch (2048 smoke images: 0.74-0.84 s against 0.81-0.94 s at nice 19).
    batches = pipeline.Prefetch(iter(ds), priority="normal")
    try:
      for batch in batches:
        h, z = embed(state, batch["image"])
        keep = gather(batch["valid"])
        fields = {k: v for k, v in batch.items() if k not in ("image", "valid")}
        parts.append({k: gather(v)[keep] for k, v in {"features": h, "projections": z, **fields}.items()})
    finally:
      batches.close()
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  return extract


def run_evals(config, graphdef, state, mesh, workdir, names=None) -> dict[str, float]:
  """Every evaluator of config.evals (or `names`) on `state`, as eval/NAME/METRIC."""
  from xsample_jax import evals
  if not config.evals:
    return {}
  data = evals.Features(make_extract(config, graphdef, state, mesh, workdir), config, mesh)
  return evals.run_all(data, config.evals, names)


# ----------------------------------------------------------------------------------------------------------
# The run.


class _Preemption:
  """SIGTERM (how TPU VMs are preempted) asks for a save at a step boundary, after which the loop returns. With
  several processes jax's preemption service catches the signal and makes them all agree on the step."""

  def __init__(self):
    self._requested = False
    self._several = jax.process_count() > 1
    self._previous = None if self._several else signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    logging.warning("SIGTERM: saving a checkpoint at the next step boundary, then exiting")
    self._requested = True

  def reached(self, step: int) -> bool:
    """Whether to save and stop after `step` (asked after every step, on every process)."""
    if self._several:
      from jax.experimental import multihost_utils
      return multihost_utils.reached_preemption_sync_point(step)
    return self._requested

  def restore(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


class StepWatch:
  """Records when each dispatched step's outputs are ready: a thread blocks on them in dispatch order, so the loop
  itself never waits for a step, yet can tell how long the devices sat idle before the next batch came."""

  def __init__(self):
    self._queue, self._watched, self._finished = queue.SimpleQueue(), 0, (0, 0.0)
    self._thread = threading.Thread(target=self._run, name="step-watch", daemon=True)
    self._thread.start()

  def _run(self):
    while (item := self._queue.get()) is not None:
      n, outputs = item
      try:
        jax.block_until_ready(outputs)
      except Exception:  # noqa: BLE001 - a failed step is the loop's to report, when it fetches the metrics
        pass
      self._finished = (n, time.perf_counter())

  def watch(self, outputs) -> None:
    self._watched += 1
    self._queue.put((self._watched, outputs))

  def finished_at(self) -> float | None:
    """When the latest watched step finished (0.0 before any); None while it runs."""
    n, at = self._finished
    return at if n == self._watched else None

  def close(self) -> None:
    self._queue.put(None)
    self._thread.join()


def _next_batch(it, clock, watch: StepWatch):
  """next(it). clock["data_wait"] gets the part of the time it blocked after the step dispatched just before (the
  latest `watch` watches) had finished: the devices' idle time for want of data, not the time the batch took
  while they computed."""
  t0 = time.perf_counter()
  batch = next(it)
  t1 = time.perf_counter()
  done = watch.finished_at()
  if done is not None:
    clock["data_wait"] += t1 - max(t0, done)
  return batch


def step_flops(train_step, state, batch) -> float | None:
  """FLOPs one device does in a train step, as XLA counts them in the compiled (partitioned) program; None where
  the backend does not count them. jax keeps this compilation for the step's first call: nothing compiles twice."""
  return utilization.compiled_flops(train_step.lower(state, batch).compile())


class _Profile:
  """Records steps first..first+count-1 (config.profile_steps) with jax.profiler into DIR/profile, on process 0."""

  def __init__(self, config, workdir):
    self.first, count = config.profile_steps
    self.last = self.first + count - 1
    self.dir = str(workdir / "profile") if count and jax.process_index() == 0 else None
    self.on = False

  def before(self, step: int) -> None:
    """Called before dispatching step `step` (1-based)."""
    if self.dir and step == self.first:
      jax.profiler.start_trace(self.dir)
      self.on = True

  def after(self, step: int, metrics, loop_ends: bool = False) -> None:
    """Called after dispatching step `step`; the trace ends once its computation has, at the window's last step or
    where the loop ends."""
    if self.on and (step >= self.last or loop_ends):
      jax.block_until_ready(metrics)
      self.stop()
      logging.info("profile of steps %d-%d written to %s", self.first, step, self.dir)

  def stop(self) -> None:
    if self.on:
      self.on = False
      jax.profiler.stop_trace()


def log_metrics(writer, bar, pending, batch_size, clock, data_metrics, nonfinite="stop", flops=None,
                peak_tflops=None) -> dict[str, float]:
  """Fetches the metrics of the steps since the last log (the loop's only host sync) and writes one row a step;
  the last row also gets the interval's throughput, data-wait (seconds a step, and as a fraction of the step) and,
  given the step's FLOPs per device (`step_flops`), the TFLOP/s each device achieved and, given its peak, the model
  FLOP utilisation `mfu`. Returns that row. A step whose loss or gradient was not finite (not applied by the step)
  raises NonFiniteError, or with nonfinite='skip' is logged."""
  fetched = jax.device_get(pending)
  elapsed, n = time.perf_counter() - clock["log"], len(fetched)
  rows = [{"step": s, **{k: float(v) for k, v in m.items()}} for s, m in fetched]
  rows[-1].update({"step_time": elapsed / n, "images_per_sec": n * batch_size / elapsed,
                   "data_wait": clock["data_wait"] / n, "data_wait_fraction": clock["data_wait"] / elapsed,
                   **data_metrics})
  if flops:
    rows[-1]["device_tflop_per_s"] = n * flops / elapsed / 1e12
    if peak_tflops:
      rows[-1]["mfu"] = rows[-1]["device_tflop_per_s"] / peak_tflops
  for row in rows:
    writer.write(row["step"], {k: v for k, v in row.items() if k != "step"})
  bad = [r["step"] for r in rows if not (math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]))]
  if bad and nonfinite == "stop":  # the checkpoints so far stay as they are
    raise NonFiniteError(
        f"step {bad[0]}: the loss or a gradient is NaN/Inf; the update was not applied and the run stops "
        "(config.nonfinite='stop'). Every checkpoint so far is intact, so rerunning resumes from the latest; a "
        "lower optimizer.lr or optimizer.grad_clip_norm may prevent it, and --config.nonfinite=skip skips such "
        "steps instead")
  if bad:
    logging.warning("steps %s: the loss or a gradient is NaN/Inf; not applied (%d such steps in this run)", bad,
                    int(rows[-1]["nonfinite_steps"]))
  if bar is not None:
    bar.set_postfix(loss=f"{rows[-1]['loss']:.4f}", img_s=f"{rows[-1]['images_per_sec']:.0f}")
  clock["log"], clock["data_wait"] = time.perf_counter(), 0.0
  return rows[-1]


def use_xla_cache(path: str | None) -> None:
  """XLA's persistent compilation cache in `path` (config.xla_cache_dir) from the next compile on; None: as it is."""
  if not path or jax.config.jax_compilation_cache_dir == path:
    return
  from jax.experimental.compilation_cache import compilation_cache
  compilation_cache.set_cache_dir(path)
  compilation_cache.reset_cache()  # JAX opens its cache once per process: one an earlier run opened is dropped


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (resuming from the latest checkpoint in `workdir` if any) and evaluates; returns the last metrics."""
  check_config(config)
  use_xla_cache(config.xla_cache_dir)
  workdir = epath.Path(workdir)
  if not str(workdir).startswith("gs://"):
    workdir = workdir.resolve()  # orbax wants absolute paths
    _check_writable(workdir)
  mesh = make_mesh(config)

  try:
    train_source = get_source(config, config.data.train, config.data.train_split, workdir)
  except (ValueError, OSError) as e:  # a missing directory, an unknown TFDS name, an empty shard manifest
    raise ConfigError(f"config.data.train: {config.data.train!r} cannot be read: {e}") from e
  graphdef, target, shardings = abstract_state(config, mesh)
  loss_fn = make_loss_fn(config, mesh, class_table(config, train_source, mesh))
  train_step = make_train_step(config, graphdef, shardings, mesh, loss_fn)

  mngr = checkpoint_manager(workdir, config)
  # Shard files left out as unreadable are reported with every log row, next to the skipped records.
  source_metrics = {"data/unreadable_shards": len(getattr(train_source, "unreadable", ()))}
  # A data-fraction run trains on a fixed head of the source (the same images whatever the seed or method).
  n_train = max(1, round(config.data.train_fraction * len(train_source)))
  if n_train < len(train_source):
    train_source = sources.Head(train_source, n_train)
  restored = restore_latest(mngr, target)
  if restored is not None:
    start, state, data_state, saved_config = restored
    it = train_iterator(config, train_source, mesh, start_batch=start if data_state is None else 0, state=data_state)
    logging.info("resumed from step %d in %s", start, workdir / "checkpoints")
    changes = config_changes(saved_config, config)
    if changes:  # legitimate (a new mesh, more steps), but the run is then not the one that was saved
      logging.warning("the config differs from the checkpoint's: %s", "; ".join(changes))
  else:
    start = 0
    it = train_iterator(config, train_source, mesh)
    state = init_state(config, shardings)
    state = warm_start(config, graphdef, state, target, shardings)

  if jax.process_index() == 0:  # only now: a run that cannot start leaves the workdir as it was
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
  writer = MetricWriter(workdir, start)
  preemption = _Preemption()
  bar = None
  if config.progress_bar and jax.process_index() == 0:
    from tqdm import tqdm
    bar = tqdm(total=config.total_steps, initial=start, unit="step", dynamic_ncols=True, mininterval=1.0)

  step, pending, last, stopped = start, [], {"step": start}, False
  clock, watch, profile = {"log": time.perf_counter(), "data_wait": 0.0}, StepWatch(), _Profile(config, workdir)
  try:
    batch = _next_batch(it, clock, watch) if start < config.total_steps else None
    flops = step_flops(train_step, state, batch) if batch is not None else None
    peak = utilization.peak_tflops(jax.devices()[0], config.model.dtype, config.peak_tflops)
    if flops:
      logging.info("the train step: %.4g GFLOP per device (XLA's count); %s", flops / 1e9,
                   f"peak {peak:g} TFLOP/s a device (mfu logged)" if peak else
                   "no peak known for this device (set config.peak_tflops for the mfu)")
    while step < config.total_steps:
      profile.before(step + 1)
      with jax.transfer_guard("disallow"):  # an accidental host copy inside the step fails loudly
        state, metrics = train_step(state, batch)  # dispatched asynchronously
      step += 1
      pending.append((step, metrics))
      watch.watch(metrics)
      stop, end = preemption.reached(step), step == config.total_steps
      profile.after(step, metrics, loop_ends=stop or end)
      save = stop or end or step % config.checkpoint_every_steps == 0
      data_state = it.get_state() if save else None  # the stream after the batches consumed so far
      if not (stop or end):  # the host fetches the next batch while the device runs this step
        batch = _next_batch(it, clock, watch)
      if stop or end or step % config.log_every_steps == 0:
        try:
          last = log_metrics(writer, bar, pending, config.batch_size, clock, {**it.metrics(), **source_metrics},
                             config.nonfinite, flops, peak)
        except OSError as e:
          raise _write_failed(mngr, f"writing the metrics in {workdir}", e) from e
        pending = []
      if bar is not None:
        bar.update(1)
      if save:
        try:
          save_checkpoint(mngr, step, state, data_state, config)
        except Exception as e:  # an earlier asynchronous save's error surfaces here
          raise _write_failed(mngr, f"saving a checkpoint in {mngr.directory}", e) from e
      if stop:
        stopped = True
        break
      if config.eval_every_steps and step % config.eval_every_steps == 0 and not end:
        writer.write(step, run_evals(config, graphdef, state, mesh, workdir))
  finally:  # a save in flight completes, and SIGTERM gets its handler back, also when the loop raises
    it.close()  # its read-ahead stops: the evaluations get the cores
    watch.close()
    profile.stop()  # a loop that raised inside the window
    preemption.restore()
    try:
      mngr.wait_until_finished()
    except Exception as e:
      raise _write_failed(mngr, f"saving a checkpoint in {mngr.directory}", e) from e
  if bar is not None:
    bar.close()
  if stopped:
    writer.close()
    mngr.close()
    logging.warning("preempted at step %d; rerun the same command to resume", step)
    return {**last, "preempted": True}
  results = run_evals(config, graphdef, state, mesh, workdir)
  writer.write(step, results)
  writer.close()
  mngr.close()
  return {**last, **results, "state": state, "graphdef": graphdef}


def _check_writable(workdir: epath.Path) -> None:
  """A local workdir (or, before it exists, its nearest existing parent) takes files; checked by writing one and
  removing it, so a run that cannot save fails before anything is computed, and leaves nothing behind."""
  import tempfile
  place = workdir
  while not place.exists():
    place = place.parent
  try:
    if not place.is_dir():
      raise NotADirectoryError(f"{place} is a file")
    with tempfile.NamedTemporaryFile(dir=place):
      pass
  except OSError as e:
    raise ConfigError(f"workdir {workdir} is not writable ({e}); choose another --workdir") from e


def warm_start(config, graphdef, state, target, shardings):
  """init.checkpoint: the model of another run (a fresh optimizer); init.backbone: image-tower parameters."""
  if not (config.init.checkpoint or config.init.backbone):
    return state
  ts = nnx.merge(graphdef, state)
  if config.init.checkpoint:
    model_state = model_from_checkpoint(config.init.checkpoint, target["model"])
    nnx.update(ts.model, model_state)
  else:
    load_backbone(config.init.backbone, ts.model.image.tower)
  return jax.device_put(nnx.state(ts), shardings)
