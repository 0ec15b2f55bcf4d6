"""Tests for the Kronecker factors A and G against dense float64 numpy oracles."""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kaisa_jax
from kaisa_jax._src import factors as factors_lib
from kaisa_jax._src.layers import conv as conv_lib
from layout import layer_factors
from oracles import (assert_close, np_kernel_matrix, np_patches, np_same_pads,
                     random_params)


def _single_layer(module, x):
  params = random_params(module, x)
  loss_fn = lambda p, x: jnp.sum(module.apply({"params": p}, x))
  (layer,) = kaisa_jax.find_layers(loss_fn, params, x).layers
  return layer, params


# --------------------------------------------------------------------------
# numpy oracles


def _np_conv_rows(patches, out_grads, use_bias):
  """The KAISA conv rows: patches (+ ones) / S and out_grads / S."""
  positions = int(np.prod(patches.shape[1:-1]))
  a = patches.reshape(-1, patches.shape[-1])
  if use_bias:
    a = np.concatenate([a, np.ones((a.shape[0], 1))], axis=1)
  g = np.asarray(out_grads, np.float64).reshape(-1, out_grads.shape[-1])
  return a / positions, g / positions


def _np_dense_rows(x, out_grads, use_bias):
  a = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
  if use_bias:
    a = np.concatenate([a, np.ones((a.shape[0], 1))], axis=1)
  g = np.asarray(out_grads, np.float64).reshape(-1, out_grads.shape[-1])
  return a, g


def _np_pooled_factors(rows):
  """rows: list of (a_i, g_i) per call -> (Σ aᵢᵀaᵢ / Σ rowsᵢ, Σ gᵢᵀgᵢ / Σ rowsᵢ)."""
  a_sum = sum(a.T @ a for a, _ in rows)
  g_sum = sum(g.T @ g for _, g in rows)
  a_rows = sum(a.shape[0] for a, _ in rows)
  g_rows = sum(g.shape[0] for _, g in rows)
  return a_sum / a_rows, g_sum / g_rows


def _batch_factors(layer, inputs, out_grads):
  capture = kaisa_jax.LayerCapture(tuple(jnp.asarray(x) for x in inputs),
                                   tuple(jnp.asarray(g) for g in out_grads))
  # One compiled program rather than many eagerly dispatched small ops.
  return jax.jit(factors_lib.batch_factors, static_argnums=(0, 2))(
      layer, capture, jnp.float32)


def _check_symmetric(f):
  for m in (f.a_factor, f.g_factor):
    m = np.asarray(m)
    np.testing.assert_array_equal(m, m.T)


# --------------------------------------------------------------------------
# Dense


@pytest.mark.parametrize("weight_sharing", ["expand", "reduce"])
@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize("x_shape", [(6, 4), (3, 5, 4), (2, 3, 4, 4)], ids=["2d", "btd", "bhwd"])
def test_dense_batch_factors(weight_sharing, use_bias, x_shape):
  module = nn.Dense(3, use_bias=use_bias)
  rng = np.random.default_rng(0)
  x = rng.normal(size=x_shape).astype(np.float32)
  g = rng.normal(size=x_shape[:-1] + (3,)).astype(np.float32)
  layer, _ = _single_layer(module, jnp.asarray(x))
  layer = dataclasses.replace(layer, weight_sharing=weight_sharing)
  f = _batch_factors(layer, [x], [g])
  if weight_sharing == "expand":  # every leading position is a row
    a, gg = _np_dense_rows(x, g, use_bias)
    assert a.shape[0] == math.prod(x_shape[:-1])
  else:  # K-FAC-reduce: per example, inputs averaged and output gradients summed
    batch = x_shape[0]
    x_mean = x.astype(np.float64).reshape(batch, -1, x_shape[-1]).mean(axis=1)
    g_sum = g.astype(np.float64).reshape(batch, -1, 3).sum(axis=1)
    a, gg = _np_dense_rows(x_mean, g_sum, use_bias)
  assert_close(f.a_factor, a.T @ a / a.shape[0])
  assert_close(f.g_factor, gg.T @ gg / gg.shape[0])
  assert f.a_factor.shape == (layer.a_size, layer.a_size)
  assert f.g_factor.shape == (layer.g_size, layer.g_size)
  assert f.a_factor.dtype == jnp.float32
  _check_symmetric(f)


def test_dense_shared_module_pools_rows():
  module = nn.Dense(3)
  rng = np.random.default_rng(1)
  x1 = rng.normal(size=(5, 4)).astype(np.float32)
  x2 = (3.0 * rng.normal(size=(2, 4)) + 1.0).astype(np.float32)
  g1 = rng.normal(size=(5, 3)).astype(np.float32)
  g2 = (0.2 * rng.normal(size=(2, 3))).astype(np.float32)
  layer, _ = _single_layer(module, jnp.asarray(x1))
  f = _batch_factors(layer, [x1, x2], [g1, g2])
  ea, eg = _np_pooled_factors([_np_dense_rows(x1, g1, True), _np_dense_rows(x2, g2, True)])
  assert_close(f.a_factor, ea)
  assert_close(f.g_factor, eg)
  _check_symmetric(f)


# --------------------------------------------------------------------------
# Conv

# (name, Conv kwargs, input shape). Channels last; C is the last input dim.
CONV_CASES = [
    ("1d_same", dict(features=3, kernel_size=(3,)), (2, 7, 2)),
    ("1d_strided_valid", dict(features=2, kernel_size=(3,), strides=2, padding="VALID"), (3, 9, 2)),
    ("1d_causal_dilated", dict(features=2, kernel_size=(3,), padding="CAUSAL",
                               kernel_dilation=2), (2, 8, 3)),
    ("1d_circular", dict(features=2, kernel_size=(4,), padding="CIRCULAR"), (2, 6, 2)),
    ("1d_causal_strided", dict(features=2, kernel_size=(2,), padding="CAUSAL", strides=2),
     (2, 7, 2)),
    ("1d_circular_dilated_strided", dict(features=2, kernel_size=(3,), padding="CIRCULAR",
                                         kernel_dilation=2, strides=2), (2, 9, 2)),
    ("1d_circular_wide_kernel", dict(features=2, kernel_size=(5,), padding="CIRCULAR"),
     (2, 3, 2)),
    ("1d_int_kernel_size", dict(features=2, kernel_size=3), (2, 6, 2)),
    ("1d_input_dilation", dict(features=2, kernel_size=(3,), padding=((1, 2),),
                               input_dilation=2), (2, 5, 2)),
    ("1d_negative_padding", dict(features=2, kernel_size=(3,), padding=((-1, 2),)), (2, 6, 2)),
    ("2d_same", dict(features=3, kernel_size=(3, 3)), (2, 5, 5, 2)),
    ("2d_same_strided", dict(features=3, kernel_size=(3, 3), strides=2), (2, 6, 6, 2)),
    ("2d_same_strided_odd", dict(features=2, kernel_size=(2, 3), strides=(2, 3)), (2, 5, 7, 2)),
    ("2d_valid", dict(features=3, kernel_size=(3, 2), padding="VALID"), (2, 5, 6, 2)),
    ("2d_explicit", dict(features=2, kernel_size=(3, 3), padding=((1, 0), (2, 1))), (2, 5, 4, 2)),
    ("2d_int_padding", dict(features=2, kernel_size=(3, 3), padding=2, strides=(1, 2)), (1, 4, 5, 3)),
    ("2d_kernel_dilation", dict(features=2, kernel_size=(3, 3), kernel_dilation=(2, 1)), (2, 7, 5, 2)),
    ("2d_dilation_valid_strided", dict(features=2, kernel_size=(2, 2), kernel_dilation=2,
                                       strides=2, padding="VALID"), (2, 7, 7, 2)),
    ("2d_no_bias", dict(features=3, kernel_size=(3, 3), use_bias=False), (2, 5, 5, 2)),
    ("2d_no_bias_strided_valid", dict(features=3, kernel_size=(2, 2), strides=2,
                                      padding="VALID", use_bias=False), (2, 6, 6, 3)),
    ("2d_circular", dict(features=2, kernel_size=(3, 2), padding="CIRCULAR"), (2, 4, 5, 2)),
    ("2d_input_dilation", dict(features=2, kernel_size=(2, 3), padding=((0, 1), (1, 1)),
                               input_dilation=(2, 1)), (2, 3, 4, 2)),
    ("2d_input_dilation_strided", dict(features=2, kernel_size=(2, 2), input_dilation=2,
                                       strides=2, kernel_dilation=(1, 2),
                                       padding=((1, 1), (0, 2))), (2, 4, 4, 2)),
    ("2d_same_lower", dict(features=2, kernel_size=(2, 4), padding="SAME_LOWER"), (2, 5, 5, 2)),
    ("2d_unbatched", dict(features=2, kernel_size=(3, 3)), (5, 4, 2)),
    ("2d_extra_batch_dims", dict(features=2, kernel_size=(3, 3)), (2, 2, 4, 4, 2)),
    ("3d_same", dict(features=2, kernel_size=(2, 2, 2)), (2, 3, 4, 3, 2)),
    ("3d_valid_strided_no_bias", dict(features=3, kernel_size=(2, 2, 2), strides=(1, 2, 1),
                                      padding="VALID", use_bias=False), (2, 3, 5, 3, 2)),
]


def _oracle_geometry(kwargs, x_shape):
  """Strides, pads, dilations and circularity from the Flax arguments, in numpy."""
  kernel_size = kwargs["kernel_size"]
  kernel_size = (kernel_size,) if isinstance(kernel_size, int) else tuple(kernel_size)
  n = len(kernel_size)
  as_tuple = lambda v: (v,) * n if isinstance(v, int) else tuple(v)
  strides = as_tuple(kwargs.get("strides", 1))
  kdil = as_tuple(kwargs.get("kernel_dilation", 1))
  idil = as_tuple(kwargs.get("input_dilation", 1))
  padding = kwargs.get("padding", "SAME")
  spatial = x_shape[-n - 1:-1]
  circular = False
  if padding in ("SAME", "SAME_LOWER"):
    pads = np_same_pads(spatial, kernel_size, strides, kdil, lower=padding == "SAME_LOWER")
  elif padding == "VALID":
    pads = [(0, 0)] * n
  elif padding == "CAUSAL":
    pads = [((kernel_size[0] - 1) * kdil[0], 0)]
  elif padding == "CIRCULAR":
    eff = [(k - 1) * d + 1 for k, d in zip(kernel_size, kdil)]
    pads = [((e - 1) // 2, e // 2) for e in eff]
    circular = True
  elif isinstance(padding, int):
    pads = [(padding, padding)] * n
  else:
    pads = [tuple(p) for p in padding]
  return kernel_size, strides, pads, kdil, idil, circular


@pytest.mark.parametrize("name, kwargs, x_shape", CONV_CASES, ids=[c[0] for c in CONV_CASES])
def test_conv_batch_factors(name, kwargs, x_shape):
  del name
  _check_conv_factors(kwargs, x_shape)


CHUNKED_CASES = ["1d_circular_dilated_strided", "2d_same", "2d_no_bias_strided_valid",
                 "2d_input_dilation_strided", "3d_same"]


@pytest.mark.parametrize("name", CHUNKED_CASES)
def test_conv_batch_factors_reduced_in_chunks(name, monkeypatch):
  # 5 examples, 2 per chunk: three chunks, the last one padded with a zero example.
  (kwargs, x_shape), = [(k, s) for n, k, s in CONV_CASES if n == name]
  x_shape = (5,) + x_shape[1:]
  module = nn.Conv(**kwargs)
  x = jnp.zeros(x_shape, jnp.float32)
  layer, params = _single_layer(module, x)
  positions = math.prod(module.apply({"params": params}, x).shape[1:-1])
  features = layer.a_size - int(layer.has_bias)
  monkeypatch.setattr(conv_lib, "_PATCH_CHUNK_BYTES", 2 * positions * features * 4)
  _check_conv_factors(kwargs, x_shape)


def _check_conv_factors(kwargs, x_shape):
  module = nn.Conv(**kwargs)
  use_bias = kwargs.get("use_bias", True)
  rng = np.random.default_rng(2)
  x = rng.normal(size=x_shape).astype(np.float32)
  layer, params = _single_layer(module, jnp.asarray(x))
  y = np.asarray(module.apply({"params": params}, x), np.float64)

  kernel_size, strides, pads, kdil, idil, circular = _oracle_geometry(kwargs, x_shape)
  n = len(kernel_size)
  x_rows = x.reshape((-1,) + x_shape[-n - 1:])
  patches = np_patches(x_rows, kernel_size, strides, pads, kdil, idil, circular)

  # The oracle patches must reproduce the module's own output (checks the oracle geometry).
  wmat = np_kernel_matrix(params["kernel"])
  y_oracle = patches.reshape(-1, patches.shape[-1]) @ wmat.T
  if use_bias:
    y_oracle = y_oracle + np.asarray(params["bias"], np.float64)
  assert_close(y_oracle.reshape(y.shape), y, rtol=1e-5)

  g = rng.normal(size=y.shape).astype(np.float32)
  f = _batch_factors(layer, [x], [g])
  a, gg = _np_conv_rows(patches, g.reshape((-1,) + y.shape[-n - 1:]), use_bias)
  assert_close(f.a_factor, a.T @ a / a.shape[0])
  assert_close(f.g_factor, gg.T @ gg / gg.shape[0])
  assert f.a_factor.shape == (layer.a_size, layer.a_size)
  assert f.g_factor.shape == (layer.g_size, layer.g_size)
  _check_symmetric(f)


def test_conv_shared_module_pools_rows():
  # One Conv called on two inputs of different batch and spatial sizes: each
  # call is scaled by its own S, and the rows of both calls are pooled.
  module = nn.Conv(2, (3, 3))
  rng = np.random.default_rng(3)
  x1 = rng.normal(size=(2, 5, 5, 2)).astype(np.float32)
  x2 = (2.0 * rng.normal(size=(3, 3, 4, 2)) + 0.5).astype(np.float32)
  layer, _ = _single_layer(module, jnp.asarray(x1))
  g1 = rng.normal(size=(2, 5, 5, 2)).astype(np.float32)
  g2 = rng.normal(size=(3, 3, 4, 2)).astype(np.float32)
  f = _batch_factors(layer, [x1, x2], [g1, g2])
  rows = []
  for x, g in ((x1, g1), (x2, g2)):
    patches = np_patches(x, (3, 3), pads=np_same_pads(x.shape[1:3], (3, 3)))
    rows.append(_np_conv_rows(patches, g, True))
  ea, eg = _np_pooled_factors(rows)
  assert_close(f.a_factor, ea)
  assert_close(f.g_factor, eg)
  _check_symmetric(f)


# --------------------------------------------------------------------------
# Running average through the transformation


class _MLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    h = nn.tanh(nn.Dense(3)(x))
    return nn.Dense(2, use_bias=False)(h)


def _np_mlp_rows(params, x, t):
  """Forward and manual backprop of 0.5 * mean_b |z - t|² in float64."""
  w0 = np.asarray(params["Dense_0"]["kernel"], np.float64)
  b0 = np.asarray(params["Dense_0"]["bias"], np.float64)
  w1 = np.asarray(params["Dense_1"]["kernel"], np.float64)
  x = np.asarray(x, np.float64)
  r = np.tanh(x @ w0 + b0)
  z = r @ w1
  dz = (z - t) / x.shape[0]
  dh = (dz @ w1.T) * (1 - r ** 2)
  return {"Dense_0": _np_dense_rows(x, dh, True),
          "Dense_1": _np_dense_rows(r, dz, False)}


@pytest.mark.parametrize("decay", [0.7])
def test_running_average_starts_from_identity(decay):
  model = _MLP()
  rng = np.random.default_rng(4)
  batches = [(rng.normal(size=(8, 4)).astype(np.float32),
              rng.normal(size=(8, 2)).astype(np.float32)) for _ in range(2)]
  params = random_params(model, jnp.asarray(batches[0][0]), seed=5)

  def loss_fn(p, x, t):
    z = model.apply({"params": p}, x)
    return 0.5 * jnp.mean(jnp.sum((z - t) ** 2, axis=-1))

  layers = kaisa_jax.find_layers(loss_fn, params, *batches[0])
  tx = kaisa_jax.kaisa(layers, damping=0.1, factor_decay=decay, kl_clip=None)
  state = jax.jit(tx.init)(params)
  factors = layer_factors(layers, state)
  assert set(factors) == set(layers.names)
  for name, layer in zip(layers.names, layers):
    np.testing.assert_array_equal(np.asarray(factors[name].a_factor), np.eye(layer.a_size))
    np.testing.assert_array_equal(np.asarray(factors[name].g_factor), np.eye(layer.g_size))

  expected = {n: (np.eye(l.a_size), np.eye(l.g_size)) for n, l in zip(layers.names, layers)}
  @jax.jit
  def step(state, x, t):
    _, grads, captures = kaisa_jax.value_and_grad(loss_fn)(params, x, t)
    return tx.update(grads, state, params, captures=captures)[1]

  for x, t in batches:
    state = step(state, x, t)
    rows = _np_mlp_rows(params, x, t)
    factors = layer_factors(layers, state)
    for name in layers.names:
      a, g = rows[name]
      ba, bg = a.T @ a / a.shape[0], g.T @ g / g.shape[0]
      old_a, old_g = expected[name]
      expected[name] = (decay * old_a + (1 - decay) * ba, decay * old_g + (1 - decay) * bg)
      assert_close(factors[name].a_factor, expected[name][0])
      assert_close(factors[name].g_factor, expected[name][1])
  assert int(state.step) == 2
