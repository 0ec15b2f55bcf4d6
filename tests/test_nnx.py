"""Flax NNX models: find_layers, value_and_grad and kaisa on nnx.Linear / nnx.Conv.

The user pattern under test: ``graphdef, params = nnx.split(model)``, a loss
that rebuilds the model with ``nnx.merge(graphdef, params)``, and kaisa_jax
on ``params`` (an ``nnx.State``, or its pure dict).

Every numerical check is against float64 NumPy written here (forward passes
and hand-derived output gradients, im2col from ``oracles``) or against plain
``jax.grad`` of the loss, never against kaisa_jax's own output; the last
tests check the method interception itself.
"""

from __future__ import annotations

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.tree_util import DictKey, GetAttrKey

import kaisa_jax
from kaisa_jax._src.capture import nnx as nnx_capture
from oracles import (assert_close, np_chain, np_damped_inverse, np_kernel_matrix,
                     np_patches, np_same_pads, np_scan_kfac_step)

BATCH = 8
# A mean loss puts 1/batch into every output gradient: scaled up so that G is
# not negligible next to the identity the factors start from.
LOSS_SCALE = 8.0


# ---------------------------------------------------------------------------
# Models and helpers.


class _Block(nnx.Module):
  """A nested module: 5 -> 4, no bias."""

  def __init__(self, rngs):
    self.proj = nnx.Linear(5, 4, use_bias=False, rngs=rngs)

  def __call__(self, x):
    return jnp.tanh(self.proj(x))


class MLP(nnx.Module):
  """6 -> 5 (bias, tanh) -> block 5 -> 4 (no bias, tanh) -> 3 (bias)."""

  def __init__(self, rngs):
    self.inp = nnx.Linear(6, 5, rngs=rngs)
    self.blocks = nnx.List([_Block(rngs)])
    self.head = nnx.Linear(4, 3, rngs=rngs)

  def __call__(self, x):
    x = jnp.tanh(self.inp(x))
    for block in self.blocks:
      x = block(x)
    return self.head(x)


# name -> (kind, params path without the leaf, has bias, kernel shape, A size, G size)
MLP_EXPECTED = {
    "inp": ("dense", ("inp",), True, (6, 5), 7, 5),
    "blocks/0/proj": ("dense", ("blocks", 0, "proj"), False, (5, 4), 5, 4),
    "head": ("dense", ("head",), True, (4, 3), 5, 3),
}


class CNN(nnx.Module):
  """(6, 6, 2) -> conv 3x3 SAME (bias, tanh) -> conv 2x2 stride 2 VALID (no bias) -> 3."""

  def __init__(self, rngs):
    self.conv1 = nnx.Conv(2, 4, (3, 3), rngs=rngs)
    self.conv2 = nnx.Conv(4, 5, (2, 2), strides=2, padding="VALID", use_bias=False,
                          rngs=rngs)
    self.head = nnx.Linear(3 * 3 * 5, 3, rngs=rngs)

  def __call__(self, x):
    x = self.conv2(jnp.tanh(self.conv1(x)))
    return self.head(x.reshape(x.shape[0], -1))


CNN_EXPECTED = {
    "conv1": ("conv", ("conv1",), True, (3, 3, 2, 4), 3 * 3 * 2 + 1, 4),
    "conv2": ("conv", ("conv2",), False, (2, 2, 4, 5), 2 * 2 * 4, 5),
    "head": ("dense", ("head",), True, (45, 3), 46, 3),
}


class Shared(nnx.Module):
  """One Linear 4 -> 4 applied twice, then a head 4 -> 2."""

  def __init__(self, rngs):
    self.shared = nnx.Linear(4, 4, rngs=rngs)
    self.head = nnx.Linear(4, 2, use_bias=False, rngs=rngs)

  def __call__(self, x):
    return self.head(self.shared(jnp.tanh(self.shared(x))))


def split_random(model_cls, seed=0, scale=0.5):
  """(graphdef, params) of ``model_cls(rngs)`` with its parameters drawn N(0, scale²) in NumPy.

  The model is built abstractly (eager initialisers would compile op by op).
  """
  graphdef, params = nnx.split(nnx.eval_shape(lambda: model_cls(nnx.Rngs(0))))
  rng = np.random.default_rng(seed)
  params = jax.tree.map(
      lambda v: jnp.asarray(rng.normal(size=v.shape) * scale, jnp.float32), params)
  return graphdef, params


def mse_loss(graphdef):
  """LOSS_SCALE · batch mean of ½‖model(x) − y‖², the model rebuilt from params."""

  def loss_fn(params, x, y):
    out = nnx.merge(graphdef, params)(x)
    return LOSS_SCALE * 0.5 * jnp.mean(jnp.sum((out - y) ** 2, axis=-1))

  return loss_fn


def batch(shape, n_out, seed=1):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(BATCH,) + shape)
  y = rng.normal(size=(BATCH, n_out))
  return jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)


def np_tree(params):
  """The params as nested dicts of float64 arrays (no Variable wrappers)."""
  return jax.tree.map(lambda v: np.asarray(v, np.float64), nnx.to_pure_dict(params))


def leaf_at(tree, path):
  return dict(jax.tree_util.tree_flatten_with_path(tree)[0])[path]


def mlp_oracle(params, x, y):
  """Hand-derived float64 forward and backward of MLP under ``mse_loss``.

  Returns {name: (input, d loss / d output)} and the kernel gradients.
  """
  p = np_tree(params)
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  w0, b0 = p["inp"]["kernel"], p["inp"]["bias"]
  w1 = p["blocks"][0]["proj"]["kernel"]
  w2, b2 = p["head"]["kernel"], p["head"]["bias"]
  h0 = np.tanh(x @ w0 + b0)
  h1 = np.tanh(h0 @ w1)
  out = h1 @ w2 + b2
  g2 = LOSS_SCALE * (out - y) / x.shape[0]
  g1 = (g2 @ w2.T) * (1 - h1 ** 2)
  g0 = (g1 @ w1.T) * (1 - h0 ** 2)
  rows = {"inp": (x, g0), "blocks/0/proj": (h0, g1), "head": (h1, g2)}
  kernel_grads = {name: a.T @ g for name, (a, g) in rows.items()}
  return rows, kernel_grads


# ---------------------------------------------------------------------------
# find_layers.


@pytest.mark.parametrize("form", ["state", "pure_dict"])
def test_find_layers_on_an_nnx_mlp(form):
  graphdef, params = split_random(MLP)
  if form == "pure_dict":
    params = nnx.to_pure_dict(params)
  x, y = batch((6,), 3)
  registry = kaisa_jax.find_layers(mse_loss(graphdef), params, x, y)
  assert registry.names == tuple(MLP_EXPECTED)  # call order
  assert registry.skipped == ()
  # An nnx.State leaf is the Variable's .value: the layer is still named
  # after the module path, the kernel path ends with the leaf.
  leaf = (GetAttrKey("value"),) if form == "state" else ()
  for name, (kind, path, has_bias, kernel_shape, a_size, g_size) in MLP_EXPECTED.items():
    layer = registry[name]
    assert (layer.kind, layer.kernel_shape, layer.a_size, layer.g_size) == (
        kind, kernel_shape, a_size, g_size)
    prefix = tuple(DictKey(k) for k in path)
    assert layer.kernel_path == prefix + (DictKey("kernel"),) + leaf
    assert leaf_at(params, layer.kernel_path).shape == kernel_shape
    if has_bias:
      assert layer.bias_path == prefix + (DictKey("bias"),) + leaf
      assert leaf_at(params, layer.bias_path).shape == (kernel_shape[-1],)
    else:
      assert layer.bias_path is None


def test_find_layers_on_an_nnx_cnn():
  graphdef, params = split_random(CNN)
  x, y = batch((6, 6, 2), 3)
  registry = kaisa_jax.find_layers(mse_loss(graphdef), params, x, y)
  assert registry.names == tuple(CNN_EXPECTED)
  for name, (kind, _, has_bias, kernel_shape, a_size, g_size) in CNN_EXPECTED.items():
    layer = registry[name]
    assert (layer.kind, layer.kernel_shape, layer.has_bias, layer.a_size, layer.g_size) == (
        kind, kernel_shape, has_bias, a_size, g_size)
  # The geometry read from the nnx.Conv attributes.
  assert registry["conv1"].strides == (1, 1) and registry["conv1"].padding == "SAME"
  assert registry["conv2"].strides == (2, 2) and registry["conv2"].padding == "VALID"


def test_find_layers_on_a_closed_over_model_names_the_fix():
  graphdef, params = split_random(MLP)
  model = nnx.merge(graphdef, params)
  x, y = batch((6,), 3)

  def loss_fn(params, x, y):  # ignores params: the kernels are not its leaves
    return jnp.mean((model(x) - y) ** 2)

  with pytest.raises(ValueError, match=r"nnx\.merge"):
    kaisa_jax.find_layers(loss_fn, params, x, y)
  assert not _is_patched(nnx.Linear)


def test_find_layers_without_layers_mentions_nnx():
  with pytest.raises(ValueError, match="NNX"):
    kaisa_jax.find_layers(lambda p, x: jnp.sum(p["w"] * x), {"w": jnp.ones(3)}, jnp.ones(3))


# ---------------------------------------------------------------------------
# value_and_grad: the captures against the oracle.


@pytest.mark.parametrize("jit", [False, True])
def test_mlp_captures_match_the_oracle(jit):
  graphdef, params = split_random(MLP)
  x, y = batch((6,), 3)
  loss_fn = mse_loss(graphdef)
  vg = kaisa_jax.value_and_grad(loss_fn)
  loss, grads, captures = (jax.jit(vg) if jit else vg)(params, x, y)
  rows, kernel_grads = mlp_oracle(params, x, y)
  assert set(captures) == set(MLP_EXPECTED)
  for name, (a, g) in rows.items():
    capture = captures[name]
    assert len(capture.inputs) == len(capture.out_grads) == 1
    assert_close(capture.inputs[0], a)
    assert_close(capture.out_grads[0], g)
    # aᵀg is the kernel gradient: of the oracle and of the returned grads.
    a_c = np.asarray(capture.inputs[0], np.float64)
    g_c = np.asarray(capture.out_grads[0], np.float64)
    assert_close(a_c.T @ g_c, kernel_grads[name])
  np_grads = np_tree(grads)
  assert_close(np_grads["inp"]["kernel"], kernel_grads["inp"])
  assert_close(np_grads["blocks"][0]["proj"]["kernel"], kernel_grads["blocks/0/proj"])
  assert_close(np_grads["head"]["kernel"], kernel_grads["head"])
  out = rows["head"][0] @ np_tree(params)["head"]["kernel"] + np_tree(params)["head"]["bias"]
  assert_close(loss, LOSS_SCALE * 0.5 * np.mean(np.sum((out - np.asarray(y)) ** 2, -1)))


def test_cnn_captures_match_the_oracle():
  graphdef, params = split_random(CNN)
  x, y = batch((6, 6, 2), 3)
  loss_fn = mse_loss(graphdef)
  _, _, captures = jax.jit(kaisa_jax.value_and_grad(loss_fn))(params, x, y)
  plain_grads = np_tree(jax.grad(loss_fn)(params, x, y))  # JAX autodiff, no capture
  p = np_tree(params)

  # Forward pass by im2col in float64.
  x64 = np.asarray(x, np.float64)
  patches1 = np_patches(x64, (3, 3), pads=np_same_pads((6, 6), (3, 3)))  # (B, 6, 6, 18)
  z1 = patches1 @ np_kernel_matrix(p["conv1"]["kernel"]).T + p["conv1"]["bias"]
  h1 = np.tanh(z1)
  patches2 = np_patches(h1, (2, 2), strides=(2, 2))  # (B, 3, 3, 16)
  z2 = patches2 @ np_kernel_matrix(p["conv2"]["kernel"]).T
  flat = z2.reshape(BATCH, -1)
  out = flat @ p["head"]["kernel"] + p["head"]["bias"]
  g_head = LOSS_SCALE * (out - np.asarray(y, np.float64)) / BATCH
  g_conv2 = (g_head @ p["head"]["kernel"].T).reshape(z2.shape)

  assert_close(captures["conv1"].inputs[0], x64)
  assert_close(captures["conv2"].inputs[0], h1)
  assert_close(captures["head"].inputs[0], flat)
  assert_close(captures["head"].out_grads[0], g_head)
  assert_close(captures["conv2"].out_grads[0], g_conv2)
  # The output gradients are those of the convolution: patchesᵀ g is the
  # kernel gradient (as a matrix), Σ g the bias gradient.
  for name, patches in (("conv1", patches1), ("conv2", patches2)):
    g = np.asarray(captures[name].out_grads[0], np.float64)
    g = g.reshape(-1, g.shape[-1])
    grad_matrix = g.T @ patches.reshape(g.shape[0], -1)
    assert_close(grad_matrix, np_kernel_matrix(plain_grads[name]["kernel"]))
  g1 = np.asarray(captures["conv1"].out_grads[0], np.float64)
  assert_close(g1.sum(axis=(0, 1, 2)), plain_grads["conv1"]["bias"])


def test_shared_linear_called_twice_gives_two_calls():
  graphdef, params = split_random(Shared)
  x, y = batch((4,), 2)
  loss_fn = mse_loss(graphdef)
  layers = kaisa_jax.find_layers(loss_fn, params, x, y)
  assert layers.names == ("shared", "head")
  _, _, captures = jax.jit(kaisa_jax.value_and_grad(loss_fn))(params, x, y)

  p = np_tree(params)
  w, b, w_head = p["shared"]["kernel"], p["shared"]["bias"], p["head"]["kernel"]
  x64 = np.asarray(x, np.float64)
  z0 = x64 @ w + b
  h = np.tanh(z0)
  z1 = h @ w + b
  out = z1 @ w_head
  g_out = LOSS_SCALE * (out - np.asarray(y, np.float64)) / BATCH
  g1 = g_out @ w_head.T
  g0 = (g1 @ w.T) * (1 - h ** 2)

  shared = captures["shared"]
  assert len(shared.inputs) == len(shared.out_grads) == 2
  assert_close(shared.inputs[0], x64)
  assert_close(shared.inputs[1], h)
  assert_close(shared.out_grads[0], g0)
  assert_close(shared.out_grads[1], g1)
  # The two calls' aᵀg add up to the kernel gradient (one probe per call,
  # not g0 + g1 in one).
  total = sum(np.asarray(a, np.float64).T @ np.asarray(g, np.float64)
              for a, g in zip(shared.inputs, shared.out_grads))
  assert_close(total, x64.T @ g0 + h.T @ g1)
  assert_close(total, np_tree(jax.grad(loss_fn)(params, x, y))["shared"]["kernel"])


def test_linen_and_nnx_versions_capture_the_same():
  """The same CNN in linen and in NNX, with the same weights: the same captures."""

  class LinenCNN(nn.Module):

    @nn.compact
    def __call__(self, x):
      x = nn.Conv(5, (2, 2), strides=2, padding="VALID", use_bias=False, name="conv2")(
          jnp.tanh(nn.Conv(4, (3, 3), name="conv1")(x)))
      return nn.Dense(3, name="head")(x.reshape(x.shape[0], -1))

  graphdef, params = split_random(CNN)
  x, y = batch((6, 6, 2), 3)
  linen_params = jax.tree.map(jnp.asarray, nnx.to_pure_dict(params))
  model = LinenCNN()

  def linen_loss(p, x, y):
    out = model.apply({"params": p}, x)
    return LOSS_SCALE * 0.5 * jnp.mean(jnp.sum((out - y) ** 2, axis=-1))

  nnx_layers = kaisa_jax.find_layers(mse_loss(graphdef), params, x, y)
  linen_layers = kaisa_jax.find_layers(linen_loss, linen_params, x, y)
  assert nnx_layers.names == linen_layers.names
  for a, b in zip(nnx_layers, linen_layers):
    assert (a.kind, a.kernel_shape, a.a_size, a.g_size) == (b.kind, b.kernel_shape, b.a_size,
                                                            b.g_size)
  _, _, nnx_caps = kaisa_jax.value_and_grad(mse_loss(graphdef))(params, x, y)
  _, _, linen_caps = kaisa_jax.value_and_grad(linen_loss)(linen_params, x, y)
  assert set(nnx_caps) == set(linen_caps)
  for name in linen_caps:
    for field in ("inputs", "out_grads"):
      for got, want in zip(getattr(nnx_caps[name], field), getattr(linen_caps[name], field)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------
# One kaisa update against a NumPy K-FAC.


def test_kaisa_updates_match_a_numpy_kfac_oracle():
  """Two preconditioned steps (inverse method, no KL clip) on the nnx MLP.

  Oracle, per layer with rows a (ones column for a bias) and g: the factors
  start at I and run A ← d·A + (1−d)·aᵀa/B, G ← d·G + (1−d)·gᵀg/B; the
  update is (G + γI)⁻¹ ∇ (A + γI)⁻¹ with ∇ = [dW, db] as (out, in [+1]).
  """
  damping, decay = 0.05, 0.8
  graphdef, params = split_random(MLP)
  loss_fn = mse_loss(graphdef)
  x, y = batch((6,), 3)
  layers = kaisa_jax.find_layers(loss_fn, params, x, y)
  tx = kaisa_jax.kaisa(layers, damping=damping, factor_decay=decay, kl_clip=None,
                       compute_method="inverse")
  state = tx.init(params)

  @jax.jit
  def step(params, state, x, y):
    _, grads, captures = kaisa_jax.value_and_grad(loss_fn)(params, x, y)
    return tx.update(grads, state, params, captures=captures)

  factors = {name: (np.eye(spec[4]), np.eye(spec[5])) for name, spec in MLP_EXPECTED.items()}
  for seed in (1, 2):  # two batches: the running average, not just one batch
    x, y = batch((6,), 3, seed=seed)
    updates, state = step(params, state, x, y)
    updates = np_tree(updates)
    rows, kernel_grads = mlp_oracle(params, x, y)
    for name, (_, path, has_bias, *_) in MLP_EXPECTED.items():
      a, g = rows[name]
      grad = kernel_grads[name].T  # (out, in)
      if has_bias:
        a = np.concatenate([a, np.ones((BATCH, 1))], axis=1)
        grad = np.concatenate([grad, g.sum(axis=0)[:, None]], axis=1)
      a_old, g_old = factors[name]
      factors[name] = (decay * a_old + (1 - decay) * a.T @ a / BATCH,
                       decay * g_old + (1 - decay) * g.T @ g / BATCH)
      a_f, g_f = factors[name]
      expected = np_damped_inverse(g_f, damping) @ grad @ np_damped_inverse(a_f, damping)
      node = updates
      for key in path:
        node = node[key]
      n_in = kernel_grads[name].shape[0]
      assert_close(node["kernel"], expected[:, :n_in].T, rtol=1e-4)
      if has_bias:
        assert_close(node["bias"], expected[:, -1], rtol=1e-4)


def test_training_step_with_sgd_under_jit_lowers_the_loss():
  graphdef, params = split_random(MLP, scale=0.3)
  loss_fn = mse_loss(graphdef)
  x, y = batch((6,), 3)
  layers = kaisa_jax.find_layers(loss_fn, params, x, y)
  opt = optax.chain(kaisa_jax.kaisa(layers, damping=0.1), optax.sgd(0.1, momentum=0.9))
  state = opt.init(params)

  @jax.jit
  def train_step(params, state, x, y):
    loss, grads, captures = kaisa_jax.value_and_grad(loss_fn)(params, x, y)
    updates, state = opt.update(grads, state, params, captures=captures)
    return optax.apply_updates(params, updates), state, loss

  losses = []
  for _ in range(10):
    params, state, loss = train_step(params, state, x, y)
    losses.append(float(loss))
  assert isinstance(params, nnx.State)
  # Against a float64 evaluation of the loss at the final weights.
  rows, _ = mlp_oracle(params, x, y)
  p = np_tree(params)
  out = rows["head"][0] @ p["head"]["kernel"] + p["head"]["bias"]
  final = LOSS_SCALE * 0.5 * np.mean(np.sum((out - np.asarray(y, np.float64)) ** 2, -1))
  assert final < losses[0], losses


# ---------------------------------------------------------------------------
# Nested transforms.


LENGTH = 3


class _Step(nnx.Module):
  """One iteration: c -> tanh(Linear 4 -> 4 (c))."""

  def __init__(self, rngs):
    self.lin = nnx.Linear(4, 4, rngs=rngs)

  def __call__(self, x):
    return jnp.tanh(self.lin(x))


class Transformed(nnx.Module):
  """x (4) -> LENGTH steps under an NNX transform -> head: Linear 4 -> 2.

  how: 'remat' (LENGTH separate steps, each under nnx.remat), 'scan_stacked'
  (nnx.scan over steps stacked on axis 0), 'scan_shared' (nnx.scan over one
  step, broadcast), 'remat_in_scan' and 'remat_around_scan' (stacked).
  """

  def __init__(self, how, rngs):
    self.how = how
    if how == "remat":
      self.steps = nnx.List([_Step(rngs) for _ in range(LENGTH)])
    elif how == "scan_shared":
      self.cell = _Step(rngs)
    else:
      self.stack = nnx.vmap(_Step, in_axes=0, out_axes=0)(
          nnx.Rngs(jax.random.split(jax.random.key(0), LENGTH)))
    self.head = nnx.Linear(4, 2, rngs=rngs)

  def __call__(self, x):
    apply = lambda step, x: step(x)
    if self.how == "remat":
      for step in self.steps:
        x = nnx.remat(apply)(step, x)
    elif self.how == "scan_shared":
      x = nnx.scan(apply, in_axes=(None, nnx.Carry), out_axes=nnx.Carry,
                   length=LENGTH)(self.cell, x)
    else:
      body = nnx.remat(apply) if self.how == "remat_in_scan" else apply
      scan = nnx.scan(body, in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
      x = (nnx.remat(scan) if self.how == "remat_around_scan" else scan)(self.stack, x)
    return self.head(x)


def _transformed_steps(p, how):
  """The (kernel, bias) each step applies, in order (float64 NumPy)."""
  if how == "remat":
    return [(s["lin"]["kernel"], s["lin"]["bias"]) for s in p["steps"].values()]
  if how == "scan_shared":
    return [(p["cell"]["lin"]["kernel"], p["cell"]["lin"]["bias"])] * LENGTH
  lin = p["stack"]["lin"]
  return [(lin["kernel"][i], lin["bias"][i]) for i in range(LENGTH)]


TRANSFORMS = ["remat", "scan_stacked", "scan_shared", "remat_in_scan", "remat_around_scan"]


@pytest.mark.parametrize("how", TRANSFORMS)
def test_layers_inside_nnx_remat_and_scan_are_captured_exactly(how):
  # NNX transforms hand the layer a new Variable holding the transform's
  # tracer; the capture finds its leaf of params through the Variable's
  # metadata, which the split and merge inside the transform keep.
  graphdef, params = split_random(lambda rngs: Transformed(how, rngs))
  x, y = batch((4,), 2)
  loss_fn = mse_loss(graphdef)
  layers = kaisa_jax.find_layers(loss_fn, params, x, y)
  assert not layers.skipped
  # The transformed layers' leaves, the copies' originals, count as covered.
  assert layers.uncovered == () and layers.plain_entries == 0
  assert layers.registered_entries == sum(leaf.size for leaf in jax.tree.leaves(params))
  scan_kind = {"scan_shared": "dense (scan)"}.get(how, "dense (scan, 3 stacked)")
  expected = ({f"steps/{i}/lin": "dense" for i in range(LENGTH)} if how == "remat"
              else {"cell/lin" if how == "scan_shared" else "stack/lin": scan_kind})
  assert {l.name: l.kind for l in layers} == {**expected, "head": "dense"}

  loss, grads, captures = jax.jit(kaisa_jax.value_and_grad(loss_fn))(params, x, y)
  p = np_tree(params)
  head = (p["head"]["kernel"], p["head"]["bias"])
  np_loss, _, rows = np_chain(_transformed_steps(p, how) + [head], x, y, ["tanh"] * LENGTH,
                              LOSS_SCALE)
  assert_close(loss, np_loss)
  for i in range(LENGTH):
    if how == "remat":
      (inputs,), (out_grads,) = captures[f"steps/{i}/lin"]
    else:  # iteration i is slice i of the stacked captures
      (inputs,), (out_grads,) = jax.tree.map(lambda c: c[i], tuple(captures[next(iter(expected))]))
    assert_close(inputs, rows[i][0])
    assert_close(out_grads, rows[i][1])
  assert_close(captures["head"].inputs[0], rows[-1][0])
  # The probes change nothing: the gradient is jax.grad's.
  jax.tree.map(lambda a, b: assert_close(a, b, rtol=1e-6), grads,
               jax.grad(loss_fn)(params, x, y))


@pytest.mark.parametrize("how", ["scan_stacked", "scan_shared"])
def test_kaisa_step_inside_nnx_scan_matches_numpy(how):
  graphdef, params = split_random(lambda rngs: Transformed(how, rngs), seed=2)
  x, y = batch((4,), 2, seed=3)
  loss_fn = mse_loss(graphdef)
  damping, decay = 0.05, 0.5
  tx = kaisa_jax.kaisa(kaisa_jax.find_layers(loss_fn, params, x, y), damping=damping,
                       factor_decay=decay, kl_clip=None)

  @jax.jit
  def step(params):
    _, grads, captures = kaisa_jax.value_and_grad(loss_fn)(params, x, y)
    return tx.update(grads, tx.init(params), params, captures=captures)[0]

  updates = np_tree(step(params))
  p = np_tree(params)
  head = (p["head"]["kernel"], p["head"]["bias"])
  _, np_grads, rows = np_chain(_transformed_steps(p, how) + [head], x, y, ["tanh"] * LENGTH,
                               LOSS_SCALE)
  stacked = how == "scan_stacked"
  lin = updates["stack" if stacked else "cell"]["lin"]
  kernels = lin["kernel"] if stacked else lin["kernel"][None]
  biases = lin["bias"] if stacked else lin["bias"][None]
  expected = np_scan_kfac_step(rows, np_grads, LENGTH, stacked, damping, decay)
  assert len(kernels) == len(expected)
  for kernel, bias, precond in zip(kernels, biases, expected):
    assert_close(kernel, precond[:, :-1].T, rtol=1e-4)
    assert_close(bias, precond[:, -1], rtol=1e-4)


def test_pure_dict_params_leave_nnx_transformed_layers_skipped():
  # A pure dict holds no Variables to carry their paths through the transform.
  graphdef, params = split_random(lambda rngs: Transformed("scan_stacked", rngs))
  params = nnx.to_pure_dict(params)
  x, y = batch((4,), 2)
  loss_fn = mse_loss(graphdef)
  layers = kaisa_jax.find_layers(loss_fn, params, x, y)
  assert layers.names == ("head",)
  assert [(s.name, s.module_type) for s in layers.skipped] == [("Linear_4x4", "Linear")]
  assert "nnx.State" in layers.skipped[0].reason
  _, grads, captures = jax.jit(kaisa_jax.value_and_grad(loss_fn))(params, x, y)
  assert set(captures) == {"head"}
  jax.tree.map(lambda a, b: assert_close(a, b, rtol=1e-6), grads,
               jax.grad(loss_fn)(params, x, y))


def test_variables_the_loss_returns_keep_their_own_metadata():
  # The capture marks the Variables of params while it traces the loss, and
  # takes the marks off before JAX flattens what the loss returns.
  graphdef, params = split_random(lambda rngs: Transformed("remat", rngs))
  x, y = batch((4,), 2)

  def loss_fn(params, x, y):
    model = nnx.merge(graphdef, params)
    return mse_loss(graphdef)(params, x, y), nnx.state(model)

  (_, aux), _, _ = jax.jit(kaisa_jax.value_and_grad(loss_fn, has_aux=True))(params, x, y)
  # A treedef holds each Variable's metadata.
  assert jax.tree.structure(aux) == jax.tree.structure(params)


class _OwnNorm(nnx.Module):
  """A hand-written RMSNorm holding a raw nnx.Param."""

  def __init__(self, features):
    self.weight = nnx.Param(jnp.zeros((features,)))

  def __call__(self, x):
    return x * jax.lax.rsqrt(jnp.mean(x ** 2, axis=-1, keepdims=True) + 1e-6) * (1 + self.weight)


class PartlyCovered(nnx.Module):
  """Linear 6 -> 5, own norm, times a raw (5, 3) nnx.Param; an unread Param."""

  def __init__(self, rngs):
    self.inp = nnx.Linear(6, 5, rngs=rngs)
    self.norm = _OwnNorm(5)
    self.mix = nnx.Param(jnp.ones((5, 3)))
    self.unread = nnx.Param(jnp.ones((2,)))

  def __call__(self, x):
    return self.norm(jnp.tanh(self.inp(x))) @ self.mix


@pytest.mark.parametrize("form", ["state", "pure_dict"])
def test_raw_nnx_params_are_uncovered_and_need_allow_plain_gradient(form):
  graphdef, params = split_random(PartlyCovered, seed=4)
  if form == "pure_dict":
    params = nnx.to_pure_dict(params)
  x, y = batch((6,), 3, seed=5)
  loss_fn = mse_loss(graphdef)
  layers = kaisa_jax.find_layers(loss_fn, params, x, y)
  assert layers.names == ("inp",)
  p = params if form == "pure_dict" else nnx.to_pure_dict(params)
  expected = [("mix", p["mix"].shape), ("norm/weight", p["norm"]["weight"].shape)]
  assert [(u.name, u.shape) for u in layers.uncovered] == expected
  assert layers.registered_entries == p["inp"]["kernel"].size + p["inp"]["bias"].size
  assert layers.plain_entries == p["mix"].size + p["norm"]["weight"].size
  with pytest.raises(ValueError, match="allow_plain_gradient") as error:
    kaisa_jax.kaisa(layers)
  assert all(f"{name!r} {shape}" in str(error.value) for name, shape in expected)
  tx = kaisa_jax.kaisa(layers, allow_plain_gradient=True, kl_clip=None)
  _, grads, captures = jax.jit(kaisa_jax.value_and_grad(loss_fn))(params, x, y)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params, captures=captures)
  pure = lambda tree: tree if form == "pure_dict" else nnx.to_pure_dict(tree)
  updates, grads = pure(updates), pure(grads)
  np.testing.assert_array_equal(updates["mix"], grads["mix"])
  np.testing.assert_array_equal(updates["norm"]["weight"], grads["norm"]["weight"])
  assert not np.allclose(updates["inp"]["kernel"], grads["inp"]["kernel"])


# ---------------------------------------------------------------------------
# The interception itself.


def _is_patched(cls) -> bool:
  return getattr(cls.__dict__["__call__"], nnx_capture._MARK, False)


def test_call_is_restored_after_the_block_and_after_an_exception():
  originals = {cls: cls.__dict__["__call__"] for cls in (nnx.Linear, nnx.Conv)}
  seen = []

  def record(next_fun, args, kwargs, context):
    seen.append((type(context.module).__name__, context.method_name, args[0].shape))
    return next_fun(*args, **kwargs)

  layer = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
  x = jnp.ones((4, 3))
  with nnx_capture.intercept_methods(record):
    assert _is_patched(nnx.Linear) and _is_patched(nnx.Conv)
    out = layer(x)
  assert seen == [("Linear", "__call__", (4, 3))]
  np.testing.assert_array_equal(np.asarray(out), np.asarray(layer(x)))
  for cls, method in originals.items():
    assert cls.__dict__["__call__"] is method

  with pytest.raises(RuntimeError, match="boom"):
    with nnx_capture.intercept_methods(record):
      layer(x)
      raise RuntimeError("boom")
  for cls, method in originals.items():
    assert cls.__dict__["__call__"] is method
  # Outside any block, calls are not intercepted.
  layer(x)
  assert len(seen) == 2


def test_nested_blocks_run_the_outer_interceptor_first_and_restore():
  original = nnx.Linear.__dict__["__call__"]
  order = []

  def tag(label):

    def interceptor(next_fun, args, kwargs, context):
      order.append(label)
      return next_fun(*args, **kwargs) * 2

    return interceptor

  layer = nnx.Linear(3, 2, use_bias=False, rngs=nnx.Rngs(0))
  x = jnp.ones((1, 3))
  plain = np.asarray(layer(x))
  with nnx_capture.intercept_methods(tag("outer")):
    with nnx_capture.intercept_methods(tag("inner")):
      out = layer(x)
    assert _is_patched(nnx.Linear)  # the outer block is still open
    layer(x)
  assert order == ["outer", "inner", "outer"]
  np.testing.assert_allclose(np.asarray(out), 4 * plain, rtol=1e-6)
  assert nnx.Linear.__dict__["__call__"] is original


def test_subclass_calling_super_is_intercepted_once():

  class Scaled(nnx.Linear):

    def __call__(self, x):
      return 2.0 * super().__call__(x)

  seen = []

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, nnx.Linear):  # not the LoRA adapter inside LoRALinear
      seen.append(type(context.module).__name__)
    return next_fun(*args, **kwargs)

  lora = nnx.LoRALinear(3, 2, lora_rank=1, rngs=nnx.Rngs(0))  # a wrapped subclass too
  with nnx_capture.intercept_methods(record):
    Scaled(3, 2, rngs=nnx.Rngs(0))(jnp.ones((1, 3)))
    lora(jnp.ones((1, 3)))
  assert seen == ["Scaled", "LoRALinear"]


def test_other_public_methods_are_intercepted_by_name():
  # Embed.attend uses the embedding as a kernel (tied embeddings): capture
  # must be able to see it, as nn.intercept_methods shows linen's.
  original = nnx.Embed.__dict__["attend"]
  seen = []

  def record(next_fun, args, kwargs, context):
    seen.append((type(context.module).__name__, context.method_name))
    return next_fun(*args, **kwargs)

  embed = nnx.Embed(5, 3, rngs=nnx.Rngs(0))
  with nnx_capture.intercept_methods(record):
    embed.attend(embed(jnp.array([1, 2])))
  assert seen == [("Embed", "__call__"), ("Embed", "attend")]
  assert nnx.Embed.__dict__["attend"] is original


def test_nnx_embed_norms_and_einsum_update_as_their_linen_twins():
  # The linen kinds are checked against float64 NumPy in test_layer_kinds.py;
  # the NNX classes must give the same registry and the same update.
  class NnxNet(nnx.Module):

    def __init__(self, rngs):
      self.embed = nnx.Embed(11, 6, rngs=rngs)
      self.norm = nnx.LayerNorm(6, rngs=rngs)
      self.gn = nnx.GroupNorm(6, num_groups=2, rngs=rngs)
      self.rms = nnx.RMSNorm(6, rngs=rngs)
      self.heads = nnx.LinearGeneral(6, (2, 4), rngs=rngs)
      self.mix = nnx.Einsum("bthk,hkf->btf", (2, 4, 5), (5,), rngs=rngs)
      self.out = nnx.Linear(5, 3, rngs=rngs)

    def __call__(self, ids):
      h = self.heads(self.rms(self.gn(self.norm(self.embed(ids)))))
      return self.out(self.mix(h))

  class LinenNet(nn.Module):

    @nn.compact
    def __call__(self, ids):
      h = nn.LayerNorm(name="norm")(nn.Embed(11, 6, name="embed")(ids))
      h = nn.RMSNorm(name="rms")(nn.GroupNorm(num_groups=2, name="gn")(h))
      h = nn.DenseGeneral((2, 4), name="heads")(h)
      # The equation given at call time, positionally.
      h = nn.Einsum((2, 4, 5), name="mix")(h, "bthk,hkf->btf")
      return nn.Dense(3, name="out")(h)

  graphdef, params = nnx.split(NnxNet(nnx.Rngs(0)))
  rng = np.random.default_rng(21)
  # Non-trivial scales and biases, the same in both.
  pure = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape) + 1, a.dtype),
                      nnx.to_pure_dict(params))
  nnx.replace_by_pure_dict(params, pure)
  ids = jnp.asarray(rng.integers(0, 11, (4, 5)), jnp.int32)
  t = jnp.asarray(rng.normal(size=(4, 5, 3)), jnp.float32)
  linen = LinenNet()
  losses = {
      "nnx": (lambda p, i, t: jnp.mean((nnx.merge(graphdef, p)(i) - t) ** 2), params),
      "linen": (lambda p, i, t: jnp.mean((linen.apply({"params": p}, i) - t) ** 2), pure),
  }
  updates, tables = {}, {}
  for name, (loss, p) in losses.items():
    registry = kaisa_jax.find_layers(loss, p, ids, t)
    tables[name] = [(l.name, l.kind, str(l.a_factor_shape), str(l.g_factor_shape))
                    for l in registry]
    tx = kaisa_jax.kaisa(registry, kl_clip=None, damping=0.05)
    _, grads, captures = kaisa_jax.value_and_grad(loss)(p, ids, t)
    updates[name], _ = tx.update(grads, tx.init(p), p, captures=captures)
  assert tables["nnx"] == tables["linen"]
  assert [row[1] for row in tables["nnx"]] == [
      "embed", "layer_norm", "group_norm", "rms_norm", "dense_general", "einsum", "dense"]
  nnx_updates = nnx.to_pure_dict(updates["nnx"])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               nnx_updates, updates["linen"])
  # Preconditioned, not the plain gradient.
  _, grads, _ = kaisa_jax.value_and_grad(losses["linen"][0])(pure, ids, t)
  assert not np.allclose(updates["linen"]["norm"]["scale"], grads["norm"]["scale"])


def test_nnx_einsum_configurations_we_cannot_read_are_skipped():
  class Net(nnx.Module):

    def __init__(self, rngs):
      # A bias laid out otherwise than the output features (2, 3), and a
      # product that is not jnp.einsum.
      self.flat_bias = nnx.Einsum("bd,dhk->bhk", (4, 2, 3), (6,), rngs=rngs)
      self.custom_op = nnx.Einsum("bd,de->be", (4, 4), (4,), rngs=rngs,
                                  einsum_op=lambda *a, **k: 2 * jnp.einsum(*a, **k))
      self.out = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x):
      h = self.flat_bias(x).reshape(x.shape[0], -1)[:, :4]
      return self.out(self.custom_op(h))

  graphdef, params = nnx.split(Net(nnx.Rngs(0)))
  x = jnp.ones((3, 4))
  loss = lambda p, x: jnp.sum(nnx.merge(graphdef, p)(x) ** 2)
  registry = kaisa_jax.find_layers(loss, params, x)
  reasons = {s.name: s.reason for s in registry.skipped}
  assert registry.names == ("out",)
  assert "bias_shape (6,)" in reasons["flat_bias"]
  assert "custom einsum_op" in reasons["custom_op"]
