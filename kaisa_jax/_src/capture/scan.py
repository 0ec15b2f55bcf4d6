"""Scans: the layer calls of a scan body, captured one iteration at a time.

``lax.scan`` traces its body once and runs it ``length`` times: a probe
closed over by the body would be shared by every iteration, and its
gradient would be the sum over them. While a capture traces the loss,
``jax.lax.scan`` is wrapped instead: each scan is given the probes of the
layer calls in its body as extra scanned-over operands, ``(length, ...)``
each, so that iteration t uses slice t and the gradients come back stacked
by iteration; the layer inputs leave the body as extra per-iteration
outputs. Flax's ``nn.scan`` and a loss's own ``lax.scan`` look
``jax.lax.scan`` up when they run, so both are seen; loops that reach scan
otherwise (``fori_loop``, ``while_loop``) are not, and their layers stay
skipped.

The wrapping lasts for one trace of the loss, in the thread that traces it;
other threads get the original ``jax.lax.scan``.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable, NamedTuple, Optional

import jax
from jax._src import core as jax_core


class Frame:
  """One ``lax.scan`` call of a traced loss.

  Attributes:
    index: its rank among the loss's scan calls (the same in every trace
      of a deterministic loss, which is how the passes of a capture agree).
    length: the number of iterations.
    slices: while its body is traced, ``{(layer name, call): probes}``: this
      iteration's slices of the probes the scan was given.
    emitted: while its body is traced, ``{(layer name, call): input}``: the
      layer inputs the body hands out as extra per-iteration outputs.
    stacked_inputs: once the scan has run, those inputs stacked,
      ``(length, ...)`` each, in the trace that called the scan.
  """

  def __init__(self, index: int, length: int):
    self.index = index
    self.length = length
    self.slices: dict = {}
    self.emitted: dict = {}
    self.stacked_inputs: dict = {}
    self._body_traces: list = []  # kept alive, so that their ids stay theirs

  def add_body_trace(self, trace):
    self._body_traces.append(trace)

  def owns(self, trace) -> bool:
    return any(t is trace for t in self._body_traces)


def _scan_length(xs, length) -> Optional[int]:
  if length is not None:
    return int(length)
  leaves = jax.tree.leaves(xs)
  return int(leaves[0].shape[0]) if leaves else None


class ScanHook:
  """Wraps ``jax.lax.scan`` for one trace of a loss.

  ``probes_for(frame_index)`` gives the probes (a pytree of ``(length,
  ...)`` arrays, keyed by (layer name, call)) to scan over with the body;
  None when the probes are not made yet (a pass that only looks).
  """

  def __init__(self, probes_for: Optional[Callable[[int], dict]] = None):
    self._probes_for = probes_for
    self._frames: list[Frame] = []

  def frame_of(self, trace) -> Optional[Frame]:
    """The frame whose body ``trace`` is, or None."""
    return next((f for f in self._frames if f.owns(trace)), None)

  @contextlib.contextmanager
  def installed(self):
    """This hook sees the scans its thread runs until the block exits."""
    global _installed
    with _lock:
      if _installed == 0:
        _original[0] = jax.lax.scan
        jax.lax.scan = _dispatch
      _installed += 1
    hooks = _thread_hooks()
    hooks.append(self)
    try:
      yield self
    finally:
      hooks.pop()
      with _lock:
        _installed -= 1
        if _installed == 0:
          jax.lax.scan = _original[0]

  def scan(self, f, init, xs, length, reverse, unroll, **kwargs):
    n = _scan_length(xs, length)
    if n is None:  # let lax.scan say what is wrong
      return _original[0](f, init, xs, length, reverse, unroll, **kwargs)
    frame = Frame(len(self._frames), n)
    self._frames.append(frame)
    probes = self._probes_for(frame.index) if self._probes_for else {}

    def body(carry, operands):
      x, frame.slices = operands
      frame.emitted = {}
      frame.add_body_trace(jax_core.trace_ctx.trace)
      carry, ys = f(carry, x)
      return carry, (ys, frame.emitted)

    carry, (ys, frame.stacked_inputs) = _original[0](
        body, init, (xs, probes), n, reverse, unroll, **kwargs)
    return carry, ys


# One wrapper stays in place while any thread has a hook installed; each
# thread's scans go to its innermost hook, other threads' to the original.
_lock = threading.Lock()
_installed = 0
_original: list = [None]
_local = threading.local()


def _thread_hooks() -> list:
  if not hasattr(_local, "hooks"):
    _local.hooks = []
  return _local.hooks


def _dispatch(f, init, xs=None, length=None, reverse=False, unroll=1, **kwargs):
  hooks = _thread_hooks()
  if not hooks:
    return _original[0](f, init, xs, length, reverse, unroll, **kwargs)
  return hooks[-1].scan(f, init, xs, length, reverse, unroll, **kwargs)


class _Emitted(NamedTuple):
  """A layer input a scan hands out: available once the scan has run."""
  frame: Any
  key: tuple

  def stacked(self) -> jax.Array:
    return self.frame.stacked_inputs[self.key]
