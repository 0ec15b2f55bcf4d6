"""State: what ``kaisa`` keeps between steps, and moving it between device layouts.

``KaisaState`` keeps the factors and the decompositions per layer group
(``groups.py``): one stack of blocks each. With several grad-worker groups a
device keeps only its column's decompositions, packed into one vector
(``Placement.pack_column``). ``state_specs`` gives shard_map the specs of
that layout, ``convert_state`` moves a saved state to another device count.
"""

from __future__ import annotations

import functools
from typing import Any, Hashable, NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax

from kaisa_jax._src import collectives
from kaisa_jax._src import config as config_lib
from kaisa_jax._src import eigen as eigen_lib
from kaisa_jax._src import factors as factors_lib
from kaisa_jax._src import placement as placement_lib


class AccumulationState(NamedTuple):
  """Sums over the micro-batches of the optimizer step in progress.

  Attributes:
    micro_step: int32, micro-batches seen in this step so far.
    grads: the sum of their gradients (the params pytree).
    factors: per group name, the sum of their batch factors
      (``LayerFactors`` stacks); only filled on factor steps.
  """
  micro_step: jax.Array
  grads: Any
  factors: dict


class KaisaState(NamedTuple):
  """State of ``kaisa``: a pytree of arrays (checkpoint it with orbax).

  Layers whose factor blocks have the same shapes form a group (see
  ``kaisa_jax.placement(...).groups``), keyed by the group's name, e.g.
  ``'a65_g128'``; ``Placement.layer_factors`` and
  ``Placement.layer_decompositions`` read them back per layer.

  Attributes:
    step: int32, optimizer steps taken (micro-batches not counted).
    factors: per group, its running ``LayerFactors``: stacks of blocks
      (blocks, a, a) and (blocks, g, g), (blocks, a) for a diagonal A.
    decompositions: per group, its latest ``Eigen``, ``EigenOuter``,
      ``EigenCorrected`` or ``Inverse`` (stacks with a leading blocks axis),
      the same on every device; used when every device holds every layer's
      eigen data (one device, or ``grad_worker_frac=1``), else empty.
    local_decompositions: with ``grad_worker_frac < 1`` on several devices,
      this device's eigen data: its grad-worker group's blocks of every
      group, packed into one vector as long as the largest group's (see
      ``kaisa_jax.placement``); different on every group, so shard it over
      the devices (``kaisa_jax.state_specs``). Else None.
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


def switch(config: config_lib.KaisaConfig, index, branches, *operands):
  """``lax.switch`` on a device-dependent index; one branch runs directly."""
  if len(branches) == 1:
    return branches[0](*operands)
  return lax.switch(index, [lambda *ops, b=b: collectives.as_varying(b(*ops), config.axis_name)
                            for b in branches], *operands)


def identity_column(config: config_lib.KaisaConfig, plan: placement_lib.Placement,
                    column: int, damping) -> dict:
  """{group name: identity decomposition of the blocks ``column`` holds}."""
  return {g.name: eigen_lib.identity_decomposition(
              plan.column_group(column, g), damping, config.compute_method, config.outer,
              config.inv_dtype)
          for g in plan.groups if plan.column_blocks(column, g)}


def init_state(config: config_lib.KaisaConfig, params) -> KaisaState:
  """The state before the first step: identity factors and their decompositions."""
  config_lib.check_params(config.layers, params, "params")
  plan = config.current_plan()
  step = jnp.zeros([], jnp.int32)
  damping0 = config_lib.value(config.damping, step)
  decompositions, local = {}, None
  if plan.num_columns == 1:
    decompositions = identity_column(config, plan, 0, damping0)
  else:
    local = switch(config, config.device_index() % plan.num_columns, [
        functools.partial(lambda j: plan.pack_column(
            j, identity_column(config, plan, j, damping0), config.inv_dtype), j)
        for j in range(plan.num_columns)])
  factors = {g.name: factors_lib.identity_factors(g, config.factor_dtype) for g in plan.groups}
  accumulation = None
  if config.accumulation_steps > 1:
    accumulation = AccumulationState(
        micro_step=jnp.zeros([], jnp.int32),
        grads=jax.tree.map(jnp.zeros_like, params),
        factors=jax.tree.map(jnp.zeros_like, factors))
  return KaisaState(
      step=step, factors=factors, decompositions=decompositions, local_decompositions=local,
      skipped_factor_updates=jnp.zeros([], jnp.int32),
      rejected_decompositions=jnp.zeros([], jnp.int32), accumulation=accumulation)


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
  _check_compatible(source, target)

  def convert(node):
    if not isinstance(node, KaisaState):
      return node
    try:
      by_group = source.group_decompositions(node)
    except ValueError as e:
      raise ValueError(f"convert_state: {e}") from e
    if target.num_columns == 1:
      return node._replace(decompositions=by_group, local_decompositions=None)
    dtype = jax.tree.leaves(by_group)[0].dtype
    column_share = lambda j: {
        g.name: eigen_lib.select_blocks(by_group[g.name], target.column_blocks(j, g),
                                        target.column_a_blocks(j, g))
        for g in target.groups if target.column_blocks(j, g)}
    # shard_map's global view of a device-local leaf: the devices' blocks end to end.
    local = jnp.concatenate([target.pack_column(target.column_of(d), column_share(
        target.column_of(d)), dtype) for d in range(target.num_devices)])
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


def _check_compatible(source: placement_lib.Placement, target: placement_lib.Placement):
  if [l.name for l in source.layers] != [l.name for l in target.layers]:
    raise ValueError(
        f"convert_state: the placements hold different layers "
        f"({[l.name for l in source.layers]} vs {[l.name for l in target.layers]}); "
        "build both from the same registry and skip_layers.")
  if source.groups != target.groups:
    raise ValueError(
        "convert_state: the placements lay the layers out in different groups (e.g. one "
        "found layers fed the same input and the other did not); build both from the "
        "same registry and skip_layers.")
  if (source.compute_method, source.eigenvalue_outer_product) != (
      target.compute_method, target.eigenvalue_outer_product):
    raise ValueError(
        "convert_state: source and target differ in compute_method or "
        "eigenvalue_outer_product; their decompositions are not interchangeable.")


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
