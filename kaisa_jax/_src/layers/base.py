"""The base of every layer kind: the ``Layer`` interface and how its factors are stored.

``FactorShape`` says how one Kronecker factor is kept (one dense matrix,
independent blocks, or a diagonal); ``Layer`` is the static description every
kind extends; the covariance helpers build ``[x, 1]ᵀ[x, 1]`` without copying
``x``. ``UnsupportedLayer`` and ``Skipped`` say which layers K-FAC leaves out
and why. This module imports no kind.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import jax
import jax.numpy as jnp

KeyPath = tuple  # a jax key path into the params pytree


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

  def cost(self, power: int) -> float:
    """Decomposition cost: n^power per block (n for a diagonal)."""
    if self.diagonal:
      return float(self.size)
    return self.blocks * float(self.size) ** power

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

  @property
  def example_axis(self) -> int:
    """The batch axis of the layer's captured inputs and output gradients."""
    return 0

  def examples(self, inputs: jax.Array) -> int:
    """The batch size of one call's ``inputs`` (along ``example_axis``).

    What ``g_factor_scaling='per_example'`` scales G by (squared), so that G
    is that of per-example gradients whatever the loss's batch mean.
    """
    return inputs.shape[self.example_axis]

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


class UnsupportedLayer(Exception):
  """Raised by ``from_call`` for a module of a known class in an unsupported configuration."""


@dataclasses.dataclass(frozen=True)
class Skipped:
  """A Flax layer that was found but that K-FAC cannot precondition (yet)."""
  name: str
  module_type: str
  reason: str
