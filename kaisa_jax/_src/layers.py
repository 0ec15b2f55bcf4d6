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

Adding a layer kind means adding one class here and listing it in
``LAYER_KINDS``.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

KeyPath = tuple  # a jax key path into the params pytree

# Conv patches are reduced in chunks of about this many bytes (see Conv.a_stats).
_PATCH_CHUNK_BYTES = 4 * 2**20


def _block_covariance(x: jax.Array, with_ones: bool) -> jax.Array:
  """``aᵀa`` for ``a = [x, 1]`` (ones column only if ``with_ones``), no copy of x.

  x: (rows, n). Returns (n [+1], n [+1]).
  """
  return _with_ones_column(x.T @ x, jnp.sum(x, axis=0), x.shape[0], with_ones)


def _with_ones_column(xtx, col_sums, rows: int, with_ones: bool) -> jax.Array:
  """Borders ``xᵀx`` (n, n) with the column sums and the row count: ``[x, 1]ᵀ[x, 1]``."""
  if not with_ones:
    return xtx
  rows = jnp.asarray(rows, xtx.dtype)
  top = jnp.concatenate([xtx, col_sums[:, None]], axis=1)
  bottom = jnp.concatenate([col_sums, rows[None]])[None, :]
  return jnp.concatenate([top, bottom], axis=0)


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

  @property
  def has_bias(self) -> bool:
    return self.bias_path is not None

  @property
  def a_size(self) -> int:
    raise NotImplementedError

  @property
  def g_size(self) -> int:
    raise NotImplementedError

  def kernel_matrix(self, kernel) -> jax.Array:
    """The kernel as a (g_size, a_size - bias) matrix."""
    raise NotImplementedError

  def kernel_from_matrix(self, mat) -> jax.Array:
    """The inverse of ``kernel_matrix``."""
    raise NotImplementedError

  def grad_matrix(self, kernel, bias) -> jax.Array:
    """(g_size, a_size): the kernel matrix with the bias as the last column."""
    mat = self.kernel_matrix(kernel)
    if self.has_bias:
      mat = jnp.concatenate([mat, bias[:, None]], axis=1)
    return mat

  def from_matrix(self, mat) -> tuple[jax.Array, Optional[jax.Array]]:
    """(kernel, bias or None) from a (g_size, a_size) matrix."""
    if self.has_bias:
      return self.kernel_from_matrix(mat[:, :-1]), mat[:, -1]
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

  @property
  def a_size(self) -> int:
    return self.kernel_shape[0] + int(self.has_bias)

  @property
  def g_size(self) -> int:
    return self.kernel_shape[1]

  @classmethod
  def matches(cls, module: nn.Module) -> bool:
    return isinstance(module, nn.Dense)

  @classmethod
  def from_call(cls, module, name, kernel_path, bias_path, kernel_shape,
                inputs, outputs) -> "Dense":
    del module, inputs, outputs
    return cls(name, kernel_path, bias_path, tuple(kernel_shape))

  def _rows(self, x: jax.Array, combine) -> jax.Array:
    """(batch, *positions, n) -> the (rows, n) matrix the factor is made of."""
    if self.weight_sharing == "reduce" and x.ndim > 2:
      return combine(x.reshape(x.shape[0], -1, x.shape[-1]), axis=1)
    return x.reshape(-1, x.shape[-1])

  def a_stats(self, inputs: jax.Array, dtype) -> tuple[jax.Array, int]:
    x = self._rows(inputs.astype(dtype), jnp.mean)
    return _block_covariance(x, self.has_bias), x.shape[0]

  def g_stats(self, out_grads: jax.Array, dtype) -> tuple[jax.Array, int]:
    g = self._rows(out_grads.astype(dtype), jnp.sum)
    return g.T @ g, g.shape[0]

  def kernel_matrix(self, kernel) -> jax.Array:
    return kernel.T  # (in, out) -> (out, in)

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
    raise ValueError(f"layer {name!r}: unknown padding {padding!r}.")
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

  kernel: (*kernel_size, in_channels, out_channels). The activation rows are
  the im2col patches, ordered channel-major (channel, then kernel position),
  the order of PyTorch's (out, in, *kernel) weight flattening.
  """
  strides: tuple[int, ...] = ()
  padding: Any = "SAME"  # 'SAME', 'VALID', 'SAME_LOWER' or ((lo, hi), ...)
  circular: bool = False
  input_dilation: tuple[int, ...] = ()
  kernel_dilation: tuple[int, ...] = ()

  kind = "conv"

  @property
  def kernel_size(self) -> tuple[int, ...]:
    return self.kernel_shape[:-2]

  @property
  def a_size(self) -> int:
    return math.prod(self.kernel_shape[:-1]) + int(self.has_bias)

  @property
  def g_size(self) -> int:
    return self.kernel_shape[-1]

  @classmethod
  def matches(cls, module: nn.Module) -> bool:
    return isinstance(module, nn.Conv)

  @classmethod
  def from_call(cls, module, name, kernel_path, bias_path, kernel_shape,
                inputs, outputs) -> "Conv":
    if module.feature_group_count != 1:
      raise UnsupportedLayer(
          f"grouped convolution (feature_group_count={module.feature_group_count})")
    if getattr(module, "mask", None) is not None:
      raise UnsupportedLayer("masked convolution")
    n = len(kernel_shape) - 2
    kernel_dilation = _as_tuple(module.kernel_dilation, n)
    padding, circular = _canonical_padding(
        module.padding, kernel_shape[:-2], kernel_dilation, name)
    layer = cls(name, kernel_path, bias_path, tuple(kernel_shape),
                strides=_as_tuple(module.strides, n), padding=padding,
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

    def reduce_chunk(sums, chunk):
      a = self._patches(chunk).reshape(-1, features)  # (chunk*S, C*k)
      return (sums[0] + a.T @ a, sums[1] + jnp.sum(a, axis=0)), None

    zeros = (jnp.zeros((features, features), dtype), jnp.zeros((features,), dtype))
    if chunks == 1:
      (xtx, col_sums), _ = reduce_chunk(zeros, x)
    else:
      x = jnp.pad(x, ((0, chunks * per_chunk - examples),) + ((0, 0),) * (n + 1))
      (xtx, col_sums), _ = lax.scan(reduce_chunk, zeros,
                                    x.reshape((chunks, per_chunk) + x.shape[1:]))
    rows = examples * positions
    # The reference divides the patches (and the ones column) by S.
    cov = _with_ones_column(xtx, col_sums, rows, self.has_bias) / (positions * positions)
    return cov, rows

  def g_stats(self, out_grads: jax.Array, dtype) -> tuple[jax.Array, int]:
    n = len(self.kernel_size)
    positions = math.prod(out_grads.shape[-n - 1:-1])
    g = out_grads.reshape(-1, out_grads.shape[-1]).astype(dtype)
    return (g.T @ g) / (positions * positions), g.shape[0]

  def kernel_matrix(self, kernel) -> jax.Array:
    n = len(self.kernel_size)
    # (*k, C, O) -> (O, C, *k) -> (O, C * prod(k)), channel-major like the patches.
    mat = jnp.transpose(kernel, (n + 1, n) + tuple(range(n)))
    return mat.reshape(mat.shape[0], -1)

  def kernel_from_matrix(self, mat) -> jax.Array:
    n = len(self.kernel_size)
    out_ch, in_ch = self.kernel_shape[-1], self.kernel_shape[-2]
    kernel = mat.reshape((out_ch, in_ch) + self.kernel_size)
    return jnp.transpose(kernel, tuple(range(2, n + 2)) + (1, 0))


class UnsupportedLayer(Exception):
  """Raised by ``from_call`` for a module of a known class in an unsupported configuration."""


@dataclasses.dataclass(frozen=True)
class Skipped:
  """A Flax layer that was found but that K-FAC cannot precondition (yet)."""
  name: str
  module_type: str
  reason: str


LAYER_KINDS = (Dense, Conv)


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
    rows += [(l.name, l.kind, str(l.a_size), str(l.g_size)) for l in self.layers]
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
