"""Eigen: decompose the Kronecker factors and precondition layer gradients.

For a layer with gradient matrix ∇ (g_size, a_size):
* eigen: ``A = QA diag(dA) QAᵀ``, ``G = QG diag(dG) QGᵀ`` (eigenvalues clamped
  at 0), ``P = QG [(QGᵀ ∇ QA) / (dG dAᵀ + damping)] QAᵀ``;
* inverse: ``P = (G + damping I)⁻¹ ∇ (A + damping I)⁻¹``;
* ekfac (George et al., NeurIPS 2018): as eigen, with a running estimate S
  of the second moment of the per-row gradients in the Kronecker eigenbasis
  in place of ``dG dAᵀ``: ``P = QG [(QGᵀ ∇ QA) / (S + damping)] QAᵀ``.

Layers with several blocks carry a leading blocks axis on every array and
are preconditioned block by block. A diagonal A (Embed) is its own
eigendecomposition: ``QA`` is the identity and is not stored (None).
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
from jax import lax

from kaisa_jax._src import factors as factors_lib
from kaisa_jax._src import layers as layers_lib


class Eigen(NamedTuple):
  """Eigenbases and eigenvalues; damping is added when preconditioning.

  Shapes: a_eigvecs (a, a), g_eigvecs (g, g), a_eigvals (a,), g_eigvals (g,),
  each with a leading blocks axis for a layer with several blocks;
  a_eigvecs is None when A is diagonal.
  """
  a_eigvecs: Optional[jax.Array]
  g_eigvecs: jax.Array
  a_eigvals: jax.Array
  g_eigvals: jax.Array


class EigenOuter(NamedTuple):
  """Eigenbases and ``1 / (dG dAᵀ + damping)`` formed at decomposition time.

  Shapes: a_eigvecs (a, a) (None when A is diagonal), g_eigvecs (g, g),
  inv_eigval_outer (g, a); with a leading blocks axis for several blocks.
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
  """Damped inverses: a_inv (a, a) = (A + damping I)⁻¹ ((a,) when A is
  diagonal), g_inv (g, g); with a leading blocks axis for several blocks."""
  a_inv: jax.Array
  g_inv: jax.Array


Decomposition = Union[Eigen, EigenOuter, EigenCorrected, Inverse]
COMPUTE_METHODS = ("eigen", "inverse", "ekfac")


def _transpose(m: jax.Array) -> jax.Array:
  return jnp.swapaxes(m, -1, -2)


def _eigh(factor: jax.Array, dtype):
  vals, vecs = jnp.linalg.eigh(factor.astype(dtype))
  # float32 eigh gives small negative eigenvalues on rank-deficient factors.
  return jnp.maximum(vals, 0), vecs


def _damped_inverse(factor: jax.Array, damping, dtype) -> jax.Array:
  m = factor.astype(dtype)
  if m.ndim == 1:
    return 1 / (m + damping)
  eye = jnp.broadcast_to(jnp.eye(m.shape[-1], dtype=dtype), m.shape)
  return jsl.cho_solve((jnp.linalg.cholesky(m + damping * eye), True), eye)


def decompose_factor(factor: jax.Array, damping, method: str, dtype) -> tuple:
  """One factor's share of a decomposition, in ``dtype``.

  'eigen': (eigenvectors (n, n), eigenvalues (n,) clamped at 0), or
  (eigenvalues,) for a diagonal (n,) factor; 'inverse': ((factor + damping
  I)⁻¹,). Blocks (a leading axis) are decomposed independently. What an
  inverse worker computes and sends.
  """
  if factor.ndim == 3 and jax.default_backend() == "cpu":
    # jaxlib's CPU LAPACK kernels split a batch over XLA's intra-op thread
    # pool and block until its pieces are done: as many batched
    # decompositions running at once as the pool has threads deadlock
    # (measured: two on a 2-core machine, jax 0.10). One block at a time
    # instead, in a loop XLA runs sequentially.
    return lax.map(lambda block: decompose_factor(block, damping, method, dtype), factor)
  if method == "inverse":
    return (_damped_inverse(factor, damping, dtype),)
  if factor.ndim == 1:
    return (jnp.maximum(factor.astype(dtype), 0),)
  vals, vecs = _eigh(factor, dtype)
  return vecs, vals


def assemble(a_parts: tuple, g_parts: tuple, damping, method: str,
             outer: bool) -> Decomposition:
  """A layer's decomposition from its A and G shares (``decompose_factor``)."""
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
              dtype) -> Decomposition:
  """Decomposes one layer's factors in ``dtype`` (``inv_dtype``)."""
  return assemble(decompose_factor(f.a_factor, damping, method, dtype),
                  decompose_factor(f.g_factor, damping, method, dtype),
                  damping, method, outer)


def decomposition_type(method: str, outer: bool) -> type:
  """The NamedTuple a layer's decomposition is kept in."""
  if method == "inverse":
    return Inverse
  if method == "ekfac":
    return EigenCorrected
  return EigenOuter if outer else Eigen


def field_shapes(kind: type, a: layers_lib.FactorShape,
                 g: layers_lib.FactorShape) -> list[Optional[tuple[int, ...]]]:
  """The shape of each field of a ``kind`` decomposition (None: not stored)."""
  shapes = {
      "a_eigvecs": None if a.diagonal else a.shape,
      "g_eigvecs": g.shape,
      "a_eigvals": a.shape if a.diagonal else a.shape[:-1],
      "g_eigvals": g.shape[:-1],
      "inv_eigval_outer": g.shape[:-1] + (a.size,),
      "scaling": g.shape[:-1] + (a.size,),
      "a_inv": a.shape,
      "g_inv": g.shape,
  }
  return [shapes[field] for field in kind._fields]


def identity_decomposition(a: layers_lib.FactorShape, g: layers_lib.FactorShape, damping,
                           method: str, outer: bool, dtype) -> Decomposition:
  """The decomposition of identity factors, written down without any solve."""
  if method == "inverse":
    return Inverse(a.identity(dtype) / (1 + damping), g.identity(dtype) / (1 + damping))
  kind = decomposition_type(method, outer)
  fill = {"a_eigvecs": a.identity(dtype), "g_eigvecs": g.identity(dtype),
          "inv_eigval_outer": 1 / (1 + damping), "scaling": 1}
  return kind(*[None if shape is None else
                jnp.broadcast_to(jnp.asarray(fill.get(field, 1), dtype), shape)
                for field, shape in zip(kind._fields, field_shapes(kind, a, g))])


def keep_if_finite(new: Decomposition, old: Decomposition):
  """``(new, False)`` when every entry of ``new`` is finite, else ``(old, True)``."""
  ok = factors_lib.all_finite(new)
  kept = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
  return kept, jnp.logical_not(ok)


def precondition(d: Decomposition, grad: jax.Array, damping) -> jax.Array:
  """The preconditioned gradient matrix, (g, a) in, (g, a) out, in d's dtype.

  With several blocks both are (blocks, g, a).
  """
  grad = grad.astype(jax.tree.leaves(d)[0].dtype)
  if isinstance(d, Inverse):
    out = d.g_inv @ grad
    return out * d.a_inv if d.a_inv.ndim == 1 else out @ d.a_inv
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
