"""Method interception for Flax NNX modules.

Flax linen has ``nn.intercept_methods``; Flax NNX has no such hook. Here the
methods of the ``flax.nnx`` layer classes (``__call__`` and the public ones,
e.g. ``Embed.attend``) are wrapped for the duration of a
``with intercept_methods(interceptor):`` block, and the wrappers hand every
call to the interceptor with linen's signature,
``interceptor(next_fun, args, kwargs, context)``, so that one interceptor
serves both worlds (calls.py stacks the two context managers).

The classes are patched only while some block is open (in any thread) and
restored when the last one closes, even on an exception; interceptors are
kept per thread, so another thread running the same classes sees plain
calls.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import threading
from typing import Any, Callable

import jax
from flax import nnx

Interceptor = Callable[..., Any]  # (next_fun, args, kwargs, context) -> outputs

# The metadata key under which a capture marks each Variable of params with
# the key path of its value. NNX transforms (nnx.remat, nnx.scan) split the
# module and merge it again inside the JAX transform: the layer then holds a
# new Variable whose value is the transform's tracer, not a leaf of params,
# but the metadata comes along.
_PATH_KEY = "kaisa_jax_path"

# Marks our wrappers, so that closing the last block restores only them.
_MARK = "_kaisa_jax_nnx_wrapper"


@dataclasses.dataclass(frozen=True)
class InterceptorContext:
  """What an interceptor learns about one intercepted call (as in linen).

  Attributes:
    module: the ``nnx.Module`` being called.
    method_name: the method's name, e.g. '__call__' or 'attend'.
    orig_method: the module's own method, bound; calling it skips the
      interceptors that have not run yet.
  """
  module: nnx.Module
  method_name: str
  orig_method: Callable[..., Any]


class _ThreadState(threading.local):

  def __init__(self):
    super().__init__()
    self.interceptors: list[Interceptor] = []  # outermost block first
    # (module id, method name) of the calls under way: a subclass method
    # calling the same method of its base (nnx.LoRALinear.__call__ calls
    # Linear.__call__) is one call, intercepted once.
    self.active: set[tuple[int, str]] = set()


_thread = _ThreadState()
_patch_lock = threading.Lock()
_open_blocks = 0  # blocks open in all threads
_originals: dict[tuple[type, str], Callable[..., Any]] = {}


def is_nnx(module: Any) -> bool:
  return isinstance(module, nnx.Module)


def param_value(module: nnx.Module, name: str):
  """The array held by the module's attribute ``name``, or None (absent or None).

  It is the very object the loss passed to ``nnx.merge``, so that the
  capture can find it among the params' leaves by identity.
  """
  attr = getattr(module, name, None)
  if isinstance(attr, nnx.Variable):
    return attr.get_value()
  return attr


def own_params(module: nnx.Module) -> list:
  """(value, marked key path or None) of each ``nnx.Param`` attribute of the module."""
  return [(attr.get_value(), attr.get_metadata(_PATH_KEY, None))
          for attr in vars(module).values() if isinstance(attr, nnx.Param)]


def marked_path(module: nnx.Module, name: str):
  """The key path in params that ``paths_marked`` gave the Variable ``name``, or None."""
  attr = getattr(module, name, None)
  if isinstance(attr, nnx.Variable):
    return attr.get_metadata(_PATH_KEY, None)
  return None


@contextlib.contextmanager
def paths_marked(params, path_of: Callable[[Any], Any]):
  """Inside the block, each ``nnx.Variable`` of params carries the key path of its value.

  ``path_of(value)`` gives that path (None: left unmarked). ``nnx.merge``
  builds the model from these very Variables, so that a layer called inside
  ``nnx.remat`` or ``nnx.scan`` can be traced to its leaf of params through
  ``marked_path``. The marks are removed on exit, so that a Variable the
  loss returns (in aux) has its own metadata again when JAX flattens it.
  Params that hold no Variables (a pure dict) are left as they are.
  """
  variables = [v for v in jax.tree_util.tree_leaves(
      params, is_leaf=lambda v: isinstance(v, nnx.Variable)) if isinstance(v, nnx.Variable)]
  marked = []
  try:
    for variable in variables:
      path = path_of(variable.get_value())
      if path is not None:
        variable.set_metadata(_PATH_KEY, path)
        marked.append(variable)
    yield
  finally:
    for variable in marked:
      metadata = variable.get_metadata()
      metadata.pop(_PATH_KEY, None)
      variable.set_metadata(metadata)


def describe(module: nnx.Module) -> str:
  """A name for a layer whose kernel is not a leaf of params, e.g. 'Linear_64x32'.

  NNX modules know no path of their own, and such a layer is typically one
  called inside a JAX transform (nnx.remat, nnx.scan), where the module and
  its parameters are the transform's copies: the class and kernel shape
  are what is left to name it by. No regex metacharacters, so that the name
  can be passed to ``skip_layers`` as it is.
  """
  kernel = param_value(module, "kernel")
  shape = getattr(kernel, "shape", None)
  if shape is None:
    return type(module).__name__
  return f"{type(module).__name__}_{'x'.join(str(d) for d in shape)}"


def _nnx_methods() -> tuple[tuple[type, str], ...]:
  """(class, method name) of the methods to wrap.

  The Module classes of ``flax.nnx`` that define their own ``__call__`` (all
  of them, not only those with a layer kind today: the interceptor decides
  what is a layer, so a kind added later needs no change here), and of each
  its ``__call__`` and the public plain functions it defines itself (like
  ``Embed.attend``; static and class methods are left alone). A user
  subclass is covered when its methods call the base class's (or it
  defines none).
  """
  methods = []
  for cls in vars(nnx).values():
    if not (isinstance(cls, type) and issubclass(cls, nnx.Module)
            and "__call__" in cls.__dict__):
      continue
    methods += [(cls, name) for name, attr in cls.__dict__.items()
                if inspect.isfunction(attr) and (name == "__call__" or not name.startswith("_"))]
  return tuple(methods)


def _wrap(method: Callable[..., Any], name: str) -> Callable[..., Any]:
  """``method`` (unbound, called ``name``) routed through this thread's interceptors."""

  # updated=(): do not copy the method's __dict__, which may carry another
  # patcher's marks (nnx.capture marks its own wrappers).
  @functools.wraps(method, updated=())
  def wrapper(self, *args, **kwargs):
    interceptors = _thread.interceptors
    key = (id(self), name)
    if not interceptors or key in _thread.active:
      return method(self, *args, **kwargs)
    context = InterceptorContext(self, name, functools.partial(method, self))
    fun = context.orig_method
    # Wrapped innermost first, so that the outermost block's interceptor
    # runs first, as with nn.intercept_methods.
    for interceptor in reversed(interceptors):
      fun = _bind(interceptor, fun, context)
    _thread.active.add(key)
    try:
      return fun(*args, **kwargs)
    finally:
      _thread.active.discard(key)

  setattr(wrapper, _MARK, True)
  return wrapper


def _bind(interceptor: Interceptor, next_fun, context: InterceptorContext):
  return lambda *args, **kwargs: interceptor(next_fun, args, kwargs, context)


def _patch() -> None:
  global _open_blocks
  with _patch_lock:
    if _open_blocks == 0:
      for cls, name in _nnx_methods():
        method = cls.__dict__[name]
        _originals[cls, name] = method
        setattr(cls, name, _wrap(method, name))
    _open_blocks += 1


def _unpatch() -> None:
  global _open_blocks
  with _patch_lock:
    _open_blocks -= 1
    if _open_blocks == 0:
      for (cls, name), method in _originals.items():
        # Someone patched over our wrapper meanwhile (nnx.capture with
        # method_outputs): leave theirs; ours passes calls straight through
        # when no interceptor is registered.
        if getattr(cls.__dict__.get(name), _MARK, False):
          setattr(cls, name, method)
      _originals.clear()


@contextlib.contextmanager
def intercept_methods(interceptor: Interceptor):
  """Calls ``interceptor`` on every call of a ``flax.nnx`` layer's method inside the block.

  The NNX counterpart of ``flax.linen.intercept_methods``, for the classes
  ``flax.nnx`` exports (and subclasses that call their methods):
  ``interceptor(next_fun, args, kwargs, context)`` gets the call's
  positional and keyword arguments (without ``self``), ``next_fun`` to
  continue the call, and ``context`` with ``.module`` and ``.method_name``;
  it returns the call's result. Blocks nest: the outer block's interceptor
  runs first.

  Example:
    >>> def show(next_fun, args, kwargs, context):
    ...   print(type(context.module).__name__, args[0].shape)
    ...   return next_fun(*args, **kwargs)
    >>> with intercept_methods(show):
    ...   model(x)
  """
  _patch()
  _thread.interceptors.append(interceptor)
  try:
    yield
  finally:
    popped = _thread.interceptors.pop()
    assert popped is interceptor, "intercept_methods blocks closed out of order"
    _unpatch()
