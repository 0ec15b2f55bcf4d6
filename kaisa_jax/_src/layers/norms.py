"""Normalisation kinds: the per-feature scale and bias of LayerNorm, RMSNorm, GroupNorm, BatchNorm.

``ScaleAndShift`` holds what they share (one small Kronecker block per
feature, on the recomputed normalised input ``x̂``); each subclass says how
its module normalises.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
from jax import lax

from kaisa_jax._src.layers.base import (Layer, UnsupportedLayer, _append_ones,
                                        _with_ones_column)

def _axes(value, ndim: int) -> tuple[int, ...]:
  """Axis arguments as sorted non-negative ints."""
  axes = (value,) if isinstance(value, int) else tuple(value)
  return tuple(sorted(a % ndim for a in axes))


@dataclasses.dataclass(frozen=True)
class ScaleAndShift(Layer):
  """A normalisation layer's per-feature ``y = x̂ · scale + bias`` (features last).

  Feature i has its own 2 x 2 Fisher block (1 x 1 without a bias),
  Kronecker-factored like a one-input Dense layer per feature:
  ``A_i = mean [x̂_i, 1]ᵀ[x̂_i, 1]`` over the rows (every position of every
  example, as a convolution's), ``G_i = mean g_i²``, with g the gradient
  with respect to y. So ``blocks`` = features, ``a_size`` = 1 + bias,
  ``g_size`` = 1, and the gradient matrix of feature i is
  ``[∂scale_i, ∂bias_i]``. ``x̂`` is recomputed from the layer input by
  ``normalized``, in at least float32 as Flax does.
  """
  epsilon: float = 1e-6
  reduction_axes: tuple[int, ...] = (-1,)  # negative
  use_fast_variance: bool = True

  kernel_param = "scale"

  @property
  def a_size(self) -> int:
    return 1 + int(self.has_bias)

  @property
  def g_size(self) -> int:
    return 1

  @property
  def blocks(self) -> int:
    return self.kernel_shape[0]

  @classmethod
  def _check_call(cls, module, kernel_shape, inputs, call_kwargs):
    if getattr(module, "axis_name", None) is not None:
      raise UnsupportedLayer(
          f"{type(module).__name__} with statistics over the device axis {module.axis_name!r}")
    if call_kwargs.get("mask") is not None:
      raise UnsupportedLayer(f"{type(module).__name__} called with a mask")
    if tuple(kernel_shape) != (inputs.shape[-1],):
      raise UnsupportedLayer(
          f"{type(module).__name__} with scale shape {tuple(kernel_shape)}: only one "
          "feature axis, the last, is supported")

  def _moments(self, x: jax.Array, axes: tuple[int, ...]):
    """(mean, variance) over ``axes``, the way Flax computes them."""
    mean = jnp.mean(x, axes, keepdims=True)
    if self.use_fast_variance:
      var = jnp.maximum(jnp.mean(x * x, axes, keepdims=True) - mean * mean, 0)
    else:
      var = jnp.mean(jnp.square(x - mean), axes, keepdims=True)
    return mean, var

  def normalized(self, x: jax.Array) -> jax.Array:
    """x̂, the input normalised as the layer does, same shape (here: standardised
    over ``reduction_axes``, as LayerNorm and BatchNorm do)."""
    mean, var = self._moments(x, self.reduction_axes)
    return (x - mean) * lax.rsqrt(var + self.epsilon)

  def a_stats(self, inputs: jax.Array, dtype) -> tuple[jax.Array, int]:
    x = inputs.astype(jnp.promote_types(inputs.dtype, jnp.float32))
    xh = self.normalized(x).astype(dtype).reshape(-1, self.blocks)  # (rows, features)
    rows = xh.shape[0]
    # Per feature [x̂, 1]ᵀ[x̂, 1]: (features, a_size, a_size).
    cov = jnp.sum(xh * xh, axis=0)[:, None, None]
    return _with_ones_column(cov, jnp.sum(xh, axis=0)[:, None], rows, self.has_bias), rows

  def g_stats(self, out_grads: jax.Array, dtype) -> tuple[jax.Array, int]:
    g = out_grads.reshape(-1, self.blocks).astype(dtype)
    return jnp.sum(g * g, axis=0)[:, None, None], g.shape[0]

  def a_rows(self, inputs, dtype):
    x = inputs.astype(jnp.promote_types(inputs.dtype, jnp.float32))
    xh = self.normalized(x).astype(dtype).reshape(-1, self.blocks, 1)  # (rows, features, 1)
    return _append_ones(xh) if self.has_bias else xh

  def g_rows(self, out_grads, dtype):
    return out_grads.reshape(-1, self.blocks, 1).astype(dtype)

  def kernel_matrix(self, kernel) -> jax.Array:
    return kernel.reshape(self.blocks, 1, 1)

  def kernel_from_matrix(self, mat) -> jax.Array:
    return mat.reshape(self.kernel_shape)


@dataclasses.dataclass(frozen=True)
class LayerNorm(ScaleAndShift):
  """``flax.linen.LayerNorm``: statistics over ``reduction_axes`` of each row."""
  kind = "layer_norm"
  modules = (nn.LayerNorm, nnx.LayerNorm)

  @classmethod
  def from_call(cls, module, name, kernel_path, bias_path, kernel_shape,
                inputs, outputs, call_kwargs) -> "LayerNorm":
    del outputs
    cls._check_call(module, kernel_shape, inputs, call_kwargs)
    if _axes(module.feature_axes, inputs.ndim) != (inputs.ndim - 1,):
      raise UnsupportedLayer(
          f"{type(module).__name__} with feature_axes={module.feature_axes}")
    axes = tuple(a - inputs.ndim for a in _axes(module.reduction_axes, inputs.ndim))
    return cls(name, kernel_path, bias_path, tuple(kernel_shape), epsilon=module.epsilon,
               reduction_axes=axes, use_fast_variance=module.use_fast_variance)


@dataclasses.dataclass(frozen=True)
class RMSNorm(LayerNorm):
  """``flax.linen.RMSNorm``: ``x̂ = x / sqrt(mean(x²) + ε)``; scale only."""
  kind = "rms_norm"
  modules = (nn.RMSNorm, nnx.RMSNorm)

  def normalized(self, x):
    return x * lax.rsqrt(jnp.mean(x * x, self.reduction_axes, keepdims=True) + self.epsilon)


@dataclasses.dataclass(frozen=True)
class GroupNorm(ScaleAndShift):
  """``flax.linen.GroupNorm``: statistics per example over each group of channels."""
  num_groups: int = 1

  kind = "group_norm"
  modules = (nn.GroupNorm, nnx.GroupNorm)

  @classmethod
  def from_call(cls, module, name, kernel_path, bias_path, kernel_shape,
                inputs, outputs, call_kwargs) -> "GroupNorm":
    del outputs
    cls._check_call(module, kernel_shape, inputs, call_kwargs)
    channels = inputs.shape[-1]
    groups = (channels // module.group_size if module.group_size is not None
              else module.num_groups)
    ndim = inputs.ndim
    # Flax's reduction axes end with the channel axis; the others (by default
    # every axis but the batch) keep their place in the (..., groups,
    # channels / groups) view, where the channels within a group are the last.
    axes = (range(1, ndim - 1) if module.reduction_axes is None
            else _axes(module.reduction_axes, ndim)[:-1])
    axes = tuple(a - (ndim + 1) for a in axes) + (-1,)
    return cls(name, kernel_path, bias_path, tuple(kernel_shape), epsilon=module.epsilon,
               reduction_axes=axes, use_fast_variance=module.use_fast_variance,
               num_groups=int(groups))

  def normalized(self, x):
    grouped = x.reshape(x.shape[:-1] + (self.num_groups, -1))
    mean, var = self._moments(grouped, self.reduction_axes)
    return ((grouped - mean) * lax.rsqrt(var + self.epsilon)).reshape(x.shape)


@dataclasses.dataclass(frozen=True)
class BatchNorm(ScaleAndShift):
  """``flax.linen.BatchNorm`` in training mode: statistics of the batch.

  Its running averages only matter at evaluation; the loss K-FAC follows is
  the training one, normalised by the statistics of the batch itself.
  """
  kind = "batch_norm"
  modules = (nn.BatchNorm, nnx.BatchNorm)

  @classmethod
  def from_call(cls, module, name, kernel_path, bias_path, kernel_shape,
                inputs, outputs, call_kwargs) -> "BatchNorm":
    del outputs
    cls._check_call(module, kernel_shape, inputs, call_kwargs)
    running = nn.merge_param("use_running_average", module.use_running_average,
                             call_kwargs.get("use_running_average"))
    if running:
      raise UnsupportedLayer("BatchNorm called with use_running_average=True (evaluation mode)")
    if _axes(module.axis, inputs.ndim) != (inputs.ndim - 1,):
      raise UnsupportedLayer(f"BatchNorm with axis={module.axis}")
    axes = tuple(range(-inputs.ndim, -1))
    return cls(name, kernel_path, bias_path, tuple(kernel_shape), epsilon=module.epsilon,
               reduction_axes=axes, use_fast_variance=module.use_fast_variance)
