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
from kaisa_jax._src import layers as layers_lib


class LayerFactors(NamedTuple):
  """The running Kronecker factors of one layer.

  Attributes:
    a_factor: (a_size, a_size) activation covariance; (blocks, a_size,
      a_size) for a layer with several blocks, (a_size,) when diagonal (see
      ``layer.a_factor_shape``).
    g_factor: (g_size, g_size) output-gradient covariance, or (blocks,
      g_size, g_size).
  """
  a_factor: jax.Array
  g_factor: jax.Array


def symmetrize(m: jax.Array) -> jax.Array:
  """Each (n, n) block made exactly symmetric; a diagonal (n,) as it is."""
  if m.ndim == 1:
    return m
  return (m + jnp.swapaxes(m, -1, -2)) / 2


def identity_factors(layer: layers_lib.Layer, dtype) -> LayerFactors:
  return LayerFactors(layer.a_factor_shape.identity(dtype),
                      layer.g_factor_shape.identity(dtype))


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
  a_sum = g_sum = 0.0
  a_rows = g_rows = 0
  for inputs, out_grads in zip(capture.inputs, capture.out_grads):
    cov, rows = layer.a_stats(inputs, dtype)
    a_sum, a_rows = a_sum + cov, a_rows + rows
    cov, rows = layer.g_stats(out_grads, dtype)
    g_sum, g_rows = g_sum + cov, g_rows + rows
  return LayerFactors(symmetrize(a_sum / a_rows), symmetrize(g_sum / g_rows))


def running_average(old: LayerFactors, new: LayerFactors, decay) -> LayerFactors:
  """``decay * old + (1 - decay) * new``, factor by factor, in old's dtype."""
  return jax.tree.map(
      lambda o, n: (decay * o + (1 - decay) * n).astype(o.dtype), old, new)


def all_finite(tree) -> jax.Array:
  """A scalar bool: every leaf of ``tree`` is finite."""
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return jnp.asarray(True)
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))
