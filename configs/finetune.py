"""Refines a pretrained backbone with X-CLR (the paper's fine-tuning of existing models with the soft graph).

  # from another run of this codebase (its model; a fresh optimizer):
  python -m xsample_jax.main --config configs/finetune.py:init=gs://BUCKET/runs/simclr_in1k \\
      --workdir gs://BUCKET/runs/simclr_in1k+xclr
  # from a backbone-only parameter file (`xsample_jax.train.save_backbone`, e.g. converted weights):
  python -m xsample_jax.main --config configs/finetune.py:backbone=/path/resnet50.npz --workdir runs/ft

Arguments: init=DIR or backbone=FILE (one of them), epochs=10, batch=1024, variant, runlocal. The data, loss and
head follow configs/imagenet.py:loss=xclr; the learning rate is a tenth of pretraining's, with a short warmup.
"""
from configs import common, imagenet


def get_config(arg=None):
  arg = common.parse_arg(arg, init="", backbone="", epochs=10, batch=1024, variant="resnet50", runlocal=False)
  if bool(arg.init) == bool(arg.backbone):
    raise ValueError("finetune.py needs exactly one of init=RUN_DIR and backbone=FILE.npz")
  c = imagenet.get_config(f"loss=xclr,variant={arg.variant},epochs={arg.epochs},batch={arg.batch}")
  c.init.checkpoint = arg.init or None
  c.init.backbone = arg.backbone or None
  c.optimizer.lr /= 10
  c.optimizer.warmup_steps = c.total_steps // 20
  return common.runlocal(c) if arg.runlocal else c
