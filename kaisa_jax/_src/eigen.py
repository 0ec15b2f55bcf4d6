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

The A fields (``A_FIELDS``) have one block per A block of the stack, which
is fewer than its G blocks where layers share an input (``LayerGroup.a_index``
maps each G block to its A block); every other field has one per G block.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import numpy as np
from jax import lax

from kaisa_jax._src import cpu_threads
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
# Fields with one block per A block; the others have one per G block.
A_FIELDS = ("a_eigvecs", "a_eigvals", "a_inv")


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
  on_cpu = jax.default_backend() == "cpu"
  if on_cpu:
    cpu_threads.limit_lapack_threads()
  if stack.shape[0] > 1 and on_cpu:
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


def assemble(a_parts: tuple, g_parts: tuple, damping, method: str, outer: bool,
             a_index=None) -> Decomposition:
  """A stack's decomposition from its A and G shares (``decompose_factor``).

  ``a_index``: per G block, its A block (``LayerGroup.a_index``); None when
  they correspond one to one.
  """
  if method == "inverse":
    return Inverse(a_parts[0], g_parts[0])
  a_vecs, a_vals = a_parts if len(a_parts) == 2 else (None, a_parts[0])
  g_vecs, g_vals = g_parts
  if method == "eigen" and not outer:
    return Eigen(a_vecs, g_vecs, a_vals, g_vals)
  a_vals = a_vals if a_index is None else groups_lib.take_blocks(a_vals, a_index)
  products = g_vals[..., :, None] * a_vals[..., None, :]  # (blocks, g, a)
  if method == "ekfac":
    return EigenCorrected(a_vecs, g_vecs, products)
  return EigenOuter(a_vecs, g_vecs, 1 / (products + damping))


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


def field_shapes(kind: type, group: groups_lib.LayerGroup, blocks: Optional[int] = None,
                 a_blocks: Optional[int] = None) -> list[Optional[tuple[int, ...]]]:
  """The shape of each field of a ``kind`` decomposition of a stack of ``group``.

  ``blocks`` G blocks and ``a_blocks`` A blocks (the group's own by
  default). None for a field that is not stored (the eigenvectors of a
  diagonal A).
  """
  blocks = group.blocks if blocks is None else blocks
  a_blocks = group.a_blocks if a_blocks is None else a_blocks
  a, g = group.a_stack_shape(a_blocks), group.g_stack_shape(blocks)
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


def identity_decomposition(group: groups_lib.LayerGroup, damping, method: str, outer: bool,
                           dtype) -> Decomposition:
  """The decomposition of ``group``'s stack of identity factors, written down without any solve."""
  kind = decomposition_type(method, outer)
  eye = lambda shape: jnp.broadcast_to(jnp.eye(shape[-1], dtype=dtype), shape)
  ones = lambda shape: jnp.ones(shape, dtype)
  fill = {"a_eigvecs": eye, "g_eigvecs": eye,
          "a_inv": lambda s: (ones(s) if group.a_diagonal else eye(s)) / (1 + damping),
          "g_inv": lambda s: eye(s) / (1 + damping),
          "inv_eigval_outer": lambda s: ones(s) / (1 + damping)}
  return kind(*[None if shape is None else fill.get(field, ones)(shape)
                for field, shape in zip(kind._fields, field_shapes(kind, group))])


def select_blocks(d: Decomposition, blocks, a_blocks) -> Decomposition:
  """``d`` restricted to G blocks ``blocks`` and A blocks ``a_blocks`` (static indices)."""
  return type(d)(*[None if x is None else groups_lib.take_blocks(
      x, a_blocks if field in A_FIELDS else blocks) for field, x in zip(d._fields, d)])


def merge_blocks(pieces: list, blocks: list, a_blocks: list) -> Decomposition:
  """The decomposition of a whole stack from ``pieces`` of it (``select_blocks``'s inverse).

  ``blocks[i]`` / ``a_blocks[i]``: the G / A stack indices piece i holds.
  """
  first = pieces[0]
  return type(first)(*[
      None if first[k] is None else groups_lib.in_order(
          [p[k] for p in pieces], a_blocks if field in A_FIELDS else blocks)
      for k, field in enumerate(first._fields)])


def _checked_fields(d: Decomposition) -> list:
  """(field, value) pairs whose finiteness decides a decomposition's: the eigenvalues
  (or what is made of them) for the eigen methods, the inverses for 'inverse'.

  jax's ``eigh`` returns NaN eigenvalues and eigenvectors together when LAPACK
  or cuSOLVER fails, so the (n,) values tell what the (n, n) vectors would,
  at a fraction of the reduction.
  """
  if isinstance(d, Eigen):
    names = ("a_eigvals", "g_eigvals")
  elif isinstance(d, EigenOuter):
    names = ("inv_eigval_outer",)
  elif isinstance(d, EigenCorrected):
    names = ("scaling",)
  else:
    names = ("a_inv", "g_inv")
  return [(name, getattr(d, name)) for name in names]


def keep_finite_members(new: Decomposition, old: Decomposition, group: groups_lib.LayerGroup):
  """Per sharing set of ``group`` (a member and those using its A), ``new`` where it is
  finite, else ``old``.

  Args:
    new, old: decompositions of ``group``'s stack (e.g. a column's subset).
    group: the members the stack holds.

  Returns:
    (kept, rejected): the decomposition, and the int32 count of members
    whose new decomposition was rejected.
  """
  sets = np.asarray(group.sharing_sets())  # (members,)
  g_segments = np.repeat(sets, group.member_blocks)  # (blocks,)
  a_segments = np.repeat(np.arange(len(group.a_layers)), [l.blocks for l in group.a_layers])
  checks = [(jnp.all(jnp.isfinite(x), axis=tuple(range(1, x.ndim))),
             a_segments if field in A_FIELDS else g_segments)
            for field, x in _checked_fields(new)]
  if all(b == 1 for b in group.member_blocks) and not group.shares_a:
    set_ok = jnp.stack([ok for ok, _ in checks]).all(axis=0)  # a block per set: no segments
  else:
    set_ok = jnp.stack([jax.ops.segment_min(ok.astype(jnp.int32), segments,
                                            num_segments=len(group.a_layers)) > 0
                        for ok, segments in checks]).all(axis=0)  # (sets,)

  def keep(field, n, o):
    block_ok = set_ok[a_segments if field in A_FIELDS else g_segments]
    return jnp.where(block_ok.reshape((-1,) + (1,) * (n.ndim - 1)), n, o)

  kept = type(new)(*[None if n is None else keep(field, n, o)
                     for field, n, o in zip(new._fields, new, old)])
  return kept, jnp.sum(jnp.logical_not(set_ok[sets])).astype(jnp.int32)


def precondition(d: Decomposition, grad: jax.Array, damping, a_index=None) -> jax.Array:
  """The preconditioned gradient matrices of a stack, in d's dtype.

  Args:
    d: the stack's decomposition.
    grad: (blocks, g, a) gradient matrices.
    damping: γ (unused by ``EigenOuter`` and ``Inverse``, whose damping was
      fixed when decomposing).
    a_index: per G block, its block of d's A fields (``LayerGroup.a_index``);
      None when they correspond one to one.

  Returns:
    (blocks, g, a).

  Example:
    >>> p = precondition(decompose(f, 1e-3, "eigen", True, jnp.float32), grads, 1e-3)
  """
  if a_index is not None:
    d = select_blocks(d, range(grad.shape[0]), a_index)
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
