"""Tests of ``kaisa_jax.kaisa``, the K-FAC optax transformation.

Numerical tests compare against a float64 NumPy model of K-FAC written from
the KAISA conventions alone: a hand-derived forward/backward pass of a small
MLP, running Kronecker factors started from the identity, preconditioning by
a dense solve with ``G ⊗ A + γI`` (eigen) or by damped inverses (inverse), and
the KL clip. Properties that relate two runs of the library (jit vs eager,
gradient accumulation vs one big batch, checkpoint restore vs an
uninterrupted run) compare the two runs with each other.
"""

from __future__ import annotations

import ast
import contextlib
import re
import warnings

import flax.linen as nn
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import Mesh, PartitionSpec as P

import kaisa_jax
from layout import group_of, layer_decompositions, layer_factors
from oracles import np_damped_inverse, np_kron_solve

N_IN, N_HIDDEN, N_OUT = 6, 5, 3
BATCH = 16
# Scales the mean loss so that G is not negligible next to the identity it
# starts from and the damping (a mean loss puts 1/batch into every g row).
LOSS_SCALE = 8.0
# The MLP's registered layers, in call order: name -> (has bias, a_size, g_size).
MLP_LAYERS = {
    "Dense_0": (True, N_IN + 1, N_HIDDEN),
    "Dense_1": (False, N_HIDDEN, N_OUT),
}
INJECT_STATIC = ("layers", "factor_update_steps", "inv_update_steps",
                 "accumulation_steps", "factor_dtype", "inv_dtype",
                 "compute_method", "skip_layers", "grad_worker_frac")


# ---------------------------------------------------------------------------
# Models.


class MLP(nn.Module):
  """6 -> 5 (bias, tanh) -> 3 (no bias), times a scalar no layer covers.

  ``kaisa`` is given ``allow_plain_gradient=True`` for it: the scalar
  follows the plain gradient.
  """

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones, ())
    h = jnp.tanh(nn.Dense(N_HIDDEN)(x))
    return nn.Dense(N_OUT, use_bias=False)(h) * scale


class ConvNet(nn.Module):
  """(6, 6, 2) images -> SAME 3x3 conv -> strided 2x2 conv (no bias) -> Dense."""

  @nn.compact
  def __call__(self, x):
    h = jnp.tanh(nn.Conv(3, (3, 3), padding="SAME")(x))
    h = nn.Conv(4, (2, 2), strides=(2, 2), padding="VALID", use_bias=False)(h)
    return nn.Dense(N_OUT)(h.reshape(h.shape[0], -1))


class MaskedConvNet(nn.Module):
  """A masked convolution (found but not supported) followed by a Dense."""

  @nn.compact
  def __call__(self, x):
    mask = jnp.ones((3, 3, x.shape[-1], 4)).at[0].set(0)
    h = nn.Conv(4, (3, 3), mask=mask, name="masked")(x)
    return nn.Dense(N_OUT)(h.reshape(h.shape[0], -1))


MLP_MODEL = MLP()
CONV_MODEL = ConvNet()


def squared_error(out, y):
  return 0.5 * LOSS_SCALE * jnp.mean(jnp.sum((out - y) ** 2, axis=-1))


def mlp_loss(params, x, y):
  return squared_error(MLP_MODEL.apply({"params": params}, x), y)


def conv_loss(params, x, y):
  return squared_error(CONV_MODEL.apply({"params": params}, x), y)


def mlp_params(seed=0):
  rng = np.random.default_rng(seed)
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  return {
      "Dense_0": {"kernel": f32(rng.normal(size=(N_IN, N_HIDDEN)) / np.sqrt(N_IN)),
                  "bias": f32(0.3 * rng.normal(size=N_HIDDEN))},
      "Dense_1": {"kernel": f32(rng.normal(size=(N_HIDDEN, N_OUT)) / np.sqrt(N_HIDDEN))},
      "scale": f32(1.3),
  }


def mlp_batch(rng, batch=BATCH):
  x = rng.normal(size=(batch, N_IN))
  y = 2 * rng.normal(size=(batch, N_OUT)) + 1
  return jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)


def conv_batch(rng, batch=BATCH):
  x = rng.normal(size=(batch, 6, 6, 2))
  y = 2 * rng.normal(size=(batch, N_OUT)) + 1
  return jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)


@pytest.fixture(scope="module")
def mlp_layers():
  x, y = mlp_batch(np.random.default_rng(0))
  return kaisa_jax.find_layers(mlp_loss, mlp_params(), x, y)


def _grads_and_captures(params, x, y, loss):
  _, grads, captures = kaisa_jax.value_and_grad(loss)(params, x, y)
  return grads, captures


# jit (compiled once per loss and shapes, shared by the tests) keeps the file fast.
_grads_and_captures_jit = jax.jit(_grads_and_captures, static_argnames="loss")


def grads_and_captures(params, x, y, loss=mlp_loss):
  return _grads_and_captures_jit(params, x, y, loss=loss)


def jitted_kfac_step(tx, loss=mlp_loss):
  """jit of: gradients and captures, then ``tx.update``."""

  @jax.jit
  def step(params, state, x, y):
    grads, captures = _grads_and_captures(params, x, y, loss)
    updates, state = tx.update(grads, state, params, captures=captures)
    return grads, updates, state

  return step


def train_step_fn(opt, loss=mlp_loss):
  """One optimizer step: (params, opt_state, x, y) -> (params, opt_state)."""

  def step(params, opt_state, x, y):
    grads, captures = _grads_and_captures(params, x, y, loss)
    updates, opt_state = opt.update(grads, opt_state, params, captures=captures)
    return optax.apply_updates(params, updates), opt_state

  return step


# ---------------------------------------------------------------------------
# The float64 oracle.


def hyper(value, step):
  """A hyperparameter at ``step``: the value, or the schedule evaluated there."""
  return float(value(step)) if callable(value) else value


def mlp_forward_backward(params, x, y):
  """Hand-derived float64 loss gradient and K-FAC rows of the MLP.

  Returns (grads, rows): ``rows[name] = (a, g)`` with ``a`` the layer input
  (a ones column appended for a bias) and ``g`` the gradient of the mean loss
  with respect to the layer output, one row per example.
  """
  p = jax.tree.map(lambda v: np.asarray(v, np.float64), params)
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  batch = x.shape[0]
  w0, b0 = p["Dense_0"]["kernel"], p["Dense_0"]["bias"]
  w1, s = p["Dense_1"]["kernel"], p["scale"]
  h = np.tanh(x @ w0 + b0)
  z1 = h @ w1
  d_out = LOSS_SCALE * (z1 * s - y) / batch
  d_z1 = d_out * s
  d_z0 = (d_z1 @ w1.T) * (1 - h ** 2)
  grads = {"Dense_0": {"kernel": x.T @ d_z0, "bias": d_z0.sum(axis=0)},
           "Dense_1": {"kernel": h.T @ d_z1},
           "scale": np.sum(d_out * z1)}
  rows = {"Dense_0": (np.concatenate([x, np.ones((batch, 1))], axis=1), d_z0),
          "Dense_1": (h, d_z1)}
  return grads, rows


def to_matrix(tree, name):
  """The (out, in [+1]) gradient matrix of an MLP layer, bias last."""
  mat = np.asarray(tree[name]["kernel"], np.float64).T
  if MLP_LAYERS[name][0]:
    mat = np.concatenate([mat, np.asarray(tree[name]["bias"], np.float64)[:, None]], axis=1)
  return mat


def from_matrix(name, mat):
  if MLP_LAYERS[name][0]:
    return {"kernel": mat[:, :-1].T, "bias": mat[:, -1]}
  return {"kernel": mat.T}


class KfacOracle:
  """Dense float64 K-FAC of the MLP, step by step, from the conventions."""

  def __init__(self, layers=tuple(MLP_LAYERS), *, damping, factor_decay, kl_clip,
               learning_rate, factor_update_steps=1, inv_update_steps=1,
               compute_method="eigen", eigenvalue_outer_product=True,
               g_factor_scaling="loss"):
    self.names = tuple(layers)
    self.per_example = g_factor_scaling == "per_example"
    self.damping, self.decay = damping, factor_decay
    self.kl_clip, self.learning_rate = kl_clip, learning_rate
    self.factor_every, self.inv_every = factor_update_steps, inv_update_steps
    self.method, self.outer = compute_method, eigenvalue_outer_product
    self.step = 0
    self.skipped = 0
    self.identity_weight = 1.0  # the weight of the initial I in every factor
    self.factors = {n: (np.eye(MLP_LAYERS[n][1]), np.eye(MLP_LAYERS[n][2]))
                    for n in self.names}
    # What the latest decomposition was computed from: (A, G, damping then).
    damping0 = hyper(damping, 0)
    self.decomposed = {n: (a, g, damping0) for n, (a, g) in self.factors.items()}
    # EKFAC: per layer [QA, QG, scaling], from the identity factors at first.
    self.corrected = {n: [a, g, np.ones((g.shape[0], a.shape[0]))]
                      for n, (a, g) in self.factors.items()}

  def update(self, params, x, y, grads=None):
    """One step; returns the update pytree (float64) and sets grads, vg, nu."""
    t = self.step
    true_grads, rows = mlp_forward_backward(params, x, y)
    grads = true_grads if grads is None else jax.tree.map(
        lambda v: np.asarray(v, np.float64), grads)
    damping = hyper(self.damping, t)
    finite = all(np.all(np.isfinite(v))
                 for v in jax.tree.leaves(rows) + jax.tree.leaves(grads))
    if self.per_example:  # the gradients of each example's own loss
      rows = {n: (a, g * g.shape[0]) for n, (a, g) in rows.items()}
    if t % self.factor_every == 0:
      if finite:
        decay = hyper(self.decay, t)
        self.identity_weight *= decay
        for n in self.names:
          a, g = rows[n]
          a_old, g_old = self.factors[n]
          self.factors[n] = (decay * a_old + (1 - decay) * (a.T @ a) / a.shape[0],
                             decay * g_old + (1 - decay) * (g.T @ g) / g.shape[0])
      else:
        self.skipped += 1
    if t % self.inv_every == 0:
      self.decomposed = {n: (a, g, damping) for n, (a, g) in self.factors.items()}
      for n, (a, g) in self.factors.items():
        a_vals, a_vecs = np.linalg.eigh(a)
        g_vals, g_vecs = np.linalg.eigh(g)
        self.corrected[n] = [a_vecs, g_vecs, np.outer(g_vals, a_vals)]
    if self.method == "ekfac" and t % self.factor_every == 0 and finite:
      decay = hyper(self.decay, t)
      for n in self.names:
        (a, g), (a_vecs, g_vecs, scaling) = rows[n], self.corrected[n]
        moment = ((g @ g_vecs) ** 2).T @ ((a @ a_vecs) ** 2) / a.shape[0]
        self.corrected[n][2] = decay * scaling + (1 - decay) * moment

    precond = {}
    for n in self.names:
      a, g, damping_then = self.decomposed[n]
      grad = to_matrix(grads, n)
      if self.method == "inverse":
        precond[n] = np_damped_inverse(g, damping_then) @ grad @ np_damped_inverse(a, damping_then)
      elif self.method == "ekfac":
        a_vecs, g_vecs, scaling = self.corrected[n]
        precond[n] = g_vecs @ ((g_vecs.T @ grad @ a_vecs) / (scaling + damping)) @ a_vecs.T
      else:
        precond[n] = np_kron_solve(g, a, grad, damping_then if self.outer else damping)

    lr = hyper(self.learning_rate, t)
    self.vg = sum(np.sum(precond[n] * to_matrix(grads, n)) for n in self.names) * lr ** 2
    self.nu = 1.0
    if self.kl_clip is not None and self.vg != 0:
      self.nu = min(1.0, float(np.sqrt(hyper(self.kl_clip, t) / abs(self.vg))))

    self.grads = grads
    updates = jax.tree.map(lambda v: v, grads)
    for n in self.names:
      updates[n] = from_matrix(n, precond[n] * self.nu)
    self.step += 1
    return updates


# ---------------------------------------------------------------------------
# Assertions.


def assert_close(actual, expected, rtol=1e-5, atol=0.0):
  """Leaf by leaf: within ``rtol`` of ``expected``, relative to the leaf's
  largest entry (plus ``atol``). A scalar leaf (the MLP's scale gradient, a
  sum of cancelling float32 terms) is taken relative to the whole tree."""
  actual_leaves, actual_def = jax.tree.flatten(actual)
  expected_leaves, expected_def = jax.tree.flatten(expected)
  assert actual_def.num_leaves == expected_def.num_leaves, (actual_def, expected_def)
  expected_leaves = [np.asarray(e, np.float64) for e in expected_leaves]
  tree_max = max(np.max(np.abs(e)) for e in expected_leaves)
  for a, e in zip(actual_leaves, expected_leaves):
    a = np.asarray(a, np.float64)
    assert a.shape == e.shape
    ref = np.max(np.abs(e)) if e.size > 1 else tree_max
    np.testing.assert_allclose(a, e, rtol=rtol, atol=rtol * ref + atol + 1e-30)


def trees_equal(a, b) -> bool:
  leaves_a, def_a = jax.tree.flatten(a)
  leaves_b, def_b = jax.tree.flatten(b)
  return def_a == def_b and all(
      np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(leaves_a, leaves_b))


def assert_trees_identical(a, b):
  leaves_a, def_a = jax.tree.flatten(a)
  leaves_b, def_b = jax.tree.flatten(b)
  assert def_a == def_b
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def assert_all_zero(tree):
  for leaf in jax.tree.leaves(tree):
    np.testing.assert_array_equal(np.asarray(leaf), 0)


def check_decomposition(d, snapshot, method, outer, rtol=1e-5):
  """``d`` decomposes the factors (A, G) with the damping of ``snapshot``."""
  a, g, damping = snapshot
  if method == "inverse":
    assert isinstance(d, kaisa_jax.Inverse)
    assert_close(d.a_inv, np_damped_inverse(a, damping), rtol)
    assert_close(d.g_inv, np_damped_inverse(g, damping), rtol)
    return
  assert isinstance(d, kaisa_jax.EigenOuter if outer else kaisa_jax.Eigen)
  for vecs, f in ((d.a_eigvecs, a), (d.g_eigvecs, g)):
    q = np.asarray(vecs, np.float64)
    assert_close(q.T @ q, np.eye(f.shape[0]), rtol)
    # ascending eigenvalues, like eigh
    assert_close(q.T @ f @ q, np.diag(np.linalg.eigvalsh(f)), rtol)
  if outer:
    expected = 1 / (np.outer(np.linalg.eigvalsh(g), np.linalg.eigvalsh(a)) + damping)
    assert_close(d.inv_eigval_outer, expected, rtol)
  else:
    assert_close(d.a_eigvals, np.linalg.eigvalsh(a), rtol)
    assert_close(d.g_eigvals, np.linalg.eigvalsh(g), rtol)


def without_identity(factors, weight):
  """The data part of running factors: each minus ``weight`` times I."""
  return jax.tree.map(lambda f: np.asarray(f, np.float64) - weight * np.eye(f.shape[0]),
                      factors)


def check_factors(state_factors, oracle, rtol=1e-5):
  """The running factors match the oracle's, data part and identity part."""
  assert set(state_factors) == set(oracle.names)
  for n, (a, g) in oracle.factors.items():
    actual = without_identity(state_factors[n], oracle.identity_weight)
    expected = without_identity((a, g), oracle.identity_weight)
    # float32 keeps the identity part to a few 1e-8 of its weight
    assert_close(actual, expected, rtol, atol=1e-6 * oracle.identity_weight)
    assert_close(state_factors[n], (a, g), rtol)


def registered_ratio(updates, reference, names=tuple(MLP_LAYERS)):
  """<u, r> / <r, r> over the registered layers' leaves: the common scale."""
  u = np.concatenate([np.ravel(to_matrix(updates, n)) for n in names])
  r = np.concatenate([np.ravel(to_matrix(reference, n)) for n in names])
  return float(u @ r / (r @ r))


# ---------------------------------------------------------------------------
# 1. The full update, step by step, against the oracle.


def test_registry_of_the_test_mlp(mlp_layers):
  assert mlp_layers.names == tuple(MLP_LAYERS)
  for layer in mlp_layers:
    assert (layer.has_bias, layer.a_size, layer.g_size) == MLP_LAYERS[layer.name]
  assert [(u.name, u.shape) for u in mlp_layers.uncovered] == [("scale", ())]
  with pytest.raises(ValueError, match="'scale' \\(\\)"):
    kaisa_jax.kaisa(mlp_layers)


@pytest.mark.parametrize("method,outer", [("eigen", True), ("eigen", False),
                                          ("inverse", True)])
def test_update_matches_oracle_over_steps(mlp_layers, method, outer):
  hp = dict(damping=0.03, factor_decay=0.6, factor_update_steps=2,
            inv_update_steps=3, kl_clip=1.0, learning_rate=0.1)
  tx = kaisa_jax.kaisa(mlp_layers, allow_plain_gradient=True, compute_method=method,
                       eigenvalue_outer_product=outer, **hp)
  oracle = KfacOracle(compute_method=method, eigenvalue_outer_product=outer, **hp)
  step = jitted_kfac_step(tx)
  params = mlp_params(1)
  state = tx.init(params)
  check_factors(layer_factors(mlp_layers, state), oracle)
  decompositions = layer_decompositions(mlp_layers, state, compute_method=method,
                                        eigenvalue_outer_product=outer)
  for n in MLP_LAYERS:
    check_decomposition(decompositions[n], oracle.decomposed[n], method, outer)

  rng = np.random.default_rng(2)
  nus = []
  for t in range(7):
    x, y = mlp_batch(rng)
    grads, updates, new_state = step(params, state, x, y)
    expected = oracle.update(params, x, y)
    nus.append(oracle.nu)
    assert_close(grads, oracle.grads)
    assert_close(updates, expected)
    assert int(new_state.step) == t + 1
    # Factors change exactly on factor steps, decompositions on inverse steps.
    assert trees_equal(new_state.factors, state.factors) == (t % 2 != 0), t
    assert trees_equal(new_state.decompositions, state.decompositions) == (t % 3 != 0), t
    check_factors(layer_factors(mlp_layers, new_state), oracle)
    decompositions = layer_decompositions(mlp_layers, new_state, compute_method=method,
                                          eigenvalue_outer_product=outer)
    for n in MLP_LAYERS:
      check_decomposition(decompositions[n], oracle.decomposed[n], method, outer)
    params = jax.tree.map(lambda p, u: p - 0.1 * u, params, updates)
    state = new_state
  assert int(state.skipped_factor_updates) == 0
  assert int(state.rejected_decompositions) == 0
  # The KL clip was active on some steps and not on others.
  assert min(nus) < 0.8 and max(nus) == 1.0, nus


@pytest.mark.parametrize("g_factor_scaling", ["loss", "per_example"])
def test_ekfac_matches_oracle_over_steps(mlp_layers, g_factor_scaling):
  # Scaling restarted from dG dAᵀ on decomposition steps (every 3rd), moved
  # by the rows' second moment on factor steps (every 2nd), in between kept.
  hp = dict(damping=0.03, factor_decay=0.6, factor_update_steps=2, inv_update_steps=3,
            kl_clip=1.0, learning_rate=0.1, g_factor_scaling=g_factor_scaling)
  tx = kaisa_jax.kaisa(mlp_layers, allow_plain_gradient=True, compute_method="ekfac", **hp)
  oracle = KfacOracle(compute_method="ekfac", **hp)
  step = jitted_kfac_step(tx)
  params = mlp_params(3)
  state = tx.init(params)
  rng = np.random.default_rng(4)
  for t in range(7):
    x, y = mlp_batch(rng)
    _, updates, new_state = step(params, state, x, y)
    expected = oracle.update(params, x, y)
    assert_close(updates, expected, rtol=1e-4)
    decompositions = layer_decompositions(mlp_layers, new_state, compute_method="ekfac")
    scalings = {n: decompositions[n].scaling for n in MLP_LAYERS}
    for n in MLP_LAYERS:
      assert_close(scalings[n], oracle.corrected[n][2], rtol=1e-4)
    params = jax.tree.map(lambda p, u: p - 0.1 * u, params, updates)
    state = new_state
  # The correction matters: the last scaling is not the Kronecker one.
  a_vals = np.linalg.eigvalsh(oracle.factors["Dense_0"][0])
  g_vals = np.linalg.eigvalsh(oracle.factors["Dense_0"][1])
  assert not np.allclose(scalings["Dense_0"], np.outer(g_vals, a_vals), rtol=1e-2)


def test_ekfac_unsupported_settings_raise(mlp_layers):
  with pytest.raises(ValueError, match="accumulation_steps"):
    kaisa_jax.kaisa(mlp_layers, allow_plain_gradient=True, compute_method="ekfac",
                    accumulation_steps=2)
  with pytest.raises(ValueError, match="grad_worker_frac=1"):
    kaisa_jax.placement(mlp_layers, 4, 1 / 4, compute_method="ekfac")


def test_per_example_g_scaling_matches_oracle_over_steps(mlp_layers):
  hp = dict(damping=0.03, factor_decay=0.6, factor_update_steps=2,
            inv_update_steps=3, kl_clip=1e-3, learning_rate=0.1)
  tx = kaisa_jax.kaisa(mlp_layers, allow_plain_gradient=True, g_factor_scaling="per_example", **hp)
  oracle = KfacOracle(g_factor_scaling="per_example", **hp)
  step = jitted_kfac_step(tx)
  params = mlp_params(3)
  state = tx.init(params)
  rng = np.random.default_rng(4)
  for _ in range(5):
    x, y = mlp_batch(rng)
    _, updates, state = step(params, state, x, y)
    assert_close(updates, oracle.update(params, x, y))
    check_factors(layer_factors(mlp_layers, state), oracle)
    params = jax.tree.map(lambda p, u: p - 0.1 * u, params, updates)


@pytest.mark.parametrize("scaling,g_ratio", [("loss", 1 / 4), ("per_example", 1.0)])
def test_g_factor_of_a_doubled_batch(mlp_layers, scaling, g_ratio):
  # The same examples twice: a mean loss halves every output gradient. Per-example
  # G does not notice; the reference's G drops to a quarter. A never changes.
  tx = kaisa_jax.kaisa(mlp_layers, allow_plain_gradient=True, factor_decay=0.5,
                       g_factor_scaling=scaling)
  step = jitted_kfac_step(tx)
  params = mlp_params(5)
  x, y = mlp_batch(np.random.default_rng(6))
  twice = lambda v: np.concatenate([v, v])
  _, _, once_state = step(params, tx.init(params), x, y)
  _, _, twice_state = step(params, tx.init(params), twice(x), twice(y))
  once_factors = layer_factors(mlp_layers, once_state)
  twice_factors = layer_factors(mlp_layers, twice_state)
  for n in MLP_LAYERS:
    (a1, g1), (a2, g2) = without_identity(once_factors[n], 0.5), \
        without_identity(twice_factors[n], 0.5)
    assert_close(a2, a1)
    assert_close(g2, g_ratio * g1)


class TokenNet(nn.Module):
  """Two Dense layers shared over T tokens, (B, T, d) -> (B, 3), the mean over tokens."""

  @nn.compact
  def __call__(self, x):
    h = jnp.tanh(nn.Dense(5)(x))
    return nn.Dense(3)(h).mean(axis=1)


def token_loss(params, x, y):
  return 0.5 * jnp.mean(jnp.sum((TokenNet().apply({"params": params}, x) - y) ** 2, axis=-1))


def token_rows(params, x, y):
  """float64 per-token rows (a with ones, g) of both layers, (B, T, ·) each."""
  p = jax.tree.map(lambda v: np.asarray(v, np.float64), params)
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  batch, tokens = x.shape[:2]
  ones = np.ones((batch, tokens, 1))
  h = np.tanh(x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"])
  out = (h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]).mean(axis=1)
  d_z = np.repeat(((out - y) / batch / tokens)[:, None, :], tokens, axis=1)
  d_h0 = (d_z @ p["Dense_1"]["kernel"].T) * (1 - h ** 2)
  return {"Dense_0": (np.concatenate([x, ones], -1), d_h0),
          "Dense_1": (np.concatenate([h, ones], -1), d_z)}


def np_token_factors(a, g, mode):
  """The oracle's batch factors of (B, T, ·) rows under ``mode``."""
  if mode == "reduce":
    a, g = a.mean(axis=1), g.sum(axis=1)
  a, g = a.reshape(-1, a.shape[-1]), g.reshape(-1, g.shape[-1])
  return a.T @ a / a.shape[0], g.T @ g / g.shape[0]


@pytest.mark.parametrize("weight_sharing, modes", [
    ("expand", {"Dense_0": "expand", "Dense_1": "expand"}),
    ("reduce", {"Dense_0": "reduce", "Dense_1": "reduce"}),
    ({"_0$": "reduce"}, {"Dense_0": "reduce", "Dense_1": "expand"}),
    ({"_1$": "reduce", "Dense": "expand"}, {"Dense_0": "expand", "Dense_1": "reduce"}),
])
def test_weight_sharing_factors_match_oracle(weight_sharing, modes):
  rng = np.random.default_rng(7)
  x = rng.normal(size=(6, 4, 3)).astype(np.float32)
  y = rng.normal(size=(6, 3)).astype(np.float32)
  params = jax.jit(TokenNet().init)(jax.random.key(8), x)["params"]
  layers = kaisa_jax.find_layers(token_loss, params, x, y)
  decay = 1e-3  # almost all batch: the identity part would swamp float32's digits
  tx = kaisa_jax.kaisa(layers, factor_decay=decay, weight_sharing=weight_sharing)
  _, _, state = jitted_kfac_step(tx, token_loss)(params, tx.init(params), x, y)
  rows = token_rows(params, x, y)
  factors = layer_factors(layers, state)
  for name, mode in modes.items():
    expected = tuple((1 - decay) * m for m in np_token_factors(*rows[name], mode))
    assert_close(without_identity(factors[name], decay), expected, rtol=1e-5)
  # reduce and expand really differ here (T = 4 tokens per example)
  assert not np.allclose(*(np_token_factors(*rows["Dense_1"], m)[1] for m in ("expand", "reduce")))


@pytest.mark.parametrize("weight_sharing, match", [
    ("sum", "weight_sharing modes"),
    ({"Dense": "mean"}, "weight_sharing modes"),
    (["reduce"], "weight_sharing must be"),
])
def test_bad_weight_sharing_raises(mlp_layers, weight_sharing, match):
  with pytest.raises(ValueError, match=match):
    kaisa_jax.kaisa(mlp_layers, allow_plain_gradient=True, weight_sharing=weight_sharing)


def test_weight_sharing_reduce_named_for_a_conv_layer_raises():
  x, y = conv_batch(np.random.default_rng(0), 2)
  params = jax.jit(CONV_MODEL.init)(jax.random.key(0), x)["params"]
  layers = kaisa_jax.find_layers(conv_loss, params, x, y)
  conv_name = next(l.name for l in layers if l.kind == "conv")
  with pytest.raises(ValueError, match=f"{conv_name}.*conv"):
    kaisa_jax.kaisa(layers, weight_sharing={conv_name: "reduce"})
  kaisa_jax.kaisa(layers, weight_sharing="reduce")  # globally: the Dense layers only


# ---------------------------------------------------------------------------
# 2. KL clip and schedules.


def test_kl_clip_scales_every_registered_layer_by_nu(mlp_layers):
  params = mlp_params(3)
  x, y = mlp_batch(np.random.default_rng(4))
  grads, captures = grads_and_captures(params, x, y)
  hp = dict(damping=0.05, factor_decay=0.5, learning_rate=0.2)
  free_oracle = KfacOracle(kl_clip=None, **hp)
  unclipped = free_oracle.update(params, x, y)
  vg = free_oracle.vg
  assert vg > 0

  for kl_clip, nu in ((vg / 16, 0.25), (4 * vg, 1.0), (None, 1.0)):
    tx = kaisa_jax.kaisa(mlp_layers, allow_plain_gradient=True, kl_clip=kl_clip, **hp)
    updates, _ = tx.update(grads, tx.init(params), params, captures=captures)
    oracle = KfacOracle(kl_clip=kl_clip, **hp)
    expected = oracle.update(params, x, y)
    assert oracle.nu == pytest.approx(nu)
    assert_close(updates, expected)
    assert registered_ratio(updates, unclipped) == pytest.approx(nu, rel=1e-4)
    np.testing.assert_array_equal(updates["scale"], grads["scale"])

  # kl_clip=None never clips, however large the step.
  tx = kaisa_jax.kaisa(mlp_layers, allow_plain_gradient=True, kl_clip=None, damping=0.05,
                       factor_decay=0.5, learning_rate=1e3)
  updates, _ = tx.update(grads, tx.init(params), params, captures=captures)
  assert_close(updates, unclipped)

  # A zero learning rate makes vg = 0: nu = 1, not a division by zero.
  tx = kaisa_jax.kaisa(mlp_layers, allow_plain_gradient=True, kl_clip=1e-9, damping=0.05,
                       factor_decay=0.5, learning_rate=0.0)
  updates, _ = tx.update(grads, tx.init(params), params, captures=captures)
  assert_close(updates, unclipped)


@pytest.mark.parametrize("method,outer", [("eigen", True), ("eigen", False),
                                          ("inverse", True)])
def test_schedules_are_evaluated_at_the_right_step(mlp_layers, method, outer):
  hp = dict(damping=lambda t: 0.01 * (1 + 2 * t),
            factor_decay=lambda t: 0.5 + 0.1 * t,
            learning_rate=lambda t: 0.1 + 0.05 * t,
            kl_clip=lambda t: 2e-4 * (1 + t),
            factor_update_steps=1, inv_update_steps=2)
  tx = kaisa_jax.kaisa(mlp_layers, allow_plain_gradient=True, compute_method=method,
                       eigenvalue_outer_product=outer, **hp)
  oracle = KfacOracle(compute_method=method, eigenvalue_outer_product=outer, **hp)
  # With the damping of the other eigen form: outer keeps the damping of the
  # last decomposition, plain eigen uses the current one.
  other = KfacOracle(compute_method=method, eigenvalue_outer_product=not outer, **hp)
  step = jitted_kfac_step(tx)
  params = mlp_params(5)
  state = tx.init(params)
  rng = np.random.default_rng(6)
  nus = []
  for t in range(4):
    x, y = mlp_batch(rng)
    _, updates, state = step(params, state, x, y)
    expected = oracle.update(params, x, y)
    assert_close(updates, expected)
    nus.append(oracle.nu)
    alternative = other.update(params, x, y)
    if method == "eigen" and t % 2:
      # step t is no decomposition step: the two forms differ.
      assert not np.allclose(to_matrix(alternative, "Dense_0"),
                             to_matrix(expected, "Dense_0"), rtol=1e-2)
    params = jax.tree.map(lambda p, u: p - 0.5 * u, params, updates)
  check_factors(layer_factors(mlp_layers, state), oracle)
  # The test means something only if the clip was active on some steps.
  assert min(nus) < 0.9, nus


# ---------------------------------------------------------------------------
# 3. Chaining, jit, pass-through leaves.


def test_chain_with_sgd_momentum_under_jit_follows_the_oracle(mlp_layers):
  hp = dict(damping=0.02, factor_decay=0.8, factor_update_steps=2,
            inv_update_steps=3, kl_clip=1e-3, learning_rate=0.1)
  opt = optax.chain(kaisa_jax.kaisa(mlp_layers, allow_plain_gradient=True, **hp),
                    optax.sgd(0.1, momentum=0.9))
  step = jax.jit(train_step_fn(opt))
  params = mlp_params(9)
  opt_state = opt.init(params)
  oracle = KfacOracle(**hp)
  start = jax.tree.map(lambda v: np.asarray(v, np.float64), params)
  p64 = start
  momentum = jax.tree.map(np.zeros_like, start)
  rng = np.random.default_rng(10)
  for _ in range(6):
    x, y = mlp_batch(rng)
    params, opt_state = step(params, opt_state, x, y)
    u = oracle.update(p64, x, y)
    momentum = jax.tree.map(lambda m, v: 0.9 * m + v, momentum, u)
    p64 = jax.tree.map(lambda p, m: p - 0.1 * m, p64, momentum)
  moved = jax.tree.map(lambda p, s: np.asarray(p, np.float64) - s, params, start)
  expected = jax.tree.map(lambda p, s: p - s, p64, start)
  assert_close(moved, expected, rtol=1e-4)
  assert int(opt_state[0].step) == 6


def test_jit_and_eager_agree(mlp_layers):
  opt = optax.chain(
      kaisa_jax.kaisa(mlp_layers, allow_plain_gradient=True, damping=0.02, factor_decay=0.8,
                      factor_update_steps=2, inv_update_steps=3),
      optax.sgd(0.1, momentum=0.9))
  eager = train_step_fn(opt)
  jitted = jax.jit(train_step_fn(opt))
  params = mlp_params(11)
  runs = {}
  for name, step in (("eager", eager), ("jit", jitted)):
    p, s = params, opt.init(params)
    rng = np.random.default_rng(12)
    for _ in range(2):  # step 0 runs the due branches, step 1 the others
      p, s = step(p, s, *mlp_batch(rng))
    # Eigenvectors of near-degenerate factors are not unique, so compare what
    # they produce (params, momentum) and the factors, not the eigenbases.
    runs[name] = (p, s[0].factors, s[1], s[0].step)
  assert_close(runs["eager"], runs["jit"], rtol=1e-5)


@pytest.mark.parametrize("skip_layers", [("Dense_1",), "_1$"])
def test_skipped_and_unregistered_leaves_pass_through(mlp_layers, skip_layers):
  hp = dict(damping=0.02, factor_decay=0.5, kl_clip=1e-6, learning_rate=0.1)
  tx = kaisa_jax.kaisa(mlp_layers, allow_plain_gradient=True, skip_layers=skip_layers, **hp)
  params = mlp_params(13)
  state = tx.init(params)
  assert set(layer_factors(mlp_layers, state, skip_layers=skip_layers)) == {"Dense_0"}
  assert set(layer_decompositions(mlp_layers, state, skip_layers=skip_layers)) == {"Dense_0"}
  # One group, Dense_0's (a 7-by-7 A, a 5-by-5 G), Dense_0 its only member.
  group = group_of(mlp_layers, "Dense_0", skip_layers=skip_layers)
  assert (group.name, group.names) == (f"a{N_IN + 1}_g{N_HIDDEN}", ("Dense_0",))
  assert set(state.factors) == {group.name}
  assert set(state.decompositions) == {group.name}
  x, y = mlp_batch(np.random.default_rng(14))
  grads, captures = grads_and_captures(params, x, y)
  updates, state = tx.update(grads, state, params, captures=captures)
  np.testing.assert_array_equal(updates["Dense_1"]["kernel"], grads["Dense_1"]["kernel"])
  np.testing.assert_array_equal(updates["scale"], grads["scale"])
  # Dense_0 alone is preconditioned and alone makes the KL sum.
  oracle = KfacOracle(layers=("Dense_0",), **hp)
  expected = oracle.update(params, x, y)
  assert oracle.nu < 1
  assert_close(updates, expected)
  check_factors(layer_factors(mlp_layers, state, skip_layers=skip_layers), oracle)


def test_unregistered_leaf_passes_through_every_layer_skipped(mlp_layers):
  tx = kaisa_jax.kaisa(mlp_layers, allow_plain_gradient=True, skip_layers=(".*",))
  params = mlp_params(15)
  grads, captures = grads_and_captures(params, *mlp_batch(np.random.default_rng(16)))
  state = tx.init(params)
  assert state.factors == {} and state.decompositions == {}
  assert layer_factors(mlp_layers, state, skip_layers=(".*",)) == {}
  updates, state = tx.update(grads, state, params, captures=captures)
  assert_trees_identical(updates, grads)


# ---------------------------------------------------------------------------
# 4. optax.inject_hyperparams.


def test_inject_hyperparams_matches_plain_transform_under_jit(mlp_layers):
  hp = dict(damping=0.02, factor_decay=0.7, kl_clip=1e-3, learning_rate=0.1,
            factor_update_steps=2, inv_update_steps=3)
  injected = optax.inject_hyperparams(kaisa_jax.kaisa, static_args=INJECT_STATIC)(
      layers=mlp_layers, allow_plain_gradient=True, **hp)
  plain = kaisa_jax.kaisa(mlp_layers, allow_plain_gradient=True, **hp)
  step_injected, step_plain = jitted_kfac_step(injected), jitted_kfac_step(plain)
  params = mlp_params(17)
  s_injected, s_plain = injected.init(params), plain.init(params)
  rng = np.random.default_rng(18)
  for _ in range(4):
    x, y = mlp_batch(rng)
    _, u_injected, s_injected = step_injected(params, s_injected, x, y)
    _, u_plain, s_plain = step_plain(params, s_plain, x, y)
    assert_close(u_injected, u_plain, rtol=1e-5)
    params = jax.tree.map(lambda p, u: p - 0.5 * u, params, u_plain)
  assert_close(s_injected.inner_state.factors, s_plain.factors, rtol=1e-5)
  assert int(s_injected.inner_state.step) == 4

  # Changing the injected damping changes the result: step 0 redecomposes
  # with the new damping.
  x, y = mlp_batch(rng)
  state = injected.init(params)
  state.hyperparams["damping"] = jnp.asarray(0.5, jnp.float32)
  _, u_changed, _ = step_injected(params, state, x, y)
  assert_close(u_changed, KfacOracle(**dict(hp, damping=0.5)).update(params, x, y))
  _, u_old, _ = step_injected(params, injected.init(params), x, y)
  assert_close(u_old, KfacOracle(**hp).update(params, x, y))
  assert not np.allclose(u_changed["Dense_0"]["kernel"], u_old["Dense_0"]["kernel"], rtol=1e-2)


# ---------------------------------------------------------------------------
# 5. Gradient accumulation.


def test_accumulation_emits_zeros_then_the_big_batch_update(mlp_layers):
  k, micro = 4, 8
  hp = dict(damping=0.02, factor_decay=0.6, kl_clip=1e-3, learning_rate=0.1)
  tx = kaisa_jax.kaisa(mlp_layers, allow_plain_gradient=True, accumulation_steps=k, **hp)
  step = jitted_kfac_step(tx)
  params = mlp_params(19)
  x, y = mlp_batch(np.random.default_rng(20), k * micro)
  state = tx.init(params)
  assert int(state.accumulation.micro_step) == 0
  for i in range(k):
    sl = slice(i * micro, (i + 1) * micro)
    _, updates, state = step(params, state, x[sl], y[sl])
    if i < k - 1:
      assert_all_zero(updates)
      assert int(state.step) == 0
      assert int(state.accumulation.micro_step) == i + 1
  assert int(state.step) == 1
  assert_all_zero(state.accumulation)
  # The emitted update is the one of the big batch (mean loss over 32 rows).
  oracle = KfacOracle(**hp)
  expected = oracle.update(params, x, y)
  assert_close(updates, expected)
  check_factors(layer_factors(mlp_layers, state), oracle)


@pytest.mark.parametrize("model,scaling", [
    ("mlp", "loss"), ("mlp", "per_example"),
    pytest.param("conv", "loss", marks=pytest.mark.slow)])
def test_accumulation_equals_one_big_batch(model, scaling):
  k, micro = 4, 8
  if model == "mlp":
    loss, make_batch, steps = mlp_loss, mlp_batch, 5
    params = mlp_params(21)
  else:
    loss, make_batch, steps = conv_loss, conv_batch, 4
    x0 = conv_batch(np.random.default_rng(0))[0]
    params = jax.jit(CONV_MODEL.init)(jax.random.key(21), x0)["params"]
  rng = np.random.default_rng(22)
  layers = kaisa_jax.find_layers(loss, params, *make_batch(rng, micro))
  hp = dict(damping=0.01, factor_decay=0.7, factor_update_steps=2,
            inv_update_steps=3, kl_clip=1e-3, learning_rate=0.1,
            g_factor_scaling=scaling, allow_plain_gradient=model == "mlp")  # the MLP's scale
  big_opt = optax.chain(kaisa_jax.kaisa(layers, **hp), optax.sgd(0.1, momentum=0.9))
  acc_opt = optax.chain(
      kaisa_jax.kaisa(layers, accumulation_steps=k, **hp),
      optax.MultiSteps(optax.sgd(0.1, momentum=0.9), k, use_grad_mean=False))
  big_step = jax.jit(train_step_fn(big_opt, loss))
  acc_step = jax.jit(train_step_fn(acc_opt, loss))
  p_big, s_big = params, jax.jit(big_opt.init)(params)
  p_acc, s_acc = params, jax.jit(acc_opt.init)(params)
  for t in range(steps):
    x, y = make_batch(rng, k * micro)
    p_big, s_big = big_step(p_big, s_big, x, y)
    for i in range(k):
      before = p_acc
      p_acc, s_acc = acc_step(p_acc, s_acc, x[i * micro:(i + 1) * micro],
                              y[i * micro:(i + 1) * micro])
      if i < k - 1:
        assert_trees_identical(p_acc, before)
    assert int(s_acc[0].step) == t + 1
    moved_acc = jax.tree.map(lambda a, b: np.asarray(a, np.float64) - np.asarray(b), p_acc, params)
    moved_big = jax.tree.map(lambda a, b: np.asarray(a, np.float64) - np.asarray(b), p_big, params)
    assert_close(moved_acc, moved_big, rtol=1e-5)
    # factor steps 0, 2, 4: compare the data parts
    weight = hp["factor_decay"] ** (t // 2 + 1)
    assert_close(without_identity(layer_factors(layers, s_acc[0]), weight),
                 without_identity(layer_factors(layers, s_big[0]), weight), rtol=1e-5,
                 atol=1e-6 * weight)


def test_accumulation_skips_a_nonfinite_micro_batch(mlp_layers):
  k, micro = 2, 8
  hp = dict(damping=0.02, factor_decay=0.6, kl_clip=None, learning_rate=0.1)
  tx = kaisa_jax.kaisa(mlp_layers, allow_plain_gradient=True, accumulation_steps=k, **hp)
  step = jitted_kfac_step(tx)
  oracle = KfacOracle(**hp)
  params = mlp_params(31)
  state = tx.init(params)
  rng = np.random.default_rng(32)
  for t in range(3):
    x, y = mlp_batch(rng, k * micro)
    if t == 1:
      x = x.at[micro + 2, 4].set(jnp.nan)  # in the second micro-batch
    before = state
    for i in range(k):
      sl = slice(i * micro, (i + 1) * micro)
      _, updates, state = step(params, state, x[sl], y[sl])
    expected = oracle.update(params, x, y)
    if t == 1:
      assert_trees_identical(state.factors, before.factors)
    else:
      assert_close(updates, expected)
    check_factors(layer_factors(mlp_layers, state), oracle)
    assert int(state.skipped_factor_updates) == oracle.skipped == min(t, 1)
  assert_all_zero(state.accumulation)


# ---------------------------------------------------------------------------
# 6. Errors.


@pytest.mark.parametrize("kwargs,match", [
    (dict(damping=0.0), "damping"),
    (dict(damping=-1e-3), "damping"),
    (dict(factor_decay=0.0), "factor_decay"),
    (dict(factor_decay=1.5), "factor_decay"),
    (dict(factor_update_steps=0), "factor_update_steps"),
    (dict(factor_update_steps=1.5), "factor_update_steps"),
    (dict(inv_update_steps=0), "inv_update_steps"),
    (dict(inv_update_steps=2.5), "inv_update_steps"),
    (dict(accumulation_steps=0), "accumulation_steps"),
    (dict(compute_method="cholesky"), "compute_method"),
    (dict(g_factor_scaling="batch"), "g_factor_scaling"),
    (dict(kl_clip=0.0), "kl_clip"),
    (dict(learning_rate=-0.1), "learning_rate"),
])
def test_bad_hyperparameters_raise(mlp_layers, kwargs, match):
  with pytest.raises(ValueError, match=match):
    kaisa_jax.kaisa(mlp_layers, allow_plain_gradient=True, **kwargs)


def test_factor_decay_of_one_is_allowed(mlp_layers):
  kaisa_jax.kaisa(mlp_layers, allow_plain_gradient=True, factor_decay=1.0)


@pytest.mark.parametrize("name", ["inv_dtype", "factor_dtype"])
def test_float64_without_x64_raises(mlp_layers, name):
  with jax.enable_x64(False):
    with pytest.raises(ValueError, match=name):
      kaisa_jax.kaisa(mlp_layers, allow_plain_gradient=True, **{name: jnp.float64})
    with pytest.raises(ValueError, match=name):
      kaisa_jax.kaisa(mlp_layers, allow_plain_gradient=True, **{name: "float64"})


def test_layers_must_be_a_registry():
  with pytest.raises(ValueError, match="layers"):
    kaisa_jax.kaisa({"Dense_0": None})


def test_bad_captures_raise(mlp_layers):
  tx = kaisa_jax.kaisa(mlp_layers, allow_plain_gradient=True)
  params = mlp_params()
  state = tx.init(params)
  grads, captures = grads_and_captures(params, *mlp_batch(np.random.default_rng(23)))
  with pytest.raises(ValueError, match="captures"):
    tx.update(grads, state, params)
  with pytest.raises(ValueError, match="Bogus_0"):
    tx.update(grads, state, params, captures=dict(captures, Bogus_0=captures["Dense_0"]))
  missing = {n: c for n, c in captures.items() if n != "Dense_1"}
  with pytest.raises(ValueError, match="Dense_1"):
    tx.update(grads, state, params, captures=missing)
  # A skipped layer needs no captures.
  tx_skip = kaisa_jax.kaisa(mlp_layers, allow_plain_gradient=True, skip_layers=("Dense_1",))
  tx_skip.update(grads, tx_skip.init(params), params, captures=missing)


def test_shapes_disagreeing_with_the_registry_raise(mlp_layers):
  tx = kaisa_jax.kaisa(mlp_layers, allow_plain_gradient=True)
  params = mlp_params()
  wide = jax.tree.map(lambda v: v, params)
  wide["Dense_0"] = {"kernel": jnp.zeros((N_IN, N_HIDDEN + 1)),
                     "bias": jnp.zeros(N_HIDDEN + 1)}
  with pytest.raises(ValueError, match="Dense_0"):
    tx.init(wide)
  state = tx.init(params)
  grads, captures = grads_and_captures(params, *mlp_batch(np.random.default_rng(24)))
  bad = jax.tree.map(lambda v: v, grads)
  bad["Dense_1"] = {"kernel": jnp.zeros((N_HIDDEN + 1, N_OUT))}
  with pytest.raises(ValueError, match="Dense_1"):
    tx.update(bad, state, params, captures=captures)
  no_bias = jax.tree.map(lambda v: v, grads)
  no_bias["Dense_0"] = {"kernel": grads["Dense_0"]["kernel"]}
  with pytest.raises(ValueError, match="Dense_0"):
    tx.update(no_bias, state, params, captures=captures)


def test_unsupported_layer_must_be_skipped():
  model = MaskedConvNet()
  x = jnp.ones((2, 4, 4, 2))
  y = jnp.zeros((2, N_OUT))
  params = jax.jit(model.init)(jax.random.key(0), x)["params"]
  loss = lambda p, x, y: squared_error(model.apply({"params": p}, x), y)
  layers = kaisa_jax.find_layers(loss, params, x, y)
  assert [s.name for s in layers.skipped] == ["masked"]
  with pytest.raises(ValueError, match="masked"):
    kaisa_jax.kaisa(layers)
  tx = kaisa_jax.kaisa(layers, skip_layers=("masked",))
  grads, updates, _ = jitted_kfac_step(tx, loss)(params, tx.init(params), x, y)
  assert_trees_identical(updates["masked"], grads["masked"])


class TwoSkippedNet(nn.Module):
  """Two layers found but not supported (a masked and a transposed convolution), a Dense."""

  @nn.compact
  def __call__(self, x):
    mask = jnp.ones((3, 3, x.shape[-1], 4)).at[0].set(0)
    h = nn.Conv(4, (3, 3), mask=mask, name="masked")(x)
    h = nn.ConvTranspose(2, (2, 2), name="up")(h)
    return nn.Dense(N_OUT, name="Dense_1")(h.reshape(h.shape[0], -1))


def _ready_skip_layers(message: str) -> tuple:
  """The ``skip_layers=(...)`` value a skip error offers, parsed."""
  match = re.search(r"skip_layers=(\(.*?\))", message)
  assert match, message
  return ast.literal_eval(match.group(1))


@pytest.mark.parametrize("given", [(), ("^up$",), ("Dense",)])
def test_skip_error_lists_every_skipped_layer_with_a_ready_value(given):
  model = TwoSkippedNet()
  x, y = jnp.ones((2, 4, 4, 2)), jnp.zeros((2, N_OUT))
  params = jax.jit(model.init)(jax.random.key(0), x)["params"]
  loss = lambda p, x, y: squared_error(model.apply({"params": p}, x), y)
  layers = kaisa_jax.find_layers(loss, params, x, y)
  assert {s.name for s in layers.skipped} == {"masked", "up"}
  unnamed = [s for s in layers.skipped if not any(re.search(p, s.name) for p in given)]
  with pytest.raises(ValueError) as error:
    kaisa_jax.kaisa(layers, skip_layers=given)
  message = str(error.value)
  for s in layers.skipped:
    # Each unnamed skipped layer on a line of its own, with its type and reason.
    assert (f"{s.name!r} ({s.module_type}): {s.reason}" in message) == (s in unnamed)
  ready = _ready_skip_layers(message)
  assert ready[:len(given)] == given
  # Pasted as it is, the value is accepted and leaves exactly the skipped
  # layers (and what the user had named) out.
  tx = kaisa_jax.kaisa(layers, skip_layers=ready)
  kept = {l.name for l in layers if not any(re.search(p, l.name) for p in given)}
  plan = kaisa_jax.placement(layers, 1, skip_layers=ready)
  assert {l.name for l in plan.layers} == kept
  grads, updates, _ = jitted_kfac_step(tx, loss)(params, tx.init(params), x, y)
  assert_trees_identical(updates["up"], grads["up"])


def _traced_update(layers, axis_name, map_as, devices=2):
  """Traces (no compile) one kaisa update on ``devices`` devices mapped as ``map_as``.

  map_as: 'pmap' (axis 'batch'), 'legacy_pmap' (jax 0.9's pmap with
  ``jax_pmap_shmap_merge=False``), 'shard_map' (axis 'data', checked and
  not), 'vmap' (a named axis 'v', not a device axis) or 'none'.
  """
  x, y = mlp_batch(np.random.default_rng(30), batch=devices * 4)
  x, y = x.reshape(devices, 4, N_IN), y.reshape(devices, 4, N_OUT)
  tx = kaisa_jax.kaisa(layers, allow_plain_gradient=True, axis_name=axis_name)
  params = mlp_params(31)

  def step(x, y):
    grads, captures = _grads_and_captures(params, x, y, mlp_loss)
    updates = tx.update(grads, tx.init(params), params, captures=captures)[0]
    return jax.flatten_util.ravel_pytree(updates)[0]  # one per device along the axis

  if map_as in ("pmap", "legacy_pmap"):
    with _legacy_pmap() if map_as == "legacy_pmap" else contextlib.nullcontext():
      return jax.make_jaxpr(jax.pmap(step, axis_name="batch"))(x, y)
  if map_as.startswith("shard_map"):
    mesh = Mesh(np.array(jax.devices()[:devices]), ("data",))
    mapped = jax.shard_map(step, mesh=mesh, in_specs=P("data"), out_specs=P("data"),
                           check_vma=map_as == "shard_map_checked")
    return jax.make_jaxpr(mapped)(x.reshape(-1, N_IN), y.reshape(-1, N_OUT))
  if map_as == "vmap":
    return jax.make_jaxpr(jax.vmap(step, axis_name="v"))(x, y)
  return jax.make_jaxpr(step)(x[0], y[0])


@contextlib.contextmanager
def _legacy_pmap():
  """jax 0.9's pmap of its own, not through shard_map (its switch is deprecated)."""

  def switch(merge: bool):
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", DeprecationWarning)
      jax.config.update("jax_pmap_shmap_merge", merge)

  switch(False)
  try:
    yield
  finally:
    switch(True)


# The legacy pmap is there only as long as its switch is (jax 0.9).
LEGACY_PMAP = ["legacy_pmap"] if hasattr(jax.config, "jax_pmap_shmap_merge") else []


@pytest.mark.parametrize("map_as, axis", [("pmap", "batch"), ("shard_map_checked", "data"),
                                          ("shard_map", "data")]
                         + [(m, "batch") for m in LEGACY_PMAP])
def test_an_update_without_axis_name_inside_a_device_map_warns(mlp_layers, map_as, axis):
  with pytest.warns(UserWarning, match="kaisa: no axis_name") as record:
    _traced_update(mlp_layers, None, map_as)
  (message,) = [str(w.message) for w in record if "kaisa: no axis_name" in str(w.message)]
  assert f"over {axis!r}" in message and f"axis_name={axis!r}" in message
  assert "warnings.filterwarnings('ignore', message='kaisa: no axis_name')" in message
  # The filter the message gives silences it.
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    warnings.filterwarnings("ignore", message="kaisa: no axis_name")
    _traced_update(mlp_layers, None, map_as)


@pytest.mark.parametrize("map_as, axis_name", [("pmap", "batch"), ("shard_map", "data"),
                                               ("vmap", None), ("none", None)])
def test_an_update_with_axis_name_or_outside_a_device_map_does_not_warn(mlp_layers, map_as,
                                                                       axis_name):
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    _traced_update(mlp_layers, axis_name, map_as)


# ---------------------------------------------------------------------------
# 7. Non-finite steps.


@pytest.mark.parametrize("poison", ["inputs", "targets", "unregistered_grad"])
def test_nonfinite_factor_step_is_skipped(mlp_layers, poison):
  hp = dict(damping=0.02, factor_decay=0.6, kl_clip=1e-3, learning_rate=0.1)
  tx = kaisa_jax.kaisa(mlp_layers, allow_plain_gradient=True, **hp)
  oracle = KfacOracle(**hp)
  params = mlp_params(25)
  state = tx.init(params)
  rng = np.random.default_rng(26)

  x, y = mlp_batch(rng)
  grads, captures = grads_and_captures(params, x, y)
  updates, state = tx.update(grads, state, params, captures=captures)
  assert_close(updates, oracle.update(params, x, y))

  x, y = mlp_batch(rng)
  if poison == "inputs":
    x = x.at[3, 2].set(jnp.nan)
  elif poison == "targets":
    y = y.at[1, 0].set(jnp.inf)
  grads, captures = grads_and_captures(params, x, y)
  if poison == "unregistered_grad":
    grads = dict(grads, scale=jnp.asarray(jnp.nan, jnp.float32))
  before = state
  _, state = tx.update(grads, state, params, captures=captures)
  with np.errstate(invalid="ignore"):  # inf - inf in the poisoned rows
    oracle.update(params, x, y, grads=grads)
  assert oracle.skipped == 1
  assert int(state.skipped_factor_updates) == 1
  assert int(state.rejected_decompositions) == 0
  assert_trees_identical(state.factors, before.factors)
  assert all(np.all(np.isfinite(np.asarray(v))) for v in jax.tree.leaves(state.decompositions))

  # The next clean step carries on from the kept factors.
  x, y = mlp_batch(rng)
  grads, captures = grads_and_captures(params, x, y)
  updates, state = tx.update(grads, state, params, captures=captures)
  assert_close(updates, oracle.update(params, x, y))
  check_factors(layer_factors(mlp_layers, state), oracle)
  assert int(state.skipped_factor_updates) == 1


@pytest.mark.parametrize("method,bad_factor", [("inverse", "negative_definite"),
                                               ("eigen", "nan")])
def test_nonfinite_decomposition_is_rejected(mlp_layers, method, bad_factor):
  hp = dict(damping=0.02, factor_decay=0.6, kl_clip=None, learning_rate=0.1,
            factor_update_steps=2, compute_method=method)
  tx = kaisa_jax.kaisa(mlp_layers, allow_plain_gradient=True, **hp)
  oracle = KfacOracle(**hp)
  params = mlp_params(27)
  rng = np.random.default_rng(28)
  state = tx.init(params)
  x, y = mlp_batch(rng)
  grads, captures = grads_and_captures(params, x, y)
  _, state = tx.update(grads, state, params, captures=captures)
  oracle.update(params, x, y)

  # Step 1 is not a factor step, but it decomposes: Dense_0's A is broken,
  # in its block of its group's stack.
  group = group_of(mlp_layers, "Dense_0")
  (block,) = group.block_range("Dense_0")
  stack = state.factors[group.name].a_factor
  a = stack[block]
  broken = -2.0 * jnp.eye(a.shape[0]) if bad_factor == "negative_definite" else a.at[0, 0].set(jnp.nan)
  factors = dict(state.factors, **{group.name: state.factors[group.name]._replace(
      a_factor=stack.at[block].set(broken))})
  before = state._replace(factors=factors)
  np.testing.assert_array_equal(np.asarray(layer_factors(mlp_layers, before)["Dense_0"].a_factor),
                                np.asarray(broken))
  x, y = mlp_batch(rng)
  grads, captures = grads_and_captures(params, x, y)
  updates, state = tx.update(grads, before, params, captures=captures)
  assert int(state.rejected_decompositions) == 1
  assert int(state.skipped_factor_updates) == 0
  assert_trees_identical(layer_decompositions(mlp_layers, state, compute_method=method)["Dense_0"],
                         layer_decompositions(mlp_layers, before, compute_method=method)["Dense_0"])
  # The previous decomposition still preconditions Dense_0. Dense_1 is
  # redecomposed from factors unchanged since step 0, so both layers precondition
  # as if step 1 were no decomposition step: tell the oracle so.
  oracle.inv_every = 2
  expected = oracle.update(params, x, y)
  assert_close(updates, expected)
  assert all(np.all(np.isfinite(np.asarray(v))) for v in jax.tree.leaves(updates))


# ---------------------------------------------------------------------------
# 8. Orbax checkpoints.


@pytest.mark.parametrize("accumulation_steps", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_orbax_restore_continues_bit_identically(mlp_layers, tmp_path, accumulation_steps):
  k = accumulation_steps
  kfac = kaisa_jax.kaisa(mlp_layers, allow_plain_gradient=True, damping=0.02, factor_decay=0.8,
                         factor_update_steps=2, inv_update_steps=3,
                         accumulation_steps=k)
  sgd = optax.sgd(0.1, momentum=0.9)
  opt = optax.chain(kfac, sgd if k == 1 else optax.MultiSteps(sgd, k, use_grad_mean=False))
  step = jax.jit(train_step_fn(opt))
  rng = np.random.default_rng(29)
  batches = [mlp_batch(rng) for _ in range(6)]
  params = mlp_params(30)

  p, s = params, opt.init(params)
  for x, y in batches:
    p, s = step(p, s, x, y)
  uninterrupted = {"params": p, "opt_state": s}

  p, s = params, opt.init(params)
  for x, y in batches[:3]:
    p, s = step(p, s, x, y)
  checkpointer = ocp.StandardCheckpointer()
  path = tmp_path / "ckpt"
  checkpointer.save(path, {"params": p, "opt_state": s})
  checkpointer.wait_until_finished()
  del p, s
  fresh = {"params": params, "opt_state": opt.init(params)}
  target = jax.tree.map(ocp.utils.to_shape_dtype_struct, fresh)
  restored = checkpointer.restore(path, target)
  assert jax.tree.structure(restored) == jax.tree.structure(fresh)
  assert isinstance(restored["opt_state"][0], kaisa_jax.KaisaState)
  p, s = restored["params"], restored["opt_state"]
  for x, y in batches[3:]:
    p, s = step(p, s, x, y)
  assert_trees_identical({"params": p, "opt_state": s}, uninterrupted)
