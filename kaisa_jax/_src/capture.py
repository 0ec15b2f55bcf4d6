"""Capture: what the Flax calls of a loss give K-FAC.

A Flax method interceptor sees every supported layer call. To find the layers
it records static facts; to capture, it records each call's input and adds a
zero "probe" to its output, so that the gradient of the loss with respect to
the probe is the gradient with respect to the layer output. Probes are named
per call, so a module called twice gets both calls' rows, not their sum.
"""

from __future__ import annotations

import collections
import contextlib
from typing import Any, Callable, NamedTuple

import flax.linen as nn
from flax.core import tracers
import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from kaisa_jax._src import collectives
from kaisa_jax._src import fisher as fisher_lib
from kaisa_jax._src import layers as layers_lib
from kaisa_jax._src import nnx_capture


class LayerCapture(NamedTuple):
  """What one layer saw in one loss evaluation, one entry per call.

  Attributes:
    inputs: per call, the layer input, e.g. (batch, in) for Dense.
    out_grads: per call, d loss / d output, same shape as the layer output.
  """
  inputs: tuple
  out_grads: tuple


class _ParamIndex:
  """Finds a layer's kernel and bias in the params pytree the loss was given.

  A layer is named after where its kernel lives in ``params`` (not after its
  Flax scope, which two models applied in one loss share): the kernel leaf is
  recognised by identity, or, when the loss re-wraps the parameters (e.g.
  ``nn.remat``), by its scope path.
  """

  def __init__(self, params):
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    self._by_id = {id(leaf): path for path, leaf in flat}
    self._by_path = {path: leaf for path, leaf in flat}

  def _by_scope(self, module: nn.Module, name: str, like):
    # NNX modules have no scope; their parameters are found by identity.
    if like is None or nnx_capture.is_nnx(module):
      return None
    scope = tuple(jax.tree_util.DictKey(p) for p in module.scope.path)
    for prefix in ((), (jax.tree_util.DictKey("params"),)):
      path = prefix + scope + (jax.tree_util.DictKey(name),)
      leaf = self._by_path.get(path)
      if leaf is not None and tuple(leaf.shape) == tuple(like.shape):
        return path
    return None

  def locate(self, module: nn.Module):
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
    kernel_path = self._by_id.get(id(kernel)) or self._by_scope(module, kind.kernel_param, kernel)
    bias_path = None
    if bias is not None:
      bias_path = self._by_id.get(id(bias)) or self._by_scope(module, kind.bias_param, bias)
    if kernel_path is None or (bias is not None and bias_path is None):
      return None
    return _layer_name(kernel_path), kernel_path, bias_path, kernel


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
def _intercept_layers(interceptor):
  """``interceptor`` on the module calls of both Flax APIs, linen and NNX."""
  with nn.intercept_methods(interceptor), nnx_capture.intercept_methods(interceptor):
    yield


def _call_input(args, kwargs):
  if args:
    return args[0]
  return kwargs["inputs"]


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


_NESTED_REASON = ("called inside a JAX transform (nn.remat, nn.scan, nn.vmap, "
                  "nnx.remat, nnx.scan, nnx.vmap, jax.checkpoint)")


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
    ``flax.linen.Dense`` 64 -> 32 with bias has A size 65 and G size 32.

  Example:
    >>> layers = kaisa_jax.find_layers(loss_fn, params, x, y)
    >>> print(layers)

  Raises:
    ValueError: when a layer's kernel is not a leaf of ``params`` (e.g. the
      loss rebuilds the parameters before applying the model).
  """
  found: dict[str, layers_lib.Layer] = {}
  skipped: dict[str, layers_lib.Skipped] = {}
  errors: list[str] = []
  leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))
  dynamic = [i for i, leaf in enumerate(leaves) if _is_abstract(leaf)]

  def traced(params, dynamic_leaves):
    call_leaves = list(leaves)
    for i, leaf in zip(dynamic, dynamic_leaves):
      call_leaves[i] = leaf
    call_args, call_kwargs = jax.tree_util.tree_unflatten(treedef, call_leaves)
    index = _ParamIndex(params)
    loss_trace = tracers.current_trace()

    def interceptor(next_fun, fn_args, fn_kwargs, context):
      module = context.module
      reason = _unsupported_call(context)
      if reason is not None:
        located = index.locate(module) if layers_lib.kind_of(module) else None
        name = _scope_name(module) if located is None else located[0]
        found.pop(name, None)
        skipped.setdefault(name, layers_lib.Skipped(name, type(module).__name__, reason))
        return next_fun(*fn_args, **fn_kwargs)
      if not _is_layer_call(context):
        return next_fun(*fn_args, **fn_kwargs)
      if tracers.current_trace() != loss_trace:
        name = _scope_name(module)
        skipped.setdefault(name, layers_lib.Skipped(name, type(module).__name__, _NESTED_REASON))
        return next_fun(*fn_args, **fn_kwargs)
      inputs = _call_input(fn_args, fn_kwargs)
      outputs = next_fun(*fn_args, **fn_kwargs)
      kernel_param = layers_lib.kind_of(module).kernel_param
      if _module_param(module, kernel_param) is None:
        name = _scope_name(module)
        skipped.setdefault(name, layers_lib.Skipped(
            name, type(module).__name__, f"it has no {kernel_param!r} parameter"))
        return outputs
      located = index.locate(module)
      if located is None:
        errors.append(
            f"layer {_scope_name(module)!r}: its parameters are not leaves of "
            "the params passed to find_layers (does the loss rebuild them?). "
            "Pass the exact pytree the loss hands to model.apply (Flax NNX: "
            "build the model inside the loss with nnx.merge(graphdef, params) "
            "instead of closing over it).")
        return outputs
      name, kernel_path, bias_path, kernel = located
      if name in found or name in skipped:
        return outputs  # a shared module: later calls add rows, not layers
      try:
        found[name] = layers_lib.kind_of(module).from_call(
            module, name, kernel_path, bias_path, tuple(kernel.shape), inputs, outputs,
            fn_kwargs)
      except layers_lib.UnsupportedLayer as e:
        skipped[name] = layers_lib.Skipped(name, type(module).__name__, str(e))
      return outputs

    with _intercept_layers(interceptor):
      return loss_fn(params, *call_args, **call_kwargs)

  jax.eval_shape(traced, params, [leaves[i] for i in dynamic])
  if errors:
    raise ValueError("\n".join(errors))
  if not found and not skipped:
    raise ValueError(
        "find_layers: loss_fn calls no flax.linen Dense or Conv (nor Flax NNX "
        "Linear or Conv) layer; "
        "K-FAC has nothing to precondition.")
  return layers_lib.LayerRegistry(tuple(found.values()), tuple(skipped.values()))


def _capture_name(index: _ParamIndex, module: nn.Module) -> str:
  located = index.locate(module)
  # An unlocatable layer cannot be in a registry; its scope name makes the
  # mismatch visible when the captures are checked.
  return _scope_name(module) if located is None else located[0]


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
  supported layer, registered or not.
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
    # Pass 1 (abstract, free at run time): the output shape of every call.
    out_shapes: dict[str, list] = collections.defaultdict(list)

    def shape_pass(params):
      index = _ParamIndex(params)
      loss_trace = tracers.current_trace()

      def shape_interceptor(next_fun, call_args, call_kwargs, context):
        outputs = next_fun(*call_args, **call_kwargs)
        if _is_layer_call(context) and tracers.current_trace() == loss_trace:
          out_shapes[_capture_name(index, context.module)].append(
              (jax.ShapeDtypeStruct(outputs.shape, outputs.dtype),
               tuple(sorted(collectives.varying_axes(outputs), key=str))))
        return outputs

      with _intercept_layers(shape_interceptor):
        return loss_fn(params, *args, **kwargs)

    jax.eval_shape(shape_pass, params)
    probes = {name: tuple(_zeros_varying_like(s, axes) for s, axes in shapes)
              for name, shapes in out_shapes.items()}

    # Pass 2: the loss as a function of the params and the probes.
    def probed_loss(params, probes):
      inputs: dict[str, list] = collections.defaultdict(list)
      index = _ParamIndex(params)
      loss_trace = tracers.current_trace()

      def interceptor(next_fun, call_args, call_kwargs, context):
        # Inside a nested transform the recorded input would leak its trace.
        if not _is_layer_call(context) or tracers.current_trace() != loss_trace:
          return next_fun(*call_args, **call_kwargs)
        name = _capture_name(index, context.module)
        call = len(inputs[name])
        inputs[name].append(_call_input(call_args, call_kwargs))
        outputs = next_fun(*call_args, **call_kwargs)
        if name not in probes or call >= len(probes[name]):
          raise ValueError(
              f"layer {name!r} was called more often than in the shape pass; "
              "the loss function must call its layers deterministically.")
        return outputs + probes[name][call]

      with _intercept_layers(interceptor):
        loss, fisher_loss, aux = split(loss_fn(params, *args, **kwargs))
      recorded = (aux, {k: tuple(v) for k, v in inputs.items()})
      return ((loss, fisher_loss) if sampled else loss), recorded

    if sampled:
      # One forward pass; the parameter gradient from the loss, the output
      # gradients from the fisher loss.
      (loss, fisher_loss), vjp, (aux, inputs) = jax.vjp(
          probed_loss, params, probes, has_aux=True)
      grads, _ = vjp((jnp.ones_like(loss), jnp.zeros_like(fisher_loss)))
      _, out_grads = vjp((jnp.zeros_like(loss), jnp.ones_like(fisher_loss)))
    else:
      (loss, (aux, inputs)), (grads, out_grads) = jax.value_and_grad(
          probed_loss, argnums=(0, 1), has_aux=True)(params, probes)
    captures = {name: LayerCapture(inputs[name], out_grads[name])
                for name in out_grads}
    value = (loss, aux) if has_aux else loss
    return value, grads, captures

  return wrapped


def _zeros_varying_like(shape: jax.ShapeDtypeStruct, axes: tuple) -> jax.Array:
  """A zero probe that varies along the same shard_map axes as the layer output.

  A probe typed as replicated would have its gradient summed over the
  devices by autodiff (shard_map's checked mode), where K-FAC needs each
  device's own output gradients.
  """
  zeros = jnp.zeros(shape.shape, shape.dtype)
  return lax.pcast(zeros, axes, to="varying") if axes else zeros
