"""The static KAISA plan: grid layout, greedy assignment, memory and byte counts."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kaisa_jax


class Stack(nn.Module):
  """Dense layers of the given widths (bias everywhere): a = in + 1, g = out."""
  widths: tuple

  @nn.compact
  def __call__(self, x):
    for w in self.widths:
      x = nn.Dense(w)(x)
    return x


def registry(widths, n_in):
  model = Stack(tuple(widths))
  x = jnp.zeros((2, n_in))
  params = model.init(jax.random.key(0), x)["params"]
  return kaisa_jax.find_layers(lambda p, x: jnp.sum(model.apply({"params": p}, x)), params, x)


def test_grid_is_the_reference_layout():
  # 8 devices, 2 grad workers: a 2 x 4 grid numbered row by row; columns
  # are the grad-worker groups, rows the receiver groups.
  plan = kaisa_jax.placement(registry([4], 3), 8, 0.25)
  assert plan.grad_workers == 2 and plan.num_columns == 4
  assert plan.columns == ((0, 4), (1, 5), (2, 6), (3, 7))
  assert plan.rows == ((0, 1, 2, 3), (4, 5, 6, 7))


@pytest.mark.parametrize("num_devices, frac, grad_workers", [
    (8, 1.0, 8), (8, 0.5, 4), (8, 0.25, 2), (8, 0.125, 1), (8, 0.01, 1), (6, 1 / 3, 2),
    (1, 1.0, 1), (1, 0.5, 1)])
def test_grad_worker_count(num_devices, frac, grad_workers):
  plan = kaisa_jax.placement(registry([4], 3), num_devices, frac)
  assert plan.grad_workers == grad_workers
  for l in plan.layers:
    column = plan.columns[l.column]
    assert len(column) == grad_workers
    assert l.a_worker in column and l.g_worker in column


def test_fraction_that_does_not_divide_lists_the_valid_ones():
  with pytest.raises(ValueError, match=r"3 grad workers.*8 devices.*1/8, 2/8, 4/8, 8/8"):
    kaisa_jax.placement(registry([4], 3), 8, 3 / 8)
  with pytest.raises(ValueError, match="grad_worker_frac"):
    kaisa_jax.placement(registry([4], 3), 8, 0.0)
  with pytest.raises(ValueError, match="grad_worker_frac"):
    kaisa_jax.kaisa(registry([4], 3), grad_worker_frac=1.5)
  with pytest.raises(ValueError, match="cost_model"):
    kaisa_jax.kaisa(registry([4], 3), cost_model="flops")


def test_greedy_assignment_largest_first_to_least_loaded():
  # Costs (n³ per factor): layer i has a = w_in + 1, g = w_out.
  widths, n_in = [9, 7, 5, 3], 8
  layers = registry(widths, n_in)
  costs = [l.a_size ** 3 + l.g_size ** 3 for l in layers.layers]
  assert costs == sorted(costs, reverse=True)  # registry order is already largest first
  plan = kaisa_jax.placement(layers, 2, 0.5)  # MEM-OPT on 2 devices
  # Hand-run greedy: 0 -> dev 0; 1 -> dev 1; 2 -> the less loaded (dev 1,
  # since cost1 < cost0); 3 -> whichever is less loaded then.
  load = [costs[0], costs[1] + costs[2]]
  last = 0 if load[0] <= load[1] else 1
  assert [l.a_worker for l in plan.layers] == [0, 1, 1, last]
  assert all(l.a_worker == l.g_worker for l in plan.layers)


def test_memory_cost_model_balances_squares():
  # One big layer and three small: by n³ the big one outweighs the rest, by
  # n² it does not, so the third layer goes to a different device.
  layers = registry([12, 7, 7, 7], 11)
  sizes = [(l.a_size, l.g_size) for l in layers.layers]
  by_compute = kaisa_jax.placement(layers, 2, 0.5, cost_model="compute")
  by_memory = kaisa_jax.placement(layers, 2, 0.5, cost_model="memory")

  def greedy(power):
    load = [0.0, 0.0]
    order = sorted(range(len(sizes)), key=lambda i: -(sizes[i][0] ** power + sizes[i][1] ** power))
    assigned = {}
    for i in order:
      d = min((0, 1), key=lambda d: (load[d], d))
      load[d] += sizes[i][0] ** power + sizes[i][1] ** power
      assigned[i] = d
    return [assigned[i] for i in range(len(sizes))]

  assert [l.a_worker for l in by_compute.layers] == greedy(3)
  assert [l.a_worker for l in by_memory.layers] == greedy(2)
  assert greedy(3) != greedy(2)


def test_split_factors_spread_within_the_group():
  layers = registry([9, 7], 8)
  plan = kaisa_jax.placement(layers, 4, 0.5, colocate_factors=False)
  for l in plan.layers:
    assert l.a_worker != l.g_worker
    assert {l.a_worker, l.g_worker} == set(plan.columns[l.column])


@pytest.mark.parametrize("method, outer, words", [
    ("eigen", True, lambda a, g: a * a + g * g + g * a),
    ("eigen", False, lambda a, g: a * a + g * g + a + g),
    ("inverse", True, lambda a, g: a * a + g * g)])
def test_eigen_bytes_fall_with_the_fraction(method, outer, words):
  # Eight equal layers: each device holds exactly f of them.
  layers = registry([15] * 8, 15)
  full = None
  for frac in (1.0, 0.5, 0.25, 0.125):
    plan = kaisa_jax.placement(layers, 8, frac, compute_method=method,
                               eigenvalue_outer_product=outer)
    eigen = {d["eigen_bytes"] for d in plan.device_bytes()}
    assert len(eigen) == 1
    eigen = eigen.pop()
    assert eigen == round(8 * frac) * words(16, 15) * 4
    assert plan.stored_words(16, 15) == words(16, 15)
    assert plan.stored_words(16, 15, blocks=8) == 8 * words(16, 15)
    full = full or eigen
    assert eigen == frac * full
    factor_bytes = {d["factor_bytes"] for d in plan.device_bytes()}
    assert factor_bytes == {8 * (16 * 16 + 15 * 15) * 4}


def test_device_keeps_its_column_packed_to_the_longest_column():
  layers = registry([9, 5, 3], 8)  # (a, g): (9, 9), (10, 5), (6, 3)
  words = lambda a, g: a * a + g * g + g * a
  for frac in (0.5, 0.25):
    plan = kaisa_jax.placement(layers, 4, frac)
    per_column = [sum(words(l.a_size, l.g_size) for l in plan.layers_of_column(j))
                  for j in range(plan.num_columns)]
    assert sorted(l.name for j in range(plan.num_columns)
                  for l in plan.layers_of_column(j)) == sorted(layers.names)
    assert plan.local_words() == max(per_column)
    assert {d["eigen_bytes"] for d in plan.device_bytes()} == {4 * max(per_column)}
  comm = kaisa_jax.placement(layers, 4, 1.0)
  total = sum(words(l.a_size, l.g_size) for l in layers.layers)
  assert {d["eigen_bytes"] for d in comm.device_bytes()} == {4 * total}


def test_collectives_per_strategy():
  layers = registry([9, 5], 8)  # (a, g): (9, 9), (10, 5)
  tri = lambda n: n * (n + 1) // 2
  factor_bytes = (tri(9) + tri(9) + tri(10) + tri(5)) * 4

  def kinds(plan):
    return {(k["step"], k["op"], k["what"].split()[0]): k for k in plan.collectives()}

  comm = kinds(kaisa_jax.placement(layers, 4, 1.0))
  assert comm[("factor step", "all-reduce", "batch")]["bytes"] == factor_bytes
  gather = comm[("decomposition step", "all-gather", "decompositions")]
  assert gather["group_size"] == 4
  assert not any(k[2] == "preconditioned" for k in comm)

  mem = kinds(kaisa_jax.placement(layers, 4, 0.25))
  assert not any(k[2] == "decompositions" for k in mem)
  grads = mem[("every step", "all-gather", "preconditioned")]
  assert grads["bytes"] == 4 * max(9 * 9, 10 * 5) * 4  # (N, widest column) float32

  hybrid = kinds(kaisa_jax.placement(layers, 4, 0.5, symmetric_factors=False))
  assert hybrid[("factor step", "all-reduce", "batch")]["bytes"] == (81 + 81 + 100 + 25) * 4
  assert hybrid[("decomposition step", "all-gather", "decompositions")]["group_size"] == 2
  assert hybrid[("every step", "all-gather", "preconditioned")]["group_size"] == 2

  assert kaisa_jax.placement(layers, 1, 1.0).collectives() == []


def test_table_shows_layers_devices_and_collectives():
  layers = registry([9, 5], 8)
  plan = kaisa_jax.placement(layers, 4, 0.5)
  text = str(plan)
  assert "HYBRID-OPT" in text
  for name in layers.names:
    assert name in text
  # Each layer's row names its group (Dense_0: a9_g9, Dense_1: a10_g5).
  lines = text.splitlines()
  assert "group" in next(line for line in lines if line.startswith("layer ")).split()
  for name, group in (("Dense_0", "a9_g9"), ("Dense_1", "a10_g5")):
    assert plan.group_of(name).name == group
    assert group in next(line for line in lines if line.split()[:1] == [name]).split()
  assert "eigen bytes" in text and "all-gather" in text
  assert "COMM-OPT" in str(kaisa_jax.placement(layers, 4, 1.0))
  assert "MEM-OPT" in str(kaisa_jax.placement(layers, 4, 0.25))
  strategies = [kaisa_jax.placement(layers, 4, f).strategy for f in (0.25, 0.5, 1.0)]
  assert strategies == ["MEM-OPT", "HYBRID-OPT", "COMM-OPT"]
  assert kaisa_jax.placement(layers, 1, 1.0).strategy == "COMM-OPT"


def test_skip_layers_leave_the_plan():
  layers = registry([9, 5], 8)
  plan = kaisa_jax.placement(layers, 2, 0.5, skip_layers=("Dense_0",))
  assert [l.name for l in plan.layers] == ["Dense_1"]


def test_plan_is_deterministic_and_hashable():
  layers = registry([9, 5, 5], 8)
  a = kaisa_jax.placement(layers, 4, 0.5)
  b = kaisa_jax.placement(layers, 4, 0.5)
  assert a == b and hash(a) == hash(b)
  np.testing.assert_equal(len(a.layers), 3)


class Mixed(nn.Module):
  """An Embed (diagonal A), three Dense layers (two of the same shape, one
  narrower) and two LayerNorms (4 blocks each), on (batch, tokens) ids."""

  @nn.compact
  def __call__(self, ids):
    x = nn.Embed(5, 4)(ids)  # a = 5 (diagonal), g = 4: the Dense shapes, diagonal A
    x = nn.Dense(4)(x)  # a = 5, g = 4
    x = nn.LayerNorm()(x)  # 4 blocks of a = 2, g = 1
    x = nn.Dense(4)(x)  # a = 5, g = 4: Dense_0's shapes
    x = nn.LayerNorm()(x)
    return nn.Dense(3)(x)  # a = 5, g = 3: another G


def test_groups_gather_layers_of_equal_block_shapes_and_layer_factors_round_trip():
  model = Mixed()
  ids = jnp.asarray(np.arange(6).reshape(2, 3) % 5, jnp.int32)
  params = model.init(jax.random.key(0), ids)["params"]
  layers = kaisa_jax.find_layers(lambda p, i: jnp.sum(model.apply({"params": p}, i)),
                                 params, ids)
  assert layers.names == ("Embed_0", "Dense_0", "LayerNorm_0", "Dense_1", "LayerNorm_1",
                          "Dense_2")
  plan = kaisa_jax.placement(layers, 1)

  # Layers share a group exactly when (A block size, A diagonal, G block size) agree;
  # groups in order of their first member, members in registry order.
  key = lambda l: (l.a_size, l.a_diagonal, l.g_size)
  assert [(g.name, g.names) for g in plan.groups] == [
      ("a5diag_g4", ("Embed_0",)), ("a5_g4", ("Dense_0", "Dense_1")),
      ("a2_g1", ("LayerNorm_0", "LayerNorm_1")), ("a5_g3", ("Dense_2",))]
  for group in plan.groups:
    assert {key(layers[n]) for n in group.names} == {
        (group.a_size, group.a_diagonal, group.g_size)}
  for a in layers:
    for b in layers:
      assert (plan.group_of(a.name) == plan.group_of(b.name)) == (key(a) == key(b))
  # Blocks: the members' blocks end to end.
  norms = plan.group_of("LayerNorm_0")
  assert norms.blocks == 8
  assert norms.block_range("LayerNorm_0") == range(0, 4)
  assert norms.block_range("LayerNorm_1") == range(4, 8)
  dense = plan.group_of("Dense_0")
  assert (dense.blocks, dense.block_range("Dense_0"), dense.block_range("Dense_1")) == (
      2, range(0, 1), range(1, 2))

  # The initial state keeps one stack per group, every block the identity
  # (ones for a diagonal A); per layer, the identity in the layer's own shape.
  tx = kaisa_jax.kaisa(layers)
  state = tx.init(params)
  assert set(state.factors) == {g.name for g in plan.groups}
  assert set(state.decompositions) == {g.name for g in plan.groups}
  for group in plan.groups:
    assert state.factors[group.name].a_factor.shape == group.a_stack_shape()
    assert state.factors[group.name].g_factor.shape == group.g_stack_shape()
  identity = lambda shape: (np.ones(shape.shape) if shape.diagonal else
                            np.broadcast_to(np.eye(shape.size), shape.shape))
  factors = plan.layer_factors(state)
  assert set(factors) == set(layers.names)
  for layer in layers:
    f = factors[layer.name]
    assert f.a_factor.shape == layer.a_factor_shape.shape
    assert f.g_factor.shape == layer.g_factor_shape.shape
    np.testing.assert_array_equal(np.asarray(f.a_factor), identity(layer.a_factor_shape))
    np.testing.assert_array_equal(np.asarray(f.g_factor), identity(layer.g_factor_shape))
  assert factors["Embed_0"].a_factor.shape == (5,)
  assert factors["LayerNorm_1"].a_factor.shape == (4, 2, 2)
  assert factors["Dense_2"].g_factor.shape == (3, 3)

  # Distinct per-layer factors written into the stacks read back per layer.
  rng = np.random.default_rng(0)
  mine = {l.name: kaisa_jax.LayerFactors(
      rng.normal(size=l.a_factor_shape.shape).astype(np.float32),
      rng.normal(size=l.g_factor_shape.shape).astype(np.float32)) for l in layers}
  stacked = {g.name: kaisa_jax.LayerFactors(*(
      jnp.concatenate([np.reshape(getattr(mine[n], field), (layers[n].blocks,) + block)
                       for n in g.names])
      for field, block in (("a_factor", g.a_block_shape), ("g_factor", g.g_block_shape))))
      for g in plan.groups}
  back = plan.layer_factors(state._replace(factors=stacked))
  assert set(back) == set(mine)
  for name, f in mine.items():
    np.testing.assert_array_equal(np.asarray(back[name].a_factor), f.a_factor)
    np.testing.assert_array_equal(np.asarray(back[name].g_factor), f.g_factor)

  # The decompositions per layer: the old per-layer shapes (EigenOuter here).
  decompositions = plan.layer_decompositions(state)
  assert set(decompositions) == set(layers.names)
  for layer in layers:
    d = decompositions[layer.name]
    assert isinstance(d, kaisa_jax.EigenOuter)
    lead = () if layer.blocks == 1 else (layer.blocks,)
    if layer.a_diagonal:
      assert d.a_eigvecs is None
    else:
      assert d.a_eigvecs.shape == lead + (layer.a_size, layer.a_size)
    assert d.g_eigvecs.shape == lead + (layer.g_size, layer.g_size)
    assert d.inv_eigval_outer.shape == lead + (layer.g_size, layer.a_size)
