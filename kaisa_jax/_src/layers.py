"""Layer kinds: what K-FAC needs to know about each supported Flax layer.

Every kind is a frozen (hashable, static) dataclass describing one layer, built
from a Flax module call by ``from_call``, and answers four questions:

* ``a_stats(inputs)``: the unnormalised activation covariance of one call and
  its row count, so that several calls of a shared module add up;
* ``g_stats(out_grads)``: the same for the output gradients;
* ``kernel_matrix(kernel)``: the kernel as the (g_size, a_size) matrix the
  Kronecker factors act on (the base class appends the bias as the last
  column in ``grad_matrix``);
* ``kernel_from_matrix(matrix)``: the inverse of ``kernel_matrix``.

A kind also says how its factors are stored (``a_factor_shape``,
``g_factor_shape``): one dense matrix each (Dense, Conv), ``blocks``
independent Kronecker blocks (grouped convolutions, the per-feature blocks
of normalisation layers), or a diagonal A (Embed). Adding a layer kind means
adding one class here and listing it in ``LAYER_KINDS``.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any, Optional, Sequence

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
from jax import lax

KeyPath = tuple  # a jax key path into the params pytree

# Conv patches are reduced in chunks of about this many bytes (see Conv.a_stats).
_PATCH_CHUNK_BYTES = 4 * 2**20


@dataclasses.dataclass(frozen=True)
class FactorShape:
  """How one Kronecker factor of a layer is stored.

  Attributes:
    size: n, the side of one block.
    blocks: independent (n, n) blocks on the diagonal of the factor (the
      layer's Fisher block is block-diagonal, one Kronecker product per
      block); 1 for an ordinary dense factor.
    diagonal: the factor is diagonal and stored as its (n,) diagonal.

  The array is (n,) when diagonal, (n, n) for one block, else (blocks, n, n).
  """
  size: int
  blocks: int = 1
  diagonal: bool = False

  @property
  def shape(self) -> tuple[int, ...]:
    if self.diagonal:
      return (self.size,)
    if self.blocks == 1:
      return (self.size, self.size)
    return (self.blocks, self.size, self.size)

  @property
  def words(self) -> int:
    """Entries stored."""
    return math.prod(self.shape)

  def packed_words(self, symmetric: bool) -> int:
    """Entries sent in a Factor-Reduce (the upper triangles when ``symmetric``)."""
    if self.diagonal or not symmetric:
      return self.words
    return self.blocks * self.size * (self.size + 1) // 2

  def decomposition_shapes(self, method: str) -> list[tuple[int, ...]]:
    """Shapes of one factor's decomposition: 'eigen' (vectors, values), 'inverse' (inverse,).

    A diagonal factor is its own eigendecomposition: values only, and its
    damped inverse is a vector.
    """
    if method == "inverse" or self.diagonal:
      return [self.shape]
    return [self.shape, self.shape[:-1]]

  def cost(self, power: int) -> float:
    """Decomposition cost: n^power per block (n for a diagonal)."""
    if self.diagonal:
      return float(self.size)
    return self.blocks * float(self.size) ** power

  def identity(self, dtype) -> jax.Array:
    if self.diagonal:
      return jnp.ones(self.shape, dtype)
    return jnp.broadcast_to(jnp.eye(self.size, dtype=dtype), self.shape)

  def __str__(self) -> str:
    if self.diagonal:
      return f"{self.size} (diag)"
    return str(self.size) if self.blocks == 1 else f"{self.blocks}x{self.size}"


def _block_covariance(x: jax.Array, with_ones: bool) -> jax.Array:
  """``aᵀa`` for ``a = [x, 1]`` (ones column only if ``with_ones``), no copy of x.

  x: (rows, n). Returns (n [+1], n [+1]).
  """
  return _with_ones_column(x.T @ x, jnp.sum(x, axis=0), x.shape[0], with_ones)


def _append_ones(x: jax.Array) -> jax.Array:
  """``[x, 1]``: a ones column after the last axis."""
  return jnp.concatenate([x, jnp.ones(x.shape[:-1] + (1,), x.dtype)], axis=-1)


def _with_ones_column(xtx, col_sums, rows: int, with_ones: bool) -> jax.Array:
  """Borders ``xᵀx`` (..., n, n) with the column sums (..., n) and the row count.

  The result is ``[x, 1]ᵀ[x, 1]``, (..., n+1, n+1), block by block.
  """
  if not with_ones:
    return xtx
  rows = jnp.full(col_sums.shape[:-1] + (1,), rows, xtx.dtype)
  top = jnp.concatenate([xtx, col_sums[..., :, None]], axis=-1)
  bottom = jnp.concatenate([col_sums, rows], axis=-1)[..., None, :]
  return jnp.concatenate([top, bottom], axis=-2)


@dataclasses.dataclass(frozen=True)
class Layer:
  """Static description shared by every layer kind.

  Attributes:
    name: the layer's Flax scope path joined by '/', e.g. 'encoder/Dense_0'.
    kernel_path: key path of the kernel leaf in the params pytree.
    bias_path: key path of the bias leaf, or None when the layer has no bias.
    kernel_shape: the kernel's shape.
  """
  name: str
  kernel_path: KeyPath
  bias_path: Optional[KeyPath]
  kernel_shape: tuple[int, ...]

  kind = "layer"
  # The names of the module's parameters that play the kernel and the bias.
  kernel_param = "kernel"
  bias_param = "bias"
  # Methods other than __call__ that use the kernel: a module calling one is
  # listed as skipped, since its factors would miss that use.
  other_kernel_methods: tuple[str, ...] = ()
  a_diagonal = False
  modules: tuple[type, ...] = ()  # the Flax linen and NNX classes of this kind

  @classmethod
  def matches(cls, module) -> bool:
    return isinstance(module, cls.modules)

  @property
  def has_bias(self) -> bool:
    return self.bias_path is not None

  @property
  def a_size(self) -> int:
    """Side of one block of A (the bias adds one)."""
    raise NotImplementedError

  @property
  def g_size(self) -> int:
    """Side of one block of G."""
    raise NotImplementedError

  @property
  def blocks(self) -> int:
    """Independent Kronecker blocks of the layer's Fisher block."""
    return 1

  @property
  def a_factor_shape(self) -> FactorShape:
    return FactorShape(self.a_size, self.blocks, self.a_diagonal)

  @property
  def g_factor_shape(self) -> FactorShape:
    return FactorShape(self.g_size, self.blocks)

  @property
  def grad_shape(self) -> tuple[int, ...]:
    """(g_size, a_size), or (blocks, g_size, a_size) with several blocks."""
    mat = (self.g_size, self.a_size)
    return mat if self.blocks == 1 else (self.blocks,) + mat

  @property
  def bias_shape(self) -> tuple[int, ...]:
    return (self.blocks * self.g_size,)

  def a_rows(self, inputs: jax.Array, dtype) -> jax.Array:
    """(rows, [blocks,] a_size): the rows A is the mean outer product of.

    With the kind's scaling and the bias's ones column; row r pairs with
    row r of ``g_rows``. Used by EKFAC, which needs the rows themselves.
    """
    raise NotImplementedError

  def g_rows(self, out_grads: jax.Array, dtype) -> jax.Array:
    """(rows, [blocks,] g_size): the rows G is the mean outer product of."""
    raise NotImplementedError

  def projected_second_moment(self, inputs: jax.Array, out_grads: jax.Array, a_eigvecs,
                              g_eigvecs, dtype) -> tuple[jax.Array, int]:
    """EKFAC: ``Σ_r (QGᵀ g_r)² (QAᵀ a_r)²ᵀ`` over one call's rows, and their count.

    ``grad_shape``: the second moment of the per-row gradients ``g_r a_rᵀ``
    in the Kronecker eigenbasis (George et al., 2018). ``a_eigvecs`` is None
    when A is diagonal (its eigenbasis is the identity).
    """
    a = self.a_rows(inputs, dtype)
    g = self.g_rows(out_grads, dtype)
    if a_eigvecs is not None:
      a = jnp.einsum("r...i,...ij->r...j", a, a_eigvecs.astype(dtype))
    g = jnp.einsum("r...i,...ij->r...j", g, g_eigvecs.astype(dtype))
    return jnp.einsum("r...i,r...j->...ij", g * g, a * a), a.shape[0]

  def kernel_matrix(self, kernel) -> jax.Array:
    """The kernel as the gradient matrix without its bias column."""
    raise NotImplementedError

  def kernel_from_matrix(self, mat) -> jax.Array:
    """The inverse of ``kernel_matrix``."""
    raise NotImplementedError

  def grad_matrix(self, kernel, bias) -> jax.Array:
    """``grad_shape``: the kernel matrix with the bias as the last column."""
    mat = self.kernel_matrix(kernel)
    if self.has_bias:
      mat = jnp.concatenate([mat, bias.reshape(mat.shape[:-1] + (1,))], axis=-1)
    return mat

  def from_matrix(self, mat) -> tuple[jax.Array, Optional[jax.Array]]:
    """(kernel, bias or None) from a ``grad_shape`` matrix."""
    if self.has_bias:
      return self.kernel_from_matrix(mat[..., :-1]), mat[..., -1].reshape(self.bias_shape)
    return self.kernel_from_matrix(mat), None


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


@dataclasses.dataclass(frozen=True)
class Embed(Layer):
  """``flax.linen.Embed``: a table (num_embeddings, features) indexed by token ids.

  A token's activation is its one-hot vector, so A is diagonal (the token
  frequencies, ``counts / rows``) and kept as a vector: no V x V matrix, no
  eigendecomposition. G is the covariance of the gradients of the looked-up
  rows; the gradient matrix is the table transposed, (features, V).
  """
  kind = "embed"
  modules = (nn.Embed, nnx.Embed)
  kernel_param = "embedding"
  bias_param = None
  other_kernel_methods = ("attend",)
  a_diagonal = True

  @property
  def a_size(self) -> int:
    return self.kernel_shape[0]

  @property
  def g_size(self) -> int:
    return self.kernel_shape[1]

  @classmethod
  def from_call(cls, module, name, kernel_path, bias_path, kernel_shape,
                inputs, outputs, call_kwargs) -> "Embed":
    del module, inputs, outputs, call_kwargs
    return cls(name, kernel_path, bias_path, tuple(kernel_shape))

  def a_stats(self, inputs: jax.Array, dtype) -> tuple[jax.Array, int]:
    ids = inputs.reshape(-1)
    counts = jnp.zeros((self.a_size,), dtype).at[ids].add(1)  # ids out of range add nothing
    return counts, ids.shape[0]

  def g_stats(self, out_grads: jax.Array, dtype) -> tuple[jax.Array, int]:
    g = self.g_rows(out_grads, dtype)
    return g.T @ g, g.shape[0]

  def g_rows(self, out_grads, dtype):
    return out_grads.reshape(-1, self.g_size).astype(dtype)

  def projected_second_moment(self, inputs, out_grads, a_eigvecs, g_eigvecs, dtype):
    # The rows of A are one-hot: scatter the projected gradients' squares by
    # token id rather than multiplying (rows, V) one-hot rows.
    g = self.g_rows(out_grads, dtype) @ g_eigvecs.astype(dtype)  # (rows, g_size)
    ids = inputs.reshape(-1)
    moment = jnp.zeros((self.a_size, self.g_size), dtype).at[ids].add(g * g)
    return moment.T, ids.shape[0]

  def kernel_matrix(self, kernel) -> jax.Array:
    return kernel.T  # (V, features) -> (features, V)

  def kernel_from_matrix(self, mat) -> jax.Array:
    return mat.T


def _canonical_padding(padding: Any, kernel_size: Sequence[int],
                       kernel_dilation: Sequence[int], name: str):
  """Flax's padding argument as a lax padding: 'SAME', 'VALID' or explicit pairs.

  Returns (lax_padding, circular): circular padding is done by wrapping the
  input before a VALID convolution, as flax.linen.Conv does.
  """
  n = len(kernel_size)
  dilated = [(k - 1) * d + 1 for k, d in zip(kernel_size, kernel_dilation)]
  if isinstance(padding, str):
    if padding in ("SAME", "VALID", "SAME_LOWER"):
      return padding, False
    if padding == "CIRCULAR":
      return tuple(((k - 1) // 2, k // 2) for k in dilated), True
    if padding == "CAUSAL":
      if n != 1:
        raise ValueError(f"layer {name!r}: CAUSAL padding is only defined for 1-D convolutions.")
      return (((kernel_size[0] - 1) * kernel_dilation[0], 0),), False
    raise UnsupportedLayer(f"padding {padding!r}")
  if isinstance(padding, int):
    return tuple((padding, padding) for _ in range(n)), False
  pairs = []
  for p in padding:
    if isinstance(p, int):
      pairs.append((p, p))
    else:
      lo, hi = p
      pairs.append((int(lo), int(hi)))
  if len(pairs) != n:
    raise ValueError(f"layer {name!r}: padding {padding!r} does not have one entry per spatial dimension.")
  return tuple(pairs), False


def _as_tuple(value, n: int) -> tuple[int, ...]:
  if value is None:
    return (1,) * n
  if isinstance(value, int):
    return (value,) * n
  return tuple(int(v) for v in value)


@dataclasses.dataclass(frozen=True)
class Conv(Layer):
  """``flax.linen.Conv`` with any number of spatial dims, channels last.

  kernel: (*kernel_size, in_channels / groups, out_channels). The activation
  rows are the im2col patches, ordered channel-major (channel, then kernel
  position), the order of PyTorch's (out, in, *kernel) weight flattening.
  A grouped convolution (``feature_group_count`` = groups > 1, depthwise
  when every group has one input channel) has one Kronecker block per
  group: its input channels' patches against its output channels.
  """
  groups: int = 1
  strides: tuple[int, ...] = ()
  padding: Any = "SAME"  # 'SAME', 'VALID', 'SAME_LOWER' or ((lo, hi), ...)
  circular: bool = False
  input_dilation: tuple[int, ...] = ()
  kernel_dilation: tuple[int, ...] = ()

  kind = "conv"
  modules = (nn.Conv, nnx.Conv)

  @property
  def kernel_size(self) -> tuple[int, ...]:
    return self.kernel_shape[:-2]

  @property
  def a_size(self) -> int:
    return math.prod(self.kernel_shape[:-1]) + int(self.has_bias)

  @property
  def g_size(self) -> int:
    return self.kernel_shape[-1] // self.groups

  @property
  def blocks(self) -> int:
    return self.groups

  @classmethod
  def from_call(cls, module, name, kernel_path, bias_path, kernel_shape,
                inputs, outputs, call_kwargs) -> "Conv":
    del call_kwargs
    if getattr(module, "mask", None) is not None:
      raise UnsupportedLayer("masked convolution")
    n = len(kernel_shape) - 2
    kernel_dilation = _as_tuple(module.kernel_dilation, n)
    padding, circular = _canonical_padding(
        module.padding, kernel_shape[:-2], kernel_dilation, name)
    layer = cls(name, kernel_path, bias_path, tuple(kernel_shape),
                groups=int(module.feature_group_count), strides=_as_tuple(module.strides, n), padding=padding,
                circular=circular,
                input_dilation=_as_tuple(module.input_dilation, n),
                kernel_dilation=kernel_dilation)
    # The patches must reproduce the module's output positions exactly.
    patches = jax.eval_shape(layer._patches, jax.ShapeDtypeStruct(inputs.shape, inputs.dtype))
    if patches.shape[1:-1] != outputs.shape[-n - 1:-1]:
      raise ValueError(
          f"layer {name!r}: could not reproduce the convolution geometry "
          f"(patches give spatial shape {patches.shape[1:-1]}, the layer output "
          f"has {outputs.shape[-n - 1:-1]}); add it to skip_layers.")
    return layer

  def _patches(self, inputs: jax.Array) -> jax.Array:
    """(batch..., *spatial, C) -> (N, *out_spatial, C * prod(kernel_size)).

    Built from strided slices of the padded input, one per kernel position:
    pure data movement, where ``lax.conv_general_dilated_patches`` would run
    a convolution with an identity kernel costing C·k/out times the layer's
    own forward pass.
    """
    n = len(self.kernel_size)
    if n > 3:
      raise ValueError(f"layer {self.name!r}: convolutions with more than 3 spatial dims are not supported.")
    x = inputs.reshape((-1,) + inputs.shape[-n - 1:])
    cropping = not isinstance(self.padding, str) and any(
        p < 0 for pair in self.padding for p in pair)
    if cropping or any(d != 1 for d in self.input_dilation):
      spatial = "DHW"[-n:]
      return lax.conv_general_dilated_patches(
          x, self.kernel_size, self.strides, self.padding,
          lhs_dilation=self.input_dilation, rhs_dilation=self.kernel_dilation,
          dimension_numbers=("N" + spatial + "C", spatial + "IO", "N" + spatial + "C"))
    dilated = tuple((k - 1) * d + 1 for k, d in zip(self.kernel_size, self.kernel_dilation))
    if isinstance(self.padding, str):
      pads = lax.padtype_to_pads(x.shape[1:-1], dilated, self.strides, self.padding)
    else:
      pads = self.padding
    x = jnp.pad(x, ((0, 0),) + tuple(pads) + ((0, 0),),
                mode="wrap" if self.circular else "constant")
    out = tuple((size - w) // s + 1
                for size, w, s in zip(x.shape[1:-1], dilated, self.strides))
    windows = []
    for offset in itertools.product(*(range(k) for k in self.kernel_size)):
      start = tuple(o * d for o, d in zip(offset, self.kernel_dilation))
      limit = tuple(b + (m - 1) * s + 1 for b, m, s in zip(start, out, self.strides))
      windows.append(lax.slice(x, (0,) + start + (0,), (x.shape[0],) + limit + (x.shape[-1],),
                               (1,) + self.strides + (1,)))
    # (N, *out, C, K) -> channel-major (N, *out, C*K)
    patches = jnp.stack(windows, axis=-1)
    return patches.reshape(patches.shape[:-2] + (-1,))

  def a_stats(self, inputs: jax.Array, dtype) -> tuple[jax.Array, int]:
    n = len(self.kernel_size)
    x = inputs.reshape((-1,) + inputs.shape[-n - 1:]).astype(dtype)  # (N, *spatial, C)
    patch_shape = jax.eval_shape(self._patches, x[:1]).shape  # (1, *out, C*k)
    positions = math.prod(patch_shape[1:-1])  # S, output positions per example
    features = patch_shape[-1]
    # The patches are k times the input: built whole for a large batch they
    # would be the step's largest buffer, so they are built and reduced a
    # chunk of examples at a time (zero examples, padding the last chunk,
    # have zero patches and add nothing).
    examples = x.shape[0]
    patch_bytes = examples * positions * features * x.dtype.itemsize
    chunks = min(examples, -(-patch_bytes // _PATCH_CHUNK_BYTES))
    per_chunk = -(-examples // chunks)  # even chunks: the least padding
    chunks = -(-examples // per_chunk)

    # Channel-major patches put each group's channels side by side.
    per_group = features // self.groups

    def reduce_chunk(sums, chunk):
      a = self._patches(chunk).reshape(-1, self.groups, per_group)  # (chunk*S, groups, C/groups*k)
      return (sums[0] + jnp.einsum("rgi,rgj->gij", a, a), sums[1] + jnp.sum(a, axis=0)), None

    zeros = (jnp.zeros((self.groups, per_group, per_group), dtype),
             jnp.zeros((self.groups, per_group), dtype))
    if chunks == 1:
      (xtx, col_sums), _ = reduce_chunk(zeros, x)
    else:
      x = jnp.pad(x, ((0, chunks * per_chunk - examples),) + ((0, 0),) * (n + 1))
      (xtx, col_sums), _ = lax.scan(reduce_chunk, zeros,
                                    x.reshape((chunks, per_chunk) + x.shape[1:]))
    rows = examples * positions
    # The reference divides the patches (and the ones column) by S.
    cov = _with_ones_column(xtx, col_sums, rows, self.has_bias) / (positions * positions)
    return (cov[0] if self.groups == 1 else cov), rows

  def g_stats(self, out_grads: jax.Array, dtype) -> tuple[jax.Array, int]:
    n = len(self.kernel_size)
    positions = math.prod(out_grads.shape[-n - 1:-1])
    g = out_grads.reshape(-1, self.groups, self.g_size).astype(dtype)
    cov = jnp.einsum("rgi,rgj->gij", g, g) / (positions * positions)
    return (cov[0] if self.groups == 1 else cov), g.shape[0]

  def _blocked_rows(self, rows: jax.Array, positions: int) -> jax.Array:
    """(N S, groups * n) -> (N S, [groups,] n), scaled by 1/S as the reference does."""
    rows = rows.reshape(rows.shape[0], self.groups, -1) / positions
    return rows[:, 0] if self.groups == 1 else rows

  def a_rows(self, inputs, dtype):
    # The whole batch's patches at once (a_stats reduces them in chunks).
    n = len(self.kernel_size)
    x = inputs.reshape((-1,) + inputs.shape[-n - 1:]).astype(dtype)
    patches = self._patches(x)
    positions = math.prod(patches.shape[1:-1])
    rows = patches.reshape(-1, self.groups, patches.shape[-1] // self.groups)
    if self.has_bias:
      rows = jnp.concatenate([rows, jnp.ones(rows.shape[:-1] + (1,), dtype)], axis=-1)
    return self._blocked_rows(rows.reshape(rows.shape[0], -1), positions)

  def g_rows(self, out_grads, dtype):
    n = len(self.kernel_size)
    positions = math.prod(out_grads.shape[-n - 1:-1])
    return self._blocked_rows(out_grads.reshape(-1, out_grads.shape[-1]).astype(dtype),
                              positions)

  def kernel_matrix(self, kernel) -> jax.Array:
    n = len(self.kernel_size)
    # (*k, C, O) -> (O, C, *k) -> (O, C * prod(k)), channel-major like the
    # patches; grouped: (groups, O / groups, C / groups * prod(k)).
    mat = jnp.transpose(kernel, (n + 1, n) + tuple(range(n)))
    mat = mat.reshape(self.groups, self.g_size, -1)
    return mat[0] if self.groups == 1 else mat

  def kernel_from_matrix(self, mat) -> jax.Array:
    n = len(self.kernel_size)
    out_ch, in_ch = self.kernel_shape[-1], self.kernel_shape[-2]
    kernel = mat.reshape((out_ch, in_ch) + self.kernel_size)
    return jnp.transpose(kernel, tuple(range(2, n + 2)) + (1, 0))


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


class UnsupportedLayer(Exception):
  """Raised by ``from_call`` for a module of a known class in an unsupported configuration."""


@dataclasses.dataclass(frozen=True)
class Skipped:
  """A Flax layer that was found but that K-FAC cannot precondition (yet)."""
  name: str
  module_type: str
  reason: str


# Flax layers with parameters that no kind handles (yet): find_layers lists
# them as skipped instead of leaving them unnoticed.
_UNSUPPORTED_MODULES = (
    ((nn.ConvTranspose, nnx.ConvTranspose), "transposed convolutions are not supported yet"),
    ((nn.ConvLocal,), "unshared (local) convolutions are not supported yet"),
)


def unsupported_reason(module: nn.Module) -> Optional[str]:
  """Why a Flax layer that no kind handles cannot be preconditioned, or None."""
  if kind_of(module) is not None:
    return None
  for classes, reason in _UNSUPPORTED_MODULES:
    if isinstance(module, classes):
      return reason
  return None


# Most specific first: a kind's ``matches`` may accept subclasses.
LAYER_KINDS = (DenseGeneral, Einsum, Dense, Conv, Embed, LayerNorm, RMSNorm, GroupNorm, BatchNorm)


def kind_of(module: nn.Module):
  """The layer kind class handling ``module``, or None."""
  for kind in LAYER_KINDS:
    if kind.matches(module):
      return kind
  return None


@dataclasses.dataclass(frozen=True)
class LayerRegistry:
  """Static, hashable registry of the Flax layers a loss function calls.

  Attributes:
    layers: the supported layers, in call order.
    skipped: layers found but not supported, with the reason.
  """
  layers: tuple[Layer, ...]
  skipped: tuple[Skipped, ...] = ()

  @property
  def names(self) -> tuple[str, ...]:
    return tuple(layer.name for layer in self.layers)

  def __getitem__(self, name: str) -> Layer:
    for layer in self.layers:
      if layer.name == name:
        return layer
    raise KeyError(name)

  def __len__(self) -> int:
    return len(self.layers)

  def __iter__(self):
    return iter(self.layers)

  def table(self) -> str:
    rows = [("layer", "kind", "A size", "G size")]
    rows += [(l.name, l.kind, str(l.a_factor_shape), str(l.g_factor_shape))
             for l in self.layers]
    rows += [(s.name, f"skipped: {s.reason}", "-", "-") for s in self.skipped]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                       for i, (c, w) in enumerate(zip(r, widths))).rstrip()
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)

  def __str__(self) -> str:
    return self.table()

  def __repr__(self) -> str:
    return f"LayerRegistry(\n{self.table()}\n)"
