"""The entry point, the same on a laptop, a CPU box and every TPU worker.

  python -m xsample_jax.main --config configs/smoke.py --workdir runs/smoke [--config.KEY=VALUE ...]

Rerunning the same command resumes from the latest checkpoint in the workdir. A config arg follows the file after a
colon (`configs/imagenet.py:loss=simclr,runlocal`). Exit status 0 also after a SIGTERM (the run saved and can resume).
Several processes (TPU pod slices, SLURM, launch/local.sh) join through jax.distributed: see --distributed.
"""
from __future__ import annotations


from absl import app, flags
from ml_collections import config_flags

from xsample_jax import cli

config_flags.DEFINE_config_file("config", None, "config file, optionally with ':arg'", lock_config=True)
flags.DEFINE_string("workdir", None, "checkpoints, metrics.jsonl and TensorBoard events go here (local or gs://)")
flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                  "join the other processes with jax.distributed.initialize(): 'on' (TPU pod slices, SLURM: the "
                  "cluster is detected), 'auto' (when JAX_COORDINATOR_ADDRESS is set, as launch/local.sh does, or "
                  "SLURM started several tasks), 'off'")
flags.DEFINE_integer("coordinator_timeout_s", 300, "how long the processes may take to find each other at start")
flags.DEFINE_integer("heartbeat_timeout_s", 30,
                     "a process silent this long counts as dead, and the others stop with an error instead of hanging")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  cli.init_distributed(f.distributed, f.coordinator_timeout_s, f.heartbeat_timeout_s)
  import jax

  from xsample_jax import train
  out = cli.run_checked(train.train_and_evaluate, flags.FLAGS.config, flags.FLAGS.workdir)
  if jax.process_index() != 0:  # process 0 speaks for the run
    return
  if out.get("preempted"):
    print(f"preempted at step {out['step']}: checkpoint saved in {flags.FLAGS.workdir}; rerun to resume")
    return
  summary = f"done: {out['step']} steps" + (f", final loss {out['loss']:.4f}" if "loss" in out else "")
  for key, name in (("eval/linear_probe/top1", "linear probe top-1"), ("eval/fewshot/10shot", "10-shot"),
                    ("eval/knn/top1", "k-NN top-1")):
    if key in out:
      summary += f", {name} {100 * out[key]:.1f}%"
  print(summary + f" (workdir {flags.FLAGS.workdir})")


if __name__ == "__main__":
  cli.use_huge_pages()
  app.run(main, flags_parser=cli.parse_flags)
