"""Factors: the Kronecker factors A and G of each layer, from its captures.

With the reference conventions: ``A = aᵀa / rows`` and ``G = gᵀg / rows``,
rows summed over every call of the layer, symmetrised, and folded into a
running average that starts from the identity.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from kaisa_jax._src import capture as capture_lib
from kaisa_jax._src import groups as groups_lib
from kaisa_jax._src import layers as layers_lib


class LayerFactors(NamedTuple):
  """Kronecker factors A and G: of one layer, or stacked for a layer group.

  Attributes:
    a_factor: activation covariance. For one layer: (a_size, a_size);
      (blocks, a_size, a_size) with several blocks, (a_size,) when diagonal
      (``layer.a_factor_shape``). In ``KaisaState``, per group: (a_blocks,
      a_size, a_size), or (a_blocks, a_size) when diagonal: one block per
      block of the group's A owners (``LayerGroup.a_blocks``).
    g_factor: output-gradient covariance, (g_size, g_size) or (blocks,
      g_size, g_size) for one layer; (blocks, g_size, g_size) per group.
  """
  a_factor: jax.Array
  g_factor: jax.Array


def symmetrize(m: jax.Array) -> jax.Array:
  """Each (n, n) block made exactly symmetric; a diagonal (n,) as it is."""
  if m.ndim == 1:
    return m
  return (m + jnp.swapaxes(m, -1, -2)) / 2


def identity_factors(group: groups_lib.LayerGroup, dtype) -> LayerFactors:
  """A group's factors at the start: every block the identity (ones when diagonal)."""
  eye = lambda n, shape: jnp.broadcast_to(jnp.eye(n, dtype=dtype), shape)
  a = (jnp.ones(group.a_stack_shape(), dtype) if group.a_diagonal
       else eye(group.a_size, group.a_stack_shape()))
  return LayerFactors(a, eye(group.g_size, group.g_stack_shape()))


def batch_factors(layer: layers_lib.Layer, capture: capture_lib.LayerCapture,
                  dtype) -> LayerFactors:
  """A and G of one batch, every call of the layer contributing its rows.

  Args:
    layer: the layer's registry entry.
    capture: its ``LayerCapture`` (inputs and output gradients per call).
    dtype: the dtype the covariances are computed in (``factor_dtype``).

  Returns:
    ``LayerFactors`` of the shapes ``layer.a_factor_shape`` and
    ``layer.g_factor_shape`` give.
  """
  return LayerFactors(_factor(layer.a_stats, capture.inputs, dtype),
                      _factor(layer.g_stats, capture.out_grads, dtype))


def _factor(stats, calls, dtype) -> jax.Array:
  """``stats`` (a kind's ``a_stats`` or ``g_stats``) pooled over the calls' rows."""
  total, count = 0.0, 0
  for x in calls:
    cov, rows = stats(x, dtype)
    total, count = total + cov, count + rows
  return symmetrize(total / count)


def group_batch_factors(group: groups_lib.LayerGroup, captures: dict, dtype,
                        per_example: bool) -> LayerFactors:
  """A and G of one batch for every member of ``group``, as its stacks.

  Members with the same signature and capture shapes are computed in one
  ``vmap`` over their stacked captures (``groups.stat_units``). A is
  computed for the group's A owners only (``LayerGroup.a_layers``): a member
  fed the same input as another uses that one's A.

  Args:
    group: the group.
    captures: layer name -> ``LayerCapture``.
    dtype: ``factor_dtype``.
    per_example: multiply G by B², B the batch size of the first call's
      input (``layer.examples``; ``g_factor_scaling='per_example'``).

  Returns:
    ``LayerFactors`` of ``group.a_stack_shape()`` and ``group.g_stack_shape()``.
  """
  shapes_of = lambda name: capture_shapes(captures[name])

  def g_factor(layer, capture):
    g = _factor(layer.g_stats, capture.out_grads, dtype)
    return g * layer.examples(capture.inputs[0]) ** 2 if per_example else g

  def over(members, fn, block_shapes):
    args_of = lambda unit: groups_lib.stacked_members(members, unit,
                                                      lambda l: (captures[l.name],))
    return groups_lib.over_units(members, groups_lib.stat_units(members, shapes_of), fn,
                                 args_of, block_shapes)

  a_of = lambda layer, capture: _factor(layer.a_stats, capture.inputs, dtype)
  if not group.shares_a:
    return LayerFactors(*over(group, lambda l, c: (a_of(l, c), g_factor(l, c)),
                              (group.a_block_shape, group.g_block_shape)))
  owners = group.subset([l.name for l in group.a_layers])
  (a,) = over(owners, lambda l, c: (a_of(l, c),), (group.a_block_shape,))
  (g,) = over(group, lambda l, c: (g_factor(l, c),), (group.g_block_shape,))
  return LayerFactors(a, g)


def capture_shapes(capture: capture_lib.LayerCapture) -> tuple:
  """A hashable description of a capture's calls: their shapes and dtypes."""
  return tuple((tuple(x.shape), str(x.dtype)) for x in jax.tree.leaves(capture))


def running_average(old: LayerFactors, new: LayerFactors, decay) -> LayerFactors:
  """``decay * old + (1 - decay) * new``, factor by factor, in old's dtype."""
  return jax.tree.map(
      lambda o, n: (decay * o + (1 - decay) * n).astype(o.dtype), old, new)


def all_finite(tree) -> jax.Array:
  """A scalar bool: every entry of every leaf of ``tree`` is finite.

  One reduction over all the leaves end to end (XLA fuses the
  concatenation into it): a check per leaf would cost a kernel per leaf.
  """
  leaves = [jnp.ravel(x) for x in jax.tree.leaves(tree)]
  if not leaves:
    return jnp.asarray(True)
  dtype = jnp.result_type(*leaves)
  return jnp.all(jnp.isfinite(jnp.concatenate([x.astype(dtype) for x in leaves])))
