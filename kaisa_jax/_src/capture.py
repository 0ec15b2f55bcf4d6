"""Capture: what the Flax calls of a loss give K-FAC.

A Flax method interceptor sees every supported layer call. To find the layers
it records static facts; to capture, it records each call's input and adds a
zero "probe" to its output, so that the gradient of the loss with respect to
the probe is the gradient with respect to the layer output. Probes are named
per call, so a module called twice gets both calls' rows, not their sum.
"""

from __future__ import annotations

import collections
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from kaisa_jax._src import layers as layers_lib


class LayerCapture(NamedTuple):
  """What one layer saw in one loss evaluation, one entry per call.

  Attributes:
    inputs: per call, the layer input, e.g. (batch, in) for Dense.
    out_grads: per call, d loss / d output, same shape as the layer output.
  """
  inputs: tuple
  out_grads: tuple


def _layer_name(module: nn.Module) -> str:
  return "/".join(str(p) for p in module.scope.path)


def _call_input(args, kwargs):
  if args:
    return args[0]
  return kwargs["inputs"]


def _is_layer_call(context) -> bool:
  return (context.method_name == "__call__"
          and layers_lib.kind_of(context.module) is not None)


def find_layers(loss_fn: Callable[..., Any], params: Any, *args,
                **kwargs) -> layers_lib.LayerRegistry:
  """Finds the Flax layers that ``loss_fn`` calls, by tracing it once abstractly.

  Args:
    loss_fn: ``loss_fn(params, *args, **kwargs)`` applying Flax linen modules,
      e.g. ``lambda p, x, y: xent(model.apply({'params': p}, x), y)``.
    params: the parameter pytree ``loss_fn`` takes (arrays or
      ``jax.ShapeDtypeStruct``); every registered layer's kernel must be a leaf
      of it.
    *args, **kwargs: example arguments (only shapes and dtypes are used).

  Returns:
    A static, hashable ``LayerRegistry``; ``print`` shows a table of layer
    path, kind, A size and G size. A ``flax.linen.Dense`` with input (B, 64),
    64 -> 32 with bias, has A size 65 and G size 32.

  Example:
    >>> layers = kaisa_jax.find_layers(loss_fn, params, x, y)
    >>> print(layers)

  Raises:
    ValueError: when a layer's kernel is not a leaf of ``params`` (e.g. the
      loss transforms the parameters before applying the model).
  """
  found: dict[str, layers_lib.Layer] = {}
  skipped: dict[str, layers_lib.Skipped] = {}
  errors: list[str] = []

  def traced(params):
    by_id = {id(leaf): path for path, leaf in
             jax.tree_util.tree_flatten_with_path(params)[0]}

    def interceptor(next_fun, call_args, call_kwargs, context):
      if not _is_layer_call(context):
        return next_fun(*call_args, **call_kwargs)
      module = context.module
      inputs = _call_input(call_args, call_kwargs)
      outputs = next_fun(*call_args, **call_kwargs)
      name = _layer_name(module)
      if name in found or name in skipped:
        return outputs  # a shared module: later calls add rows, not layers
      kind = layers_lib.kind_of(module)
      kernel = module.scope.get_variable("params", "kernel")
      bias = module.scope.get_variable("params", "bias")
      kernel_path = by_id.get(id(kernel))
      bias_path = None if bias is None else by_id.get(id(bias))
      if kernel_path is None or (bias is not None and bias_path is None):
        errors.append(
            f"layer {name!r}: its parameters are not leaves of the params "
            "passed to find_layers (does the loss transform or rebuild them?). "
            "Pass the exact pytree the loss hands to model.apply.")
        return outputs
      try:
        found[name] = kind.from_call(module, name, kernel_path, bias_path,
                                     tuple(kernel.shape), inputs, outputs)
      except layers_lib.UnsupportedLayer as e:
        skipped[name] = layers_lib.Skipped(name, type(module).__name__, str(e))
      return outputs

    with nn.intercept_methods(interceptor):
      return loss_fn(params, *args, **kwargs)

  jax.eval_shape(traced, params)
  if errors:
    raise ValueError("\n".join(errors))
  if not found and not skipped:
    raise ValueError(
        "find_layers: loss_fn calls no flax.linen Dense or Conv layer; "
        "K-FAC has nothing to precondition.")
  return layers_lib.LayerRegistry(tuple(found.values()), tuple(skipped.values()))


def value_and_grad(loss_fn: Callable[..., Any], has_aux: bool = False):
  """``jax.value_and_grad`` over ``params`` that also returns the K-FAC captures.

  Args:
    loss_fn: ``loss_fn(params, *args, **kwargs)`` applying Flax linen modules
      and returning a scalar loss (or ``(loss, aux)`` when ``has_aux``).
    has_aux: as in ``jax.value_and_grad``.

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
  supported layer, registered or not.
  """

  def wrapped(params, *args, **kwargs):
    # Pass 1 (abstract, free at run time): the output shape of every call.
    out_shapes: dict[str, list] = collections.defaultdict(list)

    def shape_interceptor(next_fun, call_args, call_kwargs, context):
      outputs = next_fun(*call_args, **call_kwargs)
      if _is_layer_call(context):
        out_shapes[_layer_name(context.module)].append(
            jax.ShapeDtypeStruct(outputs.shape, outputs.dtype))
      return outputs

    def shape_pass(params):
      with nn.intercept_methods(shape_interceptor):
        return loss_fn(params, *args, **kwargs)

    jax.eval_shape(shape_pass, params)
    probes = {name: tuple(jnp.zeros(s.shape, s.dtype) for s in shapes)
              for name, shapes in out_shapes.items()}

    # Pass 2: the loss as a function of the params and the probes.
    def probed_loss(params, probes):
      inputs: dict[str, list] = collections.defaultdict(list)

      def interceptor(next_fun, call_args, call_kwargs, context):
        if not _is_layer_call(context):
          return next_fun(*call_args, **call_kwargs)
        name = _layer_name(context.module)
        index = len(inputs[name])
        inputs[name].append(_call_input(call_args, call_kwargs))
        outputs = next_fun(*call_args, **call_kwargs)
        if name not in probes or index >= len(probes[name]):
          raise ValueError(
              f"layer {name!r} was called more often than in the shape pass; "
              "the loss function must call its layers deterministically.")
        return outputs + probes[name][index]

      with nn.intercept_methods(interceptor):
        out = loss_fn(params, *args, **kwargs)
      loss, aux = out if has_aux else (out, None)
      return loss, (aux, {k: tuple(v) for k, v in inputs.items()})

    (loss, (aux, inputs)), (grads, out_grads) = jax.value_and_grad(
        probed_loss, argnums=(0, 1), has_aux=True)(params, probes)
    captures = {name: LayerCapture(inputs[name], out_grads[name])
                for name in out_grads}
    value = (loss, aux) if has_aux else loss
    return value, grads, captures

  return wrapped
