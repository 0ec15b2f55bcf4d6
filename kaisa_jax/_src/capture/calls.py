"""Calls: the layer calls of a loss, intercepted and read.

One interceptor, with linen's signature, sees the module calls of both Flax
APIs (``nn.intercept_methods`` and its NNX counterpart in ``nnx.py``); these
helpers read what a call is (a layer's ``__call__``, an unsupported use of
a kernel) and its input and options.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import TYPE_CHECKING

import flax.linen as nn

from kaisa_jax._src import layers as layers_lib
from kaisa_jax._src.capture import nnx as nnx_capture

if TYPE_CHECKING:
  from kaisa_jax._src.capture.transforms import _LossTrace


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
