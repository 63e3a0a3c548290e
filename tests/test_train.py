"""The trainer: the sharded step equals the single-device step, config errors, restore onto another mesh.

The end-to-end runs through the entry point (determinism, SIGTERM / kill -9 and resume) are in test_train_e2e.py.
"""
import json
import re
import shutil

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

from configs import common, smoke
from tests.helpers import tiny_config
from xsample_jax import sharding, train
from xsample_jax.data import augment, pipeline


def host_batch(config):
  """One global training batch as NumPy (a single process reads the whole batch)."""
  src = train.get_source(config, config.data.train, config.data.train_split)
  tok = train.tokenize_fn(config) if config.loss.name in train.TEXT_LOSSES else None
  aug = augment.SimCLRAugment(size=config.image_size)
  ds = pipeline.train_dataset(src, global_batch_size=config.batch_size, augment=aug, seed=0, tokenize_fn=tok)
  return next(iter(ds))


def one_step(config, devices, batch):
  config = ml_collections.ConfigDict(config)
  config.mesh.data = devices
  mesh = train.make_mesh(config)
  graphdef, _, shardings = train.abstract_state(config, mesh)
  state = train.init_state(config, shardings)
  step = train.make_train_step(config, graphdef, shardings, mesh, train.make_loss_fn(config, mesh, None))
  placed = {k: jax.device_put(v, sharding.batch_sharding(mesh)) for k, v in batch.items()}
  new_state, metrics = step(state, placed)
  specs = {str(x.sharding.spec) for x in jax.tree.leaves(new_state)}
  return jax.device_get(new_state), jax.device_get(metrics), specs


@pytest.mark.parametrize("loss", ["xclr", "clip"])
@pytest.mark.parametrize("partitioning", ["replicate", "fsdp"])
def test_sharded_step_equals_single_device_step(loss, partitioning):
  # SGD: its update is proportional to the gradient, so parameter differences show gradient differences
  # (Adam's first step is ~lr * sign(g) and would amplify rounding on near-zero gradients).
  config = tiny_config(loss, partitioning=partitioning, **{"optimizer.name": "sgd", "optimizer.lr": 0.1,
                                                           "optimizer.warmup_steps": 0, "model.head": (256, 512)})
  batch = host_batch(config)
  state8, m8, specs8 = one_step(config, 8, batch)
  state1, m1, _ = one_step(config, 1, batch)
  if partitioning == "fsdp":
    assert any("data" in s for s in specs8), specs8  # something really is split over the 8 devices
  np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5)
  np.testing.assert_allclose(m8["grad_norm"], m1["grad_norm"], rtol=1e-4)
  leaves8, _ = jax.tree_util.tree_flatten_with_path(state8)
  for (path, a), b in zip(leaves8, jax.tree.leaves(state1)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("loss", train.LOSSES)
def test_every_loss_trains_a_few_steps(loss, tmp_path):
  out = train.train_and_evaluate(tiny_config(loss, total_steps=3, checkpoint_every_steps=3), str(tmp_path))
  assert out["step"] == 3 and np.isfinite(out["loss"])
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert len(lines) == 3


def test_bfloat16_compute_keeps_float32_parameters_and_optimizer_state(tmp_path):
  config = tiny_config(total_steps=3, checkpoint_every_steps=3, **{"model.dtype": "bfloat16"})
  out = train.train_and_evaluate(config, str(tmp_path))
  assert np.isfinite(out["loss"])
  ts = nnx.merge(out["graphdef"], out["state"])
  assert {x.dtype for x in jax.tree.leaves(nnx.state(ts.model, nnx.Param))} == {np.dtype("float32")}
  assert {x.dtype for x in jax.tree.leaves(ts.optimizer.opt_state)} <= {np.dtype("float32"), np.dtype("int32")}


def test_restore_on_a_smaller_mesh_and_continue(tmp_path, caplog):
  config = tiny_config(total_steps=4, checkpoint_every_steps=4)
  first = train.train_and_evaluate(config, str(tmp_path))
  saved = jax.device_get(first["state"])
  # The same workdir on a 4-device mesh: restores the 8-device checkpoint and, at total_steps, changes nothing.
  config4 = tiny_config(total_steps=4, checkpoint_every_steps=4, **{"mesh.data": 4})
  again = train.train_and_evaluate(config4, str(tmp_path))
  assert "mesh.data: -1 -> 4" in caplog.text  # the resumed run says how its config differs from the saved one
  leaves = jax.tree.leaves(again["state"])
  assert {x.sharding.mesh.devices.size for x in leaves} == {4}
  for a, b in zip(leaves, jax.tree.leaves(saved)):
    np.testing.assert_array_equal(np.asarray(a), b)
  # ... and continues there.
  config4.total_steps = 6
  more = train.train_and_evaluate(config4, str(tmp_path))
  assert more["step"] == 6 and np.isfinite(more["loss"])


def test_a_data_state_of_the_older_pipeline_restarts_the_stream_at_the_global_batch_reached(tmp_path, caplog):
  train.train_and_evaluate(tiny_config(total_steps=3, checkpoint_every_steps=3), str(tmp_path))
  saved = tmp_path / "checkpoints" / "3" / "data" / "process_0-of-1.json"
  state = json.loads(saved.read_text())
  assert state["rows_used"] == 0
  del state["rows_used"]  # as the pipeline wrote it before grain elements carried several examples
  saved.write_text(json.dumps(state))
  more = train.train_and_evaluate(tiny_config(total_steps=5, checkpoint_every_steps=3), str(tmp_path))
  assert "saved by an older version of the input pipeline" in caplog.text and "global batch 3" in caplog.text
  assert more["step"] == 5 and np.isfinite(more["loss"])


BAD_CONFIGS = [
    ({"total_steps": 0}, "config.total_steps: must be > 0"),
    ({"batch_size": 3}, "config.batch_size: the 6 rows .* do not split over mesh.data=8"),
    ({"model.variant": "resnet51"}, "config.model.variant: unknown image tower 'resnet51'"),
    ({"loss.name": "infonce"}, "config.loss.name: unknown loss 'infonce'"),
    ({"data.train": "imagefolder:/x"}, "config.data.train: unknown data source"),
    ({"loss.temperature": 0.0}, "config.loss.temperature: must be > 0"),
    ({"loss.target_temperature": -1.0}, "config.loss.target_temperature: must be > 0"),
    ({"optimizer.name": "lamb"}, "config.optimizer.name: unknown optimizer 'lamb'"),
    ({"partitioning": "tp"}, "config.partitioning: must be one of"),
    ({"mesh.model": 3}, "config.mesh.model: 3 does not divide the 8 devices"),
    ({"mesh.data": 16}, "config.mesh.data: data=16 x model=1 needs more than the 8 devices"),
    ({"data.train": "folder:/no/such/dir"}, "config.data.train: 'folder:/no/such/dir' cannot be read"),
    ({"data.train": "tfds:no_such_dataset"}, "config.data.train: 'tfds:no_such_dataset' cannot be read"),
    ({"data.num_workers": -2}, r"config.data.num_workers: must be >= 0 .* or -1 \(by the host's cores\), got -2"),
    ({"data.read_threads": -2}, "config.data.read_threads: must be >= 0, or -1"),
    ({"data.prefetch_priority": "high"}, r"config.data.prefetch_priority: must be one of .*, got 'high'"),
    ({"data.procedural_keep_mb": -1}, "config.data.procedural_keep_mb: must be >= 0"),
    ({"cpu_matmuls": "mkl"}, "config.cpu_matmuls: unknown 'mkl'; valid: auto, eigen, ynnpack"),
    ({"profile_steps": (3, 0)}, r"config.profile_steps: must be \(first step, count\), both >= 1, or \(0, 0\)"),
    ({"peak_tflops": 0.0}, r"config.peak_tflops: must be > 0 \(one device's peak TFLOP/s\) or None"),
]


@pytest.mark.parametrize("changes,message", BAD_CONFIGS)
def test_config_errors_name_the_key_and_leave_the_workdir_untouched(changes, message, tmp_path):
  workdir = tmp_path / "run"
  with pytest.raises(train.ConfigError, match=message):
    train.train_and_evaluate(tiny_config(**changes), str(workdir))
  assert not workdir.exists()


AVX2_CPUINFO = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse sse2 avx fma avx2 bmi2\n"
AVX512_CPUINFO = "processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu sse sse2 avx avx2 avx512f avx512bw\n"
ARM_CPUINFO = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes sha2 crc32 atomics\nCPU implementer\t: 0x41\n"


def test_cpu_matmuls_choose_xla_cpus_kernels_by_host():
  eigen = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}
  assert [train.x86_avx512(t) for t in (AVX2_CPUINFO, AVX512_CPUINFO, ARM_CPUINFO, "")] == [False, True, None, None]
  assert train.compiler_options("auto", "cpu", AVX2_CPUINFO, local_devices=1) == eigen
  assert train.compiler_options("auto", "cpu", AVX2_CPUINFO, local_devices=8) is None  # these tests' fake devices
  assert train.compiler_options("eigen", "cpu", AVX2_CPUINFO, local_devices=8) == eigen
  assert train.compiler_options("auto", "cpu", AVX512_CPUINFO, local_devices=1) is None  # XLA's own choice
  assert train.compiler_options("auto", "cpu", ARM_CPUINFO, local_devices=1) is None
  assert train.compiler_options("eigen", "cpu", AVX512_CPUINFO) == eigen
  assert train.compiler_options("ynnpack", "cpu", AVX2_CPUINFO) is None
  assert train.compiler_options("eigen", "gpu") is None and train.compiler_options("auto", "tpu") is None


def test_cpu_matmuls_reach_xla_and_leave_the_step_unchanged():
  """'eigen' compiles the step with no dot or convolution in a YNNPACK fusion, 'ynnpack' with some, and both
  compute the same step on 8 devices."""
  config = tiny_config(**{"optimizer.name": "sgd", "optimizer.lr": 0.1, "optimizer.warmup_steps": 0})
  batch = host_batch(config)
  out = {}
  for setting in ("eigen", "ynnpack"):
    config.cpu_matmuls = setting
    mesh = train.make_mesh(config)
    graphdef, _, shardings = train.abstract_state(config, mesh)
    state = train.init_state(config, shardings)
    step = train.make_train_step(config, graphdef, shardings, mesh, train.make_loss_fn(config, mesh, None))
    placed = {k: jax.device_put(v, sharding.batch_sharding(mesh)) for k, v in batch.items()}
    hlo = step.lower(state, placed).compile().as_text()
    ynn = set(re.findall(r"calls=(%[\w.\-]+),[^\n]*__ynn_fusion", hlo))
    ynn_bodies = [c for c in hlo.split("\n\n") if c.split(" ", 1)[0] in ynn]
    out[setting] = (sum(" dot(" in c or " convolution(" in c for c in ynn_bodies), jax.device_get(step(state, placed)))
  assert out["eigen"][0] == 0 and out["ynnpack"][0] > 0, (out["eigen"][0], out["ynnpack"][0])
  (eigen_state, eigen_metrics), (ynn_state, ynn_metrics) = out["eigen"][1], out["ynnpack"][1]
  np.testing.assert_allclose(eigen_metrics["loss"], ynn_metrics["loss"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(eigen_state), jax.tree.leaves(ynn_state)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_the_procedural_training_split_is_kept_when_it_fits_the_budget():
  config = tiny_config()  # 256 images of 24 px: 0.44 MB
  kept = lambda split: train.get_source(config, "procedural", split).images._kept is not None  # noqa: E731
  assert kept("train") and not kept("original")  # evaluation splits are read once
  config.data.procedural_keep_mb = 0
  assert not kept("train")


def test_config_is_locked_and_typed():
  c = common.base()
  c.lock()
  with pytest.raises(AttributeError, match="totl_steps"):
    c.totl_steps = 5
  with pytest.raises(TypeError):
    c.total_steps = "many"
  with pytest.raises(ValueError, match="unknown config argument 'los'"):
    smoke.get_config("los=simclr")


def test_weight_decay_and_lars_adaptation_skip_biases_norms_and_scalars():
  model = train.Model(tiny_config("clip"), rngs=nnx.Rngs(0))
  mask = train._decay_mask(nnx.state(model, nnx.Param))
  flat = {jax.tree_util.keystr(p): m for p, m in jax.tree_util.tree_flatten_with_path(mask)[0]}
  decayed = {k for k, m in flat.items() if m}
  assert decayed and all("kernel" in k or "embedding" in k or "posemb" in k for k in decayed), decayed
  assert not any(m for k, m in flat.items() if "bias" in k or "scale" in k or "norm" in k)  # incl. log_scale


def _events(directory):
  """The Event protos of every TensorBoard event file in `directory` (TFRecord framing: length, crc, data, crc)."""
  import struct
  from tensorboardX.proto import event_pb2
  out = []
  for path in sorted(directory.glob("events.out.tfevents.*")):
    data, at = path.read_bytes(), 0
    while at < len(data):
      (n,) = struct.unpack_from("<Q", data, at)
      out.append(event_pb2.Event.FromString(data[at + 12:at + 12 + n]))
      at += 12 + n + 4
  return out


def test_tensorboard_events_hold_every_logged_scalar_and_a_resume_purges_later_ones(tmp_path):
  train.train_and_evaluate(tiny_config(total_steps=3, checkpoint_every_steps=2), str(tmp_path))
  events = _events(tmp_path / "tensorboard")
  losses = {e.step: v.simple_value for e in events for v in e.summary.value if v.tag == "loss"}
  logged = {r["step"]: r["loss"] for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())}
  assert losses.keys() == logged.keys() == {1, 2, 3}
  np.testing.assert_allclose([losses[s] for s in (1, 2, 3)], [logged[s] for s in (1, 2, 3)], rtol=1e-6)
  # Resuming from the step-2 checkpoint (as after a crash past it) tells TensorBoard to drop what followed.
  shutil.rmtree(tmp_path / "checkpoints" / "3")
  train.train_and_evaluate(tiny_config(total_steps=3, checkpoint_every_steps=2), str(tmp_path))
  starts = [e.step for e in _events(tmp_path / "tensorboard") if e.HasField("session_log")]
  assert starts == [3]


def test_data_wait_counts_only_the_time_the_finished_step_waited_for_its_batch():
  """The logged data_wait is the part of the time blocked fetching a batch after the step had finished: while the
  step still computes, the devices are not waiting for data."""
  import functools
  import time

  import jax.numpy as jnp

  class Slow:  # a pipeline whose every batch takes 20 ms to come
    def __next__(self):
      time.sleep(0.02)
      return "batch"

  # Seconds of matmuls on a 2-core CPU (tenths on a large one), dispatched asynchronously like the train step.
  work = jax.jit(lambda x: functools.reduce(lambda y, _: jnp.tanh(y @ x), range(20), x))
  x = jnp.full((1536, 1536), 1 / 1536, jnp.float32)
  work(x).block_until_ready()
  watch, clock = train.StepWatch(), {"data_wait": 0.0}
  try:
    running = work(x)
    watch.watch({"loss": running})
    assert train._next_batch(Slow(), clock, watch) == "batch"
    assert not running.is_ready()  # still computing now, so it was while the batch came
    assert clock["data_wait"] == 0.0 and watch.finished_at() is None
    running.block_until_ready()
    while watch.finished_at() is None:  # the watcher notes the time within microseconds
      time.sleep(0.001)
    train._next_batch(Slow(), clock, watch)  # the step had finished before: the whole wait was idle
    assert 0.02 <= clock["data_wait"] < 1.0
    running = work(x)
    watch.watch({"loss": running})

    class AfterTheStep:  # a batch that comes 20 ms after the watcher noted the step finished
      def __next__(self):
        running.block_until_ready()
        while watch.finished_at() is None:  # on a busy host the watcher may wake a few ms after this thread
          time.sleep(0.001)
        time.sleep(0.02)
        return "batch"

    before, t0 = clock["data_wait"], time.perf_counter()
    train._next_batch(AfterTheStep(), clock, watch)
    waited, idle = time.perf_counter() - t0, clock["data_wait"] - before
    assert 0.02 <= idle < 0.2 and idle < waited - 0.05  # only the end of the wait, not the step's compute
    before = clock["data_wait"]
    fresh = train.StepWatch()
    try:
      train._next_batch(Slow(), clock, fresh)  # before the first step every wait counts
    finally:
      fresh.close()
    assert 0.02 <= clock["data_wait"] - before < 1.0
  finally:
    watch.close()


def test_step_flops_count_one_devices_share_of_the_step():
  """XLA's count of the compiled step, per device, against the ViT's matmuls counted by hand: forward
  2 x (patch embedding + per layer qkv, output projection, MLP, QK^T and AV) a token, plus the head, and the
  backward pass twice the forward. The rest (norms, GELU, softmax, the optimizer) adds ~10% at this size."""
  from xsample_jax.models import vit
  config = tiny_config(**{"model.variant": "vit_tiny"})
  mesh = train.make_mesh(config)
  graphdef, _, shardings = train.abstract_state(config, mesh)
  step = train.make_train_step(config, graphdef, shardings, mesh, train.make_loss_fn(config, mesh, None))
  batch = {k: jax.device_put(v, sharding.batch_sharding(mesh)) for k, v in host_batch(config).items()}
  flops = train.step_flops(step, train.init_state(config, shardings), batch)

  cfg, rows = vit.VARIANTS["vit_tiny"], 2 * config.batch_size
  d, tokens = cfg.width, (config.image_size // cfg.patch) ** 2
  layer = 2 * (3 * d * d + d * d + 2 * d * cfg.mlp_dim) + 2 * 2 * tokens * d
  forward = rows * (tokens * (2 * cfg.patch ** 2 * 3 * d + cfg.depth * layer)
                    + 2 * sum(a * b for a, b in zip((d, *config.model.head), config.model.head)))
  by_hand = 3 * forward / jax.device_count()
  assert 1.0 <= flops / by_hand <= 1.3, (flops, by_hand)


def test_the_log_rows_give_each_devices_tflops_the_mfu_and_the_data_wait_fraction(tmp_path):
  train.train_and_evaluate(tiny_config(total_steps=4, log_every_steps=2, peak_tflops=0.5), str(tmp_path))
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  last = [r for r in rows if "step_time" in r]
  assert [r["step"] for r in last] == [2, 4]
  # The same FLOPs every step: achieved TFLOP/s x step time is constant.
  flops = [r["device_tflop_per_s"] * r["step_time"] for r in last]
  assert flops[0] > 0 and flops[1] == pytest.approx(flops[0], rel=1e-6)
  for r in last:
    assert r["mfu"] == pytest.approx(r["device_tflop_per_s"] / 0.5)
    assert 0 <= r["data_wait_fraction"] <= 1
    assert r["data_wait_fraction"] == pytest.approx(r["data_wait"] / r["step_time"])


def test_profile_steps_write_a_trace_of_the_train_step_and_a_cpu_logs_no_mfu(tmp_path):
  import gzip
  train.train_and_evaluate(tiny_config(total_steps=4, profile_steps=(2, 2)), str(tmp_path))
  traces = list((tmp_path / "profile").rglob("*.trace.json.gz"))
  assert len(traces) == 1
  events = json.loads(gzip.decompress(traces[0].read_bytes()))["traceEvents"]
  runs = [e for e in events if e.get("name") == "CommonPjRtLoadedExecutable::Execute (jit_train_step)"]
  assert len(runs) == 2, sorted({e.get("name") for e in events if "train_step" in e.get("name", "")})  # steps 2, 3
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [1, 2, 3, 4]  # the run itself as without
  assert rows[-1]["device_tflop_per_s"] > 0
  if jax.default_backend() == "cpu":
    assert "mfu" not in rows[-1]  # no peak known for a CPU


@pytest.mark.accelerator
def test_on_an_accelerator_the_log_rows_give_the_mfu(tmp_path):
  """On a GPU/TPU the chip's peak comes from its device kind: the logs carry the model FLOP utilisation."""
  train.train_and_evaluate(tiny_config(total_steps=3, **{"optimizer.warmup_steps": 0}), str(tmp_path))
  row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
  assert 0 < row["mfu"] < 1, row
