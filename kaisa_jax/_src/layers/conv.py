"""The ``Conv`` kind: convolutions with any number of spatial dims, grouped included.

The activation rows are the im2col patches, gathered as windows of
the padded input and reduced a chunk of examples at a time.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from kaisa_jax._src.layers.base import Layer, UnsupportedLayer, _with_ones_column

# Conv patches are reduced in chunks of about this many bytes (see Conv.a_stats).
# The gathered windows and their matmul operand make a chunk's temporaries about
# twice this: at 4 MiB the step_time CNN's step at batch 1024 needed 34.8 MiB of
# temporaries, above glibc's 32 MiB mmap threshold, and page-faulted every step
# (8,400 faults, 1.24 x the FLOP floor); at 2 MiB, 31.5 MiB, none, 1.08 x.
_PATCH_CHUNK_BYTES = 2 * 2**20


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

    One gather of a (N, C, *kernel) window per output position from the
    padded input, channels moved first: pure data movement and one kernel,
    where ``lax.conv_general_dilated_patches`` would run a convolution with
    an identity kernel costing C·k/out times the layer's own forward pass
    (and a slice per kernel position would be a kernel each).
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
    x = jnp.moveaxis(x, -1, 1)  # (N, C, *padded): a window is channel-major
    starts = np.stack(np.meshgrid(*(np.arange(m) * s for m, s in zip(out, self.strides)),
                                  indexing="ij"), axis=-1).reshape(-1, n)
    windows = lax.gather(  # (N, S, C, *dilated)
        x, starts.astype(np.int32),
        lax.GatherDimensionNumbers(offset_dims=(0,) + tuple(range(2, n + 3)),
                                   collapsed_slice_dims=(),
                                   start_index_map=tuple(range(2, n + 2))),
        x.shape[:2] + dilated, mode=lax.GatherScatterMode.PROMISE_IN_BOUNDS)
    windows = windows[(Ellipsis,) + tuple(slice(None, None, d) for d in self.kernel_dilation)]
    return windows.reshape((x.shape[0],) + out + (-1,))

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
      if self.groups == 1:  # a plain aᵀa takes the patches in their layout, no transposed copy
        xtx = (a[:, 0].T @ a[:, 0])[None]
      else:
        xtx = jnp.einsum("rgi,rgj->gij", a, a)
      return (sums[0] + xtx, sums[1] + jnp.sum(a, axis=0)), None

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
