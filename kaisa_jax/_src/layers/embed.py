"""The ``Embed`` kind: a lookup table, whose activation factor A is diagonal."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp

from kaisa_jax._src.layers.base import Layer

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
