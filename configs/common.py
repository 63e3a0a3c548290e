"""Every key a config may set, with its type and default. Configs start from `base()` and change what differs.

The key names are the project's public surface: launch scripts and users set them from the command line as
`--config.KEY=VALUE`. A key that is not here does not exist (the ConfigDict is locked), and a value of the wrong type
is refused; `xsample_jax.train.check_config` then checks the values themselves.
"""
from __future__ import annotations

import ml_collections
from ml_collections import config_dict



def _optional_str():
  # A fresh placeholder per key: one shared FieldReference would tie every key that uses it together.
  return config_dict.placeholder(str)


def base() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_steps = 1000
  c.batch_size = 256  # global, in images; each image gives two augmented views (2 x batch_size rows)
  c.image_size = 224
  c.log_every_steps = 50
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3
  c.eval_every_steps = 0  # 0: evaluate at the end only
  c.eval_batch_size = 256  # global, for extracting frozen features
  c.progress_bar = True
  # A step whose loss or gradient is NaN/Inf is never applied (parameters, optimizer and BatchNorm statistics stay
  # as they were). 'stop': the run ends with an error naming the step; 'skip': training goes on, counting such steps
  # in the metric `nonfinite_steps` (saved with the state).
  c.nonfinite = "stop"
  # XLA:CPU's kernels for the model's dots and convolutions: 'eigen' | 'ynnpack' (XLA's default) | 'auto' (eigen
  # on x86 without AVX-512 with one CPU device per process, where it measured 1.1-2x faster steps; XLA's default
  # elsewhere). Ignored off CPU.
  c.cpu_matmuls = "auto"
  # XLA's persistent compilation cache (a local or gs:// directory): a run resumed after preemption, and any later
  # run of the same programs, loads the compiled train step instead of compiling it again. None: JAX's own setting
  # (off unless JAX_COMPILATION_CACHE_DIR is set). Only ever share it with people you trust: it holds executables.
  c.xla_cache_dir = _optional_str()
  # One device's dense matmul peak in TFLOP/s for model.dtype, for the model FLOP utilisation (`mfu`) the logs give
  # beside each device's achieved TFLOP/s. None: from the device kind (xsample_jax/utilization.py: H100/H200, A100,
  # L4, TPU v3-v6); on other chips (a CPU) no mfu unless set.
  c.peak_tflops = config_dict.placeholder(float)
  # Record a profile of steps FIRST..FIRST+COUNT-1 (1-based, as logged): XLA's ops on the host and the devices, in
  # DIR/profile (TensorBoard's profile plugin, or the trace.json.gz in Perfetto); process 0 only. (0, 0): none.
  c.profile_steps = (0, 0)

  c.data = ml_collections.ConfigDict()
  c.data.train = "procedural"  # 'procedural' | 'tfds:NAME' | 'shards:DIR' | 'folder:DIR'
  c.data.train_split = "train"
  c.data.train_fraction = 1.0  # train on the first fraction of data.train (the same subset for every seed); evals see all
  c.data.eval = "procedural"
  c.data.eval_split = "original"
  c.data.data_dir = _optional_str()  # TFDS data_dir
  c.data.cache_dir = _optional_str()  # class-name caption embeddings; default DATA_DIR/xsample_caption_emb or WORKDIR
  c.data.template = "a photo of a {}"  # class-name caption of label datasets
  c.data.class_names = _optional_str()  # data.train's class names, a file of one per line in label order (where the
  #   dataset's own names are codes or placeholders: '0'..'9', '/a/abbey', ...)
  c.data.unlabelled = "error"  # tfds examples with label -1 (e.g. stl10 'unlabelled'): 'error' | 'instance' (each its own caption)
  c.data.num_workers = -1  # grain worker processes (augmentation runs there); 0: threads of the training process;
  #   -1: by the host's cores (pipeline.default_num_workers: none up to 4 cores, then one per two, at most 16)
  c.data.read_threads = -1  # threads reading and augmenting, in the training process or in each worker (0: the
  #   thread asking for the batch reads); -1: pipeline.default_read_threads (0 in the training process of a host
  #   of up to 4 cores, where the prefetch thread reads, else 8)
  c.data.prefetch_priority = "idle"  # the thread assembling the next training batches (Linux): 'idle' (SCHED_IDLE:
  #   it runs on the cores the step leaves idle), 'low' (nice 19) or 'normal' (where the step keeps every core busy
  #   and waits for data)
  c.data.allow_incomplete_shards = False  # shards:DIR that make_shards has not finished: refused unless True
  c.data.strict = False  # True: a bad record stops training instead of being skipped and counted
  c.data.max_bad_in_a_row = 1000  # stop when this many records in a row are bad (a dataset-wide problem) ...
  c.data.max_bad_fraction = 0.5  # ... or when more than this fraction of the records read are bad
  c.data.procedural_examples = 50_000  # size of the embedded dataset's training split
  c.data.procedural_image_size = 64  # its rendering resolution (crops are resized to image_size)
  c.data.procedural_keep_mb = 256  # keep its training split in memory once rendered, if it fits (smoke: 57 MB;
  #   rendered in a background thread while XLA compiles the step; 0: render on every read)
  c.data.context_length = 32  # caption tokens for text towers

  c.augment = ml_collections.ConfigDict()
  c.augment.crop_scale = (0.08, 1.0)
  c.augment.jitter_strength = 1.0
  c.augment.jitter_prob = 0.8
  c.augment.grayscale_prob = 0.2
  c.augment.blur_prob = 0.5
  c.augment.solarize_prob = 0.0

  c.model = ml_collections.ConfigDict()
  c.model.variant = "resnet50"
  c.model.head = (2048, 2048, 128)  # projection-head widths; the last is the embedding the loss sees
  c.model.head_bn = True
  c.model.zero_init_residual = True  # ResNets: each block starts as the identity
  c.model.bn_momentum = 0.9
  c.model.stem = _optional_str()  # ResNets: 'imagenet' | 'cifar'; None: the variant's own
  c.model.pool = "gap"  # ViTs: 'gap' | 'cls'
  c.model.dtype = "float32"  # compute dtype; 'bfloat16' keeps float32 parameters and optimizer state
  c.model.text = "text_b"  # text tower of the image-text losses
  c.model.text_pool = "last"

  c.loss = ml_collections.ConfigDict()
  c.loss.name = "xclr"  # 'xclr' | 'simclr' | 'supcon' | 'clip' | 'siglip' | 'xclr_cross_modal'
  c.loss.temperature = 0.1  # tau of the image logits (CLIP / SigLIP: the learnable scale's initial 1 / tau)
  c.loss.target_temperature = 0.1  # tau_s of the target graph
  c.loss.graph = "auto"  # X-CLR graph: 'caption' (caption embeddings), 'class' (K x K table), 'auto'
  c.loss.impl = "auto"  # 'dense' | 'blockwise' | 'auto'
  c.loss.mask_self = True
  c.loss.siglip_bias = -10.0  # SigLIP's initial bias

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "lars"  # 'lars' | 'adamw' | 'sgd'
  c.optimizer.lr = 0.3  # peak learning rate, per `lr_batch` images when lr_batch > 0
  c.optimizer.lr_batch = 256  # lr scales linearly with batch_size / lr_batch (SimCLR); 0: lr is absolute
  c.optimizer.warmup_steps = 0
  c.optimizer.end_lr_fraction = 0.0  # cosine decay ends at this fraction of the peak
  c.optimizer.weight_decay = 1e-6  # never on biases and norm parameters
  c.optimizer.momentum = 0.9  # LARS / SGD
  c.optimizer.trust_coefficient = 1e-3  # LARS
  c.optimizer.b1 = 0.9  # AdamW
  c.optimizer.b2 = 0.999
  c.optimizer.eps = 1e-8
  c.optimizer.grad_clip_norm = 0.0  # 0: no clipping

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # -1: every device not used by 'model'
  c.mesh.model = 1
  c.partitioning = "replicate"  # 'replicate' | 'fsdp'

  c.init = ml_collections.ConfigDict()
  c.init.checkpoint = _optional_str()  # a run's workdir (or its checkpoints/ dir): start from its model
  c.init.backbone = _optional_str()  # an .npz of image-tower parameters (`xsample_jax.train.save_backbone`)

  c.evals = ml_collections.ConfigDict()  # name -> settings, e.g. evals.linear_probe = {...}

  c.debug = ml_collections.ConfigDict()
  c.debug.inject_nonfinite_steps = ()  # fault testing: the loss and gradients of these steps (1-based) become NaN
  return c


def linear_probe(train_examples: int = 10_000, eval_examples: int = 10_000, label: str = "label", train_data: str = "", train_split: str = "",
                 eval_data: str = "", eval_split: str = "") -> ml_collections.ConfigDict:
  """A linear probe on frozen backbone features (un-augmented: resize + centre crop), fitted on the first
  `train_examples` of train_data and scored on eval_data; empty data/split strings mean the run's data.train /
  data.eval and their splits."""
  return ml_collections.ConfigDict(dict(train_examples=train_examples, eval_examples=eval_examples,
                                        label=label, train_data=train_data,
                                        train_split=train_split, eval_data=eval_data, eval_split=eval_split))


def parse_arg(arg: str | None, **defaults):
  """'runlocal,loss=simclr' -> ConfigDict(runlocal=True, loss='simclr', ...) over `defaults` (big_vision's form).

  A bare name is a True flag; NAME=VALUE takes the default's type. Unknown names are refused.
  """
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    name, eq, value = item.partition("=")
    if name not in defaults:
      raise ValueError(f"unknown config argument {name!r}; valid: {', '.join(sorted(defaults))}")
    kind = type(defaults[name])
    if not eq:
      if kind is not bool:
        raise ValueError(f"config argument {name!r} needs a value: {name}=...")
      out[name] = True
    elif kind is bool:
      out[name] = value.lower() in ("1", "true", "yes")
    else:
      out[name] = kind(value)
  return out


def runlocal(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Shrinks any config to a few CPU steps (big_vision's `runlocal`): the same code paths at toy sizes."""
  c.total_steps, c.batch_size, c.image_size = 4, 8, 64
  c.log_every_steps, c.checkpoint_every_steps = 1, 2
  c.optimizer.warmup_steps = 1
  c.data.num_workers = 0
  c.model.dtype = "float32"
  c.progress_bar = False
  c.eval_batch_size = 16
  for name in c.evals:
    c.evals[name].train_examples, c.evals[name].eval_examples = 64, 32
  return c


def vit(c: ml_collections.ConfigDict, variant: str) -> ml_collections.ConfigDict:
  """A ViT tower with the AdamW recipe of MoCo v3 / DINO-style ViT pretraining (lr 1.5e-4 per 256 images)."""
  c.model.variant = variant
  c.optimizer.name = "adamw"
  c.optimizer.lr, c.optimizer.lr_batch = 1.5e-4, 256
  c.optimizer.weight_decay = 0.1
  c.optimizer.b2 = 0.95
  c.optimizer.grad_clip_norm = 1.0
  return c
