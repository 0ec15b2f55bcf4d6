"""Subsample: the factor statistics from a subset of each batch's examples.

K-FAC's batch factors cost about a forward and backward pass (measured: 0.9x
on a 4-layer MLP at batch 1024) for an estimate that a few hundred examples
already make well. With ``factor_subsample`` the factors (and EKFAC's
moments) are computed from ``k`` of each call's ``B`` examples, the gradient
still from all of them:

* strided (no seed): examples ``0, B/k, 2B/k, ...`` (``⌊iB/k⌋``), the same
  every step: for batches that are shuffled;
* random (a seed): ``k`` distinct examples drawn uniformly each step, from a
  key folded with the step, the micro-batch and the device.

Either way A and G are means over the chosen examples' rows, which
estimate the full batch's means without bias. With
``g_factor_scaling='per_example'``, where G is scaled by the batch size
squared, that size stays the full batch's ``B``.
"""

from __future__ import annotations

from typing import Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from kaisa_jax._src import capture as capture_lib
from kaisa_jax._src import layers as layers_lib


def check(size, seed) -> tuple[Optional[Union[int, float]], Optional[int]]:
  """``(factor_subsample, factor_subsample_seed)`` checked."""
  if size is not None:
    if isinstance(size, bool) or not isinstance(size, (int, float, np.integer, np.floating)):
      raise ValueError(
          f"factor_subsample must be a number of examples (int >= 1), a fraction of the "
          f"batch (float in (0, 1]) or None, got {size!r}.")
    if isinstance(size, (int, np.integer)):
      if size < 1:
        raise ValueError(f"factor_subsample must be at least 1 example, got {size}.")
      size = int(size)
    elif not 0 < size <= 1:
      raise ValueError(
          f"factor_subsample as a fraction must be in (0, 1], got {size!r}; pass an int "
          "for a number of examples.")
    else:
      size = float(size)
  if seed is not None:
    if size is None:
      raise ValueError("factor_subsample_seed is set but factor_subsample is None.")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
      raise ValueError(f"factor_subsample_seed must be an int or None, got {seed!r}.")
    seed = int(seed)
  return size, seed


def sample_size(size: Union[int, float], batch: int, layer: str) -> int:
  """How many of ``batch`` examples a layer's call keeps."""
  if isinstance(size, float):
    return max(1, round(size * batch))
  if size > batch:
    raise ValueError(
        f"factor_subsample={size} examples, but layer {layer!r} is called on a batch of "
        f"{batch}; pass at most {batch}, or a fraction.")
  return size


def strided_index(batch: int, size: int) -> np.ndarray:
  """``size`` examples of ``batch`` spread evenly: ``⌊i · batch / size⌋``, (size,)."""
  return np.arange(size) * batch // size


def random_index(key: jax.Array, batch: int, size: int) -> jax.Array:
  """``size`` distinct examples of ``batch``, uniformly drawn, (size,) int32.

  Example:
    >>> random_index(jax.random.key(0), 8, 3).shape
    (3,)
  """
  return jax.random.permutation(key, batch)[:size].astype(jnp.int32)


def subsample_capture(layer: layers_lib.Layer, capture: capture_lib.LayerCapture,
                      size: Union[int, float], key: Optional[jax.Array],
                      per_example: bool) -> capture_lib.LayerCapture:
  """``capture`` with each call's examples cut to a subsample (see the module docstring).

  Args:
    layer: the layer (its ``example_axis`` is the batch axis of its captures).
    capture: its ``LayerCapture``: per call inputs (B, ...) and output
      gradients (B, ...), (length, B, ...) inside a scan.
    size: examples to keep (int) or a fraction of B (float).
    key: None for strided examples, else the key of this step's random draw.
    per_example: ``g_factor_scaling='per_example'``: the output gradients
      are multiplied by B / k, so that G's B² scaling stays the full
      batch's (k² (B/k)² = B²).

  Returns:
    A ``LayerCapture`` of k examples per call.
  """
  axis = layer.example_axis
  inputs, out_grads = [], []
  for x, g in zip(capture.inputs, capture.out_grads):
    batch = x.shape[axis]
    k = sample_size(size, batch, layer.name)
    if k == batch:
      inputs.append(x)
      out_grads.append(g)
      continue
    index = strided_index(batch, k) if key is None else random_index(key, batch, k)
    inputs.append(jnp.take(x, index, axis=axis))
    g = jnp.take(g, index, axis=axis)
    out_grads.append(g * (batch / k) if per_example else g)
  return capture_lib.LayerCapture(tuple(inputs), tuple(out_grads))
