"""The layer kinds beyond Dense and Conv, each end to end against float64 NumPy.

For every kind: the registry entry (sizes, factor storage), the batch
factors written from the definitions, and one ``kaisa`` step (every compute
method) against ``P = (G + γI)⁻¹ ∇ (A + γI)⁻¹`` ('inverse') or
``(G ⊗ A + γI)⁻¹ vec ∇`` ('eigen'), block by block. The gradients come from
``jax.grad`` and the layer outputs from Flax; the inputs, output gradients,
factors and gradient layouts are rebuilt here in NumPy.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kaisa_jax
from layout import group_of, layer_factors
from oracles import (assert_close, np_damped_inverse, np_kernel_matrix, np_kron_solve,
                     np_patches, random_params)

DAMPING = 0.05
DECAY = 0.5


def _loss(module):
  """Half the squared error of the layer output against a target, mean over the batch."""
  def loss_fn(params, x, t):
    y = module.apply({"params": params}, x)
    return 0.5 * jnp.sum((y - t) ** 2) / x.shape[0]
  return loss_fn


def _out_grads(module, params, x, t):
  """dL/dy of ``_loss`` in float64: (y - t) / B, y from Flax."""
  y = np.asarray(module.apply({"params": params}, x), np.float64)
  return (y - np.asarray(t, np.float64)) / x.shape[0]


def _kfac_step(module, params, x, t, method, **kwargs):
  """(registry, jax.grad gradients, preconditioned updates) of one kaisa step."""
  loss_fn = _loss(module)
  registry = kaisa_jax.find_layers(loss_fn, params, x, t)
  tx = kaisa_jax.kaisa(registry, damping=DAMPING, factor_decay=DECAY, kl_clip=None,
                       compute_method=method, **kwargs)

  @jax.jit
  def step(params, x, t):
    state = tx.init(params)
    _, grads, captures = kaisa_jax.value_and_grad(loss_fn)(params, x, t)
    updates, state = tx.update(grads, state, params, captures=captures)
    return grads, updates, state

  grads, updates, state = step(params, x, t)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
               grads, jax.grad(loss_fn)(params, x, t))
  return registry, grads, updates, state


def _np_precondition(a_rows, g_rows, grad, method, a_diagonal=False):
  """One block's K-FAC update from its rows (running averages from I, step 0).

  a_rows (rows, a), g_rows (rows, g), grad (g, a). 'ekfac': the eigenbases of
  the factors, the scaling ``dG dAᵀ`` moved towards the mean of
  ``(QGᵀ g_r)² (QAᵀ a_r)²ᵀ`` by the running average.
  """
  rows = a_rows.shape[0]
  a = DECAY * np.eye(a_rows.shape[1]) + (1 - DECAY) * a_rows.T @ a_rows / rows
  g = DECAY * np.eye(g_rows.shape[1]) + (1 - DECAY) * g_rows.T @ g_rows / rows
  if method == "inverse":
    return np_damped_inverse(g, DAMPING) @ grad @ np_damped_inverse(a, DAMPING)
  if method == "eigen":
    return np_kron_solve(g, a, grad, DAMPING)
  if a_diagonal:
    a_vals, a_vecs = np.diag(a), np.eye(a.shape[0])
  else:
    a_vals, a_vecs = np.linalg.eigh(a)
  g_vals, g_vecs = np.linalg.eigh(g)
  moment = ((g_rows @ g_vecs) ** 2).T @ ((a_rows @ a_vecs) ** 2) / rows
  scaling = DECAY * np.outer(g_vals, a_vals) + (1 - DECAY) * moment
  return g_vecs @ ((g_vecs.T @ grad @ a_vecs) / (scaling + DAMPING)) @ a_vecs.T


def _with_ones(rows):
  return np.concatenate([rows, np.ones((rows.shape[0], 1))], axis=1)


# --------------------------------------------------------------------------
# DenseGeneral


DENSE_GENERAL_CASES = {
    # attention query: (B, T, d) -> (B, T, heads, head_dim)
    "query": (dict(features=(2, 3), axis=-1), (3, 4, 5)),
    # attention output: (B, T, heads, head_dim) -> (B, T, d)
    "output": (dict(features=5, axis=(-2, -1)), (3, 4, 2, 3)),
    "no_bias": (dict(features=(2, 2), axis=-1, use_bias=False), (4, 3)),
}


@pytest.mark.parametrize("weight_sharing", ["expand", "reduce"])
@pytest.mark.parametrize("method", ["inverse", "eigen", "ekfac"])
@pytest.mark.parametrize("case", sorted(DENSE_GENERAL_CASES))
def test_dense_general_step_matches_oracle(case, method, weight_sharing):
  kwargs, x_shape = DENSE_GENERAL_CASES[case]
  module = nn.DenseGeneral(**kwargs)
  rng = np.random.default_rng(1)
  x = rng.normal(size=x_shape).astype(np.float32)
  params = random_params(module, jnp.asarray(x), seed=2)
  y_shape = jax.eval_shape(lambda: module.apply({"params": params}, x)).shape
  t = rng.normal(size=y_shape).astype(np.float32)
  registry, grads, updates, _ = _kfac_step(module, params, x, t, method,
                                           weight_sharing=weight_sharing)

  (layer,) = registry.layers
  use_bias = kwargs.get("use_bias", True)
  n_in = 1 if isinstance(kwargs["axis"], int) else len(kwargs["axis"])
  in_size = int(np.prod(x_shape[-n_in:]))
  out_size = int(np.prod(kwargs["features"]))
  assert layer.kind == "dense_general"
  assert (layer.a_size, layer.g_size) == (in_size + use_bias, out_size)

  # Rows: the contracted axes flattened (row-major), positions between batch and them.
  x64 = np.asarray(x, np.float64).reshape(x_shape[0], -1, in_size)
  g64 = _out_grads(module, params, x, t).reshape(x_shape[0], -1, out_size)
  if weight_sharing == "reduce":
    a_rows, g_rows = x64.mean(axis=1), g64.sum(axis=1)
  else:
    a_rows, g_rows = x64.reshape(-1, in_size), g64.reshape(-1, out_size)
  if use_bias:
    a_rows = _with_ones(a_rows)

  kernel_grad = np.asarray(grads["kernel"], np.float64)
  grad = kernel_grad.reshape(in_size, out_size).T
  if use_bias:
    grad = np.concatenate([grad, np.asarray(grads["bias"], np.float64).reshape(-1, 1)], axis=1)
  expected = _np_precondition(a_rows, g_rows, grad, method)

  assert_close(np.asarray(updates["kernel"]).reshape(in_size, out_size).T,
               expected[:, :in_size], rtol=1e-4)
  if use_bias:
    assert updates["bias"].shape == kwargs_features_shape(kwargs)
    assert_close(np.asarray(updates["bias"]).reshape(-1), expected[:, -1], rtol=1e-4)


def kwargs_features_shape(kwargs):
  features = kwargs["features"]
  return (features,) if isinstance(features, int) else tuple(features)


def test_dense_general_unsupported_configurations_are_listed():
  class Net(nn.Module):

    @nn.compact
    def __call__(self, x):
      r = nn.DenseGeneral(2, axis=(-1, -2), name="reversed")(x)  # kernel (5, 4, 2)
      h = nn.DenseGeneral(3, axis=1, name="middle")(x)  # (B, 4, 5) -> (B, 5, 3)
      return nn.DenseGeneral(2, batch_dims=(0,), axis=-1, name="batched")(h), r

  x = jnp.ones((2, 4, 5))
  model = Net()
  params = random_params(model, x)
  loss = lambda p, x: sum(jnp.sum(y) for y in model.apply({"params": p}, x))
  registry = kaisa_jax.find_layers(loss, params, x)
  reasons = {s.name: s.reason for s in registry.skipped}
  assert "not the last" in reasons["middle"]
  assert "increasing order" in reasons["reversed"]
  assert "batch_dims" in reasons["batched"]
  with pytest.raises(ValueError, match="reversed|middle"):
    kaisa_jax.kaisa(registry)


# --------------------------------------------------------------------------
# Einsum

# equation, kernel shape, input shape, and the NumPy views: input rows
# (rows, in), output-gradient rows (rows, out) and the kernel as (out, in).
EINSUM_CASES = {
    "query": ("btd,dhk->bthk", (5, 2, 3), (3, 4, 5),
              lambda x: x.reshape(-1, 5), lambda g: g.reshape(-1, 6),
              lambda k: k.reshape(5, 6).T),
    "output": ("bthk,hkd->btd", (2, 3, 5), (3, 4, 2, 3),
               lambda x: x.reshape(-1, 6), lambda g: g.reshape(-1, 5),
               lambda k: k.reshape(6, 5).T),
    "transposed_kernel": ("bd,fd->bf", (3, 5), (4, 5),
                          lambda x: x, lambda g: g, lambda k: k),
    "ellipsis": ("...d,df->...f", (4, 3), (2, 3, 4),
                 lambda x: x.reshape(-1, 4), lambda g: g.reshape(-1, 3), lambda k: k.T),
    # output positions in another order: rows pair (b, t) with (b, t)
    "reordered": ("btd,dk->tbk", (5, 2), (3, 4, 5),
                  lambda x: x.reshape(-1, 5), lambda g: g.transpose(1, 0, 2).reshape(-1, 2),
                  lambda k: k.T),
}


@pytest.mark.parametrize("method", ["inverse", "eigen", "ekfac"])
@pytest.mark.parametrize("case", sorted(EINSUM_CASES))
def test_einsum_step_matches_oracle(case, method):
  equation, kernel_shape, x_shape, np_in, np_out, np_kernel = EINSUM_CASES[case]
  module = nn.Einsum(kernel_shape, equation)
  rng = np.random.default_rng(8)
  x = rng.normal(size=x_shape).astype(np.float32)
  params = random_params(module, jnp.asarray(x), seed=9)
  y_shape = jax.eval_shape(lambda: module.apply({"params": params}, x)).shape
  t = rng.normal(size=y_shape).astype(np.float32)
  registry, grads, updates, _ = _kfac_step(module, params, x, t, method)

  (layer,) = registry.layers
  a_rows = _with_ones(np_in(np.asarray(x, np.float64)))
  g_rows = np_out(_out_grads(module, params, x, t))
  assert layer.kind == "einsum"
  assert (layer.a_size, layer.g_size) == (a_rows.shape[1], g_rows.shape[1])
  bias = np.asarray(grads["bias"], np.float64).reshape(-1, 1)  # the output's order
  grad = np.concatenate([np_kernel(np.asarray(grads["kernel"], np.float64)), bias], axis=1)
  expected = _np_precondition(a_rows, g_rows, grad, method)
  assert_close(np_kernel(np.asarray(updates["kernel"], np.float64)), expected[:, :-1],
               rtol=1e-4)
  assert_close(np.asarray(updates["bias"]).reshape(-1), expected[:, -1], rtol=1e-4)


@pytest.mark.parametrize("equation, reason", [
    ("bhd,hdk->bhk", "batched kernel"),
    ("bd,dk->b", "kernel indices summed"),
    ("btd,dk->bk", "input indices summed"),
    ("db,dk->bk", "leading (batch) input axis"),
    ("bdd,dk->bk", "repeated index"),
])
def test_einsum_unsupported_equations_are_listed(equation, reason):
  kernel_shape = {"bhd,hdk->bhk": (2, 3, 4), "bd,dk->b": (3, 4), "btd,dk->bk": (3, 4),
                  "db,dk->bk": (3, 4), "bdd,dk->bk": (3, 4)}[equation]
  x_shape = {"bhd,hdk->bhk": (5, 2, 3), "bd,dk->b": (5, 3), "btd,dk->bk": (5, 2, 3),
             "db,dk->bk": (3, 5), "bdd,dk->bk": (5, 3, 3)}[equation]
  module = nn.Einsum(kernel_shape, equation, use_bias=False)
  x = jnp.ones(x_shape)
  params = random_params(module, x)
  registry = kaisa_jax.find_layers(lambda p, x: jnp.sum(module.apply({"params": p}, x)),
                                   params, x)
  assert not registry.layers and reason in registry.skipped[0].reason


# --------------------------------------------------------------------------
# Embed


@pytest.mark.parametrize("method", ["inverse", "eigen", "ekfac"])
def test_embed_step_matches_oracle(method):
  vocab, features = 7, 4
  module = nn.Embed(vocab, features)
  rng = np.random.default_rng(3)
  ids = rng.integers(0, vocab - 2, size=(3, 5)).astype(np.int32)  # two ids never used
  params = random_params(module, jnp.asarray(ids), seed=4)
  t = rng.normal(size=(3, 5, features)).astype(np.float32)
  registry, grads, updates, state = _kfac_step(module, params, ids, t, method)

  (layer,) = registry.layers
  assert layer.kind == "embed"
  assert (layer.a_size, layer.g_size) == (vocab, features)
  name = layer.name
  # A is kept as its diagonal: a vector of token frequencies.
  counts = np.bincount(ids.ravel(), minlength=vocab)
  a_factor = layer_factors(registry, state)[name].a_factor
  assert a_factor.shape == (vocab,)
  assert_close(a_factor, DECAY + (1 - DECAY) * counts / ids.size)
  # In the state: a group of diagonal A blocks, one block of (vocab,).
  group = group_of(registry, name)
  assert (group.name, group.names, group.a_diagonal) == (f"a{vocab}diag_g{features}", (name,),
                                                         True)
  assert state.factors[group.name].a_factor.shape == (1, vocab)

  a_rows = np.eye(vocab)[ids.ravel()]  # one-hot
  g_rows = _out_grads(module, params, ids, t).reshape(-1, features)
  grad = np.asarray(grads["embedding"], np.float64).T  # (features, vocab)
  expected = _np_precondition(a_rows, g_rows, grad, method, a_diagonal=True)
  assert_close(np.asarray(updates["embedding"]).T, expected, rtol=1e-4)


def test_embed_tied_with_attend_is_listed_as_skipped():
  class TiedLM(nn.Module):

    @nn.compact
    def __call__(self, ids):
      embed = nn.Embed(9, 4, name="embed")
      return embed.attend(nn.Dense(4, name="mix")(embed(ids)))

  ids = jnp.zeros((2, 3), jnp.int32)
  model = TiedLM()
  params = random_params(model, ids)
  registry = kaisa_jax.find_layers(lambda p, i: jnp.sum(model.apply({"params": p}, i)),
                                   params, ids)
  assert registry.names == ("mix",)
  assert [s.name for s in registry.skipped] == ["embed"]
  assert "attend" in registry.skipped[0].reason


# --------------------------------------------------------------------------
# Grouped and depthwise convolutions


GROUPED_CASES = {
    # 2 groups of 2 input channels -> 2 groups of 3 output channels
    "grouped_2d": (dict(features=6, kernel_size=(3, 3), feature_group_count=2,
                        padding="VALID"), (2, 5, 4, 4)),
    # depthwise with a channel multiplier of 2, no bias
    "depthwise_1d": (dict(features=6, kernel_size=(3,), feature_group_count=3,
                          padding="VALID", use_bias=False), (3, 7, 3)),
}


@pytest.mark.parametrize("method", ["inverse", "eigen", "ekfac"])
@pytest.mark.parametrize("case", sorted(GROUPED_CASES))
def test_grouped_conv_step_matches_oracle_block_by_block(case, method):
  kwargs, x_shape = GROUPED_CASES[case]
  module = nn.Conv(**kwargs)
  rng = np.random.default_rng(5)
  x = rng.normal(size=x_shape).astype(np.float32)
  params = random_params(module, jnp.asarray(x), seed=6)
  y_shape = jax.eval_shape(lambda: module.apply({"params": params}, x)).shape
  t = rng.normal(size=y_shape).astype(np.float32)
  registry, grads, updates, state = _kfac_step(module, params, x, t, method)

  groups = kwargs["feature_group_count"]
  use_bias = kwargs.get("use_bias", True)
  c_in, c_out = x_shape[-1] // groups, kwargs["features"] // groups
  k = int(np.prod(kwargs["kernel_size"]))
  (layer,) = registry.layers
  assert (layer.blocks, layer.a_size, layer.g_size) == (groups, c_in * k + use_bias, c_out)
  assert layer_factors(registry, state)[layer.name].a_factor.shape == (
      groups, c_in * k + use_bias, c_in * k + use_bias)
  # In the state: the layer's blocks are its group's whole stack.
  group = group_of(registry, layer.name)
  assert (group.names, group.blocks) == ((layer.name,), groups)
  assert state.factors[group.name].a_factor.shape == (groups, c_in * k + use_bias,
                                                      c_in * k + use_bias)

  out_grads = _out_grads(module, params, x, t)
  positions = int(np.prod(y_shape[1:-1]))
  kernel_grad = np.asarray(grads["kernel"], np.float64)
  for j in range(groups):
    ins, outs = slice(j * c_in, (j + 1) * c_in), slice(j * c_out, (j + 1) * c_out)
    patches = np_patches(x[..., ins], kwargs["kernel_size"]).reshape(-1, c_in * k)
    a_rows = _with_ones(patches) if use_bias else patches
    g_rows = out_grads[..., outs].reshape(-1, c_out)
    # The reference's convolution scaling: rows / S, averaged over N·S rows.
    grad = np_kernel_matrix(kernel_grad[..., outs],
                            np.asarray(grads["bias"])[outs] if use_bias else None)
    expected = _np_precondition(a_rows / positions, g_rows / positions, grad, method)
    got = np_kernel_matrix(np.asarray(updates["kernel"], np.float64)[..., outs],
                           np.asarray(updates["bias"])[outs] if use_bias else None)
    assert_close(got, expected, rtol=1e-4)


# --------------------------------------------------------------------------
# Normalisation layers: scale and bias, per-feature Kronecker blocks


def _np_layer_norm(x, axes, eps):
  mean = x.mean(axis=axes, keepdims=True)
  var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
  return (x - mean) / np.sqrt(var + eps)


def _np_rms_norm(x, axes, eps):
  return x / np.sqrt((x ** 2).mean(axis=axes, keepdims=True) + eps)


def _np_group_norm(x, groups, eps):
  grouped = x.reshape(x.shape[:-1] + (groups, -1))
  axes = tuple(range(1, x.ndim - 1)) + (x.ndim,)
  return _np_layer_norm(grouped, axes, eps).reshape(x.shape)


NORM_CASES = {
    "layer_norm": (lambda: nn.LayerNorm(epsilon=1e-3), (3, 4, 5),
                   lambda x: _np_layer_norm(x, (-1,), 1e-3)),
    "layer_norm_two_axes": (lambda: nn.LayerNorm(reduction_axes=(-2, -1), use_bias=False),
                            (3, 4, 5), lambda x: _np_layer_norm(x, (-2, -1), 1e-6)),
    "rms_norm": (lambda: nn.RMSNorm(), (4, 6), lambda x: _np_rms_norm(x, (-1,), 1e-6)),
    "group_norm": (lambda: nn.GroupNorm(num_groups=2, epsilon=1e-5), (2, 3, 3, 4),
                   lambda x: _np_group_norm(x, 2, 1e-5)),
    "batch_norm": (lambda: nn.BatchNorm(use_running_average=False), (6, 2, 3),
                   lambda x: _np_layer_norm(x, (0, 1), 1e-5)),
}


@pytest.mark.parametrize("method", ["inverse", "eigen", "ekfac"])
@pytest.mark.parametrize("case", sorted(NORM_CASES))
def test_norm_scale_and_bias_step_matches_oracle(case, method):
  make, x_shape, np_normalized = NORM_CASES[case]
  module = make()
  rng = np.random.default_rng(7)
  x = (rng.normal(size=x_shape) * 2 + 1).astype(np.float32)
  t = rng.normal(size=x_shape).astype(np.float32)
  variables = jax.eval_shape(module.init, jax.random.key(0), x)
  params = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape) + 1, jnp.float32),
                        variables["params"])
  extra = {k: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), v)
           for k, v in variables.items() if k != "params"}

  def apply(p, x):
    if not extra:
      return module.apply({"params": p}, x)
    return module.apply({"params": p, **extra}, x, mutable=list(extra))[0]

  class Wrapped:  # _kfac_step's view of the module: apply({'params': p}, x)
    @staticmethod
    def apply(variables, x):
      return apply(variables["params"], x)

  registry, grads, updates, _ = _kfac_step(Wrapped, params, x, t, method)
  (layer,) = registry.layers
  features = x_shape[-1]
  use_bias = "bias" in params
  assert (layer.blocks, layer.a_size, layer.g_size) == (features, 1 + use_bias, 1)

  x_hat = np_normalized(np.asarray(x, np.float64))
  # Our reading of the normalisation agrees with Flax's output.
  y = x_hat * np.asarray(params["scale"]) + (np.asarray(params["bias"]) if use_bias else 0)
  assert_close(apply(params, x), y, rtol=1e-4)

  out_grads = _out_grads(Wrapped, params, x, t).reshape(-1, features)
  x_hat = x_hat.reshape(-1, features)
  for i in range(features):
    a_rows = x_hat[:, i:i + 1]
    if use_bias:
      a_rows = _with_ones(a_rows)
    g_rows = out_grads[:, i:i + 1]
    grad = np.array([[float(grads["scale"][i])]
                     + ([float(grads["bias"][i])] if use_bias else [])])
    expected = _np_precondition(a_rows, g_rows, grad, method)
    assert_close(float(updates["scale"][i]), expected[0, 0], rtol=1e-4)
    if use_bias:
      assert_close(float(updates["bias"][i]), expected[0, 1], rtol=1e-4)


def test_norm_unsupported_configurations_are_listed():
  class Net(nn.Module):

    @nn.compact
    def __call__(self, x):
      x = nn.LayerNorm(use_scale=False, name="no_scale")(x)
      x = nn.LayerNorm(feature_axes=(-2, -1), reduction_axes=(-2, -1), name="two_features")(x)
      x = nn.BatchNorm(use_running_average=True, name="eval_bn")(x)
      # Evaluation mode asked for at call time, positionally.
      return nn.BatchNorm(name="eval_bn_call")(x, True)

  x = jnp.ones((2, 3, 4))
  model = Net()
  variables = model.init(jax.random.key(0), x)
  stats = {"batch_stats": variables["batch_stats"]}
  loss = lambda p, x: jnp.sum(model.apply({"params": p, **stats}, x))
  registry = kaisa_jax.find_layers(loss, variables["params"], x)
  reasons = {s.name: s.reason for s in registry.skipped}
  assert not registry.layers
  assert "no 'scale' parameter" in reasons["no_scale"]
  assert "only one feature axis" in reasons["two_features"]
  assert "evaluation mode" in reasons["eval_bn"]
  assert "evaluation mode" in reasons["eval_bn_call"]
