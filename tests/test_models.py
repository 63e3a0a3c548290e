"""Image towers, heads, text tower and parameter partitioning: sizes against the reference implementations'
published counts, BatchNorm and attention against float64 NumPy, and sharded (8 fake devices) against unsharded."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from xsample_jax import models
from xsample_jax.models import partitioning, resnet, transformer, vit
from xsample_jax.sharding import DATA, batch_sharding

# torchvision resnet18 / resnet50 minus fc; timm vit_{small,base}_patch16_224 (class token) minus the classifier
# and minus the class token's position embedding (big_vision adds position embeddings to the patches only).
REFERENCE_COUNTS = {"resnet18": 11_689_512 - 513_000, "resnet50": 25_557_032 - 2_049_000,
                    "vit_s16": 22_050_664 - 385_000 - 384, "vit_b16": 86_567_656 - 769_000 - 768}


def n_params(module) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


def graphdef(build):
  """The structure of a model, without running its initialisers."""
  return nnx.split(nnx.eval_shape(build))[0]


def init_state(build, out_shardings=None):
  """The trainer's way to create parameters: one jitted init (eager init compiles one kernel per shape: slow)."""
  if out_shardings is None:
    out_shardings = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.jit(lambda: nnx.state(build()), out_shardings=out_shardings)()


BUILD = {
    "resnet_tiny": lambda **kw: models.make_image_encoder("resnet_tiny", (64, 16), rngs=nnx.Rngs(0), **kw),
    "vit_tiny": lambda **kw: models.make_image_encoder("vit_tiny", (64, 16), image_size=32, rngs=nnx.Rngs(0), **kw),
}


@pytest.fixture(scope="module")
def encoder_states():
  """Initial states of the tiny encoders, made once; tests merge them with a graphdef and never mutate them."""
  return {name: init_state(build) for name, build in BUILD.items()}


@pytest.mark.parametrize("variant", sorted(REFERENCE_COUNTS))
def test_standard_variants_sizes_and_shapes(variant):
  kwargs = {"pool": "cls"} if variant.startswith("vit") else {}
  tower = nnx.eval_shape(lambda: models.make_image_tower(variant, rngs=nnx.Rngs(0), **kwargs))
  assert n_params(tower) == REFERENCE_COUNTS[variant]
  width = {"resnet18": 512, "resnet50": 2048, "vit_s16": 384, "vit_b16": 768}[variant]
  assert tower.width == width
  if variant in ("resnet50", "vit_b16"):  # abstract forward: cheap even at 224 px
    out = jax.eval_shape(lambda: models.make_image_tower(variant, rngs=nnx.Rngs(0), **kwargs)(
        jnp.zeros((2, 224, 224, 3))))
    assert out.shape == (2, width)


def test_gap_vit_and_sincos_have_fewer_parameters():
  gap = nnx.eval_shape(lambda: models.make_image_tower("vit_b16", rngs=nnx.Rngs(0)))
  sincos = nnx.eval_shape(lambda: models.make_image_tower("vit_b16", posemb="sincos2d", rngs=nnx.Rngs(0)))
  assert n_params(gap) == REFERENCE_COUNTS["vit_b16"] - 768  # no class token
  assert n_params(sincos) == n_params(gap) - 196 * 768


def test_bfloat16_compute_keeps_float32_params(encoder_states):
  gdef = graphdef(lambda: BUILD["resnet_tiny"](dtype=jnp.bfloat16))
  state = encoder_states["resnet_tiny"]
  h, z = jax.jit(lambda s, x: nnx.merge(gdef, s)(x))(state, jnp.ones((2, 32, 32, 3)))
  assert h.dtype == z.dtype == jnp.bfloat16 and h.shape == (2, 64) and z.shape == (2, 16)
  assert {x.dtype for x in jax.tree.leaves(nnx.state(nnx.merge(gdef, state), nnx.Param))} == {jnp.dtype("float32")}


def test_bad_names_raise():
  with pytest.raises(ValueError, match="unknown image tower 'resnet51'.*resnet50.*vit_b16"):
    models.make_image_tower("resnet51", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="unknown text tower 'text_xl'.*text_tiny"):
    models.make_text_tower("text_xl", out_dim=8, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="unknown pool 'max'"):
    models.make_image_tower("vit_tiny", image_size=32, pool="max", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="unknown posemb"):
    models.make_image_tower("vit_tiny", image_size=32, posemb="rope", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="not a multiple of the patch size"):
    models.make_image_tower("vit_tiny", image_size=30, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="patch grid"):
    jax.eval_shape(lambda: models.make_image_tower("vit_tiny", image_size=32, rngs=nnx.Rngs(0))(
        jnp.zeros((1, 64, 64, 3))))
  with pytest.raises(ValueError, match="unknown partitioning mode 'zero3'"):
    partitioning.state_shardings(nnx.state(nnx.eval_shape(BUILD["vit_tiny"])), None, "zero3")


def test_head_widths_and_layout():
  head = models.make_head(16, (32, 24, 8), rngs=nnx.Rngs(0))
  assert [l.kernel.shape for l in head.layers] == [(16, 32), (32, 24), (24, 8)]
  assert [l.bias is None for l in head.layers] == [True, True, False]  # BN's shift replaces the hidden biases
  assert [bn.num_features for bn in head.norms] == [32, 24]
  z = head(jax.random.normal(jax.random.key(0), (5, 16)))
  assert z.shape == (5, 8)
  assert not np.allclose(np.linalg.norm(z, axis=1), 1.0)  # the losses normalise, the head does not
  plain = models.make_head(16, (8,), use_bn=False, rngs=nnx.Rngs(0))
  assert len(plain.layers) == 1 and len(plain.norms) == 0 and plain.layers[0].bias is not None
  with pytest.raises(ValueError, match="head widths"):
    models.make_head(16, (), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("variant", ["resnet_tiny", "vit_tiny"])
def test_bn_momentum_reaches_every_batchnorm(variant):
  enc = nnx.eval_shape(lambda: BUILD[variant](bn_momentum=0.99))
  bns = {path: m for path, m in nnx.iter_graph(enc) if isinstance(m, nnx.BatchNorm)}
  assert any(p[0] == "head" for p in bns)
  assert any(p[0] == "tower" for p in bns) == variant.startswith("resnet")  # a ViT has no BatchNorm
  assert {path: m.momentum for path, m in bns.items()} == {path: 0.99 for path in bns}


def test_zero_init_residual():
  tower = lambda zero: models.make_image_tower("resnet_tiny", zero_init_residual=zero, rngs=nnx.Rngs(0))
  # only the BN scales are returned, so XLA drops the conv initialisers: a cheap compile
  scales = jax.jit(lambda zero: [(b.bn1.scale[...], b.bn2.scale[...]) for b in tower(zero).blocks],
                   static_argnums=0)
  for zero in (True, False):
    for bn1, bn2 in scales(zero):
      np.testing.assert_array_equal(bn1, 1.0)
      np.testing.assert_array_equal(bn2, 0.0 if zero else 1.0)  # each block's last BN
  # a zero-scaled residual branch leaves a block without projection as relu(x)
  block = resnet.BasicBlock(resnet.Layers(nnx.Rngs(0)), 16, 16, 1, True)
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 16))
  np.testing.assert_allclose(block(x), jax.nn.relu(x), atol=1e-6)
  bottleneck = nnx.eval_shape(lambda: resnet.Bottleneck(resnet.Layers(nnx.Rngs(0)), 64, 16, 1, True))
  assert bottleneck.bn3.scale.shape == (64,)  # where ResNet-50 puts the zero scale (same flag, same helper)


# --- NumPy float64 references for the building blocks ---

def np_batchnorm(x, scale, bias, eps=1e-5):
  x = x.astype(np.float64)
  mean, var = x.reshape(-1, x.shape[-1]).mean(0), x.reshape(-1, x.shape[-1]).var(0)
  return (x - mean) / np.sqrt(var + eps) * scale + bias, mean, var


def test_batchnorm_global_statistics_under_sharded_jit(mesh):
  bn = resnet.Layers(nnx.Rngs(0)).bn(16)  # a BatchNorm exactly as resnet.py configures them
  bn.scale[...] = jnp.linspace(0.5, 1.5, 16)
  bn.bias[...] = jnp.linspace(-1, 1, 16)
  # Each device's rows get their own offset, so per-shard statistics would be far from the global ones.
  x = np.random.default_rng(0).normal(size=(16, 4, 4, 16)) + np.repeat(np.arange(8.0), 2)[:, None, None, None]
  gdef, state = nnx.split(bn)

  @jax.jit
  def forward(state, x):
    bn = nnx.merge(gdef, state)
    return bn(x), nnx.state(bn)

  y, new_state = forward(state, jax.device_put(jnp.asarray(x, jnp.float32), batch_sharding(mesh)))
  assert y.sharding.spec[0] == DATA
  ref, mean, var = np_batchnorm(x, np.asarray(bn.scale[...]), np.asarray(bn.bias[...]))
  np.testing.assert_allclose(y, ref, atol=2e-5)
  np.testing.assert_allclose(new_state["mean"][...], 0.1 * mean, atol=1e-5)  # momentum 0.9 from zeros
  np.testing.assert_allclose(new_state["var"][...], 0.9 + 0.1 * var, atol=1e-5)  # from ones
  local_mean = x[:2].reshape(-1, 16).mean(0)
  assert np.abs(local_mean - mean).max() > 1.0  # the check above could tell local from global statistics


def np_attention(x, p, num_heads, mask=None, causal=False):
  x = x.astype(np.float64)
  b, t, d = x.shape
  proj = lambda name, y: y @ p[name]["kernel"] + p[name]["bias"]
  heads = lambda y: y.reshape(b, t, num_heads, d // num_heads).transpose(0, 2, 1, 3)
  q, k, v = (heads(proj(n, x)) for n in ("query", "key", "value"))
  logits = q @ k.transpose(0, 1, 3, 2) / np.sqrt(d // num_heads)
  allowed = np.ones((b, 1, t, t), bool)
  if mask is not None:
    allowed &= mask.astype(bool)[:, None, None, :]
  if causal:
    allowed &= np.tril(np.ones((t, t), bool))
  logits = np.where(allowed, logits, -np.inf)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  y = (w / w.sum(-1, keepdims=True)) @ v
  return proj("out", y.transpose(0, 2, 1, 3).reshape(b, t, d))


@pytest.mark.parametrize("causal", [False, True])
def test_attention_matches_numpy(causal):
  attn = transformer.SelfAttention(32, 4, rngs=nnx.Rngs(0))
  for lin in (attn.query, attn.key, attn.value, attn.out):  # non-zero biases so they are checked too
    lin.bias[...] = jax.random.normal(jax.random.key(lin.kernel.shape[0]), lin.bias.shape)
  x = np.random.default_rng(1).normal(size=(3, 7, 32))
  mask = np.array([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5])
  p = jax.tree.map(lambda v: np.asarray(v, np.float64), nnx.to_pure_dict(nnx.state(attn)))
  got = attn(jnp.asarray(x, jnp.float32), jnp.asarray(mask), causal=causal)
  np.testing.assert_allclose(got, np_attention(x, p, 4, mask, causal), atol=1e-5)


def test_gelu_and_its_gradient_match_float64():
  x = np.concatenate([np.linspace(-9, 9, 721), np.random.default_rng(0).normal(size=1000) * 3])
  erf = np.vectorize(math.erf)
  cdf, pdf = 0.5 * (1 + erf(x / math.sqrt(2))), np.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
  xf = jnp.asarray(x, jnp.float32)
  np.testing.assert_allclose(transformer.gelu(xf), x * cdf, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(jax.vmap(jax.grad(transformer.gelu))(xf), cdf + x * pdf, rtol=1e-5, atol=1e-6)
  # The same function and gradient as JAX's exact GELU (an erfc form with an autodiff gradient).
  np.testing.assert_allclose(transformer.gelu(xf), jax.nn.gelu(xf, approximate=False), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(jax.vmap(jax.grad(transformer.gelu))(xf),
                             jax.vmap(jax.grad(lambda v: jax.nn.gelu(v, approximate=False)))(xf), atol=1e-6)
  xb = xf.astype(jnp.bfloat16)
  assert transformer.gelu(xb).dtype == jax.grad(lambda v: transformer.gelu(v).sum())(xb).dtype == jnp.bfloat16


def test_dense_on_rows_equals_linear_on_a_3d_input():
  dense = transformer.Dense(6, 5, rngs=nnx.Rngs(0))
  dense.bias[...] = jnp.arange(5.0)
  linear = nnx.Linear(6, 5, rngs=nnx.Rngs(1))
  nnx.update(linear, nnx.state(dense))
  x = jnp.asarray(np.random.default_rng(2).normal(size=(3, 4, 6)), jnp.float32)
  ct = jnp.asarray(np.random.default_rng(3).normal(size=(3, 4, 5)), jnp.float32)
  grads = [nnx.grad(lambda m, x: jnp.vdot(m(x), ct), argnums=(0, 1))(m, x) for m in (dense, linear)]
  np.testing.assert_allclose(dense(x), linear(x), rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), *grads)


def test_sincos_posemb_formula():
  emb = vit.sincos_2d(3, 5, 8)
  assert emb.shape == (15, 8)
  row, col = 1, 3  # token 1 * 5 + 3; width 8 -> two frequencies 1 and 1e-4
  omega = np.array([1.0, 1e-4])
  np.testing.assert_allclose(emb[row * 5 + col], np.concatenate(
      [np.sin(col * omega), np.cos(col * omega), np.sin(row * omega), np.cos(row * omega)]), rtol=1e-6)


# --- Sharded (8 fake devices, batch on 'data', params FSDP) against one device ---

def _forward_fn(gdef):
  def forward(state, x):
    model = nnx.merge(gdef, state)
    h, z = model(x)
    return h, z, nnx.state(model)
  return jax.jit(forward)


@pytest.mark.parametrize("variant", ["resnet_tiny", "vit_tiny"])
@pytest.mark.parametrize("train", [True, False])
def test_sharded_forward_equals_unsharded(mesh, encoder_states, variant, train):
  gdef, state = nnx.split(nnx.view(nnx.merge(graphdef(BUILD[variant]), encoder_states[variant]),
                                   use_running_average=not train, raise_if_not_found=False))
  x = jax.random.normal(jax.random.key(2), (16, 32, 32, 3))
  forward = _forward_fn(gdef)

  h1, z1, s1 = forward(state, jax.device_put(x, jax.devices()[0]))
  assert h1.shape == (16, 64) and z1.shape == (16, 16)
  fsdp = partitioning.state_shardings(state, mesh, "fsdp", min_size=1024)
  sharded_state = jax.device_put(state, fsdp)
  assert any(DATA in tuple(v.sharding.spec) for v in jax.tree.leaves(sharded_state))  # FSDP really applied
  h8, z8, s8 = forward(sharded_state, jax.device_put(x, batch_sharding(mesh)))

  assert h8.sharding.spec[0] == DATA
  np.testing.assert_allclose(h8, h1, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(z8, z1, rtol=1e-4, atol=1e-4)
  stats = lambda s: nnx.to_pure_dict(nnx.state(nnx.merge(gdef, s), nnx.BatchStat))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), stats(s8), stats(s1))
  moved = not np.allclose(stats(s1)["head"]["norms"][0]["mean"], 0.0)
  assert moved == train  # running statistics update in train mode only


def test_sharded_gradients_equal_unsharded(mesh, encoder_states):
  """The train step's backward pass through global BatchNorm: same gradients with the batch split 8 ways."""
  gdef, state = graphdef(BUILD["resnet_tiny"]), encoder_states["resnet_tiny"]
  x = jax.random.normal(jax.random.key(4), (16, 32, 32, 3))

  @nnx.jit
  def grads(model, x):
    def loss(model):
      _, z = model(x)
      return jnp.mean(jnp.sum(z * jnp.roll(z, 1, axis=0), axis=1))  # couples rows across devices
    return nnx.grad(loss)(model)  # w.r.t. the Params; BatchStat updates are carried out

  g1 = grads(nnx.merge(gdef, state), jax.device_put(x, jax.devices()[0]))
  fsdp = partitioning.state_shardings(state, mesh, "fsdp", min_size=1024)
  g8 = grads(nnx.merge(gdef, jax.device_put(state, fsdp)), jax.device_put(x, batch_sharding(mesh)))
  # float32 reduction order differs between the layouts: compare at 1e-4 of each tensor's scale
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4 * np.abs(b).max()), g8, g1)
  assert np.abs(g1["tower"]["stem_conv"]["kernel"][...]).max() > 0


def _shard_map_forward(gdef, mesh):
  def forward(state, x):
    model = nnx.merge(gdef, state)
    h, z = model(x)
    return h, z, nnx.state(model)
  return jax.jit(jax.shard_map(forward, mesh=mesh, in_specs=(P(), P(DATA)), out_specs=(P(DATA), P(DATA), P()),
                               check_vma=True))


def test_shard_map_with_bn_axis_name_equals_global_batch(mesh, encoder_states):
  x = jax.random.normal(jax.random.key(3), (16, 32, 32, 3)) + jnp.repeat(jnp.arange(8.0), 2)[:, None, None, None]
  state = encoder_states["resnet_tiny"]
  gdef = graphdef(BUILD["resnet_tiny"])
  h1, z1, s1 = _forward_fn(gdef)(state, x)

  gdef_ax = graphdef(lambda: BUILD["resnet_tiny"](bn_axis_name=DATA))
  state = jax.device_put(state, NamedSharding(mesh, P()))
  h8, z8, s8 = _shard_map_forward(gdef_ax, mesh)(state, jax.device_put(x, batch_sharding(mesh)))
  np.testing.assert_allclose(h8, h1, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(z8, z1, rtol=1e-4, atol=1e-4)
  stats = lambda g, s: nnx.to_pure_dict(nnx.state(nnx.merge(g, s), nnx.BatchStat))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), stats(gdef_ax, s8),
               stats(gdef, s1))

  # Without the axis name each device would normalise with its own rows: check_vma sees statistics that vary over
  # 'data' and refuses to return them as replicated.
  with pytest.raises(ValueError, match="varying"):
    _shard_map_forward(gdef, mesh)(state, jax.device_put(x, batch_sharding(mesh)))


# --- Partitioning rules ---

def test_fsdp_init_shards_largest_dimension(mesh, encoder_states):
  build = BUILD["vit_tiny"]
  abstract = nnx.state(nnx.eval_shape(build))
  shardings = partitioning.state_shardings(abstract, mesh, "fsdp", min_size=1024)
  state = init_state(build, shardings)
  blk = state["tower"]["encoder"]["blocks"][0]
  assert blk["mlp"]["fc1"]["kernel"][...].sharding.spec == P(None, DATA)  # (64, 128): the 128
  assert blk["mlp"]["fc2"]["kernel"][...].sharding.spec == P(DATA, None)  # (128, 64)
  assert blk["attn"]["query"]["kernel"][...].sharding.spec == P(DATA, None)  # (64, 64): first of equals
  assert blk["ln1"]["scale"][...].sharding.spec == P()  # 'norm': never sharded
  assert blk["mlp"]["fc1"]["bias"][...].sharding.spec == P()  # under min_size
  assert state["head"]["norms"][0]["mean"][...].sharding.spec == P()  # BatchNorm statistics: replicated
  assert state["tower"]["patch_embed"]["kernel"][...].sharding.spec == P(None, None, None, DATA)  # (4,4,3,64)
  # the values are those of the same init on one device
  jax.tree.map(np.testing.assert_array_equal, state, encoder_states["vit_tiny"])

  replicated = partitioning.state_shardings(abstract, mesh, "replicate", min_size=1)
  assert all(s.spec == P() for s in jax.tree.leaves(replicated))


def test_optimizer_state_follows_parameter_shardings(mesh):
  """Adam's moments inherit the parameters' annotations, so one call shards the whole train state alike."""
  model, opt = nnx.eval_shape(lambda: (m := BUILD["vit_tiny"](), nnx.Optimizer(m, optax.adamw(1e-3), wrt=nnx.Param)))
  specs = lambda state: jax.tree.leaves(jax.tree.map(
      lambda s: s.spec, partitioning.state_shardings(state, mesh, "fsdp", min_size=1024)))
  param_specs = specs(nnx.state(model, nnx.Param))
  assert P(None, DATA) in param_specs
  for moment in ("mu", "nu"):
    assert specs(nnx.state(opt)["opt_state"][0][moment]) == param_specs


def test_fsdp_rules_on_resnet50_abstract_state(mesh):
  abstract = nnx.state(nnx.eval_shape(lambda: models.make_image_tower("resnet50", rngs=nnx.Rngs(0))))
  shardings = partitioning.state_shardings(abstract, mesh, "fsdp")
  leaves = jax.tree.leaves(abstract)
  specs = [s.spec for s in jax.tree.leaves(shardings)]
  total = per_device = 0
  for x, spec in zip(leaves, specs):
    n = math.prod(x.shape)
    sharded = [i for i, a in enumerate(spec) if a == DATA]
    if n >= partitioning.DEFAULT_MIN_SIZE and x.ndim == 4:  # every big conv kernel: its largest channel dim
      assert sharded == [2 + int(np.argmax(x.shape[2:]))], (x.shape, spec)
    if n < partitioning.DEFAULT_MIN_SIZE:
      assert not sharded
    total += n
    per_device += n // 8 if sharded else n
  assert per_device < total / 6  # nearly all of ResNet-50's 23.5M parameters are split 8 ways


def test_logical_to_spec_rules(mesh):
  rules = partitioning.RULES["fsdp"]
  spec = lambda names, shape, **kw: partitioning.logical_to_spec(names, shape, rules, mesh, min_size=1, **kw)
  assert spec(("vocab", "embed"), (30522, 512)) == P(None, DATA)  # 30522 is not divisible by 8
  assert spec(("conv_in", "conv_out"), (12, 20)) == P()  # neither dimension divides
  assert spec(("norm",), (4096,)) == P()
  assert spec((None, "embed"), (4096, 64)) == P(None, DATA)  # unnamed dimensions are never sharded
  assert spec(None, (64, 64)) == P()  # an unannotated variable
  assert partitioning.logical_to_spec(("embed", "mlp"), (64, 128), rules, mesh, min_size=10**6) == P()
  with pytest.raises(ValueError, match="do not match"):
    spec(("embed",), (4, 4))


# --- Text tower ---

TEXT = lambda **kw: models.make_text_tower("text_tiny", out_dim=16, vocab_size=100, max_len=16, rngs=nnx.Rngs(0),
                                          **kw)


@pytest.fixture(scope="module")
def text_state():
  return init_state(TEXT)  # pool and causal are static: every variant shares these parameters


@pytest.mark.parametrize("pool,causal", [("last", False), ("mean", False), ("last", True)])
def test_text_tower_ignores_padding(text_state, pool, causal):
  gdef = graphdef(lambda: TEXT(pool=pool, causal=causal))
  apply = jax.jit(lambda ids, mask: nnx.merge(gdef, text_state)(ids, mask))
  tower = lambda ids, mask: apply(jnp.asarray(ids), jnp.asarray(mask))
  rng = np.random.default_rng(0)
  lengths = np.array([3, 7, 1, 8])
  ids = rng.integers(1, 100, size=(4, 8)).astype(np.int32)
  mask = (np.arange(8)[None] < lengths[:, None]).astype(np.int32)
  out = tower(ids, mask)
  assert out.shape == (4, 16)
  # other ids under the padding, and four more padding columns: nothing changes
  ids2 = np.concatenate([np.where(mask, ids, rng.integers(1, 100, size=ids.shape)),
                         rng.integers(1, 100, size=(4, 4))], axis=1).astype(np.int32)
  mask2 = np.concatenate([mask, np.zeros((4, 4), np.int32)], axis=1)
  np.testing.assert_allclose(tower(ids2, mask2), out, atol=1e-5)
  # while a real token does change it
  ids3 = ids.copy()
  ids3[1, 0] = (ids3[1, 0] % 99) + 1
  assert np.abs(np.asarray(tower(ids3, mask)[1]) - np.asarray(out[1])).max() > 1e-4


def test_text_tower_errors_and_default_vocab():
  tower = nnx.eval_shape(lambda: models.make_text_tower("text_b", out_dim=512, rngs=nnx.Rngs(0)))
  assert tower.token_embed.embedding.shape == (30522, 512)  # the MiniLM WordPiece vocabulary
  small = nnx.eval_shape(lambda: models.make_text_tower("text_tiny", out_dim=8, max_len=4, rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match="exceeds the text tower's max_len 4"):
    small(jnp.ones((1, 5), jnp.int32), jnp.ones((1, 5), jnp.int32))
  with pytest.raises(ValueError, match="same shape"):
    small(jnp.ones((1, 3), jnp.int32), jnp.ones((1, 4), jnp.int32))
  with pytest.raises(ValueError, match="unknown pool"):
    models.make_text_tower("text_tiny", out_dim=8, pool="cls", rngs=nnx.Rngs(0))
