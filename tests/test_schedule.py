"""stagger_decompositions: the groups' decompositions spread over the interval.

Each step's stored decomposition of every group is checked, as an operator,
against float64 NumPy built from the factors of the step that last decomposed
that group under the schedule (every group at step 0, then phase ``s mod T``).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kaisa_jax
from kaisa_jax._src import schedule
from oracles import assert_close, normal_batch, random_params, scaled_mse
import test_distributed as dist

DAMPING, PERIOD = 0.05, 3


class Net(nn.Module):
  """Five groups: widths that differ layer to layer."""

  @nn.compact
  def __call__(self, x):
    for i, width in enumerate((7, 5, 6, 4)):
      x = jnp.tanh(nn.Dense(width, name=f"d{i}")(x))
    return nn.Dense(3, name="head")(x)


def test_phases_hold_every_group_once_balanced_by_cost():
  x, t = normal_batch(8, 5, 3)
  params = random_params(Net(), jnp.asarray(x))
  registry = kaisa_jax.find_layers(scaled_mse(Net(), 4.0), params, x, t)
  groups = kaisa_jax.placement(registry, 1).groups
  assert len(groups) == 5
  for period in (1, 2, 3, 5, 9):
    phases = schedule.decomposition_phases(groups, period)
    assert len(phases) == min(period, 5)
    assert sorted(g.name for p in phases for g in p) == sorted(g.name for g in groups)
    costs = sorted(sum(schedule.decomposition_cost(g) for g in p) for p in phases)
    # Greedy largest-first: no phase exceeds another by more than its largest group.
    largest = max(schedule.decomposition_cost(g) for g in groups)
    assert costs[-1] - costs[0] <= largest


def _operator(d, v):
  """The preconditioner of a stored EigenOuter applied to v (g, a), float64."""
  qa, qg = (np.asarray(m, np.float64) for m in (d.a_eigvecs, d.g_eigvecs))
  return qg @ ((qg.T @ v @ qa) * np.asarray(d.inv_eigval_outer, np.float64)) @ qa.T


def _np_operator(a, g, v):
  da, qa = np.linalg.eigh(np.asarray(a, np.float64))
  dg, qg = np.linalg.eigh(np.asarray(g, np.float64))
  return qg @ ((qg.T @ v @ qa) / (np.outer(np.maximum(dg, 0), np.maximum(da, 0)) + DAMPING)) @ qa.T


def test_each_group_is_decomposed_at_its_phase_from_that_steps_factors():
  model = Net()
  x, t = normal_batch(16, 5, 3, seed=1)
  params = random_params(model, jnp.asarray(x), seed=2)
  loss_fn = scaled_mse(model, 4.0)
  registry = kaisa_jax.find_layers(loss_fn, params, x, t)
  tx = kaisa_jax.kaisa(registry, damping=DAMPING, factor_decay=0.6, kl_clip=None,
                       inv_update_steps=PERIOD, stagger_decompositions=True)
  plan = kaisa_jax.placement(registry, 1)
  phase_of = {g.name: p for p, phase in enumerate(schedule.decomposition_phases(plan.groups,
                                                                                PERIOD))
              for g in phase}

  @jax.jit
  def step(params, state, x):
    _, grads, captures = kaisa_jax.value_and_grad(loss_fn)(params, x, t)
    return tx.update(grads, state, params, captures=captures)[1]

  rng = np.random.default_rng(3)
  state, factors_at = tx.init(params), []
  for s in range(2 * PERIOD + 1):
    # A new batch every step: the factors move, so a stale decomposition shows.
    state = step(params, state, jnp.asarray(rng.normal(size=x.shape), jnp.float32))
    factors_at.append(plan.layer_factors(state))
    decompositions = plan.layer_decompositions(state)
    for layer in registry:
      group = plan.group_of(layer.name).name
      due = max(u for u in range(s + 1) if u == 0 or u % PERIOD == phase_of[group])
      f = factors_at[due][layer.name]
      v = rng.normal(size=(layer.g_size, layer.a_size))
      assert_close(_operator(decompositions[layer.name], v), _np_operator(f.a_factor,
                                                                          f.g_factor, v),
                   rtol=2e-4)
  # Not every group at one step: at step PERIOD + 1 some groups still hold step 0's.
  assert len(set(phase_of.values())) == PERIOD


def test_a_bad_stagger_argument_is_named():
  x, t = normal_batch(8, 5, 3)
  params = random_params(Net(), jnp.asarray(x))
  registry = kaisa_jax.find_layers(scaled_mse(Net(), 4.0), params, x, t)
  with pytest.raises(ValueError, match="stagger_decompositions must be True or False"):
    kaisa_jax.kaisa(registry, stagger_decompositions="yes")


@pytest.mark.slow
@pytest.mark.parametrize("frac, mapped", [(1 / 4, "shard_map"), (1 / 8, "pmap")])
def test_staggered_on_8_devices_matches_one_device(frac, mapped):
  x, y = next(dist.batches())
  layers = kaisa_jax.find_layers(dist.loss_fn, dist.initial_params(), x, y)
  kwargs = dict(stagger_decompositions=True, inv_update_steps=3)
  expected = dist.run_single(layers, "eigen", **kwargs)
  if mapped == "pmap":
    actual = dist.run_pmap(layers, "eigen", 8, frac, **kwargs)
  else:
    actual = dist.run_shard_map(layers, "eigen", 8, frac, check_vma=False, **kwargs)
  dist.assert_trajectories_close(actual, expected)
