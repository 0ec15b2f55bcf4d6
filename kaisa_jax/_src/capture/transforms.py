"""Transforms: where a layer call sits among the JAX transforms of the loss.

Each call's place is read from JAX's chain of traces between the loss's
trace and the call's, and what opened each trace (checkpoint, scan, jit,
vmap): a call is captured directly (in the loss's own trace), through the
backward pass (inside ``jax.checkpoint`` only), per iteration (inside one
scan the hook saw), or it is skipped, with the reason.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
# The chain of traces (``parent_trace``) and what opened each one are not
# public; flax.core.tracers reads the same state.
from jax._src import core as jax_core

from kaisa_jax._src.capture import nnx as nnx_capture
from kaisa_jax._src.capture import scan as scan_lib
from kaisa_jax._src.capture.params import _ParamIndex, _layer_name, _scope_name
from kaisa_jax._src.capture.probes import _comes_back_exactly


# What DebugInfo.traced_for says of the trace jax.checkpoint opens (nn.remat,
# nn.checkpoint, nnx.remat): its body runs once per forward pass.
_CHECKPOINT = "checkpoint / remat"
_LOOPS = ("scan", "fori_loop", "while_body", "while_cond")

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
    frame: the ``scan.Frame`` of a 'scan' call.
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
    self.hook = scan_lib.ScanHook(probes_for)
    self.trace = jax_core.trace_ctx.trace
    self._enclosing: list = []  # linen modules called in the loss's trace, innermost last
    self._prefixes: dict = {}  # id(root scope) -> (root scope, prefix or None)

  def transforms(self):
    """The transforms between the loss's trace and this call's, innermost first.

    (label, frame) pairs, the frame being the ``scan.Frame`` of a scan
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
