"""Collectives: everything that crosses devices, along one named mapped axis.

Used inside ``jax.pmap`` or ``jax.shard_map``. Several arrays that cross
together are packed into one flat buffer, so that each kind of step runs one
collective of each kind.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


def mean_over_devices(tree, axis_name, num_devices: int):
  """The mean over the devices of per-device values (Gradient-Reduce).

  Under shard_map's checked mode (``check_vma=True``) autodiff has already
  summed the gradient of replicated parameters over the devices (their
  values are typed as replicated): those are divided by N. Per-device values
  (pmap, ``check_vma=False``, or typed as varying) are averaged.
  """
  checked = axis_name in varying_axes(lax.axis_index(axis_name))

  def mean(x):
    if checked and axis_name not in varying_axes(x):
      return x / num_devices
    return lax.pmean(x, axis_name)

  return jax.tree.map(mean, tree)


def as_varying(tree, axis_name):
  """``tree`` typed as differing between devices (a no-op outside checked mode).

  The branches of a switch on the device index must agree on this type even
  where one of them (a device with nothing to do) returns constants.
  """
  if axis_name not in varying_axes(lax.axis_index(axis_name)):
    return tree
  return jax.tree.map(
      lambda x: x if axis_name in varying_axes(x) else lax.pcast(x, (axis_name,), to="varying"),
      tree)


def varying_axes(x) -> frozenset:
  """The shard_map axes along which ``x`` is typed as differing between devices.

  Empty outside shard_map's checked mode. (jax >= 0.10 keeps them in
  ``manual_axis_type.varying``, older versions in ``vma``.)
  """
  aval = jax.typeof(x)
  manual = getattr(aval, "manual_axis_type", None)
  if manual is not None:
    return frozenset(manual.varying)
  return frozenset(getattr(aval, "vma", ()))


def pack(arrays: Sequence[jax.Array], dtype) -> jax.Array:
  """Flattens and concatenates ``arrays`` into one vector of ``dtype``."""
  if not arrays:
    return jnp.zeros((0,), dtype)
  return jnp.concatenate([jnp.ravel(a).astype(dtype) for a in arrays])


def unpack(buffer: jax.Array, shapes: Sequence[tuple[int, ...]]) -> list[jax.Array]:
  """The inverse of ``pack`` for arrays of ``shapes`` at the start of ``buffer``."""
  out, offset = [], 0
  for shape in shapes:
    size = int(np.prod(shape))
    out.append(buffer[offset:offset + size].reshape(shape))
    offset += size
  return out


def upper_triangle(m: jax.Array) -> jax.Array:
  """(..., n, n) -> (..., n (n + 1) / 2): symmetric blocks in half the words."""
  rows, cols = np.triu_indices(m.shape[-1])
  return m[..., rows, cols]


def from_upper_triangle(v: jax.Array, n: int) -> jax.Array:
  """The symmetric (..., n, n) blocks whose upper triangles are ``v`` (..., n (n + 1) / 2)."""
  rows, cols = np.triu_indices(n)
  upper = jnp.zeros(v.shape[:-1] + (n, n), v.dtype).at[..., rows, cols].set(v)
  strictly_lower = jnp.swapaxes(upper, -1, -2) * (1 - jnp.eye(n, dtype=v.dtype))
  return upper + strictly_lower


def pad_to(buffer: jax.Array, length: int) -> jax.Array:
  return jnp.pad(buffer, (0, length - buffer.shape[0]))


def gather_within(buffer: jax.Array, axis_name, groups: Sequence[Sequence[int]]) -> jax.Array:
  """Every device gets the ``buffer`` of each member of its group (an all-gather).

  ``groups`` partition the devices into equal groups, each listed in
  increasing device order. Returns (group size, length): row r holds the
  buffer of the r-th member of the caller's group.

  Over all devices under shard_map's checked mode, the result must be typed
  as replicated (shard_map may then return it with ``P()``): JAX >= 0.10
  says so with ``to="invarying"``; older versions get an all-reduce of an
  (N, length) buffer holding each device's row, the same result at several
  times the cost. Within smaller groups the result is per-device.
  """
  size = len(groups[0])
  if size == 1:
    return buffer[None]
  if len(groups) > 1:
    return lax.all_gather(buffer, axis_name, axis_index_groups=[list(g) for g in groups])
  if axis_name not in varying_axes(lax.axis_index(axis_name)):
    return lax.all_gather(buffer, axis_name)
  try:
    return lax.all_gather(buffer, axis_name, to="invarying")
  except ValueError:  # jax < 0.10: no "invarying" all-gather
    me = lax.axis_index(axis_name)
    rows = jnp.zeros((size,) + buffer.shape, buffer.dtype)
    return lax.psum(lax.dynamic_update_index_in_dim(rows, buffer, me, 0), axis_name)
