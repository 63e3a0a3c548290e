"""The paper's comparison at CPU scale: SimCLR, SupCon, CLIP and X-CLR with one budget (steps, batch, augmentations,
tower) on the embedded procedural dataset, at 10% and 100% of its training set, over two seeds, each evaluated with
the same evaluators; plus the untrained network's features as a baseline row.

  python -m xsample_jax.tools.compare --config configs/compare.py --workdir runs/compare

Writes runs/compare/table.md (mean ± std over seeds) and results.json; a rerun skips the runs already done.
About 25 minutes on a 2-core CPU. Arguments: steps=200, seeds=2, runlocal (two methods, 3 steps: a check).
"""
import ml_collections

from configs import common, smoke


def get_config(arg=None):
  arg = common.parse_arg(arg, steps=200, seeds=2, runlocal=False)
  c = ml_collections.ConfigDict()
  c.methods = ("simclr", "supcon", "clip", "xclr")
  c.fractions = (0.1, 1.0)
  c.seeds = tuple(range(arg.seeds))
  c.random_init = True
  # Every method trains from this config; only loss.name (and the CLIP logit scale's initial value) changes.
  c.train = smoke.get_config()
  c.train.total_steps = arg.steps
  c.train.optimizer.warmup_steps = arg.steps // 10
  c.train.checkpoint_every_steps = arg.steps
  c.train.log_every_steps = 50
  c.train.progress_bar = False
  small = dict(train_examples=1024, eval_examples=512)
  c.train.evals = ml_collections.ConfigDict(dict(
      linear_probe=common.linear_probe(**small), fewshot=dict(small, shots=(1, 5, 10)), knn=dict(small, k=20),
      background=dict(small), attributes=dict(eval_examples=1024), graph_alignment=dict(eval_examples=512)))
  if arg.runlocal:
    c.methods, c.fractions, c.seeds = ("simclr", "xclr"), (0.1,), (0,)
    c.train.total_steps, c.train.optimizer.warmup_steps, c.train.checkpoint_every_steps = 3, 1, 3
    c.train.batch_size, c.train.image_size = 16, 16
    c.train.data.procedural_examples = 512
    for e in c.train.evals.values():
      for key in ("train_examples", "eval_examples"):
        if key in e:
          e[key] = min(e[key], 128)
    c.train.evals.fewshot.shots = (1, 5)
  return c
