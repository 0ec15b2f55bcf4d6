"""Dense kinds: ``Dense``, ``DenseGeneral`` and ``Einsum``, a kernel contracted with the last input axes.

The input axes the kernel does not contract are positions sharing the
kernel; ``WEIGHT_SHARING`` names the ways they enter the factors.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp

from kaisa_jax._src.layers.base import Layer, UnsupportedLayer, _append_ones, _block_covariance

WEIGHT_SHARING = ("expand", "reduce")


@dataclasses.dataclass(frozen=True)
class Dense(Layer):
  """``flax.linen.Dense``: kernel (in_features, out_features) on the last axis.

  Inputs (batch, *positions, in) share the kernel over the positions
  (tokens, patches). ``weight_sharing`` says how they enter the factors
  (Eschenhagen et al., NeurIPS 2023), with R positions per example:

  * 'expand' (the reference): every position is a row,
    ``A = Σ_{n,r} a aᵀ / (B R)``, ``G = Σ_{n,r} g gᵀ / (B R)``;
  * 'reduce': one row per example, the inputs averaged and the output
    gradients summed over its positions, ``A = Σ_n ā āᵀ / B``,
    ``G = Σ_n (Σ_r g)(Σ_r g)ᵀ / B``: R times fewer rows to multiply.

  Both are the same for (batch, in) inputs.
  """
  weight_sharing: str = "expand"

  kind = "dense"
  modules = (nn.Dense, nnx.Linear)

  @property
  def in_features(self) -> int:
    return self.kernel_shape[0]

  @property
  def a_size(self) -> int:
    return self.in_features + int(self.has_bias)

  @property
  def g_size(self) -> int:
    return math.prod(self.kernel_shape) // self.in_features

  @classmethod
  def from_call(cls, module, name, kernel_path, bias_path, kernel_shape,
                inputs, outputs, call_kwargs) -> "Dense":
    del module, inputs, outputs, call_kwargs
    return cls(name, kernel_path, bias_path, tuple(kernel_shape))

  def _input_features(self, inputs: jax.Array) -> jax.Array:
    """The input as (batch, *positions, in_features)."""
    return inputs

  def _output_features(self, out_grads: jax.Array) -> jax.Array:
    """The output gradients as (batch, *positions, g_size)."""
    return out_grads

  def _rows(self, x: jax.Array, combine) -> jax.Array:
    """(batch, *positions, n) -> the (rows, n) matrix the factor is made of."""
    if self.weight_sharing == "reduce" and x.ndim > 2:
      return combine(x.reshape(x.shape[0], -1, x.shape[-1]), axis=1)
    return x.reshape(-1, x.shape[-1])

  def a_stats(self, inputs: jax.Array, dtype) -> tuple[jax.Array, int]:
    x = self._rows(self._input_features(inputs.astype(dtype)), jnp.mean)
    return _block_covariance(x, self.has_bias), x.shape[0]

  def g_stats(self, out_grads: jax.Array, dtype) -> tuple[jax.Array, int]:
    g = self.g_rows(out_grads, dtype)
    return g.T @ g, g.shape[0]

  def a_rows(self, inputs, dtype):
    x = self._rows(self._input_features(inputs.astype(dtype)), jnp.mean)
    return _append_ones(x) if self.has_bias else x

  def g_rows(self, out_grads, dtype):
    return self._rows(self._output_features(out_grads.astype(dtype)), jnp.sum)

  def kernel_matrix(self, kernel) -> jax.Array:
    return kernel.reshape(self.in_features, -1).T  # (in, out) -> (out, in)

  def kernel_from_matrix(self, mat) -> jax.Array:
    return mat.T.reshape(self.kernel_shape)


@dataclasses.dataclass(frozen=True)
class DenseGeneral(Dense):
  """``flax.linen.DenseGeneral``: contracts ``in_axes`` of the input.

  kernel: (*in_dims, *features), e.g. (d, heads, head_dim) for an attention
  query projection or (heads, head_dim, d) for its output projection. The
  kernel is the (prod(features), prod(in_dims)) matrix over the flattened
  axes, the input axes that are not contracted are positions (weight
  sharing as in ``Dense``), and the bias has the shape of ``features``.
  """
  in_axes: tuple[int, ...] = (-1,)  # negative, increasing

  kind = "dense_general"
  modules = (nn.DenseGeneral, nnx.LinearGeneral)

  @property
  def in_features(self) -> int:
    return math.prod(self.kernel_shape[:len(self.in_axes)])

  @property
  def bias_shape(self) -> tuple[int, ...]:
    return self.kernel_shape[len(self.in_axes):]

  @classmethod
  def from_call(cls, module, name, kernel_path, bias_path, kernel_shape,
                inputs, outputs, call_kwargs) -> "DenseGeneral":
    del outputs, call_kwargs
    kind = type(module).__name__
    # linen's batch_dims, NNX's batch_axis: kernels batched over input axes.
    batched = getattr(module, "batch_dims", None) or getattr(module, "batch_axis", None)
    if batched:
      raise UnsupportedLayer(f"{kind} with batch_dims={batched}")
    axes = (module.axis,) if isinstance(module.axis, int) else tuple(module.axis)
    # The kernel's input dims follow the order of ``axis``.
    in_axes = tuple(a % inputs.ndim - inputs.ndim for a in axes)
    if min(in_axes) == -inputs.ndim:
      raise UnsupportedLayer(f"{kind} contracting the leading (batch) axis")
    if in_axes != tuple(range(-len(in_axes), 0)):
      raise UnsupportedLayer(
          f"{kind} contracting axes {axes} that are not the last ones in increasing order")
    return cls(name, kernel_path, bias_path, tuple(kernel_shape), in_axes=in_axes)

  def _input_features(self, inputs: jax.Array) -> jax.Array:
    return inputs.reshape(inputs.shape[:inputs.ndim - len(self.in_axes)] + (-1,))

  def _output_features(self, out_grads: jax.Array) -> jax.Array:
    n_out = len(self.bias_shape)
    return out_grads.reshape(out_grads.shape[:out_grads.ndim - n_out] + (-1,))


def _einsum_roles(equation: str, input_ndim: int):
  """The letters of an ``input,kernel->output`` einsum as (positions, contracted, features).

  positions: input letters kept in the output (batch first); contracted:
  input letters summed against the kernel, in input order; features: kernel
  letters of the output, in output order (Flax's bias order). Returns the
  equation with any ellipsis spelled out, or raises ``UnsupportedLayer``.
  """
  equation = equation.replace(" ", "")
  if "->" not in equation or equation.count(",") != 1:
    raise UnsupportedLayer(f"einsum {equation!r} is not of the form 'input,kernel->output'")
  operands, out = equation.split("->")
  lhs, rhs = operands.split(",")
  if "..." in rhs:
    raise UnsupportedLayer(f"einsum {equation!r}: an ellipsis in the kernel")
  if "..." in lhs:
    spare = [c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in equation]
    ellipsis = "".join(spare[:input_ndim - (len(lhs) - 3)])
    lhs, out = lhs.replace("...", ellipsis), out.replace("...", ellipsis)
  if any(len(set(t)) != len(t) for t in (lhs, rhs, out)):
    raise UnsupportedLayer(f"einsum {equation!r}: a repeated index (a diagonal)")
  shared = [c for c in lhs if c in rhs and c in out]
  if shared:
    raise UnsupportedLayer(
        f"einsum {equation!r}: indices {''.join(shared)} in the input, the kernel and the "
        "output (a batched kernel)")
  if any(c not in lhs and c not in out for c in rhs):
    raise UnsupportedLayer(f"einsum {equation!r}: kernel indices summed on their own")
  if any(c not in rhs and c not in out for c in lhs):
    raise UnsupportedLayer(f"einsum {equation!r}: input indices summed on their own")
  positions = tuple(c for c in lhs if c in out)
  if not positions or positions[0] != lhs[0]:
    raise UnsupportedLayer(f"einsum {equation!r}: the leading (batch) input axis is contracted")
  contracted = tuple(c for c in lhs if c in rhs)
  features = tuple(c for c in out if c in rhs)
  return f"{lhs},{rhs}->{out}", positions, contracted, features


@dataclasses.dataclass(frozen=True)
class Einsum(Dense):
  """``flax.linen.Einsum`` / ``nnx.Einsum``: ``einsum('input,kernel->output', x, kernel)``.

  The kernel is the (prod(features), prod(contracted)) matrix, ``features``
  its indices kept in the output (in output order, as the bias), and
  ``contracted`` those summed against the input (in input order); the
  input's other indices are the batch and positions (weight sharing as in
  ``Dense``). E.g. 'btd,dhk->bthk' is an attention projection. Kernels with
  an index shared by all three operands (batched kernels) are not
  supported.
  """
  equation: str = ""  # explicit, ellipsis spelled out
  positions: tuple[str, ...] = ()
  contracted: tuple[str, ...] = ()
  features: tuple[str, ...] = ()

  kind = "einsum"
  modules = (nn.Einsum, nnx.Einsum)

  @property
  def _operands(self) -> tuple[str, str, str]:
    lhs_rhs, out = self.equation.split("->")
    lhs, rhs = lhs_rhs.split(",")
    return lhs, rhs, out

  @property
  def _kernel_order(self) -> tuple[int, ...]:
    """Kernel axes in (contracted..., features...) order."""
    rhs = self._operands[1]
    return tuple(rhs.index(c) for c in self.contracted + self.features)

  @property
  def in_features(self) -> int:
    rhs = self._operands[1]
    return math.prod(self.kernel_shape[rhs.index(c)] for c in self.contracted)

  @property
  def bias_shape(self) -> tuple[int, ...]:
    rhs = self._operands[1]
    return tuple(self.kernel_shape[rhs.index(c)] for c in self.features)

  @classmethod
  def from_call(cls, module, name, kernel_path, bias_path, kernel_shape,
                inputs, outputs, call_kwargs) -> "Einsum":
    del outputs
    equation = call_kwargs.get("einsum_str") or module.einsum_str
    if equation is None:
      raise UnsupportedLayer("Einsum without an einsum_str")
    if getattr(module, "einsum_op", jnp.einsum) is not jnp.einsum:
      raise UnsupportedLayer("nnx.Einsum with a custom einsum_op, whose product is unknown")
    equation, positions, contracted, features = _einsum_roles(
        equation.replace(" ", ""), inputs.ndim)
    layer = cls(name, kernel_path, bias_path, tuple(kernel_shape), equation=equation,
                positions=positions, contracted=contracted, features=features)
    declared = getattr(module, "bias_shape", None)  # NNX declares it; linen infers it
    if bias_path is not None and declared is not None and tuple(declared) != layer.bias_shape:
      raise UnsupportedLayer(
          f"nnx.Einsum with bias_shape {tuple(declared)}: only the shape of its "
          f"output features {layer.bias_shape} is supported")
    return layer

  def _input_features(self, inputs: jax.Array) -> jax.Array:
    lhs = self._operands[0]
    x = jnp.transpose(inputs, [lhs.index(c) for c in self.positions + self.contracted])
    return x.reshape(x.shape[:len(self.positions)] + (-1,))

  def _output_features(self, out_grads: jax.Array) -> jax.Array:
    out = self._operands[2]
    g = jnp.transpose(out_grads, [out.index(c) for c in self.positions + self.features])
    return g.reshape(g.shape[:len(self.positions)] + (-1,))

  def kernel_matrix(self, kernel) -> jax.Array:
    return jnp.transpose(kernel, self._kernel_order).reshape(self.in_features, -1).T

  def kernel_from_matrix(self, mat) -> jax.Array:
    order = self._kernel_order
    kernel = mat.T.reshape(tuple(self.kernel_shape[i] for i in order))
    return jnp.transpose(kernel, tuple(order.index(i) for i in range(len(order))))
