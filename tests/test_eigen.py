"""Tests for the decompositions and the preconditioning, against dense float64 solves."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kaisa_jax
from kaisa_jax._src import eigen as eigen_lib
from kaisa_jax._src import factors as factors_lib
from layout import layer_decompositions, layer_factors
from oracles import (assert_close, np_damped_inverse, np_kernel_from_matrix,
                     np_kernel_matrix, np_kron_solve, np_patches, np_same_pads,
                     random_params)


def _random_spd(rng, n, low, high):
  q, _ = np.linalg.qr(rng.normal(size=(n, n)))
  m = q @ np.diag(rng.uniform(low, high, size=n)) @ q.T
  return ((m + m.T) / 2).astype(np.float32)


def _np_eigen_precondition(g, a, grad, damping):
  """QG [(QGᵀ ∇ QA) / (dG dAᵀ + γ)] QAᵀ with clamped float64 eigenvalues."""
  da, qa = np.linalg.eigh(np.asarray(a, np.float64))
  dg, qg = np.linalg.eigh(np.asarray(g, np.float64))
  da, dg = np.maximum(da, 0), np.maximum(dg, 0)
  v = qg.T @ np.asarray(grad, np.float64) @ qa
  return qg @ (v / (np.outer(dg, da) + damping)) @ qa.T


def _np_inverse_precondition(g, a, grad, damping):
  """(G + γI)⁻¹ ∇ (A + γI)⁻¹ as one dense Kronecker solve."""
  g, a, grad = (np.asarray(m, np.float64) for m in (g, a, grad))
  big = np.kron(g + damping * np.eye(g.shape[0]), a + damping * np.eye(a.shape[0]))
  return np.linalg.solve(big, grad.ravel()).reshape(grad.shape)


def _problem(seed, a_size=7, g_size=5, low=0.5, high=2.0):
  rng = np.random.default_rng(seed)
  a = _random_spd(rng, a_size, low, high)
  g = _random_spd(rng, g_size, low, high)
  grad = rng.normal(size=(g_size, a_size)).astype(np.float32)
  return a, g, grad


def _factors(a, g):
  """One layer's factors as a stack of one block each, as ``eigen.decompose`` takes them."""
  return factors_lib.LayerFactors(jnp.asarray(a)[None], jnp.asarray(g)[None])


def _decompose(a, g, damping, method, outer):
  """``eigen.decompose`` of one (a, a) and one (g, g) factor, its blocks axis of 1 dropped."""
  d = eigen_lib.decompose(_factors(a, g), damping, method, outer, jnp.float32)
  for x in jax.tree.leaves(d):
    assert x.shape[0] == 1
  return jax.tree.map(lambda x: x[0], d)


def _precondition(d, grad, damping):
  """``eigen.precondition`` of one (g, a) gradient with a one-block decomposition."""
  stacked = jax.tree.map(lambda x: x[None], d)
  p = eigen_lib.precondition(stacked, jnp.asarray(grad)[None], damping)
  assert p.shape[0] == 1
  return p[0]


@pytest.mark.parametrize("outer", [True, False])
@pytest.mark.parametrize("damping", [1e-3, 1e-2, 1e-1])
def test_eigen_precondition_matches_dense_kronecker_solve(outer, damping):
  a, g, grad = _problem(0)
  d = _decompose(a, g, damping, "eigen", outer)
  assert isinstance(d, kaisa_jax.EigenOuter if outer else kaisa_jax.Eigen)
  p = _precondition(d, jnp.asarray(grad), damping)
  assert p.shape == grad.shape and p.dtype == jnp.float32
  assert_close(p, np_kron_solve(g, a, grad, damping), rtol=1e-4)
  assert_close(p, _np_eigen_precondition(g, a, grad, damping), rtol=1e-4)


@pytest.mark.parametrize("outer", [True, False])
def test_eigen_decomposition_contents(outer):
  a, g, _ = _problem(1)
  damping = 0.05
  d = _decompose(a, g, damping, "eigen", outer)
  da = np.linalg.eigvalsh(a.astype(np.float64))
  dg = np.linalg.eigvalsh(g.astype(np.float64))
  for vecs, vals, m in ((d.a_eigvecs, da, a), (d.g_eigvecs, dg, g)):
    q = np.asarray(vecs, np.float64)
    assert_close(q.T @ q, np.eye(q.shape[0]), rtol=1e-5)
    # Ascending eigenvalues, in the order of the eigenvector columns.
    assert_close(q.T @ m.astype(np.float64) @ q, np.diag(vals), rtol=1e-5)
  if outer:
    assert d.inv_eigval_outer.shape == (g.shape[0], a.shape[0])
    assert_close(d.inv_eigval_outer, 1 / (np.outer(dg, da) + damping), rtol=1e-5)
  else:
    assert_close(d.a_eigvals, da, rtol=1e-5)
    assert_close(d.g_eigvals, dg, rtol=1e-5)


def test_eigen_damping_taken_at_the_right_time():
  # Eigen adds the damping when preconditioning; EigenOuter fixed it when decomposing.
  a, g, grad = _problem(2)
  decompose_damping, precondition_damping = 0.2, 0.02
  plain = _decompose(a, g, decompose_damping, "eigen", False)
  outer = _decompose(a, g, decompose_damping, "eigen", True)
  assert_close(_precondition(plain, jnp.asarray(grad), precondition_damping),
               np_kron_solve(g, a, grad, precondition_damping), rtol=1e-4)
  assert_close(_precondition(outer, jnp.asarray(grad), precondition_damping),
               np_kron_solve(g, a, grad, decompose_damping), rtol=1e-4)


@pytest.mark.parametrize("damping", [1e-3, 1e-2, 1e-1])
def test_inverse_precondition_matches_dense_kronecker_solve(damping):
  a, g, grad = _problem(3)
  d = _decompose(a, g, damping, "inverse", False)
  assert isinstance(d, kaisa_jax.Inverse)
  assert_close(d.a_inv, np_damped_inverse(a, damping), rtol=1e-5)
  assert_close(d.g_inv, np_damped_inverse(g, damping), rtol=1e-5)
  p = _precondition(d, jnp.asarray(grad), damping)
  assert_close(p, _np_inverse_precondition(g, a, grad, damping), rtol=1e-4)


def _with_spectrum(rng, eigvals):
  n = len(eigvals)
  q, _ = np.linalg.qr(rng.normal(size=(n, n)))
  m = q @ np.diag(eigvals) @ q.T
  return ((m + m.T) / 2).astype(np.float32)


@pytest.mark.parametrize("outer", [True, False])
def test_negative_eigenvalues_are_clamped(outer):
  # Factors with negative eigenvalues (as float32 rounding produces on
  # rank-deficient covariances, here exaggerated): they count as zero.
  rng = np.random.default_rng(4)
  a = _with_spectrum(rng, [-0.04, -1e-3, 0.0, 0.0, 0.7, 1.3, 2.0])
  g = _with_spectrum(rng, [-0.02, 0.6, 1.1, 1.9, 2.5])
  grad = rng.normal(size=(5, 7)).astype(np.float32)
  damping = 0.1
  d = _decompose(a, g, damping, "eigen", outer)
  if outer:
    assert np.all(np.asarray(d.inv_eigval_outer) <= np.float32(1 / damping) * (1 + 1e-6))
    assert np.all(np.asarray(d.inv_eigval_outer) > 0)
  else:
    assert np.all(np.asarray(d.a_eigvals) >= 0)
    assert np.all(np.asarray(d.g_eigvals) >= 0)
    assert_close(d.a_eigvals, np.maximum(np.linalg.eigvalsh(a.astype(np.float64)), 0),
                 rtol=1e-5)
  p = _precondition(d, jnp.asarray(grad), damping)
  # Oracle: the clamped (positive semi-definite part) factors, dense solve.
  clamp = lambda m: (lambda w, q: q @ np.diag(np.maximum(w, 0)) @ q.T)(
      *np.linalg.eigh(m.astype(np.float64)))
  assert_close(p, np_kron_solve(clamp(g), clamp(a), grad, damping), rtol=1e-4)
  assert_close(p, _np_eigen_precondition(g, a, grad, damping), rtol=1e-4)


@pytest.mark.parametrize("outer", [True, False])
def test_rank_deficient_covariance(outer):
  # A = xᵀx / rows with fewer rows than columns, as from a tiny batch.
  rng = np.random.default_rng(5)
  x = rng.normal(size=(3, 8))
  a = (x.T @ x / 3).astype(np.float32)
  g = _random_spd(rng, 4, 0.5, 2.0)
  grad = rng.normal(size=(4, 8)).astype(np.float32)
  damping = 0.1
  d = _decompose(a, g, damping, "eigen", outer)
  if not outer:
    assert np.all(np.asarray(d.a_eigvals) >= 0)
  p = _precondition(d, jnp.asarray(grad), damping)
  assert np.all(np.isfinite(np.asarray(p)))
  assert_close(p, np_kron_solve(g, a, grad, damping), rtol=1e-4)


def test_identity_decompositions_in_initial_state():
  # Before any factor update, every method preconditions with the identity
  # factors: P = ∇ / (1 + γ) (eigen) or ∇ / (1 + γ)² (inverse).
  class Net(nn.Module):

    @nn.compact
    def __call__(self, x):
      return nn.Dense(3)(x)

  model = Net()
  x = jnp.ones((2, 4))
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
  params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  loss_fn = lambda p, x: jnp.sum(model.apply({"params": p}, x))
  layers = kaisa_jax.find_layers(loss_fn, params, x)
  rng = np.random.default_rng(6)
  grad = rng.normal(size=(3, 5)).astype(np.float32)
  damping = 0.3
  for method, outer in (("eigen", True), ("eigen", False), ("inverse", False)):
    tx = kaisa_jax.kaisa(layers, damping=damping, compute_method=method,
                         eigenvalue_outer_product=outer, kl_clip=None)
    state = tx.init(params)
    d = layer_decompositions(layers, state, compute_method=method,
                             eigenvalue_outer_product=outer)["Dense_0"]
    p = _precondition(d, jnp.asarray(grad), damping)
    eye_a, eye_g = np.eye(5), np.eye(3)
    if method == "eigen":
      expected = np_kron_solve(eye_g, eye_a, grad, damping)
    else:
      expected = _np_inverse_precondition(eye_g, eye_a, grad, damping)
    assert_close(p, expected, rtol=1e-6)


# --------------------------------------------------------------------------
# End to end: tx.update on a Conv + Dense model against a numpy model


class _ConvNet(nn.Module):
  conv_bias: bool = True

  @nn.compact
  def __call__(self, x):
    h = nn.Conv(3, (3, 3), padding="SAME", use_bias=self.conv_bias, name="conv")(x)
    r = jnp.tanh(h)
    z = nn.Dense(2, name="head")(r.reshape(r.shape[0], -1))
    # An extra parameter no layer owns: it must pass through unchanged.
    return z * self.param("scale", nn.initializers.ones, (2,))


def _np_model(params, x, t, conv_bias):
  """Forward + manual backprop of 0.5 * mean_b |z - t|²: grads and factor rows."""
  f64 = lambda v: np.asarray(v, np.float64)
  kc = f64(params["conv"]["kernel"])
  kd, bd = f64(params["head"]["kernel"]), f64(params["head"]["bias"])
  scale = f64(params["scale"])
  x = f64(x)
  n, hgt, wid, _ = x.shape
  positions = hgt * wid
  kernel_size = kc.shape[:2]
  pads = np_same_pads((hgt, wid), kernel_size)
  patches = np_patches(x, kernel_size, pads=pads).reshape(n * positions, -1)
  a_conv = patches
  if conv_bias:
    a_conv = np.concatenate([patches, np.ones((n * positions, 1))], axis=1)
  w_conv = np_kernel_matrix(kc, f64(params["conv"]["bias"]) if conv_bias else None)
  h = a_conv @ w_conv.T  # (n * S, 3)
  r = np.tanh(h)
  r_flat = r.reshape(n, -1)  # (n, S * 3), the row-major flatten of (n, H, W, 3)
  u = r_flat @ kd + bd
  z = u * scale
  dz = (z - f64(t)) / n
  du = dz * scale
  a_head = np.concatenate([r_flat, np.ones((n, 1))], axis=1)
  dr = (du @ kd.T).reshape(n * positions, -1)
  dh = dr * (1 - r ** 2)
  grads = {
      "conv": dh.T @ a_conv,  # (out, in [+1])
      "head": du.T @ a_head,
      "scale": np.sum(dz * u, axis=0),
  }
  rows = {
      "conv": (a_conv / positions, dh / positions),
      "head": (a_head, du),
  }
  return grads, rows


@pytest.mark.parametrize("method, outer, conv_bias, clip", [
    ("eigen", True, True, False),
    ("eigen", False, False, False),
    ("inverse", False, True, True),
    ("eigen", True, False, True),
])
def test_end_to_end_update(method, outer, conv_bias, clip):
  model = _ConvNet(conv_bias=conv_bias)
  rng = np.random.default_rng(7)
  x_shape = (4, 5, 5, 2)
  batches = [(rng.normal(size=x_shape).astype(np.float32),
              rng.normal(size=(4, 2)).astype(np.float32)) for _ in range(2)]
  params = random_params(model, jnp.ones(x_shape), seed=rng, scale=0.3)
  params["scale"] = params["scale"] + 1.0

  def loss_fn(p, x, t):
    z = model.apply({"params": p}, x)
    return 0.5 * jnp.mean(jnp.sum((z - t) ** 2, axis=-1))

  layers = kaisa_jax.find_layers(loss_fn, params, *batches[0])
  assert layers.names == ("conv", "head")
  damping, decay, lr = 0.05, 0.6, 0.1
  has_bias = {"conv": conv_bias, "head": True}

  # The numpy side: running factors, preconditioned matrices and the KL clip.
  running = {l.name: (np.eye(l.a_size), np.eye(l.g_size)) for l in layers}
  expected_steps = []
  for x, t in batches:
    grads, rows = _np_model(params, x, t, conv_bias)
    precond = {}
    for name, (a_rows, g_rows) in rows.items():
      ba = a_rows.T @ a_rows / a_rows.shape[0]
      bg = g_rows.T @ g_rows / g_rows.shape[0]
      old_a, old_g = running[name]
      running[name] = (decay * old_a + (1 - decay) * ba, decay * old_g + (1 - decay) * bg)
      fa, fg = running[name]
      if method == "eigen":
        precond[name] = np_kron_solve(fg, fa, grads[name], damping)
      else:
        precond[name] = _np_inverse_precondition(fg, fa, grads[name], damping)
    vg = lr ** 2 * sum(np.sum(precond[n] * grads[n]) for n in precond)
    expected_steps.append((grads, precond, vg))

  # Set the KL bound so that the clip is active, scaling the first step by 1/2.
  kl_clip = expected_steps[0][2] / 4 if clip else None
  # allow_plain_gradient: the model's scale is held by no layer.
  tx = kaisa_jax.kaisa(layers, damping=damping, factor_decay=decay, kl_clip=kl_clip,
                       learning_rate=lr, compute_method=method,
                       eigenvalue_outer_product=outer, allow_plain_gradient=True)
  state = jax.jit(tx.init)(params)

  @jax.jit
  def step(state, x, t):
    _, grads, captures = kaisa_jax.value_and_grad(loss_fn)(params, x, t)
    updates, state = tx.update(grads, state, params, captures=captures)
    return grads, updates, state

  for (x, t), (np_grads, precond, vg) in zip(batches, expected_steps):
    grads, updates, state = step(state, x, t)
    # The model oracle agrees with jax's gradients.
    for name in ("conv", "head"):
      layer = layers[name]
      gk, gb = np_kernel_from_matrix(np_grads[name], layer.kernel_shape, has_bias[name])
      assert_close(grads[name]["kernel"], gk, rtol=1e-5)
      if has_bias[name]:
        assert_close(grads[name]["bias"], gb, rtol=1e-5)
    nu = min(1.0, np.sqrt(kl_clip / vg)) if clip else 1.0
    for name in ("conv", "head"):
      layer = layers[name]
      ek, eb = np_kernel_from_matrix(nu * precond[name], layer.kernel_shape, has_bias[name])
      assert_close(updates[name]["kernel"], ek, rtol=1e-4)
      if has_bias[name]:
        assert_close(updates[name]["bias"], eb, rtol=1e-4)
      else:
        assert "bias" not in updates[name]
    np.testing.assert_array_equal(np.asarray(updates["scale"]), np.asarray(grads["scale"]))
    assert_close(updates["scale"], np_grads["scale"], rtol=1e-5)
  factors = layer_factors(layers, state)
  for name, (fa, fg) in running.items():
    assert_close(factors[name].a_factor, fa, rtol=1e-5)
    assert_close(factors[name].g_factor, fg, rtol=1e-5)
