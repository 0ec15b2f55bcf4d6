"""Transform: K-FAC as an optax ``GradientTransformationExtraArgs``.

One update: (on factor steps) fold the batch factors into the running
averages, (on decomposition steps) decompose them, precondition every
registered layer's gradient with the latest decomposition, KL-clip, and hand
the other leaves through unchanged. Periodic work sits behind ``lax.cond``, so
a step that is not due costs nothing.
"""

from __future__ import annotations

import re
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import optax
from jax import lax

from kaisa_jax._src import eigen as eigen_lib
from kaisa_jax._src import factors as factors_lib
from kaisa_jax._src import layers as layers_lib

ScalarOrSchedule = Union[float, jax.Array, Callable[[jax.Array], jax.Array]]


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
      ``Inverse``.
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
    compute_method: 'eigen' (eigendecompositions) or 'inverse' (damped
      Cholesky inverses).
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

  Returns:
    An ``optax.GradientTransformationExtraArgs``; its update is
    ``update(grads, state, params=None, *, captures)`` with the captures of
    ``kaisa_jax.value_and_grad``. Works under ``jax.jit``; with
    ``optax.inject_hyperparams`` put ``factor_update_steps``,
    ``inv_update_steps`` and ``accumulation_steps`` in ``static_args`` (and
    dtypes, when given as dtype objects rather than names).

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
  if compute_method not in eigen_lib.COMPUTE_METHODS:
    raise ValueError(
        f"compute_method must be one of {eigen_lib.COMPUTE_METHODS}, got "
        f"{compute_method!r}.")
  _check_hyperparameters(damping, factor_decay, kl_clip, learning_rate)
  factor_update_steps = _check_positive_int("factor_update_steps", factor_update_steps)
  inv_update_steps = _check_positive_int("inv_update_steps", inv_update_steps)
  accumulation_steps = _check_positive_int("accumulation_steps", accumulation_steps)
  if isinstance(skip_layers, str):
    skip_layers = (skip_layers,)
  factor_dtype = _check_dtype("factor_dtype", factor_dtype)
  inv_dtype = _check_dtype("inv_dtype", inv_dtype)
  active = _active_layers(layers, skip_layers)
  outer = bool(eigenvalue_outer_product)

  def init_fn(params):
    _check_params(active, params, "params")
    step = jnp.zeros([], jnp.int32)
    damping0 = _value(damping, step)
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
        decompositions={
            l.name: eigen_lib.identity_decomposition(
                l.a_size, l.g_size, damping0, compute_method, outer, inv_dtype)
            for l in active},
        skipped_factor_updates=jnp.zeros([], jnp.int32),
        rejected_decompositions=jnp.zeros([], jnp.int32),
        accumulation=accumulation)

  def batch_factors(captures):
    return {l.name: factors_lib.batch_factors(l, captures[l.name], factor_dtype)
            for l in active}

  def is_due(step, every: int):
    return step % every == 0

  def maybe(pred, every: int, fn, otherwise, *operands):
    # Static period 1: always due, no cond at all.
    if every == 1:
      return fn(*operands)
    return lax.cond(pred, fn, otherwise, *operands)

  def preconditioned_step(grads, state: KaisaState, new_batch_factors):
    """One optimizer step given the gradients and a thunk for the batch factors."""
    step = state.step
    damping_t = _value(damping, step)

    def update_factors(state_factors):
      batch = new_batch_factors()
      ok = factors_lib.all_finite(batch) & factors_lib.all_finite(grads)
      decay = _value(factor_decay, step)
      averaged = {n: factors_lib.running_average(state_factors[n], batch[n], decay)
                  for n in state_factors}
      kept = jax.tree.map(lambda new, old: jnp.where(ok, new, old),
                          averaged, state_factors)
      return kept, jnp.logical_not(ok).astype(jnp.int32)

    def keep_factors(state_factors):
      return state_factors, jnp.zeros([], jnp.int32)

    factors, skipped = maybe(is_due(step, factor_update_steps), factor_update_steps,
                             update_factors, keep_factors, state.factors)

    def update_decompositions(decompositions):
      new, rejected = {}, jnp.zeros([], jnp.int32)
      for name, f in factors.items():
        d = eigen_lib.decompose(f, damping_t, compute_method, outer, inv_dtype)
        new[name], bad = eigen_lib.keep_if_finite(d, decompositions[name])
        rejected = rejected + bad.astype(jnp.int32)
      return new, rejected

    def keep_decompositions(decompositions):
      return decompositions, jnp.zeros([], jnp.int32)

    decompositions, rejected = maybe(
        is_due(step, inv_update_steps), inv_update_steps,
        update_decompositions, keep_decompositions, state.decompositions)

    leaves = _leaves_by_path(grads)
    grad_mats, precond_mats = {}, {}
    for layer in active:
      bias = leaves[layer.bias_path] if layer.has_bias else None
      grad_mats[layer.name] = layer.grad_matrix(leaves[layer.kernel_path], bias)
      precond_mats[layer.name] = eigen_lib.precondition(
          decompositions[layer.name], grad_mats[layer.name], damping_t)

    scale = 1.0
    if kl_clip is not None:
      lr = _value(learning_rate, step)
      vg = sum(jnp.sum(precond_mats[n] * grad_mats[n].astype(precond_mats[n].dtype))
               for n in precond_mats) * lr ** 2
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

    new_state = KaisaState(
        step=step + 1,
        factors=factors,
        decompositions=decompositions,
        skipped_factor_updates=state.skipped_factor_updates + skipped,
        rejected_decompositions=state.rejected_decompositions + rejected,
        accumulation=state.accumulation)
    return updates, new_state

  def update_fn(grads, state: KaisaState, params=None, *, captures=None, **extra_args):
    del params, extra_args
    _check_params(active, grads, "grads")
    _check_captures(layers, active, captures)
    if accumulation_steps == 1:
      return preconditioned_step(grads, state, lambda: batch_factors(captures))
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
      # The big-batch loss is the mean of the micro-batch losses: its output
      # gradients carry 1/k, so G gets 1/k² on top of the mean over micro-batches.
      big_batch = {n: factors_lib.LayerFactors(f.a_factor / k, f.g_factor / k ** 3)
                   for n, f in acc.factors.items()}
      updates, new_state = preconditioned_step(mean_grads, state, lambda: big_batch)
      reset = jax.tree.map(jnp.zeros_like, acc)
      return updates, new_state._replace(accumulation=reset)

    def hold(state, acc):
      return jax.tree.map(jnp.zeros_like, grads), state._replace(accumulation=acc)

    return lax.cond(acc.micro_step == accumulation_steps, emit, hold, state, acc)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
