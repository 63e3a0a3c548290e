"""ImageNet-1k pretraining as in the paper: ResNet-50 + 2048-2048-128 head, SimCLR augmentations, LARS, with the
class-name graph ("a photo of a {class}": a 1000 x 1000 similarity table, looked up by label).

  python -m xsample_jax.main --config configs/imagenet.py:loss=xclr --workdir gs://BUCKET/runs/xclr_in1k \\
      --config.data.data_dir=gs://BUCKET/tensorflow_datasets

Arguments (comma-separated): loss=xclr|simclr|supcon, variant=resnet50|vit_b16|vit_s16 (ViTs switch to AdamW),
epochs=100, batch=1024, runlocal (a few CPU steps: checks the config end to end, e.g. on TFDS mock data).
The linear probe at the end is fitted on 260k training images (a fifth of the train split) and scored on the
50k validation images. Expect several days on a v4-32 slice at 100 epochs. The paper's other test sets, on any
saved checkpoint:

  python -m xsample_jax.evaluate --workdir DIR --eval linear_probe \
      --config.evals.linear_probe.eval_data=tfds:imagenet2012_real      # ReaL labels: real_top1
  python -m xsample_jax.evaluate --workdir DIR --eval objectnet --config.evals.objectnet.folder=/data/objectnet-1.0
  python -m xsample_jax.evaluate --workdir DIR --eval background --config.evals.background.folder=/data/bg_challenge
"""
from configs import common

TRAIN_IMAGES = 1_281_167


def get_config(arg=None):
  arg = common.parse_arg(arg, loss="xclr", variant="resnet50", epochs=100, batch=1024, runlocal=False)
  c = common.base()
  c.batch_size = arg.batch
  c.total_steps = arg.epochs * TRAIN_IMAGES // arg.batch
  c.image_size = 224
  c.log_every_steps = 100
  c.checkpoint_every_steps = 2000
  c.data.train, c.data.train_split = "tfds:imagenet2012", "train"
  c.data.eval, c.data.eval_split = "tfds:imagenet2012", "validation"
  c.model.head = (2048, 2048, 128)
  c.model.dtype = "bfloat16"
  c.loss.name = arg.loss
  c.loss.graph = "class"
  c.optimizer.name = "lars"
  c.optimizer.lr, c.optimizer.lr_batch = 0.3, 256  # SimCLR: 0.3 x batch / 256
  c.optimizer.weight_decay = 1e-6
  c.optimizer.warmup_steps = 10 * TRAIN_IMAGES // arg.batch  # 10 epochs
  if arg.variant != "resnet50":
    common.vit(c, arg.variant)
  c.evals.linear_probe = common.linear_probe(train_examples=260_000, eval_examples=50_000)
  return common.runlocal(c) if arg.runlocal else c
