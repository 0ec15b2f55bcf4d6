"""The capture's entry points: ``find_layers`` and ``value_and_grad``.

``find_layers`` traces the loss once abstractly (to a jaxpr), registers the
layers its calls show and lists the leaves of params the loss reads that
none of them covers. ``value_and_grad`` traces it twice: an abstract shape
pass, which learns every call's output (and, where it must come back
through the backward pass, input) shape, then the loss as a function of
the params and zero probes of those shapes, differentiated with respect to
both.
"""

from __future__ import annotations

import collections
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kaisa_jax._src import fisher as fisher_lib
from kaisa_jax._src import groups as groups_lib
from kaisa_jax._src import layers as layers_lib
from kaisa_jax._src.layers import scanned
from kaisa_jax._src.capture import coverage as coverage_lib
from kaisa_jax._src.capture.calls import (_call_arguments, _call_input, _intercept_layers,
                                          _is_layer_call, _unsupported_call)
from kaisa_jax._src.capture.params import _module_param, _scope_name
from kaisa_jax._src.capture.probes import (_CallShape, _input_probe, _return_input,
                                           _zeros_varying_like)
from kaisa_jax._src.capture.scan import _Emitted
from kaisa_jax._src.capture.transforms import _MIXED_REASON, _LossTrace, _Site


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
    name, kind, A size and G size, then how many parameter entries are in
    registered layers and how many follow the plain gradient. A layer is
    named after the path of its kernel in ``params`` without the leaf, e.g.
    'encoder/Dense_0'. A
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

    Every leaf of ``params`` that the loss (the first output of
    ``loss_fn``, as traced) depends on and that no registered or skipped
    layer holds is listed in ``uncovered`` (a ``UncoveredParam``: path,
    shape, size), e.g. a custom module's own ``self.param`` kernel used with
    ``jnp.dot``, a hand-written norm's scale or a raw ``nnx.Param``: it
    follows the plain gradient, which ``kaisa`` accepts only with
    ``allow_plain_gradient=True``. A leaf the loss never reads has a zero
    gradient and is not listed. A remat'ed or scanned layer covers its
    leaves of ``params`` (a stacked scan's whole leaf).

  Example:
    >>> layers = kaisa_jax.find_layers(loss_fn, params, x, y)
    >>> print(layers)
    >>> [u.name for u in layers.uncovered]  # e.g. ['Block_0/w'] for a custom matmul

  Raises:
    ValueError: when a layer's kernel is not a leaf of ``params`` (e.g. the
      loss rebuilds the parameters before applying the model).
  """
  findings = _Findings()
  leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))
  dynamic = [i for i, leaf in enumerate(leaves) if _is_abstract(leaf)]

  def traced(params, dynamic_leaves):
    call_leaves = list(leaves)
    for i, leaf in zip(dynamic, dynamic_leaves):
      call_leaves[i] = leaf
    call_args, call_kwargs = jax.tree_util.tree_unflatten(treedef, call_leaves)
    loss_trace = _LossTrace(params)
    findings.index = loss_trace.index
    interceptor = functools.partial(_find_call, findings, loss_trace)
    with _intercept_layers(interceptor, loss_trace):
      return loss_fn(params, *call_args, **call_kwargs)

  flat_params = jax.tree_util.tree_flatten_with_path(params)[0]
  # The jaxpr's inputs are the params' leaves, in order, then the arguments'.
  jaxpr = jax.make_jaxpr(traced)(params, [leaves[i] for i in dynamic])
  used = coverage_lib.used_inputs(jaxpr)[:len(flat_params)]
  return findings.registry(flat_params, used)


class _Findings:
  """What ``find_layers`` learns of the layers, one call at a time."""

  def __init__(self):
    self.found: dict[str, layers_lib.Layer] = {}
    self.skipped: dict[str, layers_lib.Skipped] = {}
    self.provisional: set[str] = set()  # skipped with a reason a more precise one replaces
    self.ignored: dict[str, layers_lib.Skipped] = {}  # seen only in nn.scan's look-ahead trace
    self.modes: dict[str, tuple] = {}  # the capture layout of each layer's calls
    # Each layer's call inputs, in call order: held (not just their ids) so
    # that no id is reused before ``registry`` compares them.
    self.call_inputs: dict[str, list] = {}
    self.errors: list[str] = []
    self.index = None  # the ``_ParamIndex`` of the params being traced
    self.skipped_paths: set = set()  # where the skipped layers' parameters are in params

  def skip(self, name, module, reason, final=True):
    # A layer with any call that cannot be captured is not registered, even
    # when its other calls could be: its factors would miss those rows.
    self.found.pop(name, None)
    self.skipped_paths |= self.index.module_paths(module)
    if name in self.skipped and name not in self.provisional:
      return
    self.skipped[name] = layers_lib.Skipped(name, type(module).__name__, reason)
    (self.provisional.discard if final else self.provisional.add)(name)

  def record(self, site: _Site, module, inputs, outputs, fn_args, fn_kwargs) -> None:
    """What the layer call of ``module`` at ``site``, ``inputs`` to ``outputs``, says."""
    if site.how == "ignore":
      self.ignored[site.name] = layers_lib.Skipped(site.name, type(module).__name__, site.reason)
      return
    if site.how == "skip":
      self.skip(site.name, module, site.reason, site.final)
      return
    if site.located is None:
      self.errors.append(
          f"layer {_scope_name(module)!r}: its parameters are not leaves of "
          "the params passed to find_layers (does the loss rebuild them?). "
          "Pass the exact pytree the loss hands to model.apply (Flax NNX: "
          "build the model inside the loss with nnx.merge(graphdef, params) "
          "instead of closing over it).")
      return
    name, kernel_path, bias_path, kernel = site.located
    self.call_inputs.setdefault(name, []).append(inputs)
    if self.modes.setdefault(name, site.mode) != site.mode:
      self.skip(name, module, _MIXED_REASON)
    if name in self.found or name in self.skipped:
      return  # a shared module: later calls add rows, not layers
    kind = layers_lib.kind_of(module)
    call_kernel = _module_param(module, kind.kernel_param)  # one iteration's in a scan
    try:
      layer = kind.from_call(module, name, kernel_path, bias_path,
                             tuple(call_kernel.shape), inputs, outputs,
                             _call_arguments(module, fn_args, fn_kwargs))
      if site.how == "scan":
        layer = scanned.Scanned.wrap(layer, kernel.shape, site.stacked_axis)
      self.found[name] = layer
    except layers_lib.UnsupportedLayer as e:
      self.skip(name, module, str(e))

  def registry(self, flat_params, used) -> layers_lib.LayerRegistry:
    """The layers found, once the loss has been traced.

    ``flat_params``: the (key path, leaf) pairs of params; ``used``: per
    leaf, whether the loss reads it (the leaves no layer covers are listed).
    """
    for name, entry in self.ignored.items():
      if name not in self.found and name not in self.skipped:
        self.skipped[name] = entry
    if self.errors:
      raise ValueError("\n".join(self.errors))
    if not self.found and not self.skipped:
      raise ValueError(
          "find_layers: loss_fn calls no flax.linen Dense or Conv (nor Flax NNX "
          "Linear or Conv) layer; "
          "K-FAC has nothing to precondition.")
    uncovered, registered, plain = coverage_lib.coverage(
        flat_params, used, self.found.values(), self.skipped_paths, set(self.skipped))
    return layers_lib.LayerRegistry(tuple(self.found.values()), tuple(self.skipped.values()),
                                    self.shared_inputs(), uncovered, registered, plain)

  def shared_inputs(self) -> tuple[tuple[str, ...], ...]:
    """Sets of found layers whose every call gets the same input object, with
    equal signatures (so the same A statistics)."""
    sets: dict[tuple, list[str]] = {}
    for name, layer in self.found.items():
      key = (tuple(id(x) for x in self.call_inputs[name]), groups_lib.signature(layer))
      sets.setdefault(key, []).append(name)
    return tuple(tuple(names) for names in sets.values() if len(names) > 1)


def _find_call(findings: _Findings, loss_trace: _LossTrace, next_fun, fn_args, fn_kwargs,
               context):
  """``find_layers``' interceptor: records in ``findings`` what one module call says."""
  module = context.module
  reason = _unsupported_call(context)
  if reason is not None:
    located = loss_trace.index.locate(module) if layers_lib.kind_of(module) else None
    findings.skip(_scope_name(module) if located is None else located[0], module, reason)
    return next_fun(*fn_args, **fn_kwargs)
  if not _is_layer_call(context):
    return next_fun(*fn_args, **fn_kwargs)
  inputs = _call_input(fn_args, fn_kwargs)
  kernel_param = layers_lib.kind_of(module).kernel_param
  if _module_param(module, kernel_param) is None:
    findings.skip(_scope_name(module), module, f"it has no {kernel_param!r} parameter")
    return next_fun(*fn_args, **fn_kwargs)
  site = loss_trace.site(module, inputs)
  outputs = next_fun(*fn_args, **fn_kwargs)
  findings.record(site, module, inputs, outputs, fn_args, fn_kwargs)
  return outputs


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

  def wrapped(params, *args, **kwargs):
    call_shapes, dropped = _shape_pass(loss_fn, params, args, kwargs)
    probes = _probes(call_shapes)
    probed_loss = functools.partial(_probed_loss, loss_fn, args, kwargs, call_shapes, dropped,
                                    has_aux, sampled)
    loss, aux, inputs, grads, (out_grads, in_grads) = _differentiate(
        probed_loss, params, probes, sampled)
    captures = _captures(call_shapes, inputs, out_grads, in_grads)
    value = (loss, aux) if has_aux else loss
    return value, grads, captures

  return wrapped


def _split_losses(out, has_aux: bool, sampled: bool):
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


def _shape_pass(loss_fn, params, args, kwargs) -> tuple[dict, set]:
  """Pass 1 (abstract, free at run time): ``(call_shapes, dropped)``.

  ``call_shapes``: per layer to capture, the ``_CallShape`` of each call,
  the output shape of every call (and the input shape of calls inside
  jax.checkpoint); ``dropped``: the layers with a call that cannot be
  captured.
  """
  call_shapes: dict[str, list] = collections.defaultdict(list)
  dropped: set[str] = set()

  def shape_pass(params):
    loss_trace = _LossTrace(params)
    interceptor = functools.partial(_shape_call, loss_trace, call_shapes, dropped)
    with _intercept_layers(interceptor, loss_trace):
      return loss_fn(params, *args, **kwargs)

  jax.eval_shape(shape_pass, params)
  # A layer with a call that cannot be captured, or whose calls' captures
  # differ in layout, is not captured at all.
  dropped |= {name for name, calls in call_shapes.items()
              if len({call.mode for call in calls}) > 1}
  call_shapes = {name: calls for name, calls in call_shapes.items() if name not in dropped}
  return call_shapes, dropped


def _shape_call(loss_trace: _LossTrace, call_shapes: dict, dropped: set, next_fun, call_args,
                call_kwargs, context):
  """The shape pass's interceptor: one layer call's ``_CallShape``, or its layer dropped."""
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


def _probes(call_shapes: dict) -> tuple[dict, dict]:
  """(output probes, input probes): per layer, a zero probe per call (no input probe: None)."""
  out_probes = {name: tuple(_zeros_varying_like(*call.output) for call in calls)
                for name, calls in call_shapes.items()}
  in_probes = {name: tuple(None if call.input is None else _input_probe(*call.input)
                           for call in calls)
               for name, calls in call_shapes.items()}
  return out_probes, in_probes


def _probed_loss(loss_fn, args, kwargs, call_shapes: dict, dropped: set, has_aux: bool,
                 sampled: bool, params, probes):
  """Pass 2: the loss as a function of the params and the probes.

  Returns the loss (``(loss, fisher_loss)`` when ``sampled``) and ``(aux,
  inputs)``: per layer, the inputs recorded in the forward pass (None for
  those that come back as the gradients of their input probes).
  """
  out_probes, in_probes = probes
  inputs: dict[str, list] = collections.defaultdict(list)
  # Each scan is given the (length, ...) probes of the calls in its body.
  by_frame: dict[int, dict] = collections.defaultdict(dict)
  for name, calls in call_shapes.items():
    for c, call in enumerate(calls):
      if call.frame is not None:
        by_frame[call.frame][(name, c)] = (out_probes[name][c], in_probes[name][c])
  loss_trace = _LossTrace(params, probes_for=lambda frame: by_frame.get(frame, {}))
  interceptor = functools.partial(_probe_call, loss_trace, call_shapes, dropped, probes, inputs)
  with _intercept_layers(interceptor, loss_trace):
    loss, fisher_loss, aux = _split_losses(loss_fn(params, *args, **kwargs), has_aux, sampled)
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


def _probe_call(loss_trace: _LossTrace, call_shapes: dict, dropped: set, probes, inputs: dict,
                next_fun, call_args, call_kwargs, context):
  """The probe pass's interceptor: one layer call probed, its input recorded."""
  out_probes, in_probes = probes
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


def _differentiate(probed_loss, params, probes, sampled: bool):
  """(loss, aux, recorded inputs, grads, (output gradients, input probe gradients))."""
  if sampled:
    # One forward pass; the parameter gradient from the loss, the output
    # gradients (and the inputs given back inside jax.checkpoint) from the
    # fisher loss.
    (loss, fisher_loss), vjp, (aux, inputs) = jax.vjp(
        probed_loss, params, probes, has_aux=True)
    grads, _ = vjp((jnp.ones_like(loss), jnp.zeros_like(fisher_loss)))
    _, probe_grads = vjp((jnp.zeros_like(loss), jnp.ones_like(fisher_loss)))
  else:
    (loss, (aux, inputs)), (grads, probe_grads) = jax.value_and_grad(
        probed_loss, argnums=(0, 1), has_aux=True)(params, probes)
  return loss, aux, inputs, grads, probe_grads


def _captures(call_shapes: dict, inputs: dict, out_grads: dict, in_grads: dict) -> dict:
  """Per layer, its ``LayerCapture``: inputs recorded or given back, output gradients."""
  captures = {}
  for name, calls in call_shapes.items():
    layer_inputs = tuple(
        recorded if call.input is None else given.astype(call.input[0].dtype)
        for recorded, given, call in zip(inputs[name], in_grads[name], calls))
    captures[name] = LayerCapture(layer_inputs, out_grads[name])
  return captures
