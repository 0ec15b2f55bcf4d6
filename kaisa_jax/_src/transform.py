"""Transform: K-FAC as an optax ``GradientTransformationExtraArgs``.

One update, each stage a function of ``steps.py`` run once per layer group:
the Gradient-Reduce (across devices), (on factor steps) the batch factors,
Factor-Reduce and running averages, (on decomposition steps) the
decompositions, then the preconditioning of every group's gradient stack,
the KL clip, and the other leaves handed through unchanged. Periodic work
sits behind ``lax.cond``, so a step that is not due costs nothing.
"""

from __future__ import annotations

import functools
from typing import Any, Hashable, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import optax
from jax import lax

from kaisa_jax._src import collectives
from kaisa_jax._src import config as config_lib
from kaisa_jax._src import factors as factors_lib
from kaisa_jax._src import layers as layers_lib
from kaisa_jax._src import placement as placement_lib
from kaisa_jax._src import schedule
from kaisa_jax._src import state as state_lib
from kaisa_jax._src import steps

ScalarOrSchedule = config_lib.ScalarOrSchedule


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
    allow_plain_gradient: bool = False,
    factor_dtype: Any = "float32",
    inv_dtype: Any = "float32",
    axis_name: Optional[Hashable] = None,
    grad_worker_frac: float = 1.0,
    colocate_factors: bool = True,
    cost_model: str = "compute",
    symmetric_factors: bool = True,
    g_factor_scaling: str = "loss",
    weight_sharing: Union[str, Mapping[str, str]] = "expand",
    factor_subsample: Optional[Union[int, float]] = None,
    factor_subsample_seed: Optional[int] = None,
    stagger_decompositions: bool = False,
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
      to the plain gradient. Every layer the registry lists as skipped must
      match one (the error offers the value that names them all), unless
      ``allow_plain_gradient``.
    allow_plain_gradient: accept that the parameters K-FAC cannot
      precondition follow the plain gradient: the registry's uncovered
      leaves (``layers.uncovered``: read by the loss, held by no registered
      layer, e.g. a custom module's ``self.param`` used with ``jnp.dot``)
      and its skipped layers, named in ``skip_layers`` or not. False (the
      default) raises, naming each, so that none does unnoticed;
      ``print(layers)`` shows how many entries are preconditioned.
    factor_dtype: dtype (or its name) the factors are computed and kept in
      ('float32'; 'bfloat16' saves time at a loss of precision).
    inv_dtype: dtype (or its name) of the decompositions and the
      preconditioning ('float32'; 'float64' needs ``jax_enable_x64``).
    axis_name: the data-parallel axis of ``jax.pmap`` / ``jax.shard_map``
      (None: one device; an update traced inside such a map without it
      warns, naming the map's axes, since the replicas would drift apart:
      filter the warning by its message, 'kaisa: no axis_name', when
      per-device updates are intended). Call ``init`` and ``update`` inside
      the map, with each device's own gradients and captures of a loss that
      is the mean over its own batch: the transform averages the gradients
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
    factor_subsample: compute the factors (and EKFAC's moments) from this
      many examples of each batch (an int, per device and micro-batch) or
      this fraction of it (a float in (0, 1]); the gradient still comes
      from the whole batch. None (default): every example. The factors are
      means over the chosen examples' rows, unbiased estimates of the whole
      batch's; 'per_example' scaling keeps the whole batch's B.
    factor_subsample_seed: None (default): evenly strided examples, the
      same every step (for shuffled batches); an int: a uniform random draw
      of distinct examples each step, from this seed folded with the step,
      micro-batch and device. A strided fraction whose inverse divides the
      per-device batch gives the same factors on any device count.
    stagger_decompositions: False (default, the reference): every group is
      decomposed every ``inv_update_steps`` steps, all at once. True: the
      groups are spread over the interval in phases of balanced cost, step
      ``s`` decomposing phase ``s % inv_update_steps`` (and step 0 every
      group), so that no step pays for all the decompositions
      (``kaisa_jax/_src/schedule.py``).

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
  config = config_lib.make_config(
      layers, damping=damping, factor_decay=factor_decay,
      factor_update_steps=factor_update_steps, inv_update_steps=inv_update_steps,
      kl_clip=kl_clip, learning_rate=learning_rate, compute_method=compute_method,
      eigenvalue_outer_product=eigenvalue_outer_product, accumulation_steps=accumulation_steps,
      skip_layers=skip_layers, allow_plain_gradient=allow_plain_gradient,
      factor_dtype=factor_dtype, inv_dtype=inv_dtype, axis_name=axis_name,
      grad_worker_frac=grad_worker_frac, colocate_factors=colocate_factors, cost_model=cost_model,
      symmetric_factors=symmetric_factors, g_factor_scaling=g_factor_scaling,
      weight_sharing=weight_sharing, factor_subsample=factor_subsample,
      factor_subsample_seed=factor_subsample_seed,
      stagger_decompositions=stagger_decompositions)
  return optax.GradientTransformationExtraArgs(
      functools.partial(state_lib.init_state, config), functools.partial(update, config))


def update(config: config_lib.KaisaConfig, grads, state: state_lib.KaisaState, params=None, *,
           captures=None, **extra_args):
  """``kaisa``'s update: the preconditioned gradients and the new state."""
  del params, extra_args
  config_lib.warn_if_unreduced(config.axis_name)
  config_lib.check_params(config.layers, grads, "grads")
  config_lib.check_captures(config.registry, config.layers, captures)
  if config.accumulation_steps == 1:
    groups = config.groups(config.current_plan())
    # Subsampled inside the factor step's branch: no work when it is not due.
    sampled = lambda: steps.subsampled_captures(config, groups, captures, state.step)
    return preconditioned_step(config, grads, state,
                               lambda: steps.batch_factors(config, groups, sampled()), sampled)
  return accumulate(config, grads, state, captures)


def _maybe(pred, every: int, fn, otherwise, *operands):
  """``fn(*operands)`` when ``pred``, else ``otherwise``; no cond at all for period 1."""
  if every == 1:
    return fn(*operands)
  return lax.cond(pred, fn, otherwise, *operands)


def _no_change(tree):
  return tree, jnp.zeros([], jnp.int32)


def _decompose_staggered(config: config_lib.KaisaConfig, plan, step, factors, store, damping):
  """This step's phase of a staggered interval (``schedule.py``): (store, rejected)."""
  phases = schedule.decomposition_phases(plan.groups, config.inv_update_steps)
  decompose = lambda groups, st: steps.decompose_all(config, plan, factors, st, damping, groups)
  # Branch 0: no phase is due; 1..P: phase p - 1; P + 1: every group (step 0).
  branches = ([_no_change] + [functools.partial(decompose, phase) for phase in phases]
              + [functools.partial(decompose, plan.groups)])
  phase = step % config.inv_update_steps
  index = jnp.where(step == 0, len(phases) + 1, jnp.where(phase < len(phases), phase + 1, 0))
  return lax.switch(index, branches, store)


def preconditioned_step(config: config_lib.KaisaConfig, grads, state: state_lib.KaisaState,
                        new_batch_factors, factor_captures=None):
  """One optimizer step given the gradients and a thunk for the batch factors.

  ``factor_captures``, a thunk for the (subsampled) captures, is needed by
  'ekfac' only (its scaling is built from the rows).
  """
  plan = config.current_plan()
  groups = config.groups(plan)
  n = plan.num_devices
  # With an axis even of one device: the reduced values are then typed as
  # replicated, which shard_map's out_specs=P() needs.
  if config.axis_name is not None:
    grads = collectives.mean_over_devices(grads, config.axis_name, n)  # Gradient-Reduce
  step = state.step
  damping = config_lib.value(config.damping, step)

  def fold_in(state_factors):
    batch = new_batch_factors()
    if config.axis_name is not None:
      batch = steps.reduce_factors(config, batch, n)
    return steps.update_factors(config, state_factors, batch, grads, step)

  factors, skipped = _maybe(step % config.factor_update_steps == 0, config.factor_update_steps,
                            fold_in, _no_change, state.factors)
  store = state.decompositions if plan.num_columns == 1 else state.local_decompositions
  if config.stagger_decompositions and config.inv_update_steps > 1:
    store, rejected = _decompose_staggered(config, plan, step, factors, store, damping)
  else:
    store, rejected = _maybe(
        step % config.inv_update_steps == 0, config.inv_update_steps,
        lambda st: steps.decompose_all(config, plan, factors, st, damping), _no_change, store)
  if config.compute_method == "ekfac":
    store = _maybe(step % config.factor_update_steps == 0, config.factor_update_steps,
                   lambda st: steps.correct_scaling(config, groups, factor_captures(), st, grads,
                                                    step),
                   lambda st: st, store)

  leaves = config_lib.leaves_by_path(grads)
  grad_stacks = steps.group_grads(groups, leaves)
  precond = steps.precondition_all(config, plan, store, grad_stacks, damping)
  scale = steps.kl_scale(config, precond, grad_stacks, step)
  leaves = steps.write_updates(groups, leaves, {k: p * scale for k, p in precond.items()})
  updates = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(grads),
                                         list(leaves.values()))
  new_state = state._replace(
      step=step + 1, factors=factors,
      skipped_factor_updates=state.skipped_factor_updates + skipped,
      rejected_decompositions=state.rejected_decompositions + rejected)
  if plan.num_columns == 1:
    return updates, new_state._replace(decompositions=store)
  return updates, new_state._replace(local_decompositions=store)


def accumulate(config: config_lib.KaisaConfig, grads, state: state_lib.KaisaState, captures):
  """One micro-batch: add to the sums, and on the k-th run the step on them."""
  acc = state.accumulation
  k = config.accumulation_steps
  groups = config.groups(config.current_plan())

  def add_factors(sums):
    sampled = steps.subsampled_captures(config, groups, captures, state.step, acc.micro_step)
    return jax.tree.map(jnp.add, sums, steps.batch_factors(config, groups, sampled))

  sums = _maybe(state.step % config.factor_update_steps == 0, config.factor_update_steps,
                add_factors, lambda s: s, acc.factors)
  acc = state_lib.AccumulationState(acc.micro_step + 1,
                                    jax.tree.map(jnp.add, acc.grads, grads), sums)

  def emit(state, acc):
    mean_grads = jax.tree.map(lambda g: g / k, acc.grads)
    # The big-batch loss is the mean of the micro-batch losses: the mean of
    # the micro-batch factors, G weighted as one part of k.
    big_batch = {name: factors_lib.LayerFactors(f.a_factor / k, f.g_factor * config.g_share(k) / k)
                 for name, f in acc.factors.items()}
    updates, new_state = preconditioned_step(config, mean_grads, state, lambda: big_batch)
    return updates, new_state._replace(accumulation=jax.tree.map(jnp.zeros_like, acc))

  def hold(state, acc):
    return jax.tree.map(jnp.zeros_like, grads), state._replace(accumulation=acc)

  return lax.cond(acc.micro_step == k, emit, hold, state, acc)


def placement(layers: layers_lib.LayerRegistry, num_devices: int,
              grad_worker_frac: float = 1.0, *, skip_layers: Sequence[str] = (),
              allow_plain_gradient: bool = False, colocate_factors: bool = True,
              cost_model: str = "compute",
              compute_method: str = "eigen", eigenvalue_outer_product: bool = True,
              symmetric_factors: bool = True, factor_dtype: Any = "float32",
              inv_dtype: Any = "float32") -> placement_lib.Placement:
  """The static KAISA plan ``kaisa`` follows on ``num_devices`` devices.

  Args:
    layers: the registry from ``kaisa_jax.find_layers``.
    num_devices: N, the size of the data-parallel axis.
    grad_worker_frac, skip_layers, allow_plain_gradient, colocate_factors,
    cost_model, compute_method, eigenvalue_outer_product, symmetric_factors,
    factor_dtype, inv_dtype: as given to ``kaisa`` (the registry's uncovered
    leaves, which the plan does not depend on, need no
    ``allow_plain_gradient`` here; its skipped layers do).

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
  # The plan does not depend on the leaves no layer covers: they are not checked here.
  active = config_lib.active_layers(layers, skip_layers, allow_plain_gradient,
                                    check_uncovered=False)
  options = config_lib.placement_options(
      grad_worker_frac=grad_worker_frac, colocate_factors=colocate_factors,
      cost_model=cost_model, compute_method=compute_method,
      eigenvalue_outer_product=eigenvalue_outer_product, symmetric_factors=symmetric_factors,
      factor_dtype=factor_dtype, inv_dtype=inv_dtype,
      a_sources=config_lib.shared_a_sources(layers, active))
  return placement_lib.plan(active, num_devices, **dict(options))
