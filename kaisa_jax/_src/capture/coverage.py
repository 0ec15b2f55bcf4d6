"""Coverage: which leaves of params the loss reads, and which no layer covers.

K-FAC preconditions the kernel and bias of each registered layer; every
other leaf of params follows the plain gradient. ``find_layers`` traces the
loss to a jaxpr and keeps the leaves the loss (its first output) depends on:
of those, the ones that are neither a registered layer's nor a skipped
layer's are *uncovered*, listed in the registry by path and shape so that
none follows the plain gradient unnoticed. A leaf the loss never reads has a
zero gradient and is not listed.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from jax.extend import core as jax_core

from kaisa_jax._src import layers as layers_lib
from kaisa_jax._src.capture.params import _leaf_name, _layer_name

try:
  # JAX's own dead-code elimination, which sees into the bodies of jit,
  # scan, cond and checkpoint. Not public: without it, the walk below.
  from jax._src.interpreters.partial_eval import dce_jaxpr as _dce_jaxpr
except ImportError:  # pragma: no cover (present in jax 0.9 to 0.10)
  _dce_jaxpr = None


def used_inputs(closed_jaxpr) -> list[bool]:
  """Per input of ``closed_jaxpr``, whether its first output depends on it."""
  jaxpr = closed_jaxpr.jaxpr
  wanted = [i == 0 for i in range(len(jaxpr.outvars))]
  if _dce_jaxpr is not None:
    try:
      return list(_dce_jaxpr(jaxpr, wanted)[1])
    except (TypeError, NotImplementedError):  # a signature or a primitive it does not know
      pass
  return read_inputs(jaxpr, wanted)


def read_inputs(jaxpr, wanted: Sequence[bool]) -> list[bool]:
  """``used_inputs`` without looking into nested jaxprs: an over-estimate.

  An equation one of whose outputs is needed (or that has effects) is taken
  to read all its inputs, so a jit or scan reads every operand it is given;
  a leaf is never missed, at worst listed although unread.
  """
  is_var = lambda v: isinstance(v, jax_core.Var)
  needed = {v for v, w in zip(jaxpr.outvars, wanted) if w and is_var(v)}
  for eqn in reversed(jaxpr.eqns):
    if eqn.effects or any(v in needed for v in eqn.outvars):
      needed.update(v for v in eqn.invars if is_var(v))
  return [v in needed for v in jaxpr.invars]


def coverage(flat_params, used: Sequence[bool], layers, skipped_paths: set,
             skipped_names: set) -> tuple[tuple, int, int]:
  """(uncovered leaves, entries in registered layers, entries left to the plain gradient).

  Args:
    flat_params: ``tree_flatten_with_path(params)[0]``, (key path, leaf) pairs.
    used: per leaf, whether the loss reads it.
    layers: the registered layers; their kernels and biases are covered.
    skipped_paths, skipped_names: the key paths of the skipped layers'
      parameters (where known), and the skipped layers' names: a leaf at
      one, or whose path without its own key is one, is a skipped layer's.

  Returns:
    The ``UncoveredParam`` of each leaf the loss reads that is neither a
    registered nor a skipped layer's, in params order; the entries of the
    registered layers' leaves; and those of the other leaves the loss reads
    (skipped and uncovered).
  """
  covered = {p for l in layers for p in (l.kernel_path, l.bias_path) if p is not None}
  uncovered, registered, plain = [], 0, 0
  for (path, leaf), read in zip(flat_params, used):
    shape = tuple(np.shape(leaf))
    if path in covered:
      registered += math.prod(shape)
    elif read:
      plain += math.prod(shape)
      if path not in skipped_paths and _layer_name(path) not in skipped_names:
        uncovered.append(layers_lib.UncoveredParam(_leaf_name(path), path, shape))
  return tuple(uncovered), registered, plain
