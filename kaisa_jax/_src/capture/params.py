"""Params: where a layer's parameters sit in the params pytree the loss was given.

A layer is named after the key path of its kernel in ``params``. The kernel
is found by identity, or, for the copy a transform hands the layer, by its
scope path (linen) or the path its Variable was marked with (NNX); inside a
scan its leaf may carry one more, stacking axis.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax

from kaisa_jax._src import layers as layers_lib
from kaisa_jax._src.capture import nnx as nnx_capture


class _ParamIndex:
  """Finds a layer's kernel and bias in the params pytree the loss was given.

  A layer is named after where its kernel lives in ``params`` (not after its
  Flax scope, which two models applied in one loss share): the kernel leaf is
  recognised by identity, or, when a transform hands the layer its own copy,
  by its scope path under the prefix where its ``apply``'s parameters sit
  in ``params`` (linen: ``nn.remat``, ``nn.scan``), or by the path its
  Variable was marked with (NNX: ``nnx.remat``, ``nnx.scan``).
  """

  # Where a linen model's parameters sit when no prefix is known: params is
  # the model's 'params' collection, or its whole variables dict.
  DEFAULT_PREFIXES = ((), (jax.tree_util.DictKey("params"),))

  def __init__(self, params):
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    self._by_id = {id(leaf): path for path, leaf in flat}
    self._by_path = {path: leaf for path, leaf in flat}

  def path_of(self, leaf):
    """The key path of ``leaf`` (by identity) in params, or None."""
    return self._by_id.get(id(leaf))

  def leaf(self, path):
    return self._by_path[path]

  def module_paths(self, module) -> set:
    """The key paths in params of the module's own parameters that can be found.

    By identity, or for an NNX Variable by the path it was marked with; a
    linen module's copies under a lifted transform are not found.
    """
    if nnx_capture.is_nnx(module):
      found = {self.path_of(value) or path for value, path in nnx_capture.own_params(module)}
    else:
      own = module.scope.variables().get("params", {}) if module.scope else {}
      found = {self.path_of(leaf) for leaf in jax.tree_util.tree_leaves(own)}
    return found - {None}

  def _scope_paths(self, module: nn.Module, name: str, prefixes):
    """(path, leaf) at each prefix + the module's scope path + name that exists."""
    if nnx_capture.is_nnx(module):
      # NNX modules have no scope: a copy made by nnx.remat or nnx.scan
      # carries the path of its leaf, whatever the prefixes.
      path = nnx_capture.marked_path(module, name)
      leaf = None if path is None else self._by_path.get(path)
      return [] if leaf is None else [(path, leaf)]
    scope = tuple(jax.tree_util.DictKey(p) for p in module.scope.path)
    found = []
    for prefix in prefixes:
      path = tuple(prefix) + scope + (jax.tree_util.DictKey(name),)
      leaf = self._by_path.get(path)
      if leaf is not None:
        found.append((path, leaf))
    return found

  def _by_scope(self, module: nn.Module, name: str, like, prefixes):
    if like is None:
      return None
    for path, leaf in self._scope_paths(module, name, prefixes):
      if tuple(leaf.shape) == tuple(like.shape):
        return path
    return None

  def locate(self, module: nn.Module, prefixes=DEFAULT_PREFIXES):
    """(name, kernel_path, bias_path, kernel) of the module's call, or None.

    The kernel and bias are the parameters the module's layer kind names
    (``kernel_param``, ``bias_param``: e.g. 'embedding' for Embed, 'scale'
    and 'bias' for LayerNorm).
    """
    kind = layers_lib.kind_of(module)
    kernel = _module_param(module, kind.kernel_param)
    bias = _module_param(module, kind.bias_param)
    if kernel is None:
      return None
    kernel_path = (self.path_of(kernel)
                   or self._by_scope(module, kind.kernel_param, kernel, prefixes))
    bias_path = None
    if bias is not None:
      bias_path = self.path_of(bias) or self._by_scope(module, kind.bias_param, bias, prefixes)
    if kernel_path is None or (bias is not None and bias_path is None):
      return None
    return _layer_name(kernel_path), kernel_path, bias_path, kernel

  def stacked(self, module: nn.Module, prefixes, length: Optional[int]) -> list:
    """Where params holds the module's parameters with one more, stacking axis.

    That is a layer inside ``nn.scan`` (or ``nn.vmap``) with
    ``variable_axes={'params': axis}``: iteration t applies slice t of each
    leaf. Returns every candidate (kernel_path, bias_path, axis) whose
    kernel (and bias) leaf is the module's with ``length`` slices inserted at
    ``axis`` (any length when None): one for an unambiguous layer.
    """
    kind = layers_lib.kind_of(module)
    kernel = _module_param(module, kind.kernel_param)
    bias = _module_param(module, kind.bias_param)
    if kernel is None:
      return []
    candidates = []
    for kernel_path, leaf in self._scope_paths(module, kind.kernel_param, prefixes):
      for axis in _stacking_axes(leaf.shape, kernel.shape, length):
        if bias is None:
          candidates.append((kernel_path, None, axis))
          continue
        candidates += [(kernel_path, bias_path, axis)
                       for bias_path, bias_leaf in self._scope_paths(
                           module, kind.bias_param, prefixes)
                       if axis in _stacking_axes(bias_leaf.shape, bias.shape, length)]
    return candidates


def _stacking_axes(stacked_shape, shape, length: Optional[int]) -> list[int]:
  """The axes i such that ``stacked_shape`` is ``shape`` with ``length`` inserted at i."""
  stacked_shape, shape = tuple(stacked_shape), tuple(shape)
  if len(stacked_shape) != len(shape) + 1:
    return []
  return [i for i in range(len(stacked_shape))
          if stacked_shape[:i] + stacked_shape[i + 1:] == shape
          and (length is None or stacked_shape[i] == length)]


def _layer_name(kernel_path) -> str:
  """The kernel's key path without the parameter's own key, joined by '/'.

  A leaf of an ``nnx.State`` is its Variable's ``.value``: that key is
  dropped too, so that ``['l1']['kernel'].value`` names layer 'l1', as the
  pure dict ``['l1']['kernel']`` does.
  """
  return "/".join(_keys(kernel_path)[:-1])


def _leaf_name(path) -> str:
  """A leaf's whole key path joined by '/', e.g. 'Block_0/scale' ('.value' dropped)."""
  return "/".join(_keys(path))


def _keys(path) -> list[str]:
  path = tuple(path)
  if path and path[-1] == jax.tree_util.GetAttrKey("value"):
    path = path[:-1]
  return [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]


def _module_param(module: nn.Module, name):
  """The module's parameter ``name`` as the loss sees it, or None (no such parameter)."""
  if name is None:
    return None
  if nnx_capture.is_nnx(module):
    return nnx_capture.param_value(module, name)
  return module.scope.get_variable("params", name)


def _scope_name(module: nn.Module) -> str:
  if nnx_capture.is_nnx(module):
    return nnx_capture.describe(module)
  return "/".join(str(p) for p in module.scope.path)
