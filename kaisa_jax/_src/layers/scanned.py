"""Scanned layers: a layer kind called in every iteration of a scan.

A layer inside ``nn.scan`` (or a loss's ``lax.scan``) is captured once per
iteration: its captures hold one more leading axis, ``(length, *call)``.
How the iterations enter its Fisher block depends on its parameters:

* shared by the iterations (``variable_broadcast='params'``: a recurrent
  cell): one Kronecker block whose rows are every iteration's, exactly as
  for a module called ``length`` times;
* stacked, one slice per iteration (``variable_axes={'params': k}``: a stack
  of identical blocks): one independent Kronecker block per slice, exactly
  as if every slice were a layer of its own.

``Scanned`` wraps the kind's own description of one call (``inner``) and maps
it over the iterations, so every kind works inside a scan unchanged.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from kaisa_jax._src import layers as layers_lib


@dataclasses.dataclass(frozen=True)
class Scanned(layers_lib.Layer):
  """A layer of kind ``inner`` called in each iteration of a scan.

  Attributes:
    inner: the layer as one iteration sees it (its kernel shape is a slice's).
    stacked_axis: None when the iterations share the kernel; else the axis
      of the kernel (and bias) leaf that indexes the iterations.

  ``kernel_shape`` is the leaf's: ``inner.kernel_shape`` with the iterations
  inserted at ``stacked_axis`` when stacked. Captures are ``(length, ...)``.
  """
  inner: Optional[layers_lib.Layer] = None
  stacked_axis: Optional[int] = None

  @classmethod
  def wrap(cls, inner: layers_lib.Layer, kernel_shape, stacked_axis: Optional[int]):
    """``inner`` (built from one iteration's call) scanned, its leaf ``kernel_shape``."""
    if stacked_axis is not None and inner.a_diagonal:
      raise layers_lib.UnsupportedLayer(
          f"a {inner.kind} layer with parameters stacked by a scan: its diagonal "
          "factors are not stored per slice")
    return cls(inner.name, inner.kernel_path, inner.bias_path, tuple(kernel_shape),
               inner=inner, stacked_axis=stacked_axis)

  @property
  def kind(self) -> str:
    if self.stacked:
      return f"{self.inner.kind} (scan, {self.length} stacked)"
    return f"{self.inner.kind} (scan)"

  @property
  def stacked(self) -> bool:
    return self.stacked_axis is not None

  @property
  def length(self) -> int:
    """The stacked slices (1 when the iterations share the kernel)."""
    return self.kernel_shape[self.stacked_axis] if self.stacked else 1

  @property
  def a_diagonal(self) -> bool:
    return self.inner.a_diagonal

  @property
  def a_size(self) -> int:
    return self.inner.a_size

  @property
  def g_size(self) -> int:
    return self.inner.g_size

  @property
  def blocks(self) -> int:
    return self.length * self.inner.blocks

  @property
  def example_axis(self) -> int:
    # (length, batch, ...): the iterations come first.
    return self.inner.example_axis + 1

  def with_inner(self, inner: layers_lib.Layer) -> "Scanned":
    return dataclasses.replace(self, inner=inner)

  def _over_iterations(self, stats, factor_shape, *arrays):
    """``stats`` of each iteration of ``arrays`` (length, ...), combined.

    Shared kernel: summed, with every iteration's rows. Stacked: one block
    per slice, each with one iteration's rows.
    """
    rows = []

    def one(*xs):
      value, count = stats(*xs)
      rows.append(count)
      return value

    per_iteration = jax.vmap(one)(*arrays)
    if self.stacked:
      return per_iteration.reshape(factor_shape), rows[0]
    return jnp.sum(per_iteration, axis=0), rows[0] * arrays[0].shape[0]

  def a_stats(self, inputs, dtype):
    return self._over_iterations(lambda x: self.inner.a_stats(x, dtype),
                                 self.a_factor_shape.shape, inputs)

  def g_stats(self, out_grads, dtype):
    return self._over_iterations(lambda g: self.inner.g_stats(g, dtype),
                                 self.g_factor_shape.shape, out_grads)

  def projected_second_moment(self, inputs, out_grads, a_eigvecs, g_eigvecs, dtype):
    if not self.stacked:
      return self._over_iterations(
          lambda x, g: self.inner.projected_second_moment(x, g, a_eigvecs, g_eigvecs, dtype),
          self.grad_shape, inputs, out_grads)
    # One eigenbasis per slice: iteration t is projected into slice t's.
    per_slice = lambda q, inner_shape: q.reshape((self.length,) + inner_shape)
    a_eigvecs = per_slice(a_eigvecs, self.inner.a_factor_shape.shape)
    g_eigvecs = per_slice(g_eigvecs, self.inner.g_factor_shape.shape)
    return self._over_iterations(
        lambda x, g, qa, qg: self.inner.projected_second_moment(x, g, qa, qg, dtype),
        self.grad_shape, inputs, out_grads, a_eigvecs, g_eigvecs)

  def grad_matrix(self, kernel, bias):
    if not self.stacked:
      return self.inner.grad_matrix(kernel, bias)
    kernels = jnp.moveaxis(kernel, self.stacked_axis, 0)
    if bias is None:
      mats = jax.vmap(lambda k: self.inner.grad_matrix(k, None))(kernels)
    else:
      mats = jax.vmap(self.inner.grad_matrix)(kernels, jnp.moveaxis(bias, self.stacked_axis, 0))
    return mats.reshape(self.grad_shape)

  def from_matrix(self, mat):
    if not self.stacked:
      return self.inner.from_matrix(mat)
    kernels, biases = jax.vmap(self.inner.from_matrix)(
        mat.reshape((self.length,) + self.inner.grad_shape))
    kernel = jnp.moveaxis(kernels, 0, self.stacked_axis)
    return kernel, None if biases is None else jnp.moveaxis(biases, 0, self.stacked_axis)
