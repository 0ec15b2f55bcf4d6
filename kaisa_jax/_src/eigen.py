"""Eigen: decompose the Kronecker factors and precondition layer gradients.

For a layer with gradient matrix ∇ (g_size, a_size):
* eigen: ``A = QA diag(dA) QAᵀ``, ``G = QG diag(dG) QGᵀ`` (eigenvalues clamped
  at 0), ``P = QG [(QGᵀ ∇ QA) / (dG dAᵀ + damping)] QAᵀ``;
* inverse: ``P = (G + damping I)⁻¹ ∇ (A + damping I)⁻¹``;
* ekfac (George et al., NeurIPS 2018): as eigen, with a running estimate S
  of the second moment of the per-row gradients in the Kronecker eigenbasis
  in place of ``dG dAᵀ``: ``P = QG [(QGᵀ ∇ QA) / (S + damping)] QAᵀ``.

Everything here works on a group's stack (``groups.py``): every array carries
a leading blocks axis, and the blocks are decomposed and preconditioned
independently, in one call per stack. A diagonal A (Embed) is its own
eigendecomposition: ``QA`` is the identity and is not stored (None).
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import numpy as np
from jax import lax

from kaisa_jax._src import factors as factors_lib
from kaisa_jax._src import groups as groups_lib


class Eigen(NamedTuple):
  """Eigenbases and eigenvalues; damping is added when preconditioning.

  Shapes, for a stack of b blocks: a_eigvecs (b, a, a), g_eigvecs (b, g, g),
  a_eigvals (b, a), g_eigvals (b, g); a_eigvecs is None when A is diagonal.
  (``Placement.layer_decompositions`` shows one layer's without the blocks
  axis when it has one block.)
  """
  a_eigvecs: Optional[jax.Array]
  g_eigvecs: jax.Array
  a_eigvals: jax.Array
  g_eigvals: jax.Array


class EigenOuter(NamedTuple):
  """Eigenbases and ``1 / (dG dAᵀ + damping)`` formed at decomposition time.

  Shapes, for b blocks: a_eigvecs (b, a, a) (None when A is diagonal),
  g_eigvecs (b, g, g), inv_eigval_outer (b, g, a).
  """
  a_eigvecs: Optional[jax.Array]
  g_eigvecs: jax.Array
  inv_eigval_outer: jax.Array


class EigenCorrected(NamedTuple):
  """EKFAC: eigenbases and the eigenvalue scaling S (g, a), damping added when preconditioning.

  S starts at ``dG dAᵀ`` when the bases are recomputed and follows the
  running average of ``(QGᵀ g)² (QAᵀ a)²ᵀ`` over the rows on factor steps.
  Shapes as ``EigenOuter``'s.
  """
  a_eigvecs: Optional[jax.Array]
  g_eigvecs: jax.Array
  scaling: jax.Array


class Inverse(NamedTuple):
  """Damped inverses, for b blocks: a_inv (b, a, a) = (A + damping I)⁻¹
  ((b, a) when A is diagonal), g_inv (b, g, g)."""
  a_inv: jax.Array
  g_inv: jax.Array


Decomposition = Union[Eigen, EigenOuter, EigenCorrected, Inverse]
COMPUTE_METHODS = ("eigen", "inverse", "ekfac")


def _transpose(m: jax.Array) -> jax.Array:
  return jnp.swapaxes(m, -1, -2)


def _eigh(factor: jax.Array, dtype):
  # The factors are symmetric by construction (``factors.symmetrize``).
  vals, vecs = jnp.linalg.eigh(factor.astype(dtype), symmetrize_input=False)
  # float32 eigh gives small negative eigenvalues on rank-deficient factors.
  return jnp.maximum(vals, 0), vecs


def _damped_inverse(factor: jax.Array, damping, dtype) -> jax.Array:
  m = factor.astype(dtype)
  eye = jnp.broadcast_to(jnp.eye(m.shape[-1], dtype=dtype), m.shape)
  return jsl.cho_solve((jnp.linalg.cholesky(m + damping * eye), True), eye)


def decompose_factor(stack: jax.Array, diagonal: bool, damping, method: str, dtype) -> tuple:
  """One stack of factor blocks' share of a decomposition, in ``dtype``.

  Args:
    stack: (blocks, n, n) factor blocks, or (blocks, n) diagonals.
    diagonal: the blocks are diagonals.
    damping: γ, used by 'inverse' only.
    method: 'eigen' / 'ekfac' or 'inverse'.
    dtype: ``inv_dtype``.

  Returns:
    'eigen': (eigenvectors (blocks, n, n), eigenvalues (blocks, n) clamped
    at 0), or (eigenvalues,) for diagonals; 'inverse': ((stack + γI)⁻¹,).
    What an inverse worker computes and sends.
  """
  if diagonal:
    values = stack.astype(dtype)
    return (1 / (values + damping),) if method == "inverse" else (jnp.maximum(values, 0),)
  if stack.shape[0] > 1 and jax.default_backend() == "cpu":
    # jaxlib's CPU LAPACK kernels split a batch over XLA's intra-op thread
    # pool and block until its pieces are done: as many batched
    # decompositions running at once as the pool has threads deadlock
    # (measured: two on a 2-core machine, jax 0.10). One block at a time
    # instead, in a loop XLA runs sequentially: one op per stack.
    return lax.map(lambda block: tuple(
        part[0] for part in decompose_factor(block[None], False, damping, method, dtype)),
        stack)
  if method == "inverse":
    return (_damped_inverse(stack, damping, dtype),)
  vals, vecs = _eigh(stack, dtype)
  return vecs, vals


def assemble(a_parts: tuple, g_parts: tuple, damping, method: str,
             outer: bool) -> Decomposition:
  """A stack's decomposition from its A and G shares (``decompose_factor``)."""
  if method == "inverse":
    return Inverse(a_parts[0], g_parts[0])
  a_vecs, a_vals = a_parts if len(a_parts) == 2 else (None, a_parts[0])
  g_vecs, g_vals = g_parts
  if method == "ekfac":
    return EigenCorrected(a_vecs, g_vecs, g_vals[..., :, None] * a_vals[..., None, :])
  if outer:
    return EigenOuter(a_vecs, g_vecs, 1 / (g_vals[..., :, None] * a_vals[..., None, :] + damping))
  return Eigen(a_vecs, g_vecs, a_vals, g_vals)


def decompose(f: factors_lib.LayerFactors, damping, method: str, outer: bool,
              dtype, a_diagonal: bool = False) -> Decomposition:
  """Decomposes stacked factors, (blocks, n, n) each, in ``dtype`` (``inv_dtype``).

  Example:
    >>> f = LayerFactors(jnp.eye(3)[None], jnp.eye(2)[None])
    >>> decompose(f, 1e-3, "eigen", True, jnp.float32).inv_eigval_outer.shape
    (1, 2, 3)
  """
  return assemble(decompose_factor(f.a_factor, a_diagonal, damping, method, dtype),
                  decompose_factor(f.g_factor, False, damping, method, dtype),
                  damping, method, outer)


def decomposition_type(method: str, outer: bool) -> type:
  """The NamedTuple a layer's decomposition is kept in."""
  if method == "inverse":
    return Inverse
  if method == "ekfac":
    return EigenCorrected
  return EigenOuter if outer else Eigen


def field_shapes(kind: type, group: groups_lib.LayerGroup,
                 blocks: int) -> list[Optional[tuple[int, ...]]]:
  """The shape of each field of a ``kind`` decomposition of ``blocks`` of ``group``.

  None for a field that is not stored (the eigenvectors of a diagonal A).
  """
  a, g = group.a_stack_shape(blocks), group.g_stack_shape(blocks)
  shapes = {
      "a_eigvecs": None if group.a_diagonal else a,
      "g_eigvecs": g,
      "a_eigvals": a if group.a_diagonal else a[:-1],
      "g_eigvals": g[:-1],
      "inv_eigval_outer": group.grad_stack_shape(blocks),
      "scaling": group.grad_stack_shape(blocks),
      "a_inv": a,
      "g_inv": g,
  }
  return [shapes[field] for field in kind._fields]


def identity_decomposition(group: groups_lib.LayerGroup, blocks: int, damping,
                           method: str, outer: bool, dtype) -> Decomposition:
  """The decomposition of ``blocks`` identity factor blocks, written down without any solve."""
  kind = decomposition_type(method, outer)
  eye = lambda shape: jnp.broadcast_to(jnp.eye(shape[-1], dtype=dtype), shape)
  ones = lambda shape: jnp.ones(shape, dtype)
  fill = {"a_eigvecs": eye, "g_eigvecs": eye,
          "a_inv": lambda s: (ones(s) if group.a_diagonal else eye(s)) / (1 + damping),
          "g_inv": lambda s: eye(s) / (1 + damping),
          "inv_eigval_outer": lambda s: ones(s) / (1 + damping)}
  return kind(*[None if shape is None else fill.get(field, ones)(shape)
                for field, shape in zip(kind._fields, field_shapes(kind, group, blocks))])


def _checked_fields(d: Decomposition) -> list:
  """The fields whose finiteness decides a decomposition's: the eigenvalues (or what
  is made of them) for the eigen methods, the inverses for 'inverse'.

  jax's ``eigh`` returns NaN eigenvalues and eigenvectors together when LAPACK
  or cuSOLVER fails, so the (n,) values tell what the (n, n) vectors would,
  at a fraction of the reduction.
  """
  if isinstance(d, Eigen):
    return [d.a_eigvals, d.g_eigvals]
  if isinstance(d, EigenOuter):
    return [d.inv_eigval_outer]
  if isinstance(d, EigenCorrected):
    return [d.scaling]
  return [d.a_inv, d.g_inv]


def keep_finite_members(new: Decomposition, old: Decomposition,
                        member_blocks: tuple[int, ...]):
  """Per member (a run of blocks), ``new`` where it is finite, else ``old``.

  Args:
    new, old: decompositions of the same stack of ``sum(member_blocks)`` blocks.
    member_blocks: blocks of each member, in stack order.

  Returns:
    (kept, rejected): the decomposition, and the int32 count of members
    whose new decomposition was rejected.
  """
  block_ok = jnp.stack([jnp.all(jnp.isfinite(x), axis=tuple(range(1, x.ndim)))
                        for x in _checked_fields(new)]).all(axis=0)  # (blocks,)
  if any(b != 1 for b in member_blocks):
    segments = np.repeat(np.arange(len(member_blocks)), member_blocks)
    member_ok = jax.ops.segment_min(block_ok.astype(jnp.int32), segments,
                                    num_segments=len(member_blocks)) > 0
    block_ok = member_ok[segments]
  else:
    member_ok = block_ok
  kept = jax.tree.map(
      lambda n, o: jnp.where(block_ok.reshape((-1,) + (1,) * (n.ndim - 1)), n, o), new, old)
  return kept, jnp.sum(jnp.logical_not(member_ok)).astype(jnp.int32)


def precondition(d: Decomposition, grad: jax.Array, damping) -> jax.Array:
  """The preconditioned gradient matrices of a stack, in d's dtype.

  Args:
    d: the stack's decomposition.
    grad: (blocks, g, a) gradient matrices.
    damping: γ (unused by ``EigenOuter`` and ``Inverse``, whose damping was
      fixed when decomposing).

  Returns:
    (blocks, g, a).

  Example:
    >>> p = precondition(decompose(f, 1e-3, "eigen", True, jnp.float32), grads, 1e-3)
  """
  grad = grad.astype(jax.tree.leaves(d)[0].dtype)
  if isinstance(d, Inverse):
    out = d.g_inv @ grad
    return out * d.a_inv[..., None, :] if d.a_inv.ndim == 2 else out @ d.a_inv
  v = _transpose(d.g_eigvecs) @ grad
  if d.a_eigvecs is not None:
    v = v @ d.a_eigvecs
  if isinstance(d, EigenOuter):
    v = v * d.inv_eigval_outer
  elif isinstance(d, EigenCorrected):
    v = v / (d.scaling + damping)
  else:
    v = v / (d.g_eigvals[..., :, None] * d.a_eigvals[..., None, :] + damping)
  v = d.g_eigvecs @ v
  return v if d.a_eigvecs is None else v @ _transpose(d.a_eigvecs)
