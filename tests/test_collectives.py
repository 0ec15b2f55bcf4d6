"""What crosses devices: packing, triangles, group gathers and the gradient mean."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from kaisa_jax._src import collectives

AXIS = "d"


def test_pack_unpack_round_trip():
  rng = np.random.default_rng(0)
  arrays = [rng.normal(size=s).astype(np.float32) for s in [(3, 3), (4,), (2, 5), ()]]
  flat = collectives.pack([jnp.asarray(a) for a in arrays], jnp.float32)
  assert flat.shape == (9 + 4 + 10 + 1,)
  padded = collectives.pad_to(flat, 30)
  assert padded.shape == (30,) and np.all(np.asarray(padded[24:]) == 0)
  for a, b in zip(collectives.unpack(padded, [a.shape for a in arrays]), arrays):
    np.testing.assert_array_equal(a, b)
  assert collectives.pack([], jnp.float32).shape == (0,)


def test_upper_triangle_round_trip():
  rng = np.random.default_rng(1)
  m = rng.normal(size=(5, 5))
  m = (m + m.T).astype(np.float32)
  v = collectives.upper_triangle(jnp.asarray(m))
  assert v.shape == (15,)
  np.testing.assert_array_equal(collectives.from_upper_triangle(v, 5), m)


GROUPINGS = {
    "all": [list(range(8))],
    "columns": [[0, 4], [1, 5], [2, 6], [3, 7]],
    "rows": [[0, 1, 2, 3], [4, 5, 6, 7]],
    "single": [[d] for d in range(8)],
}


@pytest.mark.parametrize("grouping", sorted(GROUPINGS))
@pytest.mark.parametrize("mapping", ["pmap", "shard_map"])
def test_gather_within_gives_each_member_its_group_in_order(grouping, mapping):
  groups = GROUPINGS[grouping]
  buffers = np.arange(8 * 3, dtype=np.float32).reshape(8, 3) ** 2
  gather = lambda b: collectives.gather_within(b, AXIS, groups)
  if mapping == "pmap":
    out = np.asarray(jax.pmap(gather, axis_name=AXIS)(buffers))
  else:
    mesh = Mesh(np.array(jax.devices()), (AXIS,))
    out = np.asarray(jax.jit(jax.shard_map(
        lambda b: gather(b[0])[None], mesh=mesh, in_specs=P(AXIS), out_specs=P(AXIS),
        check_vma=False))(buffers))
  for device in range(8):
    (group,) = [g for g in groups if device in g]
    np.testing.assert_array_equal(out[device], buffers[group])


def test_gather_over_all_devices_is_replicated_for_shard_map():
  # Under shard_map's checked mode the result can be returned with P().
  mesh = Mesh(np.array(jax.devices()), (AXIS,))
  buffers = np.arange(16, dtype=np.float32).reshape(8, 2)
  out = jax.jit(jax.shard_map(
      lambda b: collectives.gather_within(b[0], AXIS, GROUPINGS["all"]), mesh=mesh,
      in_specs=P(AXIS), out_specs=P()))(buffers)
  np.testing.assert_array_equal(out, buffers)


@pytest.mark.parametrize("check_vma", [True, False])
def test_mean_over_devices_of_gradients(check_vma):
  # The gradient of a replicated parameter: under checked mode autodiff has
  # summed it already; either way the result is the mean of the local ones.
  mesh = Mesh(np.array(jax.devices()), (AXIS,))
  rng = np.random.default_rng(2)
  w = rng.normal(size=3).astype(np.float32)
  x = rng.normal(size=(8, 4, 3)).astype(np.float32)
  local = lambda w, x: jnp.mean((x @ w) ** 2)

  def mean_grad(w, x):
    return collectives.mean_over_devices(jax.grad(local)(w, x[0]), AXIS, 8)

  out = jax.jit(jax.shard_map(mean_grad, mesh=mesh, in_specs=(P(), P(AXIS)), out_specs=P(),
                              check_vma=check_vma))(w, x)
  x64, w64 = x.astype(np.float64), w.astype(np.float64)
  expected = np.mean([2 * xs.T @ (xs @ w64) / 4 for xs in x64], axis=0)
  np.testing.assert_allclose(out, expected, rtol=1e-5)
