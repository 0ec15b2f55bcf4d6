"""factor_subsample: the factors from a subset of each batch's examples.

Against float64 NumPy (``oracles.np_chain``: a Dense chain's rows and
gradients by hand): the running factors are the means over the chosen
examples' rows, the update is the Kronecker solve of the whole batch's
gradient with them, a random subsample is unbiased, and a layer inside a
scan subsamples along its batch axis.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kaisa_jax
from kaisa_jax._src import factors as factors_lib
from kaisa_jax._src import subsample as subsample_lib
from oracles import (assert_close, np_chain, np_damped_inverse, normal_batch, random_params,
                     scaled_mse)
import test_distributed as dist

BATCH, LOSS_SCALE, DAMPING, DECAY = 12, 8.0, 0.05, 0.5


class MLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.Dense(3, name="out")(jnp.tanh(nn.Dense(4, name="hidden")(x)))


def _problem(seed):
  """The MLP on a batch of BATCH: (x, t, params, loss_fn, registry)."""
  model = MLP()
  x, t = normal_batch(BATCH, 5, 3, seed=seed)
  params = random_params(model, jnp.asarray(x), seed=seed + 1)
  loss_fn = scaled_mse(model, LOSS_SCALE)
  return x, t, params, loss_fn, kaisa_jax.find_layers(loss_fn, params, x, t)


def _one_step(tx, loss_fn, params, x, t):
  """(updates, state) of tx's first update on the batch."""
  _, grads, captures = kaisa_jax.value_and_grad(loss_fn)(params, x, t)
  return jax.jit(lambda g, s, c: tx.update(g, s, params, captures=c))(
      grads, tx.init(params), captures)


def test_strided_and_random_indices():
  np.testing.assert_array_equal(subsample_lib.strided_index(10, 4), [0, 2, 5, 7])
  np.testing.assert_array_equal(subsample_lib.strided_index(6, 6), np.arange(6))
  draws = [np.asarray(subsample_lib.random_index(jax.random.key(s), 10, 4)) for s in range(20)]
  for d in draws:
    assert len(set(d.tolist())) == 4 and d.min() >= 0 and d.max() < 10
  assert len({tuple(sorted(d)) for d in draws}) > 10  # different keys, different subsets


@pytest.mark.parametrize("size, seed, scaling", [
    (4, None, "loss"), (1 / 3, None, "per_example"), (5, 7, "loss")])
def test_factors_and_update_against_float64_oracle(size, seed, scaling):
  x, t, params, loss_fn, registry = _problem(seed=1)
  tx = kaisa_jax.kaisa(registry, damping=DAMPING, factor_decay=DECAY, kl_clip=None,
                       compute_method="inverse", g_factor_scaling=scaling,
                       factor_subsample=size, factor_subsample_seed=seed)
  updates, state = _one_step(tx, loss_fn, params, x, t)

  k = size if isinstance(size, int) else round(size * BATCH)
  if seed is None:
    chosen = subsample_lib.strided_index(BATCH, k)
  else:  # the draw of step 0, micro-batch 0
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 0), 0)
    chosen = np.asarray(subsample_lib.random_index(key, BATCH, k))
  layers = [(params[n]["kernel"], params[n]["bias"]) for n in ("hidden", "out")]
  _, np_grads, rows = np_chain(layers, x, t, ["tanh"], LOSS_SCALE)
  per_layer = kaisa_jax.placement(registry, 1, compute_method="inverse").layer_factors(state)
  for name, (inputs, out_grads), (w_grad, b_grad) in zip(("hidden", "out"), rows,
                                                         np_grads):
    a = np.concatenate([inputs, np.ones((BATCH, 1))], axis=1)[chosen]
    g = out_grads[chosen] * (BATCH ** 2 if scaling == "per_example" else 1)
    a_factor = DECAY * np.eye(a.shape[1]) + (1 - DECAY) * a.T @ a / k
    g_factor = DECAY * np.eye(g.shape[1]) + (1 - DECAY) * (g.T @ out_grads[chosen]) / k
    assert_close(per_layer[name].a_factor, a_factor, rtol=1e-5)
    assert_close(per_layer[name].g_factor, g_factor, rtol=1e-5)
    # The whole batch's gradient, preconditioned with the subsample's factors.
    grad = np.concatenate([w_grad.T, b_grad[:, None]], axis=1)
    precond = np_damped_inverse(g_factor, DAMPING) @ grad @ np_damped_inverse(a_factor, DAMPING)
    assert_close(updates[name]["kernel"], precond[:, :-1].T, rtol=1e-4)
    assert_close(updates[name]["bias"], precond[:, -1], rtol=1e-4)


def test_ekfac_scaling_comes_from_the_subsample():
  x, t, params, loss_fn, registry = _problem(seed=7)
  tx = kaisa_jax.kaisa(registry, damping=DAMPING, factor_decay=DECAY, kl_clip=None,
                       compute_method="ekfac", factor_subsample=4)
  _, state = _one_step(tx, loss_fn, params, x, t)
  chosen = subsample_lib.strided_index(BATCH, 4)
  layers = [(params[n]["kernel"], params[n]["bias"]) for n in ("hidden", "out")]
  _, _, rows = np_chain(layers, x, t, ["tanh"], LOSS_SCALE)
  plan = kaisa_jax.placement(registry, 1, compute_method="ekfac")
  decompositions, factors = plan.layer_decompositions(state), plan.layer_factors(state)
  for name, (inputs, out_grads) in zip(("hidden", "out"), rows):
    # Step 0 decomposes the new factors (S = dG dAᵀ), then folds in the batch's moments.
    a = np.concatenate([inputs, np.ones((BATCH, 1))], axis=1)[chosen]
    g = out_grads[chosen]
    qa = np.asarray(decompositions[name].a_eigvecs, np.float64)
    qg = np.asarray(decompositions[name].g_eigvecs, np.float64)
    moment = ((g @ qg) ** 2).T @ ((a @ qa) ** 2) / len(chosen)
    values = lambda f: np.linalg.eigvalsh(np.asarray(f, np.float64))
    start = np.outer(values(factors[name].g_factor), values(factors[name].a_factor))
    # Eigenvalues in eigh's ascending order, the bases' column order.
    assert_close(decompositions[name].scaling, DECAY * start + (1 - DECAY) * moment, rtol=1e-4)


def test_a_random_subsample_is_unbiased():
  x, t, params, loss_fn, registry = _problem(seed=3)
  layer = registry["hidden"]
  capture = kaisa_jax.value_and_grad(loss_fn)(params, x, t)[2]["hidden"]

  def factor_of(key):
    sampled = subsample_lib.subsample_capture(layer, capture, 3, key, per_example=False)
    return factors_lib.batch_factors(layer, sampled, jnp.float32)

  keys = jax.random.split(jax.random.key(0), 4000)
  draws = jax.vmap(factor_of)(keys)
  a = np.concatenate([np.asarray(x, np.float64), np.ones((BATCH, 1))], axis=1)
  g = np.asarray(capture.out_grads[0], np.float64)
  for draw, full in ((draws.a_factor, a.T @ a / BATCH), (draws.g_factor, g.T @ g / BATCH)):
    draw = np.asarray(draw, np.float64)
    stderr = draw.std(axis=0) / np.sqrt(len(keys))
    assert np.all(np.abs(draw.mean(axis=0) - full) <= 5 * stderr + 1e-6 * np.abs(full).max())
    # A single draw is not the full batch's: the test could tell a biased mean.
    assert np.abs(draw[0] - full).max() > 20 * stderr.max()


class _Block(nn.Module):

  @nn.compact
  def __call__(self, h, _):
    return jnp.tanh(nn.Dense(4)(h)), None


class ScanNet(nn.Module):
  unrolled: bool = False

  @nn.compact
  def __call__(self, x):
    if self.unrolled:
      for i in range(3):
        x, _ = _Block(name=f"inner_{i}")(x, None)
    else:
      x, _ = nn.scan(_Block, variable_axes={"params": 0}, split_rngs={"params": True},
                     length=3)(name="inner")(x, None)
    return nn.Dense(2, name="head")(x)


def test_a_layer_in_a_scan_subsamples_its_batch_axis():
  x, t = normal_batch(BATCH, 4, 2, seed=5)
  params = random_params(ScanNet(), jnp.asarray(x), seed=6)
  unrolled = dict(head=params["head"], **{
      f"inner_{i}": jax.tree.map(lambda leaf: leaf[i], params["inner"]) for i in range(3)})
  results = []
  for model, p in ((ScanNet(), params), (ScanNet(unrolled=True), unrolled)):
    loss_fn = scaled_mse(model, LOSS_SCALE)
    tx = kaisa_jax.kaisa(kaisa_jax.find_layers(loss_fn, p, x, t), kl_clip=None,
                         factor_subsample=5, g_factor_scaling="per_example")
    _, grads, captures = kaisa_jax.value_and_grad(loss_fn)(p, x, t)
    results.append(jax.jit(lambda g, s, c, tx=tx, p=p: tx.update(g, s, p, captures=c)[0])(
        grads, tx.init(p), captures))
  scanned, expected = results
  for i in range(3):
    for leaf in ("kernel", "bias"):
      assert_close(scanned["inner"]["Dense_0"][leaf][i], expected[f"inner_{i}"]["Dense_0"][leaf],
                   rtol=1e-4)


def test_bad_subsample_arguments_are_named():
  x, t, params, loss_fn, registry = _problem(seed=0)
  for size, words in ((0, "at least 1"), (1.5, r"in \(0, 1\]"), ("8", "number of examples"),
                      (True, "number of examples")):
    with pytest.raises(ValueError, match=words):
      kaisa_jax.kaisa(registry, factor_subsample=size)
  with pytest.raises(ValueError, match="factor_subsample is None"):
    kaisa_jax.kaisa(registry, factor_subsample_seed=3)
  tx = kaisa_jax.kaisa(registry, factor_subsample=13)
  _, grads, captures = kaisa_jax.value_and_grad(loss_fn)(params, x, t)
  with pytest.raises(ValueError, match="'hidden' is called on a batch of 12; pass at most 12"):
    tx.update(grads, tx.init(params), params, captures=captures)


@pytest.mark.slow
def test_a_strided_fraction_does_not_depend_on_the_device_count():
  # 16 examples: every other one on one device is every other one of each
  # device's 2 on 8 devices.
  x, y = next(dist.batches())
  layers = kaisa_jax.find_layers(dist.loss_fn, dist.initial_params(), x, y)
  expected = dist.run_single(layers, "eigen", factor_subsample=0.5)
  dist.assert_trajectories_close(
      dist.run_pmap(layers, "eigen", 8, 1 / 4, factor_subsample=0.5), expected)
  # And it is not the full batch's trajectory.
  full = dist.run_single(layers, "eigen")
  assert any(not np.allclose(a, b, rtol=1e-3) for a, b in zip(
      jax.tree.leaves(expected[-1]), jax.tree.leaves(full[-1])))
