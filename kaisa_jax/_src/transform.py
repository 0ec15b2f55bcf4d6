"""Transform: K-FAC as an optax ``GradientTransformationExtraArgs``.

One update: (on factor steps) fold the batch factors into the running
averages, (on decomposition steps) decompose them, precondition every
registered layer's gradient with the latest decomposition, KL-clip, and hand
the other leaves through unchanged. Periodic work sits behind ``lax.cond``, so
a step that is not due costs nothing.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import (Any, Callable, Hashable, Mapping, NamedTuple, Optional, Sequence,
                    Union)

import jax
import jax.numpy as jnp
import optax
from jax import lax

from kaisa_jax._src import collectives
from kaisa_jax._src import eigen as eigen_lib
from kaisa_jax._src import factors as factors_lib
from kaisa_jax._src import layers as layers_lib
from kaisa_jax._src import placement as placement_lib
from kaisa_jax._src import scanned as scanned_lib

ScalarOrSchedule = Union[float, jax.Array, Callable[[jax.Array], jax.Array]]


# How G is scaled: see kaisa(g_factor_scaling=...).
G_FACTOR_SCALINGS = ("loss", "per_example")


class AccumulationState(NamedTuple):
  """Sums over the micro-batches of the optimizer step in progress.

  Attributes:
    micro_step: int32, micro-batches seen in this step so far.
    grads: the sum of their gradients (the params pytree).
    factors: per layer, the sum of their batch factors (``LayerFactors``);
      only filled on factor steps.
  """
  micro_step: jax.Array
  grads: Any
  factors: dict


class KaisaState(NamedTuple):
  """State of ``kaisa``: a pytree of arrays (checkpoint it with orbax).

  Attributes:
    step: int32, optimizer steps taken (micro-batches not counted).
    factors: per layer name, its running ``LayerFactors`` (A, G).
    decompositions: per layer name, its latest ``Eigen``, ``EigenOuter`` or
      ``Inverse``, the same on every device; used when every device holds
      every layer's eigen data (one device, or ``grad_worker_frac=1``),
      else empty.
    local_decompositions: with ``grad_worker_frac < 1`` on several devices,
      this device's eigen data: the decompositions of the layers of its
      grad-worker group, packed into one vector whose length is that of the
      largest group's (see ``kaisa_jax.placement``); different on every
      group, so shard it over the devices (``kaisa_jax.state_specs``). Else
      None.
    skipped_factor_updates: int32, factor steps skipped because a capture or
      gradient was not finite (the previous factors were kept).
    rejected_decompositions: int32, layer decompositions that came out not
      finite and were rejected (the previous one was kept).
    accumulation: ``AccumulationState`` when ``accumulation_steps > 1``, else
      None.
  """
  step: jax.Array
  factors: dict
  decompositions: dict
  local_decompositions: Optional[jax.Array]
  skipped_factor_updates: jax.Array
  rejected_decompositions: jax.Array
  accumulation: Optional[AccumulationState]


def _value(hyperparameter, step):
  return hyperparameter(step) if callable(hyperparameter) else hyperparameter


def _concrete(value) -> Optional[float]:
  """The value as a float when it is known at trace time, else None."""
  if callable(value) or isinstance(value, jax.core.Tracer):
    return None
  return float(value)


def _check_positive_int(name: str, value) -> int:
  if isinstance(value, jax.core.Tracer):
    raise ValueError(
        f"{name} must be a static Python int; with optax.inject_hyperparams "
        f"list it in static_args.")
  if int(value) != value or int(value) < 1:
    raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
  return int(value)


def _check_hyperparameters(damping, factor_decay, kl_clip, learning_rate):
  checks = [
      ("damping", damping, lambda v: v > 0, "> 0"),
      ("factor_decay", factor_decay, lambda v: 0 < v <= 1, "in (0, 1]"),
      ("learning_rate", learning_rate, lambda v: v >= 0, ">= 0"),
  ]
  if kl_clip is not None:
    checks.append(("kl_clip", kl_clip, lambda v: v > 0, "> 0 (or None to disable)"))
  for name, value, ok, want in checks:
    v = _concrete(value)
    if v is not None and not ok(v):
      raise ValueError(f"{name} must be {want}, got {value!r}.")


def _check_dtype(name: str, dtype):
  dtype = jnp.dtype(dtype)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"{name} must be a floating dtype, got {dtype}.")
  if dtype.itemsize == 8 and not jax.config.jax_enable_x64:
    raise ValueError(
        f"{name}={dtype} needs jax.config.update('jax_enable_x64', True); "
        "without it JAX would silently compute in float32.")
  return dtype


def _active_layers(layers: layers_lib.LayerRegistry,
                   skip_layers: Sequence[str]) -> tuple[layers_lib.Layer, ...]:
  patterns = [re.compile(p) for p in skip_layers]
  skipped = lambda name: any(p.search(name) for p in patterns)
  for s in layers.skipped:
    if not skipped(s.name):
      raise ValueError(
          f"layer {s.name!r} ({s.module_type}) cannot be preconditioned yet: "
          f"{s.reason}. Pass skip_layers=({re.escape(s.name)!r},) to leave it "
          "to the plain gradient.")
  return tuple(l for l in layers.layers if not skipped(l.name))


def _with_weight_sharing(active: tuple[layers_lib.Layer, ...],
                         weight_sharing) -> tuple[layers_lib.Layer, ...]:
  """The active layers, each Dense layer set to its weight-sharing mode.

  A string applies to every Dense layer; a mapping from regular expressions
  to modes applies the first that matches a layer's name ('expand' if none).
  """
  if isinstance(weight_sharing, str):
    rules = [(None, weight_sharing)]
  elif isinstance(weight_sharing, Mapping):
    rules = [(re.compile(pattern), mode) for pattern, mode in weight_sharing.items()]
  else:
    raise ValueError(
        f"weight_sharing must be one of {layers_lib.WEIGHT_SHARING} or a mapping from "
        f"layer-name regular expressions to them, got {weight_sharing!r}.")
  for _, mode in rules:
    if mode not in layers_lib.WEIGHT_SHARING:
      raise ValueError(
          f"weight_sharing modes are {layers_lib.WEIGHT_SHARING}, got {mode!r}.")
  resolved = []
  for layer in active:
    mode = next((m for p, m in rules if p is None or p.search(layer.name)), "expand")
    # A layer inside a scan shares the weights of its kind's own calls.
    scan = layer if isinstance(layer, scanned_lib.Scanned) else None
    inner = layer.inner if scan else layer
    if isinstance(inner, layers_lib.Dense):
      inner = dataclasses.replace(inner, weight_sharing=mode)
      layer = scan.with_inner(inner) if scan else inner
    elif mode != "expand" and isinstance(weight_sharing, Mapping):
      raise ValueError(
          f"weight_sharing={mode!r} was asked for layer {layer.name!r}, a {layer.kind} "
          "layer; it applies to Dense layers (a convolution keeps the reference's "
          "convention over its positions). Narrow the regular expression.")
    resolved.append(layer)
  return tuple(resolved)


def _leaves_by_path(tree) -> dict:
  return {path: leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _check_params(layers, tree, what: str):
  """Trace-time check that every layer's kernel/bias is in ``tree`` with its shape."""
  leaves = _leaves_by_path(tree)
  for layer in layers:
    kernel = leaves.get(layer.kernel_path)
    if kernel is None or tuple(kernel.shape) != layer.kernel_shape:
      got = None if kernel is None else tuple(kernel.shape)
      raise ValueError(
          f"layer {layer.name!r}: {what} kernel at "
          f"{jax.tree_util.keystr(layer.kernel_path)} has shape {got}, the "
          f"registry says {layer.kernel_shape}; call find_layers on the same "
          "params structure.")
    if layer.has_bias and layer.bias_path not in leaves:
      raise ValueError(
          f"layer {layer.name!r}: {what} has no bias at "
          f"{jax.tree_util.keystr(layer.bias_path)}.")


def _check_captures(registry: layers_lib.LayerRegistry, layers, captures):
  if captures is None:
    raise ValueError(
        "kaisa update needs captures=...: call "
        "opt.update(grads, state, params, captures=captures) with the captures "
        "from kaisa_jax.value_and_grad.")
  known = set(registry.names) | {s.name for s in registry.skipped}
  unknown = sorted(set(captures) - known)
  if unknown:
    raise ValueError(
        f"captures for layers not in the registry: {unknown}; run find_layers "
        "on the same loss function.")
  missing = sorted(l.name for l in layers if l.name not in captures)
  if missing:
    raise ValueError(
        f"no captures for registered layers {missing}; the loss given to "
        "kaisa_jax.value_and_grad must call them.")


def kaisa(
    layers: layers_lib.LayerRegistry,
    *,
    damping: ScalarOrSchedule = 1e-3,
    factor_decay: ScalarOrSchedule = 0.95,
    factor_update_steps: int = 1,
    inv_update_steps: int = 1,
    kl_clip: Optional[ScalarOrSchedule] = 1e-3,
    learning_rate: ScalarOrSchedule = 0.1,
    compute_method: str = "eigen",
    eigenvalue_outer_product: bool = True,
    accumulation_steps: int = 1,
    skip_layers: Sequence[str] = (),
    factor_dtype: Any = "float32",
    inv_dtype: Any = "float32",
    axis_name: Optional[Hashable] = None,
    grad_worker_frac: float = 1.0,
    colocate_factors: bool = True,
    cost_model: str = "compute",
    symmetric_factors: bool = True,
    g_factor_scaling: str = "loss",
    weight_sharing: Union[str, Mapping[str, str]] = "expand",
) -> optax.GradientTransformationExtraArgs:
  """K-FAC preconditioning (KAISA conventions) as an optax transformation.

  Each registered layer's gradient matrix ∇ (g_size, a_size; the bias is the
  last column) becomes ``ν · (G + γI)⁻¹ ∇ (A + γI)⁻¹`` computed through the
  eigendecompositions of the running Kronecker factors A and G; ν is the KL
  clip. Leaves of unregistered or skipped layers pass through unchanged.
  Chain it before a first-order optimizer, which applies the learning rate.

  Args:
    layers: the registry from ``kaisa_jax.find_layers``.
    damping: γ > 0, a float or an optax schedule of the step count.
    factor_decay: running-average weight of the old factors, in (0, 1]; float
      or schedule.
    factor_update_steps: update the factors every this many steps (from 0).
    inv_update_steps: recompute the decompositions every this many steps.
    kl_clip: KL clip bound (float or schedule); None disables clipping.
    learning_rate: the learning rate of the optimizer that follows, used only
      by the KL clip; float or schedule.
    compute_method: 'eigen' (eigendecompositions), 'inverse' (damped
      Cholesky inverses) or 'ekfac' (eigenvalue-corrected K-FAC, George et
      al. 2018: the eigenbases of 'eigen' with a running average of the
      per-row gradients' second moment in those bases, ``(QGᵀ g)² (QAᵀ
      a)²ᵀ``, in place of ``dG dAᵀ``; it restarts from ``dG dAᵀ`` when the
      bases are recomputed and is updated on factor steps). 'ekfac' needs
      ``grad_worker_frac=1`` on several devices and ``accumulation_steps=1``.
    eigenvalue_outer_product: with 'eigen', form ``1/(dG dAᵀ + γ)`` when
      decomposing (damping fixed until the next decomposition) rather than
      at every step.
    accumulation_steps: micro-batches per optimizer step. Every micro-batch
      adds to the gradient and (on factor steps) to the factors; the result
      equals one big batch whose loss is the mean of the micro-batch losses.
      The update is zero on the first k-1 micro-batches; wrap the optimizer
      that follows in ``optax.MultiSteps(opt, k, use_grad_mean=False)``.
    skip_layers: regular expressions; layers whose name matches one are left
      to the plain gradient.
    factor_dtype: dtype (or its name) the factors are computed and kept in
      ('float32'; 'bfloat16' saves time at a loss of precision).
    inv_dtype: dtype (or its name) of the decompositions and the
      preconditioning ('float32'; 'float64' needs ``jax_enable_x64``).
    axis_name: the data-parallel axis of ``jax.pmap`` / ``jax.shard_map``
      (None: one device). Call ``init`` and ``update`` inside the map, with
      each device's own gradients and captures of a loss that is the mean
      over its own batch: the transform averages the gradients
      (Gradient-Reduce) and the factors (Factor-Reduce, G scaled to the
      global-batch loss), so the result is that of one device on the global
      batch for any device count.
    grad_worker_frac: f in (0, 1]: ``max(1, round(N f))`` devices per layer
      hold its eigen data and precondition its gradient. 1 is COMM-OPT
      (every device preconditions everything locally, no gradient
      broadcast), 1/N is MEM-OPT (one device per layer, the least memory),
      in between HYBRID-OPT. The grad-worker count must divide N.
    colocate_factors: decompose a layer's A and G on one device (True) or
      spread them over its grad-worker group.
    cost_model: what the layer-to-device assignment balances: 'compute'
      (n³ per factor) or 'memory' (n²).
    symmetric_factors: send only the upper triangles in the Factor-Reduce
      (half the bytes).
    g_factor_scaling: 'loss' (the reference): G is built from the output
      gradients of the loss as given, so a loss that is a mean over B
      examples puts 1/B² into G and the damping that works depends on B.
      'per_example': G is multiplied by B² (B the leading axis of each
      layer's input, times the device count and ``accumulation_steps``), so
      it estimates the per-example Fisher block and a damping value means
      the same at any batch size. Either way the result does not depend on
      the device count or on accumulation.
    weight_sharing: how a Dense, DenseGeneral or Einsum layer on inputs
      with extra axes, (batch, *positions, in) such as tokens, enters its
      factors: 'expand' (the
      reference: every position a row) or 'reduce' (one row per example:
      inputs averaged, output gradients summed over the positions; cheaper,
      Eschenhagen et al. 2023); or a mapping from layer-name regular
      expressions to modes, the first match deciding ('expand' if none).
      Convolutions keep the reference's treatment of their positions.

  Several devices: see ``kaisa_jax.placement`` for who does what and the
  bytes each collective moves. HYBRID-OPT inside ``jax.shard_map`` needs
  ``check_vma=False``: its preconditioned gradients arrive through grouped
  collectives, whose results JAX types as per-device. COMM-OPT and MEM-OPT
  run with the default. With shard_map give the state the specs of
  ``kaisa_jax.state_specs``.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; its update is
    ``update(grads, state, params=None, *, captures)`` with the captures of
    ``kaisa_jax.value_and_grad``. Works under ``jax.jit``; with
    ``optax.inject_hyperparams`` put ``factor_update_steps``,
    ``inv_update_steps``, ``accumulation_steps`` and ``grad_worker_frac`` in
    ``static_args`` (and dtypes, when given as dtype objects rather than
    names).

  Example:
    >>> layers = kaisa_jax.find_layers(loss_fn, params, x, y)
    >>> opt = optax.chain(kaisa_jax.kaisa(layers, damping=1e-3),
    ...                   optax.sgd(0.1, momentum=0.9))
    >>> state = opt.init(params)
    >>> loss, grads, captures = kaisa_jax.value_and_grad(loss_fn)(params, x, y)
    >>> updates, state = opt.update(grads, state, params, captures=captures)
    >>> params = optax.apply_updates(params, updates)
  """
  if not isinstance(layers, layers_lib.LayerRegistry):
    raise ValueError(
        f"layers must be the LayerRegistry from kaisa_jax.find_layers, got "
        f"{type(layers).__name__}.")
  if g_factor_scaling not in G_FACTOR_SCALINGS:
    raise ValueError(
        f"g_factor_scaling must be one of {G_FACTOR_SCALINGS}, got "
        f"{g_factor_scaling!r}.")
  if compute_method not in eigen_lib.COMPUTE_METHODS:
    raise ValueError(
        f"compute_method must be one of {eigen_lib.COMPUTE_METHODS}, got "
        f"{compute_method!r}.")
  _check_hyperparameters(damping, factor_decay, kl_clip, learning_rate)
  factor_update_steps = _check_positive_int("factor_update_steps", factor_update_steps)
  inv_update_steps = _check_positive_int("inv_update_steps", inv_update_steps)
  accumulation_steps = _check_positive_int("accumulation_steps", accumulation_steps)
  if compute_method == "ekfac" and accumulation_steps > 1:
    raise ValueError(
        "compute_method='ekfac' does not support accumulation_steps > 1 yet: its "
        "eigenvalue scaling needs each micro-batch's rows in the current eigenbases.")
  if isinstance(skip_layers, str):
    skip_layers = (skip_layers,)
  factor_dtype = _check_dtype("factor_dtype", factor_dtype)
  inv_dtype = _check_dtype("inv_dtype", inv_dtype)
  active = _with_weight_sharing(_active_layers(layers, skip_layers), weight_sharing)
  by_name = {l.name: l for l in active}
  outer = bool(eigenvalue_outer_product)

  @functools.lru_cache(maxsize=None)
  def plan_for(num_devices: int) -> placement_lib.Placement:
    return placement(layers, num_devices, grad_worker_frac, skip_layers=skip_layers,
                     colocate_factors=colocate_factors, cost_model=cost_model,
                     compute_method=compute_method, eigenvalue_outer_product=outer,
                     symmetric_factors=symmetric_factors, factor_dtype=factor_dtype,
                     inv_dtype=inv_dtype)

  if isinstance(grad_worker_frac, jax.core.Tracer):
    raise ValueError(
        "grad_worker_frac must be a static Python number; with "
        "optax.inject_hyperparams list it in static_args.")
  plan_for(1)  # checks the placement options now rather than at trace time

  def current_plan() -> placement_lib.Placement:
    return plan_for(_axis_size(axis_name))

  def device_index():
    return lax.axis_index(axis_name) if axis_name is not None else 0

  def init_fn(params):
    _check_params(active, params, "params")
    plan = current_plan()
    step = jnp.zeros([], jnp.int32)
    damping0 = _value(damping, step)
    identity = lambda a, g: eigen_lib.identity_decomposition(
        a, g, damping0, compute_method, outer, inv_dtype)
    decompositions, local = {}, None
    if plan.num_columns == 1:
      decompositions = {l.name: identity(l.a_factor_shape, l.g_factor_shape) for l in active}
    else:
      local = switch(device_index() % plan.num_columns, [
          functools.partial(lambda j: _pack_column(
              plan, j, {l.name: identity(l.a_shape, l.g_shape) for l in plan.layers_of_column(j)},
              inv_dtype), j)
          for j in range(plan.num_columns)])
    accumulation = None
    if accumulation_steps > 1:
      accumulation = AccumulationState(
          micro_step=jnp.zeros([], jnp.int32),
          grads=jax.tree.map(jnp.zeros_like, params),
          factors={l.name: jax.tree.map(jnp.zeros_like,
                                        factors_lib.identity_factors(l, factor_dtype))
                   for l in active})
    return KaisaState(
        step=step,
        factors={l.name: factors_lib.identity_factors(l, factor_dtype) for l in active},
        decompositions=decompositions,
        local_decompositions=local,
        skipped_factor_updates=jnp.zeros([], jnp.int32),
        rejected_decompositions=jnp.zeros([], jnp.int32),
        accumulation=accumulation)

  def g_share(parts: int) -> float:
    """What one of ``parts`` equal sub-batches' G weighs in the whole batch's.

    Under a mean loss each sub-batch's output gradients are ``parts`` times
    those of the whole-batch loss; per-example G carries no batch size.
    """
    return 1.0 / parts ** 2 if g_factor_scaling == "loss" else 1.0

  def batch_factors(captures):
    factors = {}
    for l in active:
      f = factors_lib.batch_factors(l, captures[l.name], factor_dtype)
      if g_factor_scaling == "per_example":
        examples = captures[l.name].inputs[0].shape[0]
        f = f._replace(g_factor=f.g_factor * examples ** 2)
      factors[l.name] = f
    return factors

  def reduce_factors(batch: dict, num_devices: int) -> dict:
    """Factor-Reduce: the mean over devices, as one global batch would give.

    Each device's loss is the mean over its own batch, so its output
    gradients are N times those of the global-batch loss: G gets 1/N²
    (with 'loss' scaling).
    """
    def pack(m):
      return collectives.upper_triangle(m) if symmetric_factors and m.ndim > 1 else m

    flat = collectives.pack(
        [pack(m) for f in batch.values()
         for m in (f.a_factor, f.g_factor * g_share(num_devices))], factor_dtype)
    flat = lax.pmean(flat, axis_name)
    out, offset = {}, 0
    for name in batch:
      mats = []
      for shape in (by_name[name].a_factor_shape, by_name[name].g_factor_shape):
        words = shape.packed_words(symmetric_factors)
        piece = flat[offset:offset + words]
        offset += words
        if symmetric_factors and not shape.diagonal:
          mats.append(collectives.from_upper_triangle(
              piece.reshape(shape.shape[:-2] + (-1,)), shape.size))
        else:
          mats.append(piece.reshape(shape.shape))
      out[name] = factors_lib.LayerFactors(*mats)
    return out

  def switch(index, branches, *operands):
    """``lax.switch`` on a device-dependent index; one branch runs directly."""
    if len(branches) == 1:
      return branches[0](*operands)
    return lax.switch(index, [lambda *ops, b=b: collectives.as_varying(b(*ops), axis_name)
                              for b in branches], *operands)

  def is_due(step, every: int):
    return step % every == 0

  def maybe(pred, every: int, fn, otherwise, *operands):
    # Static period 1: always due, no cond at all.
    if every == 1:
      return fn(*operands)
    return lax.cond(pred, fn, otherwise, *operands)

  def own_parts(plan, device: int, factors, damping_t) -> dict:
    """The decomposition shares ``device`` computes: {(layer, 'a'|'g'): parts}."""
    parts = {}
    for l in plan.layers:
      for which, worker, m in (("a", l.a_worker, factors[l.name].a_factor),
                               ("g", l.g_worker, factors[l.name].g_factor)):
        if worker == device:
          parts[(l.name, which)] = eigen_lib.decompose_factor(m, damping_t, compute_method,
                                                              inv_dtype)
    return parts

  def outbox_layout(plan, device: int):
    """[(layer, 'a'|'g', shapes of its decomposition share)] that ``device`` sends."""
    return [(l.name, which, factor.decomposition_shapes(compute_method)) for l in plan.layers
            for which, worker, factor in (("a", l.a_worker, l.a_shape),
                                          ("g", l.g_worker, l.g_shape))
            if worker == device]

  def received_parts(plan, column: int, inbox) -> dict:
    """The shares of a column's layers, from the column's gathered outboxes."""
    parts = {}
    for row, device in enumerate(plan.columns[column]):
      layout = outbox_layout(plan, device)
      pieces = iter(collectives.unpack(inbox[row], [s for _, _, shapes in layout for s in shapes]))
      for name, which, shapes in layout:
        parts[(name, which)] = tuple(next(pieces) for _ in shapes)
    return parts

  def decompose_all(plan, factors, store, damping_t):
    """New decompositions for the layers this device holds; (store, rejected)."""
    n = plan.num_devices
    me = device_index()

    def install(column, parts, store):
      held = store if plan.num_columns == 1 else _unpack_column(plan, column, store)
      new, rejected = {}, jnp.zeros([], jnp.int32)
      for l in plan.layers_of_column(column):
        d = eigen_lib.assemble(parts[(l.name, "a")], parts[(l.name, "g")], damping_t,
                               compute_method, outer)
        new[l.name], bad = eigen_lib.keep_if_finite(d, held[l.name])
        rejected = rejected + bad.astype(jnp.int32)
      if plan.num_columns == 1:
        return new, rejected
      return _pack_column(plan, column, new, inv_dtype), rejected

    if plan.grad_workers == 1:
      # The column's only device decomposes everything the column holds.
      branches = [functools.partial(lambda j, f, st: install(j, own_parts(plan, j, f, damping_t), st), j)
                  for j in range(plan.num_columns)]
      store, rejected = switch(me, branches, factors, store)
    else:
      width = plan.outbox_words()
      outbox = switch(me, [
          functools.partial(lambda d, f: collectives.pad_to(collectives.pack(
              [p for name, which, _ in outbox_layout(plan, d)
               for p in own_parts(plan, d, f, damping_t)[(name, which)]], inv_dtype), width), d)
          for d in range(n)], factors)
      inbox = collectives.gather_within(outbox, axis_name, plan.columns)
      branches = [functools.partial(lambda j, ib, st: install(j, received_parts(plan, j, ib), st), j)
                  for j in range(plan.num_columns)]
      store, rejected = switch(me % plan.num_columns, branches, inbox, store)
    if axis_name is not None:
      # Row 0 of the grid holds every column once: count each layer once.
      rejected = lax.psum(jnp.where(me < plan.num_columns, rejected, 0), axis_name)
    return store, rejected

  def precondition_all(plan, store, grad_mats, damping_t) -> dict:
    """Every layer's preconditioned gradient, on every device."""
    def column(j, store):
      held = store if plan.num_columns == 1 else _unpack_column(plan, j, store)
      return {l.name: eigen_lib.precondition(held[l.name], grad_mats[l.name], damping_t)
              for l in plan.layers_of_column(j)}

    if plan.num_columns == 1:
      return column(0, store)
    width = plan.gradient_words()
    branches = [functools.partial(lambda j, st: collectives.pad_to(collectives.pack(
        list(column(j, st).values()), inv_dtype), width), j)
                for j in range(plan.num_columns)]
    mine = switch(device_index() % plan.num_columns, branches, store)
    # Row-wise: member j of a row is the device of column j.
    gathered = collectives.gather_within(mine, axis_name, plan.rows)
    out = {}
    for j in range(plan.num_columns):
      held = plan.layers_of_column(j)
      for l, m in zip(held, collectives.unpack(gathered[j], [l.grad_shape for l in held])):
        out[l.name] = m
    return out

  def batch_moments(captures, store) -> dict:
    """EKFAC: per layer, the mean of ``(QGᵀ g)² (QAᵀ a)²ᵀ`` over this batch's rows.

    Scaled as G is (``g_share``, per-example B²), averaged over the devices
    (every device holds every eigenbasis under COMM-OPT).
    """
    moments = {}
    for l in active:
      d, capture = store[l.name], captures[l.name]
      total, rows = 0.0, 0
      for inputs, out_grads in zip(capture.inputs, capture.out_grads):
        moment, count = l.projected_second_moment(inputs, out_grads, d.a_eigvecs, d.g_eigvecs,
                                                  factor_dtype)
        total, rows = total + moment, rows + count
      moment = total / rows
      if g_factor_scaling == "per_example":
        moment = moment * capture.inputs[0].shape[0] ** 2
      moments[l.name] = moment
    if axis_name is not None:
      n = _axis_size(axis_name)
      moments = lax.pmean({k: m * g_share(n) for k, m in moments.items()}, axis_name)
    return moments

  def preconditioned_step(grads, state: KaisaState, new_batch_factors, captures=None):
    """One optimizer step given the gradients and a thunk for the batch factors.

    ``captures`` are needed by 'ekfac' only (its scaling is built from the rows).
    """
    plan = current_plan()
    n = plan.num_devices
    # With an axis even of one device: the reduced values are then typed as
    # replicated, which shard_map's out_specs=P() needs.
    if axis_name is not None:
      grads = collectives.mean_over_devices(grads, axis_name, n)  # Gradient-Reduce
    step = state.step
    damping_t = _value(damping, step)

    def update_factors(state_factors):
      batch = new_batch_factors()
      if axis_name is not None:
        batch = reduce_factors(batch, n)
      ok = factors_lib.all_finite(batch) & factors_lib.all_finite(grads)
      decay = _value(factor_decay, step)
      averaged = {k: factors_lib.running_average(state_factors[k], batch[k], decay)
                  for k in state_factors}
      kept = jax.tree.map(lambda new, old: jnp.where(ok, new, old),
                          averaged, state_factors)
      return kept, jnp.logical_not(ok).astype(jnp.int32)

    def keep_factors(state_factors):
      return state_factors, jnp.zeros([], jnp.int32)

    factors, skipped = maybe(is_due(step, factor_update_steps), factor_update_steps,
                             update_factors, keep_factors, state.factors)

    store = state.decompositions if plan.num_columns == 1 else state.local_decompositions

    def keep_decompositions(store):
      return store, jnp.zeros([], jnp.int32)

    store, rejected = maybe(
        is_due(step, inv_update_steps), inv_update_steps,
        lambda st: decompose_all(plan, factors, st, damping_t), keep_decompositions, store)

    if compute_method == "ekfac":
      def correct_scaling(store):
        moments = batch_moments(captures, store)
        ok = factors_lib.all_finite(moments) & factors_lib.all_finite(grads)
        decay = _value(factor_decay, step)
        return {k: d._replace(scaling=jnp.where(
                    ok, decay * d.scaling + (1 - decay) * moments[k].astype(d.scaling.dtype),
                    d.scaling))
                for k, d in store.items()}

      store = maybe(is_due(step, factor_update_steps), factor_update_steps,
                    correct_scaling, lambda st: st, store)

    leaves = _leaves_by_path(grads)
    grad_mats = {}
    for layer in active:
      bias = leaves[layer.bias_path] if layer.has_bias else None
      grad_mats[layer.name] = layer.grad_matrix(leaves[layer.kernel_path], bias)
    precond_mats = precondition_all(plan, store, grad_mats, damping_t)

    scale = 1.0
    if kl_clip is not None:
      lr = _value(learning_rate, step)
      vg = sum(jnp.sum(precond_mats[k] * grad_mats[k].astype(precond_mats[k].dtype))
               for k in precond_mats) * lr ** 2
      bound = _value(kl_clip, step)
      safe_vg = jnp.where(vg == 0, 1.0, jnp.abs(vg))
      scale = jnp.where(vg == 0, 1.0, jnp.minimum(1.0, jnp.sqrt(bound / safe_vg)))

    for layer in active:
      kernel, bias = layer.from_matrix(precond_mats[layer.name] * scale)
      old_kernel = leaves[layer.kernel_path]
      leaves[layer.kernel_path] = kernel.astype(old_kernel.dtype)
      if layer.has_bias:
        leaves[layer.bias_path] = bias.astype(leaves[layer.bias_path].dtype)
    treedef = jax.tree_util.tree_structure(grads)
    updates = jax.tree_util.tree_unflatten(treedef, list(leaves.values()))

    new_state = state._replace(
        step=step + 1,
        factors=factors,
        skipped_factor_updates=state.skipped_factor_updates + skipped,
        rejected_decompositions=state.rejected_decompositions + rejected)
    if plan.num_columns == 1:
      new_state = new_state._replace(decompositions=store)
    else:
      new_state = new_state._replace(local_decompositions=store)
    return updates, new_state

  def update_fn(grads, state: KaisaState, params=None, *, captures=None, **extra_args):
    del params, extra_args
    _check_params(active, grads, "grads")
    _check_captures(layers, active, captures)
    if accumulation_steps == 1:
      return preconditioned_step(grads, state, lambda: batch_factors(captures), captures)
    return accumulate(grads, state, captures)

  def accumulate(grads, state: KaisaState, captures):
    acc = state.accumulation
    factor_step = is_due(state.step, factor_update_steps)

    def add_factors(sums):
      return jax.tree.map(jnp.add, sums, batch_factors(captures))

    sums = maybe(factor_step, factor_update_steps, add_factors, lambda s: s, acc.factors)
    acc = AccumulationState(acc.micro_step + 1, jax.tree.map(jnp.add, acc.grads, grads), sums)

    def emit(state, acc):
      k = accumulation_steps
      mean_grads = jax.tree.map(lambda g: g / k, acc.grads)
      # The big-batch loss is the mean of the micro-batch losses: the mean of
      # the micro-batch factors, G weighted as one part of k.
      big_batch = {name: factors_lib.LayerFactors(f.a_factor / k, f.g_factor * g_share(k) / k)
                   for name, f in acc.factors.items()}
      updates, new_state = preconditioned_step(mean_grads, state, lambda: big_batch)
      reset = jax.tree.map(jnp.zeros_like, acc)
      return updates, new_state._replace(accumulation=reset)

    def hold(state, acc):
      return jax.tree.map(jnp.zeros_like, grads), state._replace(accumulation=acc)

    return lax.cond(acc.micro_step == accumulation_steps, emit, hold, state, acc)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _axis_size(axis_name) -> int:
  """Devices along ``axis_name`` (1 without one), at trace time."""
  if axis_name is None:
    return 1
  try:
    return int(lax.axis_size(axis_name))
  except NameError as e:
    raise ValueError(
        f"kaisa(axis_name={axis_name!r}): the axis is not bound here; call "
        "tx.init and tx.update inside jax.pmap or jax.shard_map over that axis.") from e


def placement(layers: layers_lib.LayerRegistry, num_devices: int,
              grad_worker_frac: float = 1.0, *, skip_layers: Sequence[str] = (),
              colocate_factors: bool = True, cost_model: str = "compute",
              compute_method: str = "eigen", eigenvalue_outer_product: bool = True,
              symmetric_factors: bool = True, factor_dtype: Any = "float32",
              inv_dtype: Any = "float32") -> placement_lib.Placement:
  """The static KAISA plan ``kaisa`` follows on ``num_devices`` devices.

  Args:
    layers: the registry from ``kaisa_jax.find_layers``.
    num_devices: N, the size of the data-parallel axis.
    grad_worker_frac, skip_layers, colocate_factors, cost_model,
    compute_method, eigenvalue_outer_product, symmetric_factors,
    factor_dtype, inv_dtype: as given to ``kaisa``.

  Returns:
    A ``Placement``; printing it shows, per layer, the devices that
    decompose A and G and its grad-worker group; per device, the bytes of
    factors and eigen data it keeps; and per kind of step, the collectives
    and the bytes each device contributes to them.

  Raises:
    ValueError: the grad-worker count ``max(1, round(N f))`` does not divide
      N (the message lists the valid fractions), or a bad option.

  Example:
    >>> print(kaisa_jax.placement(layers, num_devices=8, grad_worker_frac=0.25))
  """
  if isinstance(skip_layers, str):
    skip_layers = (skip_layers,)
  return placement_lib.plan(
      _active_layers(layers, skip_layers), num_devices, grad_worker_frac,
      colocate_factors=colocate_factors, cost_model=cost_model,
      compute_method=compute_method, eigenvalue_outer_product=bool(eigenvalue_outer_product),
      symmetric_factors=symmetric_factors,
      factor_itemsize=_check_dtype("factor_dtype", factor_dtype).itemsize,
      inv_itemsize=_check_dtype("inv_dtype", inv_dtype).itemsize)


def state_specs(opt_state, axis_name: Hashable):
  """shard_map ``PartitionSpec``s for an optimizer state that holds ``KaisaState``s.

  Every leaf is replicated (``P()``) except the device-local eigen data
  (``KaisaState.local_decompositions``), sharded over ``axis_name``: each
  device keeps its own.

  Args:
    opt_state: the state of an optimizer containing ``kaisa`` (any optax
      wrapping), or its abstract shape: with a mesh, take it from
      ``jax.eval_shape(jax.shard_map(opt.init, mesh=mesh, in_specs=P(),
      out_specs=P(), check_vma=False), params)``.
    axis_name: the mesh axis given to ``kaisa(axis_name=...)``.

  Returns:
    A pytree of ``PartitionSpec`` with the structure of ``opt_state``, for
    the ``in_specs`` / ``out_specs`` of ``jax.shard_map``.

  Example:
    >>> specs = kaisa_jax.state_specs(abstract_state, "data")
    >>> init = jax.jit(jax.shard_map(opt.init, mesh=mesh, in_specs=P(), out_specs=specs))
  """
  replicated = jax.sharding.PartitionSpec()
  sharded = jax.sharding.PartitionSpec(axis_name)

  def spec(node):
    if isinstance(node, KaisaState):
      specs = jax.tree.map(lambda _: replicated, node._replace(local_decompositions=None))
      return specs._replace(
          local_decompositions=jax.tree.map(lambda _: sharded, node.local_decompositions))
    return replicated

  return jax.tree.map(spec, opt_state, is_leaf=lambda x: isinstance(x, KaisaState))


def convert_state(opt_state, source: placement_lib.Placement,
                  target: placement_lib.Placement, *, stacked: bool = False):
  """Moves the eigen data of an optimizer state from one device layout to another.

  A state saved from a run on N devices (the global arrays of a shard_map
  run, or a single-device state) restores into a run on M devices once its
  device-local eigen data are laid out for M: each layer's latest
  decomposition moves to the devices of its new grad-worker group, so that
  training continues with the same numbers as an uninterrupted run. The
  factors, counters and accumulation sums are the same on every device and
  pass through unchanged.

  Args:
    opt_state: an optimizer state holding ``KaisaState``s laid out for
      ``source``, as arrays of their global shape (what shard_map with
      ``state_specs`` returns, or a single-device state).
    source: the ``kaisa_jax.placement`` of the run that produced it.
    target: the placement of the run that continues, with the same layers
      and compute method.
    stacked: the state comes from ``jax.pmap`` (every leaf has a leading
      axis of ``source.num_devices``, one entry per device) and goes to a
      ``jax.pmap`` run (the result has a leading axis of
      ``target.num_devices``).

  Returns:
    ``opt_state`` laid out for ``target``: feed it to the new run with
    ``state_specs`` (or directly, on one device, or to ``jax.pmap`` when
    ``stacked``).

  Example:
    >>> old = kaisa_jax.placement(layers, 8, 1 / 8)
    >>> new = kaisa_jax.placement(layers, 4, 1 / 2)
    >>> state = kaisa_jax.convert_state(restored_state, old, new)
    >>> pmap_state = kaisa_jax.convert_state(restored_pmap_state, old, new, stacked=True)
  """
  if [l.name for l in source.layers] != [l.name for l in target.layers]:
    raise ValueError(
        f"convert_state: the placements hold different layers "
        f"({[l.name for l in source.layers]} vs {[l.name for l in target.layers]}); "
        "build both from the same registry and skip_layers.")
  if (source.compute_method, source.eigenvalue_outer_product) != (
      target.compute_method, target.eigenvalue_outer_product):
    raise ValueError(
        "convert_state: source and target differ in compute_method or "
        "eigenvalue_outer_product; their decompositions are not interchangeable.")

  def convert(node):
    if not isinstance(node, KaisaState):
      return node
    by_layer = _decompositions_by_layer(node, source)
    if target.num_columns == 1:
      return node._replace(decompositions={l.name: by_layer[l.name] for l in target.layers},
                           local_decompositions=None)
    dtype = jax.tree.leaves(by_layer)[0].dtype
    # shard_map's global view of a device-local leaf: the devices' blocks end to end.
    local = jnp.concatenate([
        _pack_column(target, target.column_of(d), by_layer, dtype)
        for d in range(target.num_devices)])
    return node._replace(decompositions={}, local_decompositions=local)

  is_kaisa = lambda x: isinstance(x, KaisaState)
  if stacked:
    opt_state = jax.tree.map(lambda node: _unstack(node, source.num_devices), opt_state,
                             is_leaf=is_kaisa)
  converted = jax.tree.map(convert, opt_state, is_leaf=is_kaisa)
  if stacked:
    converted = jax.tree.map(lambda node: _stack(node, target.num_devices), converted,
                             is_leaf=is_kaisa)
  return converted


def _unstack(node, num_devices: int):
  """A pmap state (leading device axis) as the global layout of one run.

  Every leaf but the device-local eigen data is the same on every device
  (the factors and gradients are averaged over them): device 0's copy
  stands for all. The local eigen data go end to end, as shard_map has them.
  """
  for leaf in jax.tree.leaves(node):
    if jnp.ndim(leaf) == 0 or leaf.shape[0] != num_devices:
      raise ValueError(
          f"convert_state(stacked=True): a leaf of shape {jnp.shape(leaf)} has no leading "
          f"axis of the source's {num_devices} devices; pass the state of the jax.pmap "
          "run that the source placement describes.")
  if not isinstance(node, KaisaState):
    return jax.tree.map(lambda a: a[0], node)
  local = node.local_decompositions
  return jax.tree.map(lambda a: a[0], node._replace(local_decompositions=None))._replace(
      local_decompositions=None if local is None else jnp.reshape(local, (-1,)))


def _stack(node, num_devices: int):
  """The inverse of ``_unstack`` for a run on ``num_devices`` devices."""
  replicate = lambda a: jnp.broadcast_to(a, (num_devices,) + jnp.shape(a))
  if not isinstance(node, KaisaState):
    return jax.tree.map(replicate, node)
  local = node.local_decompositions
  return jax.tree.map(replicate, node._replace(local_decompositions=None))._replace(
      local_decompositions=None if local is None else jnp.reshape(local, (num_devices, -1)))


def _pack_column(plan: placement_lib.Placement, column: int, decompositions: dict,
                 dtype) -> jax.Array:
  """A device's eigen data: its column's decompositions packed, padded to the longest column."""
  leaves = [x for l in plan.layers_of_column(column) for x in decompositions[l.name]
            if x is not None]
  return collectives.pad_to(collectives.pack(leaves, dtype), plan.local_words())


def _unpack_column(plan: placement_lib.Placement, column: int, packed: jax.Array) -> dict:
  """The inverse of ``_pack_column``: {layer name: decomposition}."""
  kind = eigen_lib.decomposition_type(plan.compute_method, plan.eigenvalue_outer_product)
  held = plan.layers_of_column(column)
  pieces = collectives.unpack(
      packed, [s for l in held for s in eigen_lib.field_shapes(kind, l.a_shape, l.g_shape)
               if s is not None])
  pieces = iter(pieces)
  return {l.name: kind(*[None if s is None else next(pieces)
                         for s in eigen_lib.field_shapes(kind, l.a_shape, l.g_shape)])
          for l in held}


def _decompositions_by_layer(state: KaisaState, plan: placement_lib.Placement) -> dict:
  """Each layer's decomposition, read from ``plan``'s layout."""
  if plan.num_columns == 1:
    if set(state.decompositions) != {l.name for l in plan.layers}:
      raise ValueError(
          "convert_state: the state's decompositions do not match the source "
          f"placement's layers ({sorted(state.decompositions)}).")
    return dict(state.decompositions)
  local = state.local_decompositions
  width = plan.local_words()
  if local is None or local.shape != (plan.num_devices * width,):
    raise ValueError(
        f"convert_state: local_decompositions has shape "
        f"{None if local is None else local.shape}, the source placement needs "
        f"({plan.num_devices * width},): pass the state as shard_map returns it "
        "(global arrays) with the placement of that run.")
  blocks = local.reshape(plan.num_devices, width)
  out = {}
  for j, members in enumerate(plan.columns):
    out.update(_unpack_column(plan, j, blocks[members[0]]))
  return out
