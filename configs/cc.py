"""CC3M / CC12M pretraining with each image's own alt-text caption as its graph input (the paper's second setup):
X-CLR against CLIP and SimCLR trained on the same image-caption pairs.

  python -m xsample_jax.main --config configs/cc.py:data=cc3m,loss=xclr --workdir gs://BUCKET/runs/xclr_cc3m \\
      --config.data.train=shards:/mnt/data/cc3m --config.data.data_dir=gs://BUCKET/tensorflow_datasets

`data.train` is a directory of caption shards written by `python -m xsample_jax.tools.make_shards` (images,
captions and their frozen sentence embeddings). Arguments: data=cc3m|cc12m, loss=xclr|clip|simclr|siglip|
xclr_cross_modal, variant=resnet50|vit_b16|vit_s16, epochs, batch, runlocal. The image-text losses add a text
tower (`model.text`) fed with the caption tokens. The linear probe is fitted on ImageNet (`tfds:imagenet2012`).
"""
from configs import common

IMAGES = {"cc3m": 2_900_000, "cc12m": 10_000_000}  # about what img2dataset retrieves today
EPOCHS = {"cc3m": 40, "cc12m": 15}


def get_config(arg=None):
  arg = common.parse_arg(arg, data="cc3m", loss="xclr", variant="resnet50", epochs=0, batch=1024, runlocal=False)
  if arg.data not in IMAGES:
    raise ValueError(f"data={arg.data!r}: use one of {sorted(IMAGES)}")
  epochs = arg.epochs or EPOCHS[arg.data]
  c = common.base()
  c.batch_size = arg.batch
  c.total_steps = epochs * IMAGES[arg.data] // arg.batch
  c.log_every_steps = 100
  c.checkpoint_every_steps = 2000
  c.data.train, c.data.train_split = f"shards:/mnt/data/{arg.data}", "train"
  c.data.eval, c.data.eval_split = "tfds:imagenet2012", "validation"
  c.model.dtype = "bfloat16"
  c.model.text = "text_b"
  c.loss.name = arg.loss
  c.loss.graph = "caption"
  if arg.loss in ("clip", "siglip", "xclr_cross_modal"):
    # CLIP's recipe: a linear projection to a shared 512-d space, AdamW, learnable temperature from 1 / 0.07.
    c.model.head = (512,)
    c.model.head_bn = False
    c.loss.temperature = 0.07 if arg.loss == "clip" else 0.1
    c.augment.crop_scale = (0.5, 1.0)
    c.augment.jitter_prob = c.augment.grayscale_prob = c.augment.blur_prob = 0.0
    c.optimizer.name = "adamw"
    c.optimizer.lr, c.optimizer.lr_batch = 5e-4, 0
    c.optimizer.weight_decay, c.optimizer.b2 = 0.1, 0.98
  else:
    c.optimizer.name = "lars"
    c.optimizer.lr, c.optimizer.lr_batch = 0.3, 256
  c.optimizer.warmup_steps = min(10_000, c.total_steps // 10)
  if arg.variant != "resnet50":
    common.vit(c, arg.variant)
  c.evals.linear_probe = common.linear_probe(train_examples=260_000, eval_examples=50_000,
                                             train_data="tfds:imagenet2012", train_split="train")
  return common.runlocal(c) if arg.runlocal else c
