"""Tests for the layer kinds: gradient-matrix layout, sizes and the registry."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kaisa_jax
from oracles import np_kernel_from_matrix, np_kernel_matrix, np_patches, random_params


def _registry(module, x):
  params = random_params(module, x)
  loss_fn = lambda p, x: jnp.sum(module.apply({"params": p}, x))
  return kaisa_jax.find_layers(loss_fn, params, x), params


def _check_grad_matrix_and_round_trip(layer, kernel, bias):
  """grad_matrix matches the oracle layout; from_matrix takes it back to (kernel, bias)."""
  mat = layer.grad_matrix(jnp.asarray(kernel), None if bias is None else jnp.asarray(bias))
  expected = np_kernel_matrix(kernel, bias)
  assert mat.shape == (layer.g_size, layer.a_size) == expected.shape
  np.testing.assert_array_equal(np.asarray(mat, np.float64), expected)

  # Round trip kernel -> matrix -> kernel.
  k2, b2 = layer.from_matrix(mat)
  np.testing.assert_array_equal(np.asarray(k2), kernel)
  if bias is None:
    assert b2 is None
  else:
    np.testing.assert_array_equal(np.asarray(b2), bias)
  return expected


DENSE_CASES = [
    dict(features=3, use_bias=True, in_features=5),
    dict(features=4, use_bias=False, in_features=2),
]

CONV_CASES = [
    dict(features=3, kernel_size=(3,), use_bias=True, c_in=2, spatial=(7,)),
    dict(features=2, kernel_size=(2,), use_bias=False, c_in=3, spatial=(5,)),
    dict(features=4, kernel_size=(3, 2), use_bias=True, c_in=3, spatial=(5, 4)),
    dict(features=2, kernel_size=(2, 3), use_bias=False, c_in=2, spatial=(4, 5)),
    dict(features=3, kernel_size=(2, 3, 2), use_bias=True, c_in=2, spatial=(3, 4, 3)),
    dict(features=2, kernel_size=(2, 2, 2), use_bias=False, c_in=3, spatial=(3, 3, 3)),
]


@pytest.mark.parametrize("case", DENSE_CASES)
def test_dense_grad_matrix_layout_and_round_trip(case):
  module = nn.Dense(case["features"], use_bias=case["use_bias"])
  x = jnp.ones((2, case["in_features"]))
  registry, _ = _registry(module, x)
  (layer,) = registry.layers
  rng = np.random.default_rng(0)
  kernel = rng.normal(size=(case["in_features"], case["features"])).astype(np.float32)
  bias = rng.normal(size=case["features"]).astype(np.float32) if case["use_bias"] else None

  _check_grad_matrix_and_round_trip(layer, kernel, bias)


@pytest.mark.parametrize("case", DENSE_CASES)
def test_dense_matrix_orientation_matches_forward(case):
  # y = x @ kernel + bias must equal [x, 1] @ matᵀ for the (out, in [+1]) layout.
  module = nn.Dense(case["features"], use_bias=case["use_bias"])
  rng = np.random.default_rng(1)
  x = rng.normal(size=(6, case["in_features"])).astype(np.float32)
  registry, params = _registry(module, jnp.asarray(x))
  (layer,) = registry.layers
  y = np.asarray(module.apply({"params": params}, x), np.float64)
  mat = np.asarray(layer.grad_matrix(params["kernel"], params.get("bias")), np.float64)
  a = x.astype(np.float64)
  if case["use_bias"]:
    a = np.concatenate([a, np.ones((a.shape[0], 1))], axis=1)
  np.testing.assert_allclose(a @ mat.T, y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_grad_matrix_layout_and_round_trip(case):
  module = nn.Conv(case["features"], case["kernel_size"], use_bias=case["use_bias"])
  x = jnp.ones((1,) + case["spatial"] + (case["c_in"],))
  registry, _ = _registry(module, x)
  (layer,) = registry.layers
  kernel_shape = tuple(case["kernel_size"]) + (case["c_in"], case["features"])
  assert layer.kernel_shape == kernel_shape
  rng = np.random.default_rng(2)
  kernel = rng.normal(size=kernel_shape).astype(np.float32)
  bias = rng.normal(size=case["features"]).astype(np.float32) if case["use_bias"] else None

  expected = _check_grad_matrix_and_round_trip(layer, kernel, bias)

  # And matrix -> kernel -> matrix, from_matrix checked against the oracle.
  m = rng.normal(size=expected.shape).astype(np.float32)
  k3, b3 = layer.from_matrix(jnp.asarray(m))
  ek, eb = np_kernel_from_matrix(m, kernel_shape, case["use_bias"])
  np.testing.assert_array_equal(np.asarray(k3, np.float64), ek)
  if case["use_bias"]:
    np.testing.assert_array_equal(np.asarray(b3, np.float64), eb)
  else:
    assert b3 is None
  np.testing.assert_array_equal(np.asarray(layer.grad_matrix(k3, b3)), m)


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_matrix_orientation_matches_forward(case):
  # The channel-major layout must agree with channel-major im2col patches:
  # conv(x) == [patches, 1] @ matᵀ.
  module = nn.Conv(case["features"], case["kernel_size"], padding="VALID",
                   use_bias=case["use_bias"])
  rng = np.random.default_rng(3)
  x = rng.normal(size=(2,) + case["spatial"] + (case["c_in"],)).astype(np.float32)
  registry, params = _registry(module, jnp.asarray(x))
  (layer,) = registry.layers
  y = np.asarray(module.apply({"params": params}, x), np.float64)
  mat = np.asarray(layer.grad_matrix(params["kernel"], params.get("bias")), np.float64)
  patches = np_patches(x, case["kernel_size"])
  a = patches.reshape(-1, patches.shape[-1])
  if case["use_bias"]:
    a = np.concatenate([a, np.ones((a.shape[0], 1))], axis=1)
  np.testing.assert_allclose((a @ mat.T).reshape(y.shape), y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", DENSE_CASES)
def test_dense_sizes(case):
  module = nn.Dense(case["features"], use_bias=case["use_bias"])
  registry, _ = _registry(module, jnp.ones((2, case["in_features"])))
  (layer,) = registry.layers
  assert layer.kind == "dense"
  assert layer.a_size == case["in_features"] + int(case["use_bias"])
  assert layer.g_size == case["features"]
  assert layer.has_bias == case["use_bias"]


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_sizes(case):
  module = nn.Conv(case["features"], case["kernel_size"], use_bias=case["use_bias"])
  registry, _ = _registry(module, jnp.ones((1,) + case["spatial"] + (case["c_in"],)))
  (layer,) = registry.layers
  assert layer.kind == "conv"
  assert layer.a_size == case["c_in"] * int(np.prod(case["kernel_size"])) + int(case["use_bias"])
  assert layer.g_size == case["features"]
  assert layer.has_bias == case["use_bias"]


def test_dense_sizes_with_leading_axes():
  # (B, T, d) inputs: sizes depend on the kernel only.
  registry, _ = _registry(nn.Dense(7), jnp.ones((2, 3, 5)))
  (layer,) = registry.layers
  assert (layer.a_size, layer.g_size) == (6, 7)


@pytest.mark.parametrize("kwargs, spatial, expected", [
    (dict(features=2, kernel_size=(3, 3), strides=2, padding=1, kernel_dilation=(1, 2)),
     (8, 8), dict(strides=(2, 2), padding=((1, 1), (1, 1)), circular=False,
                  input_dilation=(1, 1), kernel_dilation=(1, 2))),
    (dict(features=2, kernel_size=(3,), padding="CAUSAL", kernel_dilation=2),
     (9,), dict(strides=(1,), padding=((4, 0),), circular=False,
                input_dilation=(1,), kernel_dilation=(2,))),
    (dict(features=2, kernel_size=(3, 4), padding="CIRCULAR"),
     (6, 7), dict(strides=(1, 1), padding=((1, 1), (1, 2)), circular=True,
                  input_dilation=(1, 1), kernel_dilation=(1, 1))),
    (dict(features=2, kernel_size=(2, 2), padding=[(0, 1), 2], input_dilation=(2, 1)),
     (4, 4), dict(strides=(1, 1), padding=((0, 1), (2, 2)), circular=False,
                  input_dilation=(2, 1), kernel_dilation=(1, 1))),
    (dict(features=2, kernel_size=(2, 2, 2), strides=(1, 2, 1), padding="VALID"),
     (3, 4, 3), dict(strides=(1, 2, 1), padding="VALID", circular=False,
                     input_dilation=(1, 1, 1), kernel_dilation=(1, 1, 1))),
])
def test_conv_geometry_attributes(kwargs, spatial, expected):
  module = nn.Conv(**kwargs)
  registry, _ = _registry(module, jnp.ones((1,) + spatial + (2,)))
  (layer,) = registry.layers
  for attr, value in expected.items():
    assert getattr(layer, attr) == value, attr


class _TwoLayer(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(3, (3, 3), name="conv")(x)
    x = x.reshape(x.shape[0], -1)
    return nn.Dense(4, use_bias=False, name="head")(x)


def _two_layer_registry():
  model = _TwoLayer()
  x = jnp.ones((2, 5, 5, 2))
  params = random_params(model, x)
  loss_fn = lambda p, x: jnp.mean(model.apply({"params": p}, x) ** 2)
  return kaisa_jax.find_layers(loss_fn, params, x)


def test_registry_table_lists_names_kinds_and_sizes():
  registry = _two_layer_registry()
  text = str(registry)
  lines = text.splitlines()
  assert lines[0].split() == ["layer", "kind", "A", "size", "G", "size"]
  assert set(lines[1]) <= {"-", " "}
  # conv: 2 channels * 9 + bias = 19, 3 outputs; head: 75 inputs, no bias, 4 outputs.
  assert lines[2].split() == ["conv", "conv", str(2 * 9 + 1), "3"]
  assert lines[3].split() == ["head", "dense", str(5 * 5 * 3), "4"]
  # Every entry is a registered layer's: conv 3x3x2x3 kernel + 3 bias, head 75x4.
  entries = 3 * 3 * 2 * 3 + 3 + 5 * 5 * 3 * 4
  assert (registry.registered_entries, registry.plain_entries) == (entries, 0)
  assert lines[4] == (f"parameters: {entries:,} in registered layers (100.0 %), "
                      "0 follow the plain gradient")
  assert len(lines) == 5
  assert "conv" in repr(registry) and "head" in repr(registry)


def test_registry_table_lists_skipped_layers():
  class Grouped(nn.Module):

    @nn.compact
    def __call__(self, x):
      x = nn.ConvTranspose(4, (3, 3), name="grouped")(x)
      return nn.Dense(2, name="head")(x.reshape(x.shape[0], -1))

  model = Grouped()
  x = jnp.ones((1, 4, 4, 4))
  params = random_params(model, x)
  registry = kaisa_jax.find_layers(
      lambda p, x: jnp.sum(model.apply({"params": p}, x)), params, x)
  text = str(registry)
  grouped_line = [l for l in text.splitlines() if l.startswith("grouped")]
  assert len(grouped_line) == 1
  assert "skipped" in grouped_line[0] and "transposed convolutions" in grouped_line[0]
  # The skipped layer's leaves follow the plain gradient; none is uncovered.
  assert registry.uncovered == ()
  sizes = {name: sum(leaf.size for leaf in jax.tree.leaves(params[name]))
           for name in ("grouped", "head")}
  assert (registry.registered_entries, registry.plain_entries) == (sizes["head"],
                                                                   sizes["grouped"])
  assert text.splitlines()[-1].endswith(
      f"{sizes['grouped']:,} follow the plain gradient ({sizes['grouped']:,} in skipped layers, "
      "0 uncovered)")


def test_registry_accessors():
  registry = _two_layer_registry()
  assert registry.names == ("conv", "head")
  assert len(registry) == 2
  assert [l.name for l in registry] == ["conv", "head"]
  assert registry["head"].kind == "dense"
  assert registry["conv"].kind == "conv"
  with pytest.raises(KeyError):
    registry["missing"]


def test_registry_hashable_and_equal_across_calls():
  r1 = _two_layer_registry()
  r2 = _two_layer_registry()
  assert r1 is not r2
  assert r1 == r2
  assert hash(r1) == hash(r2)
  assert len({r1, r2}) == 1


def test_registry_usable_as_jit_static_argument():
  r1 = _two_layer_registry()
  r2 = _two_layer_registry()
  traces = []

  @functools.partial(jax.jit, static_argnums=1)
  def f(x, registry):
    traces.append(registry)
    return x * sum(l.a_size for l in registry)

  out1 = f(jnp.ones(3), r1)
  out2 = f(jnp.ones(3), r2)
  assert len(traces) == 1  # the equal registry hits the jit cache
  np.testing.assert_array_equal(np.asarray(out1), np.asarray(out2))
  np.testing.assert_array_equal(np.asarray(out1), np.full(3, 19 + 75.0))
