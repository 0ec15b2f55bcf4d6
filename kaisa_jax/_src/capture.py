"""Capture: what the Flax calls of a loss give K-FAC.

A Flax method interceptor sees every supported layer call. To find the layers
it records static facts; to capture, it records each call's input and adds a
zero "probe" to its output, so that the gradient of the loss with respect to
the probe is the gradient with respect to the layer output. Probes are named
per call, so a module called twice gets both calls' rows, not their sum.

Calls made inside ``jax.checkpoint`` (``nn.remat``, ``nn.checkpoint``,
``nnx.remat``) run once per forward pass, like the others, but their inputs
are values of the checkpoint's own trace, which must not be kept. Their
inputs come back through the differentiation instead: an identity with a
custom VJP on the layer output hands the layer input to the backward pass,
which returns it as the gradient of a zero "input probe" closed over from
the loss's trace. A scan runs its body several times: each scan is given
stacked probes to scan over, one slice per iteration (``loops.py``). Calls
inside other loops and ``vmap`` cannot be told apart by one probe: their
layers are listed as skipped, with the reason.
"""

from __future__ import annotations

import collections
import contextlib
import inspect
from typing import Any, Callable, NamedTuple, Optional

import flax.linen as nn
import jax
# The chain of traces (``parent_trace``) and what opened each one are not
# public; flax.core.tracers reads the same state.
from jax._src import core as jax_core
import jax.numpy as jnp
from jax import lax
import numpy as np

from kaisa_jax._src import collectives
from kaisa_jax._src import fisher as fisher_lib
from kaisa_jax._src import layers as layers_lib
from kaisa_jax._src import loops
from kaisa_jax._src import nnx_capture
from kaisa_jax._src import scanned


class LayerCapture(NamedTuple):
  """What one layer saw in one loss evaluation, one entry per call.

  Attributes:
    inputs: per call, the layer input, e.g. (batch, in) for Dense; for a
      call inside a scan, every iteration's, (length, batch, in).
    out_grads: per call, d loss / d output, same shape as the layer output
      (with the iterations first inside a scan).
  """
  inputs: tuple
  out_grads: tuple


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
  path = tuple(kernel_path)
  if path and path[-1] == jax.tree_util.GetAttrKey("value"):
    path = path[:-1]
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path[:-1])


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


@contextlib.contextmanager
def _intercept_layers(interceptor, loss_trace: "_LossTrace"):
  """``interceptor`` on the module calls of both Flax APIs, linen and NNX.

  ``loss_trace.track`` runs first on linen calls, to know the module calls
  each call is nested in.
  """
  with nn.intercept_methods(loss_trace.track), nn.intercept_methods(interceptor), \
       nnx_capture.intercept_methods(interceptor), loss_trace.hook.installed(), \
       nnx_capture.paths_marked(loss_trace.params, loss_trace.index.path_of):
    yield


def _call_input(args, kwargs):
  if args:
    return args[0]
  return kwargs["inputs"]


def _call_arguments(module, args, kwargs) -> dict:
  """The call's arguments after the input, by name, positional ones included.

  A kind reads its call's options (``mask``, ``use_running_average``,
  ``einsum_str``) from them, however they were passed.
  """
  try:
    bound = inspect.signature(type(module).__call__).bind(module, *args, **kwargs)
  except (TypeError, ValueError):  # no readable signature: the keywords alone
    return dict(kwargs)
  named = list(bound.arguments.items())[2:]  # after self and the input
  arguments = {}
  for name, value in named:
    kind = bound.signature.parameters[name].kind
    if kind == inspect.Parameter.VAR_KEYWORD:
      arguments.update(value)
    elif kind != inspect.Parameter.VAR_POSITIONAL:
      arguments[name] = value
  return arguments


def _unsupported_call(context):
  """Why this call makes its module impossible to precondition, or None.

  A Flax layer with parameters that no kind handles, or a supported layer's
  method other than ``__call__`` that uses its kernel (``Embed.attend``):
  the factors would miss that use of the kernel.
  """
  module = context.module
  kind = layers_lib.kind_of(module)
  if kind is None:
    return layers_lib.unsupported_reason(module)
  if context.method_name in kind.other_kernel_methods:
    return (f"{type(module).__name__}.{context.method_name} uses the {kind.kernel_param} "
            "too (e.g. tied embeddings), which its factors would not see")
  return None


def _is_layer_call(context) -> bool:
  return (context.method_name == "__call__"
          and layers_lib.kind_of(context.module) is not None)


# What DebugInfo.traced_for says of the trace jax.checkpoint opens (nn.remat,
# nn.checkpoint, nnx.remat): its body runs once per forward pass.
_CHECKPOINT = "checkpoint / remat"
_LOOPS = ("scan", "fori_loop", "while_body", "while_cond")

# Integer inputs (token ids) come back through a float32 gradient: exact for
# integers of at most 16 bits, and for the ids of a table of at most 2**24
# rows (an id out of range, rounded, stays out of range).
_MAX_EXACT_IDS = 2**24

_STACKED_REASON = (
    "called inside nn.vmap with stacked parameters (variable_axes={'params': ...}): "
    "one K-FAC block per mapped slice of the kernel is not supported")
_LOOP_REASON = (
    "called inside a loop that does not call jax.lax.scan (fori_loop, while_loop, "
    "a scan imported by name): one call per iteration, which a single probe "
    "cannot tell apart")
_NESTED_LOOPS_REASON = (
    "called inside a scan inside a scan: only layers of one scan level are captured")
_MIXED_REASON = (
    "called both inside and outside a scan (or with differently stacked "
    "parameters): its captures would not have one layout")
_AMBIGUOUS_STACK_REASON = (
    "called inside a scan with stacked parameters whose stacking axis is "
    "ambiguous (the scan length equals another dimension of the kernel)")
_VMAP_REASON = (
    "called inside vmap (nn.vmap, nnx.vmap, jax.vmap): one call per mapped "
    "element, which a single probe cannot tell apart")
_NNX_COPY_REASON = (
    "called inside a JAX transform (nnx.remat, nnx.scan) that hands the layer "
    "a copy of its parameters (Flax NNX), which cannot be traced to a leaf of "
    "params: pass params as the nnx.State of nnx.split (not a pure dict), "
    "whose Variables carry their paths through the transform")
_UNMATCHED_REASON = (
    "called inside jax.checkpoint (nn.remat) or a scan, and its kernel is not "
    "at its scope path in params, whole or stacked")
_IDS_REASON = (
    "called inside jax.checkpoint or a scan with integer inputs that a float32 gradient "
    "cannot give back exactly (only 16-bit integers, or the ids of an embedding "
    "table of at most 2**24 rows)")


def _trace_label(trace) -> str:
  """What opened ``trace``: e.g. 'checkpoint / remat', 'scan', 'jit' or 'vmap'."""
  frame = getattr(trace, "frame", None)
  traced_for = getattr(getattr(frame, "debug_info", None), "traced_for", None)
  if traced_for:
    return _PARTIAL_EVAL if traced_for == _FLAX_LOOK_AHEAD else str(traced_for)
  kind = type(trace).__name__
  return {"BatchTrace": "vmap", "JaxprTrace": _PARTIAL_EVAL}.get(kind, kind)


# nn.scan traces its body once by partial evaluation before the scan, to
# check which outputs are loop invariants, and drops the layer outputs of
# that trace: calls under it are ignored when the layer has other calls.
# jax 0.9-0.10 give that trace no debug info (a bare JaxprTrace); jax 0.11.2
# (with flax 0.12.10) makes it a DynamicJaxprTrace named by flax.
_PARTIAL_EVAL = "partial evaluation"
_FLAX_LOOK_AHEAD = "flax scan"


def _nested_reason(labels) -> tuple[str, bool]:
  """(why a call nested in these transforms is skipped, whether that is final).

  A reason naming no known transform is not final: a later, more precise
  one replaces it.
  """
  if labels is None:
    return "called inside a JAX transform the capture cannot see through", False
  if any(label in _LOOPS for label in labels):
    return _LOOP_REASON, True
  if "vmap" in labels:
    return _VMAP_REASON, True
  others = ", ".join(dict.fromkeys(l for l in labels if l != _CHECKPOINT))
  return f"called inside a JAX transform other than jax.checkpoint ({others})", False


class _Site(NamedTuple):
  """Where one layer call sits, as the capture sees it.

  Attributes:
    name: the layer's name (its kernel's path in params without the leaf),
      or, for a kernel that is no leaf of params, a descriptive name.
    located: (name, kernel_path, bias_path, kernel), or None.
    how: 'direct' (in the loss's own trace: the input is recorded),
      'checkpoint' (inside jax.checkpoint only: the input comes back as the
      gradient of an input probe), 'scan' (inside one scan, and maybe
      jax.checkpoint: probes and input come per iteration, stacked), 'skip',
      or 'ignore' (nn.scan's look-ahead trace, whose outputs are dropped).
    reason: why 'skip' or 'ignore'; ``final`` False when a later reason may
      replace it.
    frame: the ``loops.Frame`` of a 'scan' call.
    stacked_axis: for a 'scan' call, the axis of the kernel leaf indexing
      the iterations, or None when they share the kernel.
    emit: a 'scan' call whose scan runs in the loss's own trace (no
      jax.checkpoint around or inside it): its input leaves the scan as an
      extra output, cheaper than through the backward pass.
  """
  name: str
  located: Any
  how: str
  reason: Any = None
  final: bool = True
  frame: Any = None
  stacked_axis: Optional[int] = None
  emit: bool = False

  @property
  def mode(self) -> tuple:
    """How the call's capture is laid out: the same for every call of a layer."""
    return ("scan", self.stacked_axis) if self.how == "scan" else ("call",)


class _LossTrace:
  """One trace of the loss: where each layer call sits relative to it.

  ``track`` is an interceptor (put outermost) that keeps the linen modules
  being called in the loss's own trace: a layer inside a lifted transform
  (``nn.remat``) gets its own copy of its parameters, and it is found in
  params by its scope path under the prefix where the enclosing
  ``apply``'s parameters sit.
  """

  def __init__(self, params, probes_for=None):
    self.params = params
    self.index = _ParamIndex(params)
    self.hook = loops.ScanHook(probes_for)
    self.trace = jax_core.trace_ctx.trace
    self._enclosing: list = []  # linen modules called in the loss's trace, innermost last
    self._prefixes: dict = {}  # id(root scope) -> (root scope, prefix or None)

  def transforms(self):
    """The transforms between the loss's trace and this call's, innermost first.

    (label, frame) pairs, the frame being the ``loops.Frame`` of a scan
    body the hook saw (else None); () in the loss's own trace; None when
    the loss's trace is not among the current trace's ancestors.
    """
    chain = []
    trace = jax_core.trace_ctx.trace
    while trace is not self.trace:
      if trace is None:
        return None
      chain.append((_trace_label(trace), self.hook.frame_of(trace)))
      trace = getattr(trace, "parent_trace", None)
    return tuple(chain)

  def track(self, next_fun, args, kwargs, context):
    module = context.module
    if nnx_capture.is_nnx(module) or jax_core.trace_ctx.trace is not self.trace:
      return next_fun(*args, **kwargs)
    self._enclosing.append(module)
    try:
      return next_fun(*args, **kwargs)
    finally:
      self._enclosing.pop()

  def _apply_prefixes(self):
    """Where the enclosing apply's params sit in params (candidate key paths)."""
    if not self._enclosing:
      return _ParamIndex.DEFAULT_PREFIXES
    root = self._enclosing[-1].scope.root
    if id(root) not in self._prefixes:
      self._prefixes[id(root)] = (root, self._prefix_of(root))
    prefix = self._prefixes[id(root)][1]
    return _ParamIndex.DEFAULT_PREFIXES if prefix is None else (prefix,)

  def _prefix_of(self, root):
    """The key path under which the apply of ``root`` finds its 'params' in params."""
    variables = root.variables()
    if "params" not in variables:
      return None
    for rel, leaf in jax.tree_util.tree_flatten_with_path(variables["params"])[0]:
      full = self.index.path_of(leaf)
      rel = tuple(rel)
      if full is not None and len(full) >= len(rel) and tuple(full[len(full) - len(rel):]) == rel:
        return tuple(full[:len(full) - len(rel)])
    return None

  def site(self, module, inputs) -> _Site:
    """Where the layer call of ``module`` on ``inputs`` sits."""
    chain = self.transforms()
    if chain == ():
      located = self.index.locate(module)
      return _Site(_scope_name(module) if located is None else located[0], located, "direct")
    prefixes = self._apply_prefixes()
    located = self.index.locate(module, prefixes)
    name = _scope_name(module) if located is None else located[0]
    if chain is None:
      return _Site(name, located, "skip", *_nested_reason(None))
    labels = tuple(label for label, _ in chain)
    if _PARTIAL_EVAL in labels:
      return _Site(name, located, "ignore", _nested_reason(labels)[0], False)
    frames = [frame for _, frame in chain if frame is not None]
    others = [label for label, frame in chain if frame is None and label != _CHECKPOINT]
    if not others and len(frames) > 1:
      return _Site(name, located, "skip", _NESTED_LOOPS_REASON)
    if not others and len(frames) == 1:
      return self._scan_site(module, inputs, located, prefixes, frames[0], len(chain) == 1)
    if not others:
      if located is None:
        reason = _NNX_COPY_REASON if nnx_capture.is_nnx(module) else _UNMATCHED_REASON
        return _Site(name, None, "skip", reason)
      if not _comes_back_exactly(module, inputs):
        return _Site(name, located, "skip", _IDS_REASON)
      return _Site(name, located, "checkpoint")
    stacked = self.index.stacked(module, prefixes, None)
    if stacked:
      return _Site(_layer_name(stacked[0][0]), None, "skip", _STACKED_REASON)
    return _Site(name, located, "skip", *_nested_reason(labels))

  def _scan_site(self, module, inputs, located, prefixes, frame, emit) -> _Site:
    """The site of a call in the body of a scan the hook saw (``frame``).

    The kernel is either the module's own leaf (shared by the iterations) or
    a leaf with ``frame.length`` slices (stacked).
    """
    if located is None:
      candidates = self.index.stacked(module, prefixes, frame.length)
      if len(candidates) > 1:
        return _Site(_layer_name(candidates[0][0]), None, "skip", _AMBIGUOUS_STACK_REASON)
      if not candidates:
        reason = _NNX_COPY_REASON if nnx_capture.is_nnx(module) else _UNMATCHED_REASON
        return _Site(_scope_name(module), None, "skip", reason)
      kernel_path, bias_path, axis = candidates[0]
      located = (_layer_name(kernel_path), kernel_path, bias_path,
                 self.index.leaf(kernel_path))
    else:
      axis = None
    if not emit and not _comes_back_exactly(module, inputs):
      return _Site(located[0], located, "skip", _IDS_REASON)
    return _Site(located[0], located, "scan", frame=frame, stacked_axis=axis, emit=emit)


@jax.custom_vjp
def _return_input(outputs, inputs, probe):
  """``outputs`` unchanged; its VJP gives ``inputs`` as the gradient of ``probe``.

  The layer input of a call inside jax.checkpoint cannot be kept from the
  forward pass (it belongs to the checkpoint's trace); the backward pass
  hands it out instead, as the gradient of the zero input probe (same shape,
  float32 for integer inputs) closed over from the loss's trace. The body
  runs once per forward pass, so that gradient is the input itself. In a
  scan body the probe is this iteration's slice of a stacked one.
  """
  del inputs, probe
  return outputs


def _return_input_fwd(outputs, inputs, probe):
  return outputs, inputs.astype(probe.dtype)


def _return_input_bwd(inputs, out_grads):
  # The input only rides along: no gradient flows to it through here.
  return out_grads, None, inputs


_return_input.defvjp(_return_input_fwd, _return_input_bwd)


def _comes_back_exactly(module, inputs) -> bool:
  """Whether the input probe's gradient (``_probe_dtype``) holds ``inputs`` exactly."""
  dtype = jnp.dtype(inputs.dtype)
  if jnp.issubdtype(dtype, jnp.inexact) or dtype.itemsize <= 2:
    return True
  kind = layers_lib.kind_of(module)
  return (kind is layers_lib.Embed
          and _module_param(module, kind.kernel_param).shape[0] <= _MAX_EXACT_IDS)


def _probe_dtype(dtype):
  """The dtype of the input probe of an input of ``dtype``."""
  return dtype if jnp.issubdtype(dtype, jnp.inexact) else jnp.float32


def _is_abstract(leaf) -> bool:
  return isinstance(leaf, (jax.Array, np.ndarray, jax.ShapeDtypeStruct))


def find_layers(loss_fn: Callable[..., Any], params: Any, *args,
                **kwargs) -> layers_lib.LayerRegistry:
  """Finds the Flax layers that ``loss_fn`` calls, by tracing it once abstractly.

  Args:
    loss_fn: ``loss_fn(params, *args, **kwargs)`` applying Flax linen modules,
      e.g. ``lambda p, x, y: xent(model.apply({'params': p}, x), y)``, or
      Flax NNX ones, e.g. ``lambda p, x, y: xent(nnx.merge(graphdef, p)(x), y)``
      with ``graphdef, params = nnx.split(model)``.
    params: the parameter pytree ``loss_fn`` takes (arrays or
      ``jax.ShapeDtypeStruct``); every registered layer's kernel must be a leaf
      of it.
    *args, **kwargs: example arguments; only the shapes and dtypes of their
      arrays are used (``jax.ShapeDtypeStruct`` works too), other values
      (flags, strings) are passed as they are.

  Returns:
    A static, hashable ``LayerRegistry``; ``print`` shows a table of layer
    name, kind, A size and G size. A layer is named after the path of its
    kernel in ``params`` without the leaf, e.g. 'encoder/Dense_0'. A
    ``flax.linen.Dense`` 64 -> 32 with bias has A size 65 and G size 32;
    blocks show as 'blocks x size' (a LayerNorm over 64 features: A
    '64x2', G '64x1') and a diagonal as 'size (diag)' (an Embed's A). The
    kinds: Dense, DenseGeneral, Einsum, Conv (grouped and depthwise too),
    Embed, LayerNorm, RMSNorm, GroupNorm, BatchNorm, linen or NNX.

    Layers called inside ``nn.remat`` / ``nn.checkpoint`` / ``jax.checkpoint``
    are registered like the others (a linen layer is found in ``params`` by
    its scope path, e.g. 'CheckpointDense_0'). Layers inside ``nn.scan`` or
    a ``jax.lax.scan`` of the loss are registered too, with their kind
    'dense (scan)' when the iterations share the kernel (one block), 'dense
    (scan, 12 stacked)' when ``variable_axes`` stacks it (A '12x65': one
    block per slice). So are Flax NNX layers inside ``nnx.remat`` and
    ``nnx.scan`` when ``params`` is the ``nnx.State`` (its Variables carry
    their paths through the transform; a pure dict cannot). Layers called
    inside other loops (``fori_loop``), a scan inside a scan, ``vmap`` or
    another transform are listed in ``skipped`` with the reason.

  Example:
    >>> layers = kaisa_jax.find_layers(loss_fn, params, x, y)
    >>> print(layers)

  Raises:
    ValueError: when a layer's kernel is not a leaf of ``params`` (e.g. the
      loss rebuilds the parameters before applying the model).
  """
  found: dict[str, layers_lib.Layer] = {}
  skipped: dict[str, layers_lib.Skipped] = {}
  provisional: set[str] = set()  # skipped with a reason a more precise one replaces
  ignored: dict[str, layers_lib.Skipped] = {}  # seen only in nn.scan's look-ahead trace
  modes: dict[str, tuple] = {}  # the capture layout of each layer's calls
  errors: list[str] = []
  leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))
  dynamic = [i for i, leaf in enumerate(leaves) if _is_abstract(leaf)]

  def skip(name, module, reason, final=True):
    # A layer with any call that cannot be captured is not registered, even
    # when its other calls could be: its factors would miss those rows.
    found.pop(name, None)
    if name in skipped and name not in provisional:
      return
    skipped[name] = layers_lib.Skipped(name, type(module).__name__, reason)
    (provisional.discard if final else provisional.add)(name)

  def traced(params, dynamic_leaves):
    call_leaves = list(leaves)
    for i, leaf in zip(dynamic, dynamic_leaves):
      call_leaves[i] = leaf
    call_args, call_kwargs = jax.tree_util.tree_unflatten(treedef, call_leaves)
    loss_trace = _LossTrace(params)
    index = loss_trace.index

    def interceptor(next_fun, fn_args, fn_kwargs, context):
      module = context.module
      reason = _unsupported_call(context)
      if reason is not None:
        located = index.locate(module) if layers_lib.kind_of(module) else None
        skip(_scope_name(module) if located is None else located[0], module, reason)
        return next_fun(*fn_args, **fn_kwargs)
      if not _is_layer_call(context):
        return next_fun(*fn_args, **fn_kwargs)
      inputs = _call_input(fn_args, fn_kwargs)
      kernel_param = layers_lib.kind_of(module).kernel_param
      if _module_param(module, kernel_param) is None:
        skip(_scope_name(module), module, f"it has no {kernel_param!r} parameter")
        return next_fun(*fn_args, **fn_kwargs)
      site = loss_trace.site(module, inputs)
      outputs = next_fun(*fn_args, **fn_kwargs)
      if site.how == "ignore":
        ignored[site.name] = layers_lib.Skipped(site.name, type(module).__name__, site.reason)
        return outputs
      if site.how == "skip":
        skip(site.name, module, site.reason, site.final)
        return outputs
      if site.located is None:
        errors.append(
            f"layer {_scope_name(module)!r}: its parameters are not leaves of "
            "the params passed to find_layers (does the loss rebuild them?). "
            "Pass the exact pytree the loss hands to model.apply (Flax NNX: "
            "build the model inside the loss with nnx.merge(graphdef, params) "
            "instead of closing over it).")
        return outputs
      name, kernel_path, bias_path, kernel = site.located
      if modes.setdefault(name, site.mode) != site.mode:
        skip(name, module, _MIXED_REASON)
      if name in found or name in skipped:
        return outputs  # a shared module: later calls add rows, not layers
      kind = layers_lib.kind_of(module)
      call_kernel = _module_param(module, kind.kernel_param)  # one iteration's in a scan
      try:
        layer = kind.from_call(module, name, kernel_path, bias_path,
                               tuple(call_kernel.shape), inputs, outputs,
                               _call_arguments(module, fn_args, fn_kwargs))
        if site.how == "scan":
          layer = scanned.Scanned.wrap(layer, kernel.shape, site.stacked_axis)
        found[name] = layer
      except layers_lib.UnsupportedLayer as e:
        skip(name, module, str(e))
      return outputs

    with _intercept_layers(interceptor, loss_trace):
      return loss_fn(params, *call_args, **call_kwargs)

  jax.eval_shape(traced, params, [leaves[i] for i in dynamic])
  for name, entry in ignored.items():
    if name not in found and name not in skipped:
      skipped[name] = entry
  if errors:
    raise ValueError("\n".join(errors))
  if not found and not skipped:
    raise ValueError(
        "find_layers: loss_fn calls no flax.linen Dense or Conv (nor Flax NNX "
        "Linear or Conv) layer; "
        "K-FAC has nothing to precondition.")
  return layers_lib.LayerRegistry(tuple(found.values()), tuple(skipped.values()))


class _CallShape(NamedTuple):
  """What the shape pass learns of one layer call.

  Attributes:
    output: the output's ShapeDtypeStruct and its varying shard_map axes,
      (length, ...) for a call in a scan.
    input: for a call whose input comes back through the backward pass
      (inside jax.checkpoint, or a scan that does not emit it), the input's
      ShapeDtypeStruct and varying axes (its probe is made from them);
      None otherwise.
    how: the site's ``how``.
    frame: the index of the scan frame of a 'scan' call, else None.
    mode: the site's ``mode``.
  """
  output: tuple
  input: Any
  how: str
  frame: Optional[int]
  mode: tuple

  @classmethod
  def of(cls, site: _Site, inputs, outputs) -> "_CallShape":
    length = (site.frame.length,) if site.how == "scan" else ()
    returned = site.how != "direct" and not site.emit
    return cls(_struct_and_axes(outputs, length),
               _struct_and_axes(inputs, length) if returned else None,
               site.how, None if site.frame is None else site.frame.index, site.mode)

  def matches(self, site: _Site) -> bool:
    return (self.how, self.frame) == (
        site.how, None if site.frame is None else site.frame.index)


def _struct_and_axes(x, leading: tuple = ()) -> tuple:
  """(ShapeDtypeStruct of x with ``leading`` axes first, x's varying shard_map axes)."""
  return (jax.ShapeDtypeStruct(leading + tuple(x.shape), x.dtype),
          tuple(sorted(collectives.varying_axes(x), key=str)))


def value_and_grad(loss_fn: Callable[..., Any], has_aux: bool = False,
                   fisher: str = "empirical"):
  """``jax.value_and_grad`` over ``params`` that also returns the K-FAC captures.

  Args:
    loss_fn: ``loss_fn(params, *args, **kwargs)`` applying Flax linen modules
      and returning a scalar loss (or ``(loss, aux)`` when ``has_aux``).
    has_aux: as in ``jax.value_and_grad``.
    fisher: 'empirical' (the reference): the output gradients are those of
      the loss. 'sampled': ``loss_fn`` returns ``(loss, fisher_loss)`` (or
      ``((loss, fisher_loss), aux)``), ``fisher_loss`` being
      ``kaisa_jax.sampled_fisher_loss`` of the model's outputs; the gradient
      is the loss's, the output gradients the fisher loss's (one forward
      pass, two backward passes). ``value`` is then the loss alone.

  Returns:
    A function ``(params, *args, **kwargs) -> (value, grads, captures)`` where
    ``value`` is the loss (or ``(loss, aux)``), ``grads`` the gradient with
    respect to ``params``, and ``captures`` a dict from layer name to
    ``LayerCapture``: per call, the layer input (e.g. (B, in) for a Dense)
    and the gradient of the loss with respect to the layer output (e.g.
    (B, out)). With a mean loss the output gradients carry the 1/B.

  Example:
    >>> (loss, grads, captures) = kaisa_jax.value_and_grad(loss_fn)(params, x, y)
    >>> updates, opt_state = opt.update(grads, opt_state, params,
    ...                                 captures=captures)

  Works under ``jax.jit``, ``pmap`` and ``shard_map``; it captures every
  supported layer, registered or not, except those ``find_layers`` lists as
  skipped for a nested transform. A call inside ``jax.checkpoint`` (``nn.remat``)
  is captured exactly: its input comes back from the backward pass, as the
  input the gradient was computed with. A call inside ``nn.scan`` (or a
  ``jax.lax.scan`` of the loss) is captured per iteration, stacked:
  (length, batch, ...), in the order of the scan's outputs.
  """
  if fisher not in fisher_lib.FISHER_TYPES:
    raise ValueError(f"fisher must be one of {fisher_lib.FISHER_TYPES}, got {fisher!r}.")
  sampled = fisher == "sampled"

  def split(out):
    """(loss, fisher loss or None, aux or None) from what loss_fn returns."""
    losses, aux = out if has_aux else (out, None)
    if not sampled:
      return losses, None, aux
    if not (isinstance(losses, (tuple, list)) and len(losses) == 2):
      raise ValueError(
          "value_and_grad(fisher='sampled'): loss_fn must return (loss, fisher_loss)"
          f"{' and aux' if has_aux else ''}, with fisher_loss from "
          "kaisa_jax.sampled_fisher_loss.")
    return losses[0], losses[1], aux

  def wrapped(params, *args, **kwargs):
    # Pass 1 (abstract, free at run time): the output shape of every call
    # (and the input shape of calls inside jax.checkpoint), and the layers
    # with a call that cannot be captured.
    call_shapes: dict[str, list] = collections.defaultdict(list)
    dropped: set[str] = set()

    def shape_pass(params):
      loss_trace = _LossTrace(params)

      def shape_interceptor(next_fun, call_args, call_kwargs, context):
        if not _is_layer_call(context):
          return next_fun(*call_args, **call_kwargs)
        inputs = _call_input(call_args, call_kwargs)
        site = loss_trace.site(context.module, inputs)
        outputs = next_fun(*call_args, **call_kwargs)
        if site.how == "skip":
          dropped.add(site.name)
        elif site.how != "ignore":
          call_shapes[site.name].append(_CallShape.of(site, inputs, outputs))
        return outputs

      with _intercept_layers(shape_interceptor, loss_trace):
        return loss_fn(params, *args, **kwargs)

    jax.eval_shape(shape_pass, params)
    # A layer with a call that cannot be captured, or whose calls' captures
    # differ in layout, is not captured at all.
    dropped |= {name for name, calls in call_shapes.items()
                if len({call.mode for call in calls}) > 1}
    call_shapes = {name: calls for name, calls in call_shapes.items() if name not in dropped}
    out_probes = {name: tuple(_zeros_varying_like(*call.output) for call in calls)
                  for name, calls in call_shapes.items()}
    in_probes = {name: tuple(None if call.input is None else _input_probe(*call.input)
                             for call in calls)
                 for name, calls in call_shapes.items()}

    # Pass 2: the loss as a function of the params and the probes.
    def probed_loss(params, probes):
      out_probes, in_probes = probes
      inputs: dict[str, list] = collections.defaultdict(list)
      # Each scan is given the (length, ...) probes of the calls in its body.
      by_frame: dict[int, dict] = collections.defaultdict(dict)
      for name, calls in call_shapes.items():
        for c, call in enumerate(calls):
          if call.frame is not None:
            by_frame[call.frame][(name, c)] = (out_probes[name][c], in_probes[name][c])
      loss_trace = _LossTrace(params, probes_for=lambda frame: by_frame.get(frame, {}))

      def interceptor(next_fun, call_args, call_kwargs, context):
        if not _is_layer_call(context):
          return next_fun(*call_args, **call_kwargs)
        x = _call_input(call_args, call_kwargs)
        site = loss_trace.site(context.module, x)
        if site.how in ("skip", "ignore") or site.name in dropped:
          return next_fun(*call_args, **call_kwargs)
        name = site.name
        call = len(inputs[name])
        if (name not in call_shapes or call >= len(call_shapes[name])
            or not call_shapes[name][call].matches(site)):
          raise ValueError(
              f"layer {name!r} was called more often, or elsewhere, than in the "
              "shape pass; the loss function must call its layers deterministically.")
        # A direct call's input is kept as it is, one in a scan in the
        # loss's trace leaves the scan stacked; one inside jax.checkpoint
        # comes back as the gradient of its input probe.
        inputs[name].append(x if site.how == "direct" else None)
        if site.how == "scan":
          out_probe, in_probe = site.frame.slices[(name, call)]
        else:
          out_probe, in_probe = out_probes[name][call], in_probes[name][call]
        outputs = next_fun(*call_args, **call_kwargs) + out_probe
        if site.emit:
          site.frame.emitted[(name, call)] = x
          inputs[name][-1] = _Emitted(site.frame, (name, call))
        elif site.how != "direct":
          outputs = _return_input(outputs, x, in_probe)
        return outputs

      with _intercept_layers(interceptor, loss_trace):
        loss, fisher_loss, aux = split(loss_fn(params, *args, **kwargs))
      missing = [name for name, probes in out_probes.items()
                 if len(inputs.get(name, ())) != len(probes)]
      if missing:
        # jax.checkpoint keeps the trace of a function it has seen with the
        # same shapes: applied to a function defined once (not in the loss),
        # the second trace does not run the layers at all.
        raise ValueError(
            f"layers {missing} were called fewer times than in the shape pass. "
            "The loss function must call its layers deterministically; a layer "
            "inside jax.checkpoint(f) with f defined outside the loss is not "
            "traced again (JAX reuses f's trace): use nn.remat, or apply "
            "jax.checkpoint to a function made inside the loss.")
      recorded = (aux, {k: tuple(x.stacked() if isinstance(x, _Emitted) else x for x in v)
                        for k, v in inputs.items()})
      return ((loss, fisher_loss) if sampled else loss), recorded

    probes = (out_probes, in_probes)
    if sampled:
      # One forward pass; the parameter gradient from the loss, the output
      # gradients (and the inputs given back inside jax.checkpoint) from the
      # fisher loss.
      (loss, fisher_loss), vjp, (aux, inputs) = jax.vjp(
          probed_loss, params, probes, has_aux=True)
      grads, _ = vjp((jnp.ones_like(loss), jnp.zeros_like(fisher_loss)))
      _, (out_grads, in_grads) = vjp((jnp.zeros_like(loss), jnp.ones_like(fisher_loss)))
    else:
      (loss, (aux, inputs)), (grads, (out_grads, in_grads)) = jax.value_and_grad(
          probed_loss, argnums=(0, 1), has_aux=True)(params, probes)
    captures = {}
    for name, calls in call_shapes.items():
      layer_inputs = tuple(
          recorded if call.input is None else given.astype(call.input[0].dtype)
          for recorded, given, call in zip(inputs[name], in_grads[name], calls))
      captures[name] = LayerCapture(layer_inputs, out_grads[name])
    value = (loss, aux) if has_aux else loss
    return value, grads, captures

  return wrapped


class _Emitted(NamedTuple):
  """A layer input a scan hands out: available once the scan has run."""
  frame: Any
  key: tuple

  def stacked(self) -> jax.Array:
    return self.frame.stacked_inputs[self.key]


def _input_probe(shape: jax.ShapeDtypeStruct, axes: tuple) -> jax.Array:
  """The zero probe whose gradient is the input of a call inside jax.checkpoint."""
  return _zeros_varying_like(jax.ShapeDtypeStruct(shape.shape, _probe_dtype(shape.dtype)), axes)


def _zeros_varying_like(shape: jax.ShapeDtypeStruct, axes: tuple) -> jax.Array:
  """A zero probe that varies along the same shard_map axes as the layer output.

  A probe typed as replicated would have its gradient summed over the
  devices by autodiff (shard_map's checked mode), where K-FAC needs each
  device's own output gradients.
  """
  zeros = jnp.zeros(shape.shape, shape.dtype)
  return lax.pcast(zeros, axes, to="varying") if axes else zeros
