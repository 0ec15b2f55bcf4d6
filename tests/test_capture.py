"""Tests for find_layers and value_and_grad (the layer captures)."""

import math

import flax.linen as nn
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.tree_util import DictKey

import kaisa_jax
from kaisa_jax._src.capture import coverage as coverage_lib
from layout import group_members, layer_factors
from oracles import assert_close, np_kernel_matrix, np_patches, random_params


def _leaf_at(tree, path):
  leaves = dict(jax.tree_util.tree_flatten_with_path(tree)[0])
  return leaves[path]


# --------------------------------------------------------------------------
# find_layers


class _Block(nn.Module):
  """Compact submodule."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3, 3))(x))
    return nn.Dense(3, use_bias=False)(x)


class _Net(nn.Module):
  """Setup-style module holding a compact one."""

  def setup(self):
    self.stem = nn.Conv(2, (3, 3), use_bias=False)
    self.block = _Block()
    self.head = nn.Dense(5)

  def __call__(self, x):
    x = self.block(self.stem(x))
    return self.head(x.reshape(x.shape[0], -1))


_NET_X_SHAPE = (2, 4, 4, 3)
_NET_EXPECTED = {
    # name: (kind, params path, has bias, kernel shape)
    "stem": ("conv", ("stem",), False, (3, 3, 3, 2)),
    "block/Conv_0": ("conv", ("block", "Conv_0"), True, (3, 3, 2, 4)),
    "block/Dense_0": ("dense", ("block", "Dense_0"), False, (4, 3)),
    "head": ("dense", ("head",), True, (4 * 4 * 3, 5)),
}


def _net_loss(model):
  return lambda p, x: jnp.mean(model.apply({"params": p}, x) ** 2)


def test_find_layers_nested_setup_and_compact():
  model = _Net()
  x = jnp.ones(_NET_X_SHAPE)
  params = random_params(model, x)
  registry = kaisa_jax.find_layers(_net_loss(model), params, x)
  assert registry.names == tuple(_NET_EXPECTED)  # call order
  assert registry.skipped == ()
  for name, (kind, path, has_bias, kernel_shape) in _NET_EXPECTED.items():
    layer = registry[name]
    assert layer.kind == kind
    assert layer.kernel_shape == kernel_shape
    assert layer.kernel_path == tuple(DictKey(k) for k in path) + (DictKey("kernel"),)
    assert _leaf_at(params, layer.kernel_path).shape == kernel_shape
    assert layer.has_bias == has_bias
    if has_bias:
      assert layer.bias_path == tuple(DictKey(k) for k in path) + (DictKey("bias"),)
      assert _leaf_at(params, layer.bias_path).shape == (kernel_shape[-1],)
    else:
      assert layer.bias_path is None


def test_find_layers_with_wrapped_params():
  model = _Net()
  x = jnp.ones(_NET_X_SHAPE)
  params = {"model": random_params(model, x), "temperature": jnp.ones(())}

  def loss_fn(p, x):
    return jnp.mean(model.apply({"params": p["model"]}, x) ** 2) * p["temperature"]

  registry = kaisa_jax.find_layers(loss_fn, params, x)
  # Layers are named after where their kernel lives in the params pytree.
  assert registry.names == tuple("model/" + name for name in _NET_EXPECTED)
  for name, (_, path, has_bias, kernel_shape) in _NET_EXPECTED.items():
    layer = registry["model/" + name]
    expected = (DictKey("model"),) + tuple(DictKey(k) for k in path)
    assert layer.kernel_path == expected + (DictKey("kernel"),)
    assert _leaf_at(params, layer.kernel_path).shape == kernel_shape
    if has_bias:
      assert layer.bias_path == expected + (DictKey("bias"),)


def test_find_layers_accepts_shape_struct_params():
  model = _Net()
  x = jnp.ones(_NET_X_SHAPE)
  params = random_params(model, x)
  structs = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), params)
  assert (kaisa_jax.find_layers(_net_loss(model), structs, x)
          == kaisa_jax.find_layers(_net_loss(model), params, x))


def test_find_layers_accepts_shape_struct_args():
  # The docstring: "*args, **kwargs: example arguments (only shapes and dtypes
  # are used)", so abstract example arguments should do.
  model = _Net()
  x = jnp.ones(_NET_X_SHAPE)
  params = random_params(model, x)
  structs = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), params)
  x_struct = jax.ShapeDtypeStruct(x.shape, x.dtype)
  assert (kaisa_jax.find_layers(_net_loss(model), structs, x_struct)
          == kaisa_jax.find_layers(_net_loss(model), params, x))


def test_find_layers_rejects_rebuilt_params():
  model = _Net()
  x = jnp.ones(_NET_X_SHAPE)
  # The loss builds the model's parameters from one flat vector: no kernel is
  # a leaf of what find_layers is given, by identity or by path.
  flat, unravel = jax.flatten_util.ravel_pytree(random_params(model, x))

  def loss_fn(p, x):
    return jnp.mean(model.apply({"params": unravel(p["flat"])}, x) ** 2)

  with pytest.raises(ValueError) as info:
    kaisa_jax.find_layers(loss_fn, {"flat": flat}, x)
  for name in _NET_EXPECTED:
    assert repr(name) in str(info.value)


def test_find_layers_rejects_a_loss_without_layers():
  params = {"w": jnp.ones(3)}
  with pytest.raises(ValueError):
    kaisa_jax.find_layers(lambda p, x: jnp.sum(p["w"] * x), params, jnp.ones(3))


def test_find_layers_passes_args_and_kwargs():
  model = nn.Dense(2)
  x = jnp.ones((3, 4))
  params = random_params(model, x)

  def loss_fn(p, x, *, target):
    return jnp.mean((model.apply({"params": p}, x) - target) ** 2)

  registry = kaisa_jax.find_layers(loss_fn, params, x, target=jnp.zeros((3, 2)))
  assert registry.names == ("",)  # a top-level module has the empty scope path
  assert registry[""].kind == "dense"


def test_find_layers_dense_called_with_keyword_input():
  class KwNet(nn.Module):

    @nn.compact
    def __call__(self, x):
      return nn.Dense(3, name="d")(inputs=x)

  model = KwNet()
  x = jnp.ones((2, 4))
  params = random_params(model, x)
  registry = kaisa_jax.find_layers(lambda p, x: jnp.sum(model.apply({"params": p}, x)),
                                   params, x)
  assert registry.names == ("d",)
  assert (registry["d"].a_size, registry["d"].g_size) == (5, 3)


def test_find_layers_registers_a_shared_module_once():
  class Shared(nn.Module):

    def setup(self):
      self.d = nn.Dense(4)

    def __call__(self, x):
      return self.d(jnp.tanh(self.d(x)))

  model = Shared()
  x = jnp.ones((2, 4))
  params = random_params(model, x)
  registry = kaisa_jax.find_layers(lambda p, x: jnp.sum(model.apply({"params": p}, x)),
                                   params, x)
  assert registry.names == ("d",)


# --------------------------------------------------------------------------
# value_and_grad on a two-layer MLP against numpy manual backprop


class _MLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    h = jnp.tanh(nn.Dense(4)(x))
    return nn.Dense(2)(h)


def _mlp_problem():
  model = _MLP()
  rng = np.random.default_rng(1)
  x = rng.normal(size=(5, 3)).astype(np.float32)
  t = rng.normal(size=(5, 2)).astype(np.float32)
  params = random_params(model, jnp.asarray(x), seed=2)

  def loss_fn(p, x, t):
    z = model.apply({"params": p}, x)
    return 0.5 * jnp.mean(jnp.sum((z - t) ** 2, axis=-1))

  return model, params, x, t, loss_fn


def _np_mlp(params, x, t):
  """float64 forward and manual backprop: loss, grads, inputs and out_grads."""
  w0 = np.asarray(params["Dense_0"]["kernel"], np.float64)
  b0 = np.asarray(params["Dense_0"]["bias"], np.float64)
  w1 = np.asarray(params["Dense_1"]["kernel"], np.float64)
  b1 = np.asarray(params["Dense_1"]["bias"], np.float64)
  x, t = np.asarray(x, np.float64), np.asarray(t, np.float64)
  r = np.tanh(x @ w0 + b0)
  z = r @ w1 + b1
  loss = 0.5 * np.mean(np.sum((z - t) ** 2, axis=-1))
  dz = (z - t) / x.shape[0]
  dh = (dz @ w1.T) * (1 - r ** 2)
  grads = {"Dense_0": {"kernel": x.T @ dh, "bias": dh.sum(0)},
           "Dense_1": {"kernel": r.T @ dz, "bias": dz.sum(0)}}
  captures = {"Dense_0": (x, dh), "Dense_1": (r, dz)}
  return loss, grads, captures


def _check_mlp(loss, grads, captures, params, x, t):
  np_loss, np_grads, np_captures = _np_mlp(params, x, t)
  assert_close(loss, np_loss)
  for name in ("Dense_0", "Dense_1"):
    for leaf in ("kernel", "bias"):
      assert_close(grads[name][leaf], np_grads[name][leaf])
  assert set(captures) == {"Dense_0", "Dense_1"}
  for name, (inputs, out_grads) in np_captures.items():
    capture = captures[name]
    assert isinstance(capture, kaisa_jax.LayerCapture)
    assert len(capture.inputs) == len(capture.out_grads) == 1
    assert_close(capture.inputs[0], inputs)
    assert_close(capture.out_grads[0], out_grads)


def test_value_and_grad_matches_jax_and_numpy():
  _, params, x, t, loss_fn = _mlp_problem()
  loss, grads, captures = kaisa_jax.value_and_grad(loss_fn)(params, x, t)
  ref_loss, ref_grads = jax.value_and_grad(loss_fn)(params, x, t)
  assert_close(loss, ref_loss, rtol=1e-6)
  jax.tree.map(lambda a, b: assert_close(a, b, rtol=1e-6), grads, ref_grads)
  assert jax.tree.structure(grads) == jax.tree.structure(params)
  _check_mlp(loss, grads, captures, params, x, t)


def test_value_and_grad_under_jit():
  _, params, x, t, loss_fn = _mlp_problem()
  loss, grads, captures = jax.jit(kaisa_jax.value_and_grad(loss_fn))(params, x, t)
  _check_mlp(loss, grads, captures, params, x, t)


def test_value_and_grad_has_aux_and_kwargs():
  model, params, x, t, _ = _mlp_problem()

  def loss_fn(p, x, *, t):
    z = model.apply({"params": p}, x)
    return 0.5 * jnp.mean(jnp.sum((z - t) ** 2, axis=-1)), {"z": z}

  (loss, aux), grads, captures = jax.jit(
      kaisa_jax.value_and_grad(loss_fn, has_aux=True))(params, x, t=t)
  _check_mlp(loss, grads, captures, params, x, t)
  assert_close(aux["z"], model.apply({"params": params}, x))


def test_captures_of_a_dense_with_leading_axes():
  # (B, T, d) inputs: captured as given, out_grads from jax.vjp of the rest of
  # the network (here the loss applied to the layer output).
  class Seq(nn.Module):

    @nn.compact
    def __call__(self, x):
      return nn.Dense(3, name="proj")(x)

  model = Seq()
  rng = np.random.default_rng(3)
  x = rng.normal(size=(2, 4, 5)).astype(np.float32)
  params = random_params(model, jnp.asarray(x))
  loss_of_output = lambda y: jnp.mean(jnp.sin(y) * y)
  loss_fn = lambda p, x: loss_of_output(model.apply({"params": p}, x))
  _, _, captures = kaisa_jax.value_and_grad(loss_fn)(params, x)
  (inputs,), (out_grads,) = captures["proj"]
  assert_close(inputs, x)
  y = model.apply({"params": params}, x)
  _, vjp = jax.vjp(loss_of_output, y)
  (expected,) = vjp(jnp.ones(()))
  assert out_grads.shape == (2, 4, 3)
  assert_close(out_grads, expected)


def test_captures_of_nested_layers_against_vjp():
  # Every layer of the nested net: its input from a forward pass written out
  # layer by layer, its output gradient as the vjp of the rest of the network.
  model = _Net()
  rng = np.random.default_rng(4)
  x = rng.normal(size=_NET_X_SHAPE).astype(np.float32)
  p = random_params(model, jnp.asarray(x), seed=5)
  loss, _, captures = kaisa_jax.value_and_grad(_net_loss(model))(p, x)
  assert set(captures) == set(_NET_EXPECTED)

  stem = lambda v: nn.Conv(2, (3, 3), use_bias=False).apply({"params": p["stem"]}, v)
  conv0 = lambda v: nn.Conv(4, (3, 3)).apply({"params": p["block"]["Conv_0"]}, v)
  dense0 = lambda v: nn.Dense(3, use_bias=False).apply({"params": p["block"]["Dense_0"]}, v)
  head = lambda v: nn.Dense(5).apply({"params": p["head"]}, v)
  flat = lambda v: v.reshape(v.shape[0], -1)
  mse = lambda out: jnp.mean(out ** 2)

  a_stem = jnp.asarray(x)
  y_stem = stem(a_stem)
  y_conv0 = conv0(y_stem)
  a_dense0 = nn.relu(y_conv0)
  y_dense0 = dense0(a_dense0)
  a_head = flat(y_dense0)
  y_head = head(a_head)
  assert_close(loss, mse(y_head))

  expected = {
      # name: (layer input, layer output, loss as a function of that output)
      "stem": (a_stem, y_stem, lambda y: mse(head(flat(dense0(nn.relu(conv0(y))))))),
      "block/Conv_0": (y_stem, y_conv0, lambda y: mse(head(flat(dense0(nn.relu(y)))))),
      "block/Dense_0": (a_dense0, y_dense0, lambda y: mse(head(flat(y)))),
      "head": (a_head, y_head, mse),
  }
  for name, (layer_in, layer_out, rest) in expected.items():
    (inputs,), (out_grads,) = captures[name]
    assert_close(inputs, layer_in)
    _, vjp = jax.vjp(rest, layer_out)
    (out_grad,) = vjp(jnp.ones(()))
    assert_close(out_grads, out_grad)


# --------------------------------------------------------------------------
# Shared modules


class _TwoInputs(nn.Module):

  def setup(self):
    self.d = nn.Dense(3)

  def __call__(self, x1, x2):
    return self.d(x1), self.d(x2)


def test_shared_module_two_calls_different_batches():
  model = _TwoInputs()
  rng = np.random.default_rng(6)
  x1 = rng.normal(size=(5, 4)).astype(np.float32)
  x2 = rng.normal(size=(2, 4)).astype(np.float32)
  t1 = rng.normal(size=(5, 3)).astype(np.float32)
  t2 = rng.normal(size=(2, 3)).astype(np.float32)
  params = random_params(model, jnp.asarray(x1), jnp.asarray(x2), seed=7)

  def loss_fn(p, x1, x2):
    y1, y2 = model.apply({"params": p}, x1, x2)
    return jnp.mean((y1 - t1) ** 2) + 0.5 * jnp.mean(jnp.abs(y2 - t2) ** 3)

  _, grads, captures = kaisa_jax.value_and_grad(loss_fn)(params, x1, x2)
  assert list(captures) == ["d"]
  capture = captures["d"]
  assert len(capture.inputs) == len(capture.out_grads) == 2

  # numpy oracle for the per-call output gradients.
  w = np.asarray(params["d"]["kernel"], np.float64)
  b = np.asarray(params["d"]["bias"], np.float64)
  y1 = x1.astype(np.float64) @ w + b
  y2 = x2.astype(np.float64) @ w + b
  e1, e2 = y1 - t1, y2 - t2
  g1 = 2 * e1 / e1.size
  g2 = 0.5 * 3 * e2 * np.abs(e2) / e2.size
  assert_close(capture.inputs[0], x1)
  assert_close(capture.inputs[1], x2)
  assert_close(capture.out_grads[0], g1)
  assert_close(capture.out_grads[1], g2)

  # Σ_calls gᵢᵀ [aᵢ, 1] is the (out, in + 1) gradient matrix.
  total = np.zeros((3, 5))
  for a, g in zip(capture.inputs, capture.out_grads):
    a = np.concatenate([np.asarray(a, np.float64), np.ones((a.shape[0], 1))], axis=1)
    total += np.asarray(g, np.float64).T @ a
  ref_grads = jax.grad(loss_fn)(params, x1, x2)
  assert_close(total[:, :-1], np.asarray(ref_grads["d"]["kernel"]).T)
  assert_close(total[:, -1], ref_grads["d"]["bias"])
  jax.tree.map(lambda a, b: assert_close(a, b, rtol=1e-6), grads, ref_grads)


def test_shared_module_applied_to_its_own_output():
  # z = D(tanh(D(x))): the calls are captured separately, not summed.
  class Twice(nn.Module):

    def setup(self):
      self.d = nn.Dense(3)

    def __call__(self, x):
      return self.d(jnp.tanh(self.d(x)))

  model = Twice()
  rng = np.random.default_rng(8)
  x = rng.normal(size=(4, 3)).astype(np.float32)
  t = rng.normal(size=(4, 3)).astype(np.float32)
  params = random_params(model, jnp.asarray(x), seed=9)

  def loss_fn(p, x):
    return 0.5 * jnp.mean(jnp.sum((model.apply({"params": p}, x) - t) ** 2, axis=-1))

  _, grads, captures = jax.jit(kaisa_jax.value_and_grad(loss_fn))(params, x)
  w = np.asarray(params["d"]["kernel"], np.float64)
  b = np.asarray(params["d"]["bias"], np.float64)
  x64 = x.astype(np.float64)
  r = np.tanh(x64 @ w + b)
  z = r @ w + b
  dz = (z - t) / x.shape[0]
  dh = (dz @ w.T) * (1 - r ** 2)
  capture = captures["d"]
  assert len(capture.inputs) == 2
  assert_close(capture.inputs[0], x64)
  assert_close(capture.inputs[1], r)
  assert_close(capture.out_grads[0], dh)
  assert_close(capture.out_grads[1], dz)
  assert_close(grads["d"]["kernel"], x64.T @ dh + r.T @ dz)
  assert_close(grads["d"]["bias"], dh.sum(0) + dz.sum(0))


def test_shared_conv_per_call_products_sum_to_kernel_gradient():
  class SharedConv(nn.Module):

    def setup(self):
      self.conv = nn.Conv(3, (2, 2), padding="VALID")

    def __call__(self, x1, x2):
      return self.conv(x1), self.conv(x2)

  model = SharedConv()
  rng = np.random.default_rng(10)
  x1 = rng.normal(size=(2, 4, 4, 2)).astype(np.float32)
  x2 = rng.normal(size=(3, 3, 5, 2)).astype(np.float32)
  params = random_params(model, jnp.asarray(x1), jnp.asarray(x2), seed=11)

  def loss_fn(p, x1, x2):
    y1, y2 = model.apply({"params": p}, x1, x2)
    return jnp.mean(jnp.tanh(y1) ** 2) + jnp.mean(y2 ** 3)

  _, grads, captures = kaisa_jax.value_and_grad(loss_fn)(params, x1, x2)
  capture = captures["conv"]
  assert len(capture.inputs) == 2
  total = np.zeros((3, 2 * 4 + 1))
  for x, g in zip(capture.inputs, capture.out_grads):
    patches = np_patches(x, (2, 2))
    a = patches.reshape(-1, patches.shape[-1])
    a = np.concatenate([a, np.ones((a.shape[0], 1))], axis=1)
    total += np.asarray(g, np.float64).reshape(-1, 3).T @ a
  assert_close(capture.inputs[0], x1)
  assert_close(capture.inputs[1], x2)
  # (2, 2, C=2, O=3) kernel gradient in the (O, C * 4 + 1) layout.
  expected = np_kernel_matrix(grads["conv"]["kernel"], np.asarray(grads["conv"]["bias"]))
  assert_close(total, expected)


# --------------------------------------------------------------------------
# Found but unsupported configurations (a masked convolution)


class _MaskedNet(nn.Module):

  @nn.compact
  def __call__(self, x):
    mask = jnp.ones((3, 3, x.shape[-1], 4)).at[1, 1].set(0)
    x = nn.Conv(4, (3, 3), mask=mask, name="masked")(x)
    return nn.Dense(2, name="head")(x.reshape(x.shape[0], -1))


def test_masked_conv_is_skipped_and_must_be_listed():
  model = _MaskedNet()
  rng = np.random.default_rng(12)
  x = rng.normal(size=(2, 3, 3, 4)).astype(np.float32)
  params = random_params(model, jnp.asarray(x), seed=13)
  loss_fn = lambda p, x: jnp.mean(model.apply({"params": p}, x) ** 2)
  registry = kaisa_jax.find_layers(loss_fn, params, x)
  assert registry.names == ("head",)
  assert [s.name for s in registry.skipped] == ["masked"]
  assert registry.skipped[0].module_type == "Conv"
  assert "masked convolution" in registry.skipped[0].reason

  with pytest.raises(ValueError, match="skip_layers"):
    kaisa_jax.kaisa(registry)

  tx = kaisa_jax.kaisa(registry, skip_layers=("masked",), kl_clip=None)
  opt = optax.chain(tx, optax.sgd(1.0))
  state = jax.jit(opt.init)(params)
  assert set(layer_factors(registry, state[0], skip_layers=("masked",))) == {"head"}
  # One group in the state, the head's alone.
  assert group_members(registry, skip_layers=("masked",)) == {"a37_g2": ("head",)}
  assert set(state[0].factors) == {"a37_g2"}

  @jax.jit
  def step(params, state, x):
    _, grads, captures = kaisa_jax.value_and_grad(loss_fn)(params, x)
    assert "masked" in captures  # captured, but left to the plain gradient
    updates, _ = opt.update(grads, state, params, captures=captures)
    return grads, updates

  grads, updates = step(params, state, x)
  # sgd(1.0) negates: the masked conv's leaves are the plain gradient.
  for leaf in ("kernel", "bias"):
    np.testing.assert_array_equal(np.asarray(updates["masked"][leaf]),
                                  -np.asarray(grads["masked"][leaf]))
  # The head is preconditioned (factors no longer the identity), so it changes.
  assert not np.allclose(np.asarray(updates["head"]["kernel"]),
                         -np.asarray(grads["head"]["kernel"]))


def test_masked_conv_is_skipped():
  class Masked(nn.Module):

    @nn.compact
    def __call__(self, x):
      x = nn.Conv(2, (3,), mask=jnp.ones((3, 2, 2)), name="masked")(x)
      return nn.Dense(2, name="head")(x)

  model = Masked()
  x = jnp.ones((2, 5, 2))
  params = random_params(model, x)
  registry = kaisa_jax.find_layers(
      lambda p, x: jnp.sum(model.apply({"params": p}, x)), params, x)
  assert registry.names == ("head",)
  assert [(s.name, s.reason) for s in registry.skipped] == [("masked", "masked convolution")]


# --------------------------------------------------------------------------
# Several separately applied models in one loss


def test_two_models_applied_in_one_loss_are_distinct_layers():
  # An encoder and a decoder, each applied with its own params subtree: both
  # have a layer at scope path "Dense_0", but they are different layers with
  # different kernels. They must not be merged into one "shared" layer (that
  # would pool the rows of two layers into one set of factors and leave the
  # decoder unpreconditioned); a clear ValueError would also be acceptable.
  class Encoder(nn.Module):

    @nn.compact
    def __call__(self, x):
      return nn.Dense(3)(x)

  class Decoder(nn.Module):

    @nn.compact
    def __call__(self, x):
      return nn.Dense(2)(x)

  enc, dec = Encoder(), Decoder()
  x = jnp.ones((4, 3))
  params = {"enc": random_params(enc, x, seed=1), "dec": random_params(dec, x, seed=2)}

  def loss_fn(p, x):
    h = jnp.tanh(enc.apply({"params": p["enc"]}, x))
    return jnp.mean(dec.apply({"params": p["dec"]}, h) ** 2)

  try:
    registry = kaisa_jax.find_layers(loss_fn, params, x)
  except ValueError:
    return
  kernel_paths = {layer.kernel_path for layer in registry}
  assert kernel_paths == {
      (DictKey("enc"), DictKey("Dense_0"), DictKey("kernel")),
      (DictKey("dec"), DictKey("Dense_0"), DictKey("kernel")),
  }


class _RematNet(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.remat(nn.Dense)(4)(x)
    return nn.Dense(2)(jnp.tanh(x))


def test_layer_inside_remat_is_registered_and_captured_exactly():
  # A call inside nn.remat is captured like any other: its input comes back
  # from the backward pass (tests/test_capture_transforms.py has the rest).
  model = _RematNet()
  x = jnp.asarray(np.random.default_rng(0).normal(size=(5, 3)), jnp.float32)
  params = model.init(jax.random.key(0), x)["params"]

  def loss_fn(p, x):
    return jnp.mean(model.apply({"params": p}, x) ** 2)

  registry = kaisa_jax.find_layers(loss_fn, params, x)
  assert registry.names == ("CheckpointDense_0", "Dense_0")
  assert registry.skipped == ()
  assert registry["CheckpointDense_0"].kernel_path == (DictKey("CheckpointDense_0"),
                                                       DictKey("kernel"))

  _, grads, captures = jax.jit(kaisa_jax.value_and_grad(loss_fn))(params, x)
  assert set(captures) == {"CheckpointDense_0", "Dense_0"}
  # float64 forward and manual backprop.
  w0, b0 = (np.asarray(params["CheckpointDense_0"][k], np.float64) for k in ("kernel", "bias"))
  w1, b1 = (np.asarray(params["Dense_0"][k], np.float64) for k in ("kernel", "bias"))
  x64 = np.asarray(x, np.float64)
  r = np.tanh(x64 @ w0 + b0)
  z = r @ w1 + b1
  dz = 2 * z / z.size
  dh = (dz @ w1.T) * (1 - r ** 2)
  for name, a, g in (("CheckpointDense_0", x64, dh), ("Dense_0", r, dz)):
    (inputs,), (out_grads,) = captures[name]
    assert_close(inputs, a)
    assert_close(out_grads, g)
    assert_close(np.asarray(inputs, np.float64).T @ np.asarray(out_grads, np.float64),
                 grads[name]["kernel"])
  # No skip_layers needed, and the remat'ed layer is preconditioned.
  tx = kaisa_jax.kaisa(registry)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params, captures=captures)
  assert not np.allclose(np.asarray(updates["CheckpointDense_0"]["kernel"]),
                         np.asarray(grads["CheckpointDense_0"]["kernel"]))


# --------------------------------------------------------------------------
# Coverage: the leaves of params the loss reads that no layer covers


class _OwnKernel(nn.Module):
  """A custom module holding its own kernel, applied with jnp.dot."""

  @nn.compact
  def __call__(self, x):
    return jnp.dot(x, self.param("w", nn.initializers.lecun_normal(), (x.shape[-1], 4)))


class _OwnRMSNorm(nn.Module):
  """A hand-written RMSNorm (Gemma's convention: the scale is 1 + weight)."""

  @nn.compact
  def __call__(self, x):
    weight = self.param("weight", nn.initializers.zeros, (x.shape[-1],))
    return x * jax.lax.rsqrt(jnp.mean(x ** 2, axis=-1, keepdims=True) + 1e-6) * (1 + weight)


class _PartlyCovered(nn.Module):
  """Registered, skipped, uncovered and unread parameters side by side."""

  @nn.compact
  def __call__(self, x):
    self.param("unread", nn.initializers.ones, (7,))
    gain = self.param("gain", nn.initializers.ones, ())  # inline, in a compact method
    x = _OwnRMSNorm(name="norm")(_OwnKernel(name="own")(x))
    x = nn.ConvTranspose(3, (1,), name="up")(x[:, None, :])[:, 0, :]
    return nn.Dense(2, name="head")(x) * gain


def _partly_covered_problem():
  model = _PartlyCovered()
  x = jnp.asarray(np.random.default_rng(20).normal(size=(4, 5)), jnp.float32)
  params = random_params(model, x, seed=21)
  return params, x, lambda p, x: jnp.mean(model.apply({"params": p}, x) ** 2)


def _sizes(params, names) -> int:
  return sum(_leaf_at(params, (DictKey(a), DictKey(b))).size for a, b in names)


def test_uncovered_leaves_are_listed_by_path_and_shape():
  params, x, loss_fn = _partly_covered_problem()
  registry = kaisa_jax.find_layers(loss_fn, params, x)
  assert registry.names == ("head",)
  assert [s.name for s in registry.skipped] == ["up"]
  covered = {("head", "kernel"), ("head", "bias"), ("up", "kernel"), ("up", "bias")}
  grads = jax.grad(loss_fn)(params, x)
  expected = []
  for path, grad in jax.tree_util.tree_flatten_with_path(grads)[0]:
    keys = tuple(k.key for k in path)
    # With random params every leaf the loss reads has a nonzero gradient.
    if keys not in covered and np.any(np.asarray(grad) != 0):
      expected.append(("/".join(keys), path, grad.shape))
  assert [(u.name, u.path, u.shape) for u in registry.uncovered] == expected
  assert {name for name, _, _ in expected} == {"gain", "norm/weight", "own/w"}
  assert [u.size for u in registry.uncovered] == [math.prod(s) for _, _, s in expected]
  assert registry.registered_entries == _sizes(params, [("head", "kernel"), ("head", "bias")])
  assert registry.plain_entries == (_sizes(params, [("up", "kernel"), ("up", "bias")])
                                    + sum(u.size for u in registry.uncovered))
  table = str(registry)
  for u in registry.uncovered:
    assert f"uncovered {u.shape}: plain gradient" in next(
        line for line in table.splitlines() if line.startswith(u.name + " "))
  assert "unread" not in table
  assert (f"parameters: {registry.registered_entries:,} in registered layers" in table
          and f"{registry.plain_entries:,} follow the plain gradient" in table)


def _checkpointed(loss_fn):
  """``loss_fn`` under a jax.checkpoint made in the loss, which hands it every leaf."""
  return lambda p, x: jax.checkpoint(lambda p: loss_fn(p, x))(p)


def test_leaves_only_aux_reads_or_a_checkpoint_drops_are_not_uncovered():
  params, x, loss_fn = _partly_covered_problem()
  names = lambda loss: [u.name for u in kaisa_jax.find_layers(loss, params, x).uncovered]
  expected = names(loss_fn)
  # The loss is the first output: what aux alone reads gets no gradient.
  assert names(lambda p, x: (loss_fn(p, x), p["unread"] * 2)) == expected
  # A leaf handed to a jax.checkpoint that does not read it is not read.
  assert names(_checkpointed(loss_fn)) == expected
  # Multiplied by zero it is still read: listed.
  assert names(lambda p, x: loss_fn(p, x) + 0 * jnp.sum(p["unread"])) == sorted(
      expected + ["unread"])


def test_without_jax_dead_code_elimination_coverage_over_estimates(monkeypatch):
  # The fallback does not look into nested jaxprs: a leaf a checkpoint is
  # given but does not read is listed too; a leaf read is never missed.
  params, x, loss_fn = _partly_covered_problem()
  names = lambda loss: {u.name for u in kaisa_jax.find_layers(loss, params, x).uncovered}
  precise = names(loss_fn)
  monkeypatch.setattr(coverage_lib, "_dce_jaxpr", None)
  assert names(loss_fn) == precise
  assert names(_checkpointed(loss_fn)) == precise | {"unread"}


def test_uncovered_leaves_need_allow_plain_gradient():
  params, x, loss_fn = _partly_covered_problem()
  registry = kaisa_jax.find_layers(loss_fn, params, x)
  with pytest.raises(ValueError) as error:
    kaisa_jax.kaisa(registry, skip_layers=("^up$",))
  message = str(error.value)
  assert "allow_plain_gradient=True" in message and "skip_layers" not in message
  for u in registry.uncovered:
    assert f"{u.name!r} {u.shape}" in message
  # Both lists in one error.
  with pytest.raises(ValueError, match="(?s)'up' \\(ConvTranspose\\).*'own/w' \\(5, 4\\)"):
    kaisa_jax.kaisa(registry)
  # The plan does not depend on the uncovered leaves, only on the skipped layers.
  assert [l.name for l in kaisa_jax.placement(registry, 1, skip_layers=("^up$",)).layers] == [
      "head"]
  with pytest.raises(ValueError, match="'up' \\(ConvTranspose\\)"):
    kaisa_jax.placement(registry, 1)
  # One argument accepts the uncovered leaves and the skipped layer alike.
  tx = kaisa_jax.kaisa(registry, allow_plain_gradient=True, kl_clip=None)
  assert [l.name for l in kaisa_jax.placement(registry, 1, allow_plain_gradient=True).layers] == [
      "head"]
  _, grads, captures = jax.jit(kaisa_jax.value_and_grad(loss_fn))(params, x)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params, captures=captures)
  for name in ("gain", "norm", "own", "up"):
    for update, grad in zip(jax.tree.leaves(updates[name]), jax.tree.leaves(grads[name])):
      np.testing.assert_array_equal(np.asarray(update), np.asarray(grad))
  assert not np.allclose(np.asarray(updates["head"]["kernel"]),
                         np.asarray(grads["head"]["kernel"]))
