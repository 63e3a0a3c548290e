"""Does the train step wait for data? The trainer's step fed by the real input pipeline vs the same step on one
in-memory batch, in one process.

    python -m benchmarks.pipeline_bench                       # smoke (40 rounds of 4 steps) and jpeg224 (3 of 10)
    python -m benchmarks.pipeline_bench --cases smoke --rounds 80
    python -m benchmarks.pipeline_bench --cases smoke smoke_in_ram smoke_geometric   # where the smoke ratio goes
    python -m benchmarks.pipeline_bench --cases smoke smoke_replay    # the pipeline's work vs its mechanics

Cases:
  smoke:   configs/smoke.py as it is: the procedural default rendered at 48 px, two 32 px views, resnet_tiny, 64 images.
  smoke_in_ram: the same, with every training image rendered into memory before timing, so the pipeline's work is
           everything but the rendering (shuffle, two views, collation, the copy to the device);
  smoke_geometric: smoke_in_ram without the colour jitter and grayscale (augment.jitter_prob and grayscale_prob 0):
           crops and flips only. The two show what the rendering and the colour passes cost the fed step.
  smoke_replay: smoke, with the prefetch thread cycling through 8 batches the pipeline made before timing: the
           thread only makes them global arrays (one copy to the device a batch), so the fed step pays the pipeline's
           mechanics (the thread, the queue, the copy, fresh input buffers every step) and none of its work. The
           smoke ratio's floor: what no cut in the pipeline's CPU can go below.
  jpeg224: configs/cc.py (data=cc3m, loss=xclr) on caption shards of 256 px JPEGs written here with the project's
           writer (benchmarks/input_bench._jpeg_shards), two 224 px views; --model and --batch (default ResNet-18,
           8 images: a few seconds a step on a 2-core CPU), float32 (bfloat16 is the TPU setting).
Both use the config's own data.num_workers and data.read_threads (the defaults, -1, resolve to
`pipeline.default_num_workers()` and `pipeline.default_read_threads()` for this host) and the config's mesh over the
host's devices.

Per case, the step (`train.make_train_step`) runs in alternating phases, --rounds of each:
  in-memory: the first pipeline batch, already on device, every step;
  pipeline:  as the training loop does it: dispatch the step, fetch the next batch (`train.train_iterator` over the
             real source; the time blocked in next(it) is the data wait), dispatch the next step.
Like the loop, which syncs with the device at its log steps only (every 10 steps at the smoke setting), a phase
blocks on the last step's outputs (--sync phase); its time over its steps is each step's. --sync step blocks after
every step instead, so each step is timed on its own and a step's dispatch waits for the host thread (a pipeline
thread holding the GIL then delays it, which the loop's queued dispatches hide).
An in-memory phase runs --warmup untimed steps (caches settle after the switch), then --steps timed ones; a
pipeline phase runs --steps timed ones, then waits until the prefetch thread has caught up (assembled every batch it
may hold: `Prefetch.ready()`), and that wait, spread over the phase's steps, counts as theirs. So every phase starts
with a full read-ahead and leaves no pipeline work to the next one: with the thread at low priority on a busy host it
lags the step, and the read-ahead it then refills during an in-memory phase would otherwise be charged there.
Short phases, many of them: this kind of host's speed drifts by 10-40% over seconds, more than the pipeline's share
of the step, so only finely interleaved phases see the same host. One JSON line per case: medians of the per-step
wall times, their ratio (target <= 1.05) with a 90% bootstrap interval over rounds (`ratio_ci90`: rounds resampled
with replacement, the ratio of the pooled medians each time), each round's own ratio, and the data-wait fraction,
sum of waits / sum of pipeline step times (target <= 0.05). A wait counts there even while the step it overlaps is
still running, so the line also gives the device-idle fraction: the part of each wait after the step had finished
(`train.StepWatch` notes when its outputs are ready), the time the step really waited for data: the trainer's
logged `data_wait`, by the trainer's own code (`train._next_batch`); the trainer's `data_wait_fraction` is this
device-idle fraction, not the blocked-in-next one. Like the
trainer's entry point, the benchmark restarts itself with glibc's malloc on transparent huge pages
(`cli.use_huge_pages`; XSAMPLE_HUGE_PAGES=0 turns it off).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import tempfile
import time

import jax
import numpy as np

from benchmarks import input_bench
from configs import cc, smoke
from xsample_jax import cli, sharding, train
from xsample_jax.data import pipeline


def smoke_case(args, tmp):
  del args, tmp
  config = smoke.get_config()
  return config, train.get_source(config, config.data.train, config.data.train_split)


class InMemory:
  """A source's elements, all read once up front (the pipeline's reads become dict copies)."""

  def __init__(self, source):
    self.elements = [source[i] for i in range(len(source))]

  def __len__(self):
    return len(self.elements)

  def __getitem__(self, index):
    return dict(self.elements[index])


def smoke_in_ram_case(args, tmp):
  config, source = smoke_case(args, tmp)
  return config, InMemory(source)


def smoke_geometric_case(args, tmp):
  config, source = smoke_in_ram_case(args, tmp)
  config.augment.jitter_prob = config.augment.grayscale_prob = 0.0
  return config, source


def jpeg224_case(args, tmp):
  config = cc.get_config("data=cc3m,loss=xclr")
  config.data.train = f"shards:{tmp}"
  config.batch_size = args.batch
  config.model.variant = args.model
  config.model.dtype = "float32"
  return config, input_bench._jpeg_shards(tmp, args.records)


class Replay:
  """Cycles through NumPy batches made before timing; next() makes one global arrays, as the pipeline's last stage
  does (an iterator `pipeline.Prefetch` can run)."""
  skipped = 0

  def __init__(self, batches, target):
    self._batches, self._sharding, self._n = batches, target, 0

  def __next__(self):
    self._n += 1
    return jax.make_array_from_process_local_data(self._sharding, self._batches[self._n % len(self._batches)])

  def get_state(self):
    return {"replayed": self._n}

  def metrics(self):
    return {}

  def close(self):
    pass


def step_and_state(config, mesh, source):
  """The trainer's jitted step for `config` (its loss with the source's class table) and a fresh state."""
  graphdef, _, shardings = train.abstract_state(config, mesh)
  loss_fn = train.make_loss_fn(config, mesh, train.class_table(config, source, mesh))
  return train.make_train_step(config, graphdef, shardings, mesh, loss_fn), train.init_state(config, shardings)


def replay_iterator(config, source, mesh, batches=8):
  numpy_it = train.train_iterator(config, source, None)  # no mesh: process-local NumPy batches
  kept = [next(numpy_it) for _ in range(batches)]
  numpy_it.close()
  return pipeline.Prefetch(Replay(kept, sharding.batch_sharding(mesh)), priority=config.data.prefetch_priority)


CASES = {"smoke": smoke_case, "smoke_in_ram": smoke_in_ram_case, "smoke_geometric": smoke_geometric_case,
         "smoke_replay": smoke_case, "jpeg224": jpeg224_case}
# Default (rounds, timed steps per phase): a smoke step takes ~0.2 s on 2 cores, a jpeg224 one a few seconds.
ROUNDS_STEPS = {"smoke": (40, 4), "smoke_in_ram": (40, 4), "smoke_geometric": (40, 4), "smoke_replay": (40, 4),
                "jpeg224": (3, 10)}


def _host_busy() -> tuple[float, float]:
  """(busy, total) CPU seconds of the whole host since boot (/proc/stat), to tell how loaded it was."""
  with open("/proc/stat") as f:
    ticks = [int(v) for v in f.readline().split()[1:9]]
  hz = os.sysconf("SC_CLK_TCK")
  return (sum(ticks) - ticks[3] - ticks[4]) / hz, sum(ticks) / hz


def _chunks(xs, n):
  return [xs[i:i + n] for i in range(0, len(xs), n)]


def _bootstrap_ratio(fed_rounds, mem_rounds, draws=2000, seed=0) -> list[float]:
  """5th and 95th percentiles of median(fed) / median(mem) over rounds resampled with replacement (a round keeps
  its two phases together: they ran on the same host seconds apart)."""
  rng = np.random.default_rng(seed)
  fed, mem = np.asarray(fed_rounds), np.asarray(mem_rounds)  # [rounds, steps]
  picks = rng.integers(0, len(fed), (draws, len(fed)))
  ratios = [np.median(fed[p]) / np.median(mem[p]) for p in picks]
  return [round(float(q), 3) for q in np.percentile(ratios, [5, 95])]


def _catch_up(it, timeout=120.0) -> float:
  """Seconds until the prefetch thread has assembled every batch it may hold and waits for room, so no pipeline work
  is left over for the next phase."""
  t0 = time.perf_counter()
  while it.ready() < it.size + 1:
    if time.perf_counter() - t0 > timeout:
      raise RuntimeError(f"the prefetch thread holds {it.ready()} batches after {timeout} s (it holds {it.size + 1} "
                         "when caught up): the pipeline stalled or ended")
    time.sleep(0.0005)
  return time.perf_counter() - t0


def _own_cpu() -> float:
  t = os.times()
  return t.user + t.system


def bench_case(name, args):
  with tempfile.TemporaryDirectory() as tmp:
    config, source = CASES[name](args, tmp)
    if args.read_threads is not None:
      config.data.read_threads = args.read_threads
    for setting in args.set:  # KEY=VALUE, the value in the type the config gives the key
      key, _, value = setting.partition("=")
      old = functools.reduce(lambda node, name: node[name], key.split("."), config)
      config.update_from_flattened_dict({key: type(old)(value)})
    train.check_config(config)
    mesh = train.make_mesh(config)
    step, state = step_and_state(config, mesh, source)
    it = (replay_iterator if name == "smoke_replay" else train.train_iterator)(config, source, mesh)
    rendering = getattr(source, "prerender", lambda: None)()
    if rendering is not None:  # the trainer's background render of the procedural split: done before timing,
      rendering.join()  # or it takes CPU from the first rounds' phases (their in-memory steps most)
    t0 = time.perf_counter()
    batch = next(it)
    first_batch = time.perf_counter() - t0
    in_memory = batch
    t0 = time.perf_counter()
    state, metrics = step(state, in_memory)
    jax.block_until_ready((state, metrics))
    first_step = time.perf_counter() - t0

    cpu = {False: 0.0, True: 0.0}  # this process's CPU seconds in the timed steps, per kind of phase
    host = {"busy": 0.0, "total": 0.0, "own": 0.0}
    watch, clock = train.StepWatch(), {"data_wait": 0.0}

    def phase(fed, n, timed=True):
      """n steps; (wall seconds per step, seconds blocked in next(it) per step, seconds of those after the step
      had finished)."""
      nonlocal state, batch
      times, waits, idle = [], [], []
      own, (busy, total) = _own_cpu(), _host_busy()
      last = time.perf_counter()
      for _ in range(n):
        if fed:
          state, metrics = step(state, batch)  # dispatched asynchronously
          watch.watch((state, metrics))
          t0, idle_before = time.perf_counter(), clock["data_wait"]
          # The host fetches the next batch while the device runs this step, as the trainer does (its own
          # accounting: data_wait grows only by the time after the step had finished).
          batch = train._next_batch(it, clock, watch)
          waits.append(time.perf_counter() - t0)
          idle.append(clock["data_wait"] - idle_before)
        else:
          state, metrics = step(state, in_memory)
        if args.sync == "step":
          jax.block_until_ready((state, metrics))
          now = time.perf_counter()
          times.append(now - last)
          last = now
      if args.sync == "phase":  # as the trainer's loop runs: the next step is dispatched while one computes
        jax.block_until_ready((state, metrics))
        times = [(time.perf_counter() - last) / n] * n
      if fed and timed:  # the pipeline's work for these steps that it has not done yet is theirs too
        catch_up = _catch_up(it)
        catch_ups.append(catch_up)
        times = [t + catch_up / n for t in times]
      if timed:
        own, (busy, total) = _own_cpu() - own, (b - a for a, b in zip((busy, total), _host_busy()))
        cpu[fed] += own
        host["busy"], host["total"], host["own"] = host["busy"] + busy, host["total"] + total, host["own"] + own
      return times, waits, idle

    _catch_up(it)
    mem, fed, waits, idles, catch_ups = [], [], [], [], []
    rounds, steps = args.rounds or ROUNDS_STEPS[name][0], args.steps or ROUNDS_STEPS[name][1]
    for _ in range(rounds):
      phase(False, args.warmup, timed=False)
      mem += phase(False, steps)[0]
      t, w, i = phase(True, steps)
      fed += t
      waits += w
      idles += i
    it.close()
    watch.close()
    m_mem, m_fed = statistics.median(mem), statistics.median(fed)
    fed_rounds, mem_rounds = _chunks(fed, steps), _chunks(mem, steps)
    workers = pipeline.resolve_num_workers(config.data.num_workers)
    return {"bench": "pipeline_vs_in_memory_step", "case": name, "model": config.model.variant,
            "batch_size": config.batch_size, "image_size": config.image_size, "data": config.data.train,
            "source_records": len(source), "num_workers": config.data.num_workers,
            "workers_used": workers, "read_threads": config.data.read_threads,
            "read_threads_used": pipeline.resolve_read_threads(config.data.read_threads, workers),
            "prefetch_priority": config.data.prefetch_priority, "procedural_keep_mb": config.data.procedural_keep_mb,
            "settings": args.set, "sync": args.sync, "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
            "devices": jax.device_count(),
            "cpus": pipeline.host_cores(), "rounds": rounds, "steps_per_phase": steps,
            "warmup_per_in_memory_phase": args.warmup, "first_batch_s": round(first_batch, 3),
            "first_step_s": round(first_step, 2), "step_time_in_memory": round(m_mem, 4),
            "step_time_pipeline": round(m_fed, 4), "ratio": round(m_fed / m_mem, 3),
            "ratio_ci90": _bootstrap_ratio(fed_rounds, mem_rounds),
            # Each round's own ratio (its phases run seconds apart): how far one ratio moves within a run.
            "ratio_by_round": [round(statistics.median(f) / statistics.median(m), 3)
                               for f, m in zip(fed_rounds, mem_rounds)],
            "catch_up_median_s": round(statistics.median(catch_ups), 4),
            "data_wait_fraction": round(sum(waits) / sum(fed), 4),
            "device_idle_fraction": round(sum(idles) / sum(fed), 4),
            "device_idle_max_s": round(max(idles), 4),
            "data_wait_median_s": round(statistics.median(waits), 4), "data_wait_max_s": round(max(waits), 4),
            "data_wait_fraction_by_round": [round(sum(w) / sum(t), 4)
                                            for w, t in zip(_chunks(waits, steps), fed_rounds)],
            "images_per_s_in_memory": round(config.batch_size / m_mem, 1),
            "images_per_s_pipeline": round(config.batch_size / m_fed, 1),
            "cpu_s_per_step_in_memory": round(cpu[False] / len(mem), 4),
            "cpu_s_per_step_pipeline": round(cpu[True] / len(fed), 4),
            # The host's other load while timing: cores' worth used by other processes (this host has `cpus`).
            "other_load_cores": round(max(0.0, host["busy"] - host["own"]) / host["total"] * os.cpu_count(), 2)}


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--cases", nargs="+", default=["smoke", "jpeg224"], choices=list(CASES))
  ap.add_argument("--rounds", type=int, default=None, help="in-memory / pipeline phase pairs (default: the case's)")
  ap.add_argument("--steps", type=int, default=None, help="timed steps per phase (default: the case's)")
  ap.add_argument("--sync", choices=["phase", "step"], default="phase",
                  help="block on the step's outputs once a phase, as the training loop does at its log steps "
                       "(each step then dispatched while the one before computes), or after every step (stricter: "
                       "each step's dispatch then also waits for the host thread)")
  ap.add_argument("--warmup", type=int, default=2, help="untimed steps at the start of each in-memory phase")
  ap.add_argument("--model", default="resnet18", help="jpeg224: the image tower")
  ap.add_argument("--batch", type=int, default=8, help="jpeg224: global images per step (two views each)")
  ap.add_argument("--records", type=int, default=512, help="jpeg224: JPEG records written")
  ap.add_argument("--read-threads", type=int, default=None, help="data.read_threads instead of the config's")
  ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                  help="a config setting for every case, e.g. data.prefetch_priority=low or data.procedural_keep_mb=0")
  ap.add_argument("--note", default="", help="free text added to every line")
  args = ap.parse_args()
  for name in args.cases:
    row = bench_case(name, args)
    if args.note:
      row["note"] = args.note
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
  cli.use_huge_pages()  # as the trainer's entry point runs
  main()
