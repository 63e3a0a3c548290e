"""X-CLR train step on the host CPU: images/s of the project's JAX trainer vs the same step written in PyTorch.

    python -m benchmarks.train_bench                              # resnet18, 5 timed steps per framework
    python -m benchmarks.train_bench --models resnet18 vit_s16 --steps 5
    python -m benchmarks.train_bench --no-torch                   # JAX only
    python -m benchmarks.train_bench --models resnet18 vit_s16 --cpu-matmuls auto ynnpack  # XLA:CPU kernels A/B
    python -m benchmarks.train_bench --models vit_b16 --no-torch --dtype bfloat16 --image-size 224 --batch-size 256
                                                                  # on a GPU/TPU: MFU of the ViT-B/16 step

Both frameworks run the same step on the same batch: B images x 2 views (2B rows) of S px, the image tower
(ResNet-18 with the ImageNet stem, 7x7/2 conv + 3x3/2 max-pool, BasicBlocks, BatchNorm in train mode; or ViT-S/16,
pre-LN, GELU, learned position embeddings, mean pooling, final LayerNorm), the projection head (config default
2048-2048-128, Linear-BN-ReLU hidden layers), the dense X-CLR loss with a caption graph (random unit caption
embeddings, E=384: target = softmax(c_i . c_j / tau_s), logits = z_i . z_j / tau, self-pairs masked in both, soft
cross-entropy, mean over rows; tau = tau_s = 0.1), and SGD with momentum 0.9 (weight decay 1e-6 on kernels only).

JAX side: the trainer's own pieces (`train.make_train_step` with `make_loss_fn`, config from `configs.common.base`),
one CPU device (mesh.data = 1). PyTorch side (optional dependency of this benchmark only: torch CPU, no
torchvision): the models are written here; `torch.set_num_threads(os.cpu_count())`, channels-last for the ResNet
(--torch-layout). If torch is not installed, a line says so and JAX is still reported. The process restarts itself
with glibc's malloc on transparent huge pages, as the trainer's entry point does (`cli.use_huge_pages`;
XSAMPLE_HUGE_PAGES=0 turns it off), so both frameworks run with it; each line records `glibc_tunables`.

Steps are timed interleaved (one JAX step, one torch step, ...) in this one process after a warm-up (compile) step;
medians of --steps. One JSON line per (model, framework), then a summary line per model with jax / torch images/s.

`--cpu-matmuls` sets the JAX step's config.cpu_matmuls (XLA:CPU's kernels for dots and convolutions, see
`train.compiler_options`); with several settings each gets its own JAX step and line, all timed interleaved with
the torch step, and the summary's JAX figures are the first setting's, with the others by name.

The JAX line carries `step_flops` (XLA's count for the compiled step: towers, loss, optimizer), the achieved
`tflop_per_s` and, on a chip in `utilization.PEAK_BF16_TFLOPS` (or with --peak-tflops), `mfu`: achieved / peak.

With torch, the summary also carries `matmul_chain_jax_over_torch`: the tower's own matmuls alone (for ViT-S/16 the
qkv, output and two MLP projections of every block on the 2B x tokens rows; for ResNet-18 none, its FLOPs are
convolutions), forward and backward, as a bare chain in each framework, timed interleaved in the same run. It is
the ratio the step could reach if everything around the matmuls cost nothing in either framework.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time

from benchmarks.timing import interleaved_medians
from xsample_jax import cli
from xsample_jax.utilization import compiled_flops, peak_tflops

MODELS = ("resnet18", "vit_s16", "vit_b16")
TORCH_VIT = {"vit_s16": dict(width=384, heads=6, mlp=1536), "vit_b16": dict(width=768, heads=12, mlp=3072)}
EMBED_DIM = 384


def make_batch(args):
  """NumPy batch in the pipeline's layout: 2B interleaved views, caption embeddings repeated for both views."""
  import numpy as np

  rng = np.random.default_rng(0)
  n, s = 2 * args.batch_size, args.image_size
  emb = rng.normal(size=(args.batch_size, EMBED_DIM)).astype(np.float32)
  emb /= np.linalg.norm(emb, axis=1, keepdims=True)
  return {"image": rng.integers(0, 256, (n, s, s, 3), dtype=np.uint8),
          "caption_emb": np.repeat(emb, 2, axis=0),
          "label": np.full((n,), -1, np.int32),
          "id": np.repeat(np.arange(args.batch_size, dtype=np.int32), 2)}


# ----------------------------------------------------------------------------------------------------------
# JAX: the trainer's step.


def jax_step(model, args, np_batch, cpu_matmuls="auto"):
  """A no-arg fn running one trainer step (state carried across calls), and its first-call (compile) seconds."""
  import jax

  from configs import common
  from xsample_jax import sharding, train

  c = common.base()
  c.model.variant = model
  if model.startswith("resnet"):
    c.model.stem = "imagenet"
  c.image_size = args.image_size
  c.batch_size = args.batch_size
  c.model.dtype = args.dtype
  c.optimizer.name = "sgd"
  c.loss.name = "xclr"
  c.loss.graph = "caption"
  c.loss.impl = "dense"
  c.mesh.data = 1
  c.cpu_matmuls = cpu_matmuls
  mesh = train.make_mesh(c)
  graphdef, _, shardings = train.abstract_state(c, mesh)
  state = train.init_state(c, shardings)
  step = train.make_train_step(c, graphdef, shardings, mesh, train.make_loss_fn(c, mesh, None))
  batch = jax.device_put(np_batch, sharding.batch_sharding(mesh))
  flops = compiled_flops(step.lower(state, batch))
  box = {"state": state}

  def run():
    box["state"], metrics = step(box["state"], batch)
    jax.block_until_ready((box["state"], metrics))
    return float(metrics["loss"])

  t0 = time.perf_counter()
  loss = run()
  return run, time.perf_counter() - t0, loss, tuple(c.model.head), flops


# ----------------------------------------------------------------------------------------------------------
# PyTorch: the same models, loss and optimizer.


def torch_modules():
  import torch
  from torch import nn
  import torch.nn.functional as F

  class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
      super().__init__()
      self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(cout, momentum=0.1, eps=1e-5)
      self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
      self.bn2 = nn.BatchNorm2d(cout, momentum=0.1, eps=1e-5)
      nn.init.zeros_(self.bn2.weight)  # zero_init_residual, as the config default
      self.down = None
      if stride != 1 or cin != cout:
        self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout, eps=1e-5))

    def forward(self, x):
      y = F.relu(self.bn1(self.conv1(x)))
      y = self.bn2(self.conv2(y))
      return F.relu(y + (x if self.down is None else self.down(x)))

  class ResNet18(nn.Module):
    width = 512

    def __init__(self):
      super().__init__()
      self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64, eps=1e-5), nn.ReLU(),
                                nn.MaxPool2d(3, 2, 1))
      blocks, cin = [], 64
      for i, c in enumerate((64, 128, 256, 512)):
        blocks += [BasicBlock(cin, c, 1 if i == 0 else 2), BasicBlock(c, c, 1)]
        cin = c
      self.blocks = nn.Sequential(*blocks)

    def forward(self, x):
      return self.blocks(self.stem(x)).mean(dim=(2, 3))

  class Block(nn.Module):
    def __init__(self, d, heads, mlp):
      super().__init__()
      self.ln1, self.ln2 = nn.LayerNorm(d, eps=1e-6), nn.LayerNorm(d, eps=1e-6)
      self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)
      self.fc1, self.fc2 = nn.Linear(d, mlp), nn.Linear(mlp, d)
      self.heads = heads

    def forward(self, x):
      b, n, d = x.shape
      q, k, v = self.qkv(self.ln1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
      a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
      x = x + self.out(a)
      return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))

  class ViT(nn.Module):
    def __init__(self, image_size, patch=16, width=384, depth=12, heads=6, mlp=1536):
      super().__init__()
      self.width = width
      self.patch = nn.Conv2d(3, width, patch, patch)
      self.posemb = nn.Parameter(torch.randn(1, (image_size // patch) ** 2, width) * 0.02)
      self.blocks = nn.Sequential(*[Block(width, heads, mlp) for _ in range(depth)])
      self.ln = nn.LayerNorm(width, eps=1e-6)

    def forward(self, x):
      x = self.patch(x).flatten(2).transpose(1, 2) + self.posemb
      return self.ln(self.blocks(x)).mean(dim=1)

  class Encoder(nn.Module):
    def __init__(self, tower, head):
      super().__init__()
      self.tower = tower
      layers, dims = [], (tower.width,) + tuple(head)
      for i, (din, dout) in enumerate(zip(dims[:-1], dims[1:])):
        if i < len(head) - 1:
          layers += [nn.Linear(din, dout, bias=False), nn.BatchNorm1d(dout, eps=1e-5), nn.ReLU()]
        else:
          layers.append(nn.Linear(din, dout))
      self.head = nn.Sequential(*layers)

    def forward(self, x):
      return self.head(self.tower(x))

  return ResNet18, ViT, Encoder


def torch_xclr_loss(z, c, tau=0.1, tau_s=0.1):
  """Dense X-CLR: soft CE of logits z z^T / tau against softmax(c c^T / tau_s), self-pairs masked; mean over rows."""
  import torch
  import torch.nn.functional as F

  z = F.normalize(z.float(), dim=-1)
  with torch.no_grad():
    c = F.normalize(c, dim=-1)
    eye = torch.eye(z.shape[0], dtype=torch.bool)
    target = torch.softmax((c @ c.T / tau_s).masked_fill(eye, -math.inf), dim=-1)
  logits = (z @ z.T / tau).masked_fill(eye, -math.inf)
  logp = torch.log_softmax(logits, dim=-1).masked_fill(eye, 0.0)
  return -(target * logp).sum(-1).mean()


def torch_step(model, args, np_batch, head):
  import torch

  ResNet18, ViT, Encoder = torch_modules()
  torch.manual_seed(0)
  tower = ResNet18() if model == "resnet18" else ViT(args.image_size, **TORCH_VIT[model])
  net = Encoder(tower, head)
  net.train()
  channels_last = model == "resnet18" and args.torch_layout == "channels_last"
  if channels_last:
    net = net.to(memory_format=torch.channels_last)
  decay = [p for p in net.parameters() if p.ndim > 1]
  no_decay = [p for p in net.parameters() if p.ndim <= 1]
  lr = 0.3 * args.batch_size / 256
  opt = torch.optim.SGD([{"params": decay, "weight_decay": 1e-6}, {"params": no_decay, "weight_decay": 0.0}],
                        lr=lr, momentum=0.9)
  mean = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1) * 255.0
  std = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1) * 255.0
  image = torch.from_numpy(np_batch["image"]).permute(0, 3, 1, 2)  # uint8 NHWC storage seen as NCHW
  caption = torch.from_numpy(np_batch["caption_emb"])

  def run():
    x = (image.float() - mean) / std  # normalised in the step, like the JAX side
    x = x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    opt.zero_grad(set_to_none=True)
    loss = torch_xclr_loss(net(x), caption)
    loss.backward()
    opt.step()
    return loss.detach().item()

  t0 = time.perf_counter()
  loss = run()
  return run, time.perf_counter() - t0, loss, ("channels_last" if channels_last else "nchw")


def matmul_chain(args, compiler_options):
  """(jax_fn, torch_fn) running ViT-S/16's projection matmuls, forward and backward, with nothing around them;
  the JAX one compiled with the train step's compiler_options."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch

  rows, d, f, depth = 2 * args.batch_size * (args.image_size // 16) ** 2, 384, 1536, 12
  rng = np.random.default_rng(0)
  ws = [[(rng.normal(size=s) * 0.02).astype(np.float32) for s in ((d, 3 * d), (d, d), (d, f), (f, d))]
        for _ in range(depth)]
  x = rng.normal(size=(rows, d)).astype(np.float32)

  def chain(ws, x):  # residual adds keep every matmul's input gradient live, as in the tower
    for w_qkv, w_out, w_1, w_2 in ws:
      x = x + (x @ w_qkv)[:, :d] @ w_out
      x = x + (x @ w_1) @ w_2
    return (x * x).sum()

  grad = jax.jit(jax.grad(chain, argnums=(0, 1)), compiler_options=compiler_options)
  j_ws, j_x = jax.tree.map(jnp.asarray, ws), jnp.asarray(x)
  t_ws = [[torch.tensor(w, requires_grad=True) for w in layer] for layer in ws]
  t_x = torch.tensor(x, requires_grad=True)
  return (lambda: jax.block_until_ready(grad(j_ws, j_x))), (lambda: chain(t_ws, t_x).backward())


def bench_model(model, args, torch_ok, note):
  np_batch = make_batch(args)
  images = args.batch_size  # images per step (each as 2 views)
  common = dict(bench="train_step", model=model, image_size=args.image_size, batch_size=args.batch_size,
                rows=2 * args.batch_size, steps=args.steps, switch_warmup=args.switch_warmup,
                cpu_count=os.cpu_count(), glibc_tunables=os.environ.get("GLIBC_TUNABLES", ""))
  if note:
    common["note"] = note
  import jax

  from xsample_jax import train
  device = jax.devices()[0]
  peak = peak_tflops(device, args.dtype, args.peak_tflops)
  fns, extra = [], []
  for setting in args.cpu_matmuls:  # one JAX step per setting, all timed interleaved with torch
    j_run, j_compile, j_loss, head, flops = jax_step(model, args, np_batch, setting)
    fns.append(j_run)
    extra.append(dict(framework="jax", backend=device.platform, device_kind=device.device_kind, dtype=args.dtype,
                      cpu_matmuls=setting, compiler_options=train.compiler_options(setting),
                      first_step_s=round(j_compile, 2), first_loss=round(j_loss, 4), step_flops=flops,
                      peak_tflops=peak))
  if torch_ok:
    import torch
    t_run, t_first, t_loss, layout = torch_step(model, args, np_batch, head)
    fns.append(t_run)
    extra.append(dict(framework="torch", torch_version=torch.__version__, threads=torch.get_num_threads(),
                      layout=layout, first_step_s=round(t_first, 2), first_loss=round(t_loss, 4)))
  medians = interleaved_medians(fns, args.steps, args.switch_warmup)
  rates = []
  for med, ex in zip(medians, extra):
    rates.append(images / med)
    if ex.get("step_flops"):  # XLA's count of the compiled step over its time; MFU against the chip's peak
      ex["tflop_per_s"] = round(ex["step_flops"] / med / 1e12, 3)
      if ex["peak_tflops"]:
        ex["mfu"] = round(ex["tflop_per_s"] / ex["peak_tflops"], 4)
    print(json.dumps(dict(common, **ex, head=list(head), median_s=round(med, 4),
                          images_per_s=round(images / med, 2))), flush=True)
  n = len(args.cpu_matmuls)  # the summary's JAX figures are the first setting's; the others follow by name
  summary = dict(common, bench="train_step_summary", cpu_matmuls=args.cpu_matmuls[0],
                 jax_images_per_s=round(rates[0], 2))
  if n > 1:
    summary["jax_images_per_s_by_cpu_matmuls"] = {k: round(r, 2) for k, r in zip(args.cpu_matmuls, rates)}
  if torch_ok:
    summary.update(torch_images_per_s=round(rates[n], 2), jax_over_torch=round(rates[0] / rates[n], 3))
    if n > 1:
      summary["jax_over_torch_by_cpu_matmuls"] = {k: round(r / rates[n], 3) for k, r in zip(args.cpu_matmuls, rates)}
    if model == "vit_s16":
      chain = matmul_chain(args, train.compiler_options(args.cpu_matmuls[0]))
      jax_s, torch_s = interleaved_medians(chain, args.steps, args.switch_warmup)
      summary.update(matmul_chain_jax_s=round(jax_s, 4), matmul_chain_torch_s=round(torch_s, 4),
                     matmul_chain_jax_over_torch=round(torch_s / jax_s, 3))
  else:
    summary["torch"] = "not run"
  print(json.dumps(summary), flush=True)


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--models", nargs="+", default=["resnet18"], choices=MODELS)
  ap.add_argument("--batch-size", type=int, default=128, help="global images; the step sees 2 views of each")
  ap.add_argument("--image-size", type=int, default=64)
  ap.add_argument("--steps", type=int, default=5, help="timed steps per framework (after one warm-up step)")
  ap.add_argument("--torch-layout", default="channels_last", choices=("channels_last", "nchw"),
                  help="memory format of the torch ResNet")
  ap.add_argument("--no-torch", action="store_true")
  ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                  help="the JAX model's compute dtype (model.dtype); PyTorch runs only with float32")
  ap.add_argument("--peak-tflops", type=float, default=None,
                  help="the chip's dense matmul peak, for MFU (default: a table of known accelerators by device kind)")
  ap.add_argument("--switch-warmup", type=int, default=1,
                  help="untimed steps of a framework at each of its turns, before the timed one")
  ap.add_argument("--cpu-matmuls", nargs="+", default=["auto"], choices=("auto", "eigen", "ynnpack"),
                  help="config.cpu_matmuls of the JAX step; several: one JAX step each, timed interleaved")
  ap.add_argument("--note", default="", help="free text added to every line (e.g. machine shared with a CI run)")
  args = ap.parse_args()
  torch_ok = False
  if args.dtype != "float32" and not args.no_torch:
    print(json.dumps({"bench": "train_step", "framework": "torch",
                      "skipped": f"the PyTorch step is float32 only; reporting JAX in {args.dtype}"}), flush=True)
  elif not args.no_torch:
    try:
      import torch
      torch.set_num_threads(os.cpu_count())
      torch_ok = True
    except ImportError:
      print(json.dumps({"bench": "train_step", "framework": "torch",
                        "skipped": "torch is not installed; reporting JAX only"}), flush=True)
  for model in args.models:
    bench_model(model, args, torch_ok, args.note)


if __name__ == "__main__":
  cli.use_huge_pages()  # as the trainer's entry point runs
  main()
