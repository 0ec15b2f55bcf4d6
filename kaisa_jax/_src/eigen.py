"""Eigen: decompose the Kronecker factors and precondition layer gradients.

For a layer with gradient matrix ∇ (g_size, a_size):
* eigen: ``A = QA diag(dA) QAᵀ``, ``G = QG diag(dG) QGᵀ`` (eigenvalues clamped
  at 0), ``P = QG [(QGᵀ ∇ QA) / (dG dAᵀ + damping)] QAᵀ``;
* inverse: ``P = (G + damping I)⁻¹ ∇ (A + damping I)⁻¹``.
"""

from __future__ import annotations

from typing import NamedTuple, Union

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl

from kaisa_jax._src import factors as factors_lib


class Eigen(NamedTuple):
  """Eigenbases and eigenvalues; damping is added when preconditioning.

  Shapes: a_eigvecs (a, a), g_eigvecs (g, g), a_eigvals (a,), g_eigvals (g,).
  """
  a_eigvecs: jax.Array
  g_eigvecs: jax.Array
  a_eigvals: jax.Array
  g_eigvals: jax.Array


class EigenOuter(NamedTuple):
  """Eigenbases and ``1 / (dG dAᵀ + damping)`` formed at decomposition time.

  Shapes: a_eigvecs (a, a), g_eigvecs (g, g), inv_eigval_outer (g, a).
  """
  a_eigvecs: jax.Array
  g_eigvecs: jax.Array
  inv_eigval_outer: jax.Array


class Inverse(NamedTuple):
  """Damped inverses: a_inv (a, a) = (A + damping I)⁻¹, g_inv (g, g)."""
  a_inv: jax.Array
  g_inv: jax.Array


Decomposition = Union[Eigen, EigenOuter, Inverse]
COMPUTE_METHODS = ("eigen", "inverse")


def _eigh(factor: jax.Array, dtype):
  vals, vecs = jnp.linalg.eigh(factor.astype(dtype))
  # float32 eigh gives small negative eigenvalues on rank-deficient factors.
  return jnp.maximum(vals, 0), vecs


def _damped_inverse(factor: jax.Array, damping, dtype) -> jax.Array:
  m = factor.astype(dtype)
  eye = jnp.eye(m.shape[0], dtype=dtype)
  return jsl.cho_solve(jsl.cho_factor(m + damping * eye, lower=True), eye)


def decompose_factor(factor: jax.Array, damping, method: str, dtype) -> tuple:
  """One factor's share of a decomposition, in ``dtype``.

  'eigen': (eigenvectors (n, n), eigenvalues (n,) clamped at 0); 'inverse':
  ((factor + damping I)⁻¹,). What an inverse worker computes and sends.
  """
  if method == "inverse":
    return (_damped_inverse(factor, damping, dtype),)
  vals, vecs = _eigh(factor, dtype)
  return vecs, vals


def assemble(a_parts: tuple, g_parts: tuple, damping, method: str,
             outer: bool) -> Decomposition:
  """A layer's decomposition from its A and G shares (``decompose_factor``)."""
  if method == "inverse":
    return Inverse(a_parts[0], g_parts[0])
  (a_vecs, a_vals), (g_vecs, g_vals) = a_parts, g_parts
  if outer:
    return EigenOuter(a_vecs, g_vecs, 1 / (jnp.outer(g_vals, a_vals) + damping))
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
  return EigenOuter if outer else Eigen


def field_shapes(kind: type, a_size: int, g_size: int) -> list[tuple[int, ...]]:
  """The shapes of the fields of a ``kind`` decomposition for factor sizes (a, g)."""
  dims = {"a": a_size, "g": g_size}
  return [tuple(dims[c] for c in _AXES[field]) for field in kind._fields]


# Which factor size each axis of each decomposition field has.
_AXES = {"a_eigvecs": "aa", "g_eigvecs": "gg", "a_eigvals": "a", "g_eigvals": "g",
         "inv_eigval_outer": "ga", "a_inv": "aa", "g_inv": "gg"}


def identity_decomposition(a_size: int, g_size: int, damping, method: str,
                           outer: bool, dtype) -> Decomposition:
  """The decomposition of identity factors, written down without any solve."""
  eye_a, eye_g = jnp.eye(a_size, dtype=dtype), jnp.eye(g_size, dtype=dtype)
  if method == "inverse":
    return Inverse(eye_a / (1 + damping), eye_g / (1 + damping))
  if outer:
    return EigenOuter(eye_a, eye_g, jnp.full((g_size, a_size), 1 / (1 + damping), dtype))
  return Eigen(eye_a, eye_g, jnp.ones(a_size, dtype), jnp.ones(g_size, dtype))


def keep_if_finite(new: Decomposition, old: Decomposition):
  """``(new, False)`` when every entry of ``new`` is finite, else ``(old, True)``."""
  ok = factors_lib.all_finite(new)
  kept = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
  return kept, jnp.logical_not(ok)


def precondition(d: Decomposition, grad: jax.Array, damping) -> jax.Array:
  """The preconditioned gradient matrix, (g, a) in, (g, a) out, in d's dtype."""
  grad = grad.astype(jax.tree.leaves(d)[0].dtype)
  if isinstance(d, Inverse):
    return d.g_inv @ grad @ d.a_inv
  v = d.g_eigvecs.T @ grad @ d.a_eigvecs
  if isinstance(d, EigenOuter):
    v = v * d.inv_eigval_outer
  else:
    v = v / (jnp.outer(d.g_eigvals, d.a_eigvals) + damping)
  return d.g_eigvecs @ v @ d.a_eigvecs.T
