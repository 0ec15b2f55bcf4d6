"""Steps: the stages of one K-FAC update, each run once per layer group.

* ``batch_factors`` / ``reduce_factors`` / ``update_factors``: the factor
  step (batch statistics, Factor-Reduce across devices, running averages);
* ``decompose_all``: the decomposition step (each device decomposes the
  blocks it owns, the shares are gathered within each grad-worker group);
* ``precondition_all``: every group's preconditioned gradient stack, the
  results gathered within each receiver group;
* ``correct_scaling``: EKFAC's running eigenvalue scaling;
* ``kl_scale``: the KL clip.

Every function takes the static ``KaisaConfig`` (and ``Placement``) first
and the arrays after; groups are keyed by name throughout (``{group name:
stack}``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from kaisa_jax._src import collectives
from kaisa_jax._src import config as config_lib
from kaisa_jax._src import eigen as eigen_lib
from kaisa_jax._src import factors as factors_lib
from kaisa_jax._src import groups as groups_lib
from kaisa_jax._src import placement as placement_lib
from kaisa_jax._src import state as state_lib
from kaisa_jax._src import subsample as subsample_lib

# -------------------------------------------------------------- gradients


def _static_units(group: groups_lib.LayerGroup):
  return groups_lib.stat_units(group, lambda name: None)


def group_grads(groups, leaves: dict) -> dict:
  """{group name: (blocks, g, a) gradient matrices} from the gradient leaves by path."""
  def one(layer, kernel, bias):
    return (layer.grad_matrix(kernel, bias),)

  value_of = lambda l: (leaves[l.kernel_path], leaves[l.bias_path] if l.has_bias else None)
  return {g.name: groups_lib.over_units(
              g, _static_units(g), one,
              lambda unit: groups_lib.stacked_members(g, unit, value_of),
              (g.grad_block_shape,))[0]
          for g in groups}


def write_updates(groups, leaves: dict, stacks: dict) -> dict:
  """``leaves`` with every member's kernel and bias taken from its group's stack."""
  leaves = dict(leaves)
  for g in groups:
    for unit in _static_units(g):
      mats = groups_lib.unit_blocks(g, unit, stacks[g.name], unit.layer.grad_shape)
      kernels, biases = jax.vmap(unit.layer.from_matrix)(mats)
      for k, layer in enumerate(g.layers[i] for i in unit.members):
        leaves[layer.kernel_path] = kernels[k].astype(leaves[layer.kernel_path].dtype)
        if layer.has_bias:
          leaves[layer.bias_path] = biases[k].astype(leaves[layer.bias_path].dtype)
  return leaves


# ---------------------------------------------------------------- factors


def subsampled_captures(config: config_lib.KaisaConfig, groups, captures: dict, step,
                        micro_step=0) -> dict:
  """The captures the factor statistics come from: a subsample of each batch when
  ``factor_subsample`` is set (``subsample.py``), else ``captures`` as they are.

  A random draw's key folds the seed with the step, the micro-batch and the
  device, so that every micro-batch and device draws its own examples.
  """
  if config.factor_subsample is None:
    return captures
  key = None
  if config.factor_subsample_seed is not None:
    key = jax.random.fold_in(jax.random.fold_in(
        jax.random.key(config.factor_subsample_seed), step), micro_step)
    if config.axis_name is not None:
      key = jax.random.fold_in(key, config.device_index())
  per_example = config.g_factor_scaling == "per_example"
  layers = {l.name: l for g in groups for l in g.layers}
  return {name: subsample_lib.subsample_capture(layers[name], c, config.factor_subsample,
                                                key, per_example)
          if name in layers else c for name, c in captures.items()}



def batch_factors(config: config_lib.KaisaConfig, groups, captures: dict) -> dict:
  """{group name: this batch's ``LayerFactors`` stacks}."""
  per_example = config.g_factor_scaling == "per_example"
  return {g.name: factors_lib.group_batch_factors(g, captures, config.factor_dtype, per_example)
          for g in groups}


def reduce_factors(config: config_lib.KaisaConfig, batch: dict, num_devices: int) -> dict:
  """Factor-Reduce: the mean over devices, as one global batch would give.

  Each device's loss is the mean over its own batch, so its output
  gradients are N times those of the global-batch loss: G gets 1/N² (with
  'loss' scaling). Symmetric blocks cross as their upper triangles.
  """
  symmetric = dict(config.placement_options)["symmetric_factors"]
  triangle = lambda m: symmetric and m.ndim == 3  # dense blocks, not diagonals
  mats = [(name, m) for name, f in batch.items()
          for m in (f.a_factor, f.g_factor * config.g_share(num_devices))]
  flat = lax.pmean(collectives.pack(
      [collectives.upper_triangle(m) if triangle(m) else m for _, m in mats],
      config.factor_dtype), config.axis_name)
  sent = [m.shape[:-2] + (m.shape[-1] * (m.shape[-1] + 1) // 2,) if triangle(m) else m.shape
          for _, m in mats]
  out = {name: [] for name in batch}
  for (name, m), piece in zip(mats, collectives.unpack(flat, sent)):
    out[name].append(collectives.from_upper_triangle(piece, m.shape[-1]) if triangle(m)
                     else piece)
  return {name: factors_lib.LayerFactors(*pair) for name, pair in out.items()}


def update_factors(config: config_lib.KaisaConfig, state_factors: dict, batch: dict, grads,
                   step) -> tuple[dict, jax.Array]:
  """The running averages with this batch folded in: (factors, skipped 0/1).

  A batch whose factors or gradients are not finite is skipped (counted).
  """
  ok = factors_lib.all_finite(batch) & factors_lib.all_finite(grads)
  decay = config_lib.value(config.factor_decay, step)
  averaged = {k: factors_lib.running_average(state_factors[k], batch[k], decay)
              for k in state_factors}
  kept = jax.tree.map(lambda new, old: jnp.where(ok, new, old), averaged, state_factors)
  return kept, jnp.logical_not(ok).astype(jnp.int32)


# --------------------------------------------------------- decompositions


def _own_shares(config, plan: placement_lib.Placement, device: int, factors: dict,
                damping, groups) -> dict:
  """The decomposition shares of ``groups`` ``device`` computes: {(group, 'a'|'g'): parts}."""
  shares = {}
  for g in groups:
    for which, stack in (("a", factors[g.name].a_factor), ("g", factors[g.name].g_factor)):
      blocks = plan.worker_blocks(device, g, which)
      if blocks:
        shares[(g.name, which)] = eigen_lib.decompose_factor(
            groups_lib.take_blocks(stack, blocks), which == "a" and g.a_diagonal, damping,
            config.compute_method, config.inv_dtype)
  return shares


def _outbox_layout(plan: placement_lib.Placement, device: int, groups) -> list:
  """[(group, 'a'|'g', share shapes)] of ``groups`` that ``device`` sends, in buffer order."""
  return [(g, which, plan.share_shapes(g, which, len(plan.worker_blocks(device, g, which))))
          for g in groups for which in "ag" if plan.worker_blocks(device, g, which)]


def _received_shares(plan: placement_lib.Placement, column: int, inbox, groups) -> dict:
  """A column's shares, each group's blocks in stack order, from its gathered outboxes."""
  pieces: dict = {}
  for row, device in enumerate(plan.columns[column]):
    layout = _outbox_layout(plan, device, groups)
    flat = iter(collectives.unpack(inbox[row], [s for _, _, shapes in layout for s in shapes]))
    for group, which, shapes in layout:
      pieces.setdefault((group.name, which), []).append(
          (plan.worker_blocks(device, group, which), tuple(next(flat) for _ in shapes)))
  return {key: tuple(groups_lib.in_order([p[i] for _, p in parts], [b for b, _ in parts])
                     for i in range(len(parts[0][1])))
          for key, parts in pieces.items()}


def _install(config, plan: placement_lib.Placement, column: int, shares: dict, store,
             damping, groups):
  """The column's new decompositions of ``groups`` from their shares, non-finite members
  rejected; the column's other groups keep theirs."""
  held = store if plan.num_columns == 1 else plan.unpack_column(column, store)
  new, rejected = dict(held), jnp.zeros([], jnp.int32)
  for g in groups:
    if not plan.column_blocks(column, g):
      continue
    sub = plan.column_group(column, g)
    d = eigen_lib.assemble(shares[(g.name, "a")], shares[(g.name, "g")], damping,
                           config.compute_method, config.outer, sub.a_index)
    new[g.name], bad = eigen_lib.keep_finite_members(d, held[g.name], sub)
    rejected = rejected + bad
  if plan.num_columns == 1:
    return new, rejected
  return plan.pack_column(column, new, config.inv_dtype), rejected


def decompose_all(config: config_lib.KaisaConfig, plan: placement_lib.Placement,
                  factors: dict, store, damping, groups=None):
  """New decompositions of the blocks this device holds: (store, rejected).

  ``store`` is ``KaisaState.decompositions`` with one column, else this
  device's ``local_decompositions``. ``groups``: the groups to decompose
  (default: all of ``plan.groups``); the others keep their decompositions.
  """
  groups = plan.groups if groups is None else tuple(groups)
  me = config.device_index()
  switch = functools.partial(state_lib.switch, config)
  if plan.grad_workers == 1:
    # The column's only device decomposes everything the column holds.
    branches = [functools.partial(lambda j, f, st: _install(
        config, plan, j, _own_shares(config, plan, j, f, damping, groups), st, damping,
        groups), j) for j in range(plan.num_columns)]
    store, rejected = switch(me, branches, factors, store)
  else:
    width = plan.outbox_words(groups)
    outbox = switch(me, [functools.partial(lambda d, f: collectives.pad_to(collectives.pack(
        [p for group, which, _ in _outbox_layout(plan, d, groups)
         for p in _own_shares(config, plan, d, f, damping, groups)[(group.name, which)]],
        config.inv_dtype), width), d) for d in range(plan.num_devices)], factors)
    inbox = collectives.gather_within(outbox, config.axis_name, plan.columns)
    branches = [functools.partial(lambda j, ib, st: _install(
        config, plan, j, _received_shares(plan, j, ib, groups), st, damping, groups), j)
                for j in range(plan.num_columns)]
    store, rejected = switch(me % plan.num_columns, branches, inbox, store)
  if config.axis_name is not None:
    # Row 0 of the grid holds every column once: count each layer once.
    rejected = lax.psum(jnp.where(me < plan.num_columns, rejected, 0), config.axis_name)
  return store, rejected


# --------------------------------------------------------- preconditioning


def precondition_all(config: config_lib.KaisaConfig, plan: placement_lib.Placement, store,
                     grads: dict, damping) -> dict:
  """{group name: preconditioned (blocks, g, a) stack}, on every device."""
  def column(j, store):
    held = store if plan.num_columns == 1 else plan.unpack_column(j, store)
    return {g.name: eigen_lib.precondition(
                held[g.name], groups_lib.take_blocks(grads[g.name], plan.column_blocks(j, g)),
                damping, plan.column_group(j, g).a_index)
            for g in plan.groups if plan.column_blocks(j, g)}

  if plan.num_columns == 1:
    return column(0, store)
  width = plan.gradient_words()
  mine = state_lib.switch(config, config.device_index() % plan.num_columns, [
      functools.partial(lambda j, st: collectives.pad_to(collectives.pack(
          list(column(j, st).values()), config.inv_dtype), width), j)
      for j in range(plan.num_columns)], store)
  # Row-wise: member j of a row is the device of column j.
  gathered = collectives.gather_within(mine, config.axis_name, plan.rows)
  pieces: dict = {g.name: [] for g in plan.groups}
  for j in range(plan.num_columns):
    held = [g for g in plan.groups if plan.column_blocks(j, g)]
    mats = collectives.unpack(
        gathered[j], [g.grad_stack_shape(len(plan.column_blocks(j, g))) for g in held])
    for g, m in zip(held, mats):
      pieces[g.name].append((plan.column_blocks(j, g), m))
  return {name: groups_lib.in_order([m for _, m in parts], [b for b, _ in parts])
          for name, parts in pieces.items()}


# ------------------------------------------------------------------ EKFAC


def batch_moments(config: config_lib.KaisaConfig, groups, captures: dict, store: dict) -> dict:
  """EKFAC: per group, the mean of ``(QGᵀ g)² (QAᵀ a)²ᵀ`` over each member's rows.

  Scaled as G is (``g_share``, per-example B²), averaged over the devices
  (every device holds every eigenbasis under COMM-OPT).
  """
  def one(layer, capture, a_eigvecs, g_eigvecs):
    total, rows = 0.0, 0
    for inputs, out_grads in zip(capture.inputs, capture.out_grads):
      moment, count = layer.projected_second_moment(inputs, out_grads, a_eigvecs, g_eigvecs,
                                                    config.factor_dtype)
      total, rows = total + moment, rows + count
    moment = total / rows
    if config.g_factor_scaling == "per_example":
      moment = moment * layer.examples(capture.inputs[0]) ** 2
    return (moment,)

  moments = {}
  for g in groups:
    d = eigen_lib.select_blocks(store[g.name], range(g.blocks), g.a_index)  # A per G block

    def args_of(unit, g=g, d=d):
      layer = unit.layer
      a_eigvecs = (None if g.a_diagonal else
                   groups_lib.unit_blocks(g, unit, d.a_eigvecs, layer.a_factor_shape.shape))
      return (groups_lib.stacked_members(g, unit, lambda l: (captures[l.name],))[0], a_eigvecs,
              groups_lib.unit_blocks(g, unit, d.g_eigvecs, layer.g_factor_shape.shape))

    units = groups_lib.stat_units(g, lambda n: factors_lib.capture_shapes(captures[n]))
    moments[g.name] = groups_lib.over_units(g, units, one, args_of, (g.grad_block_shape,))[0]
  if config.axis_name is not None:
    share = config.g_share(config.axis_size())
    moments = lax.pmean({k: m * share for k, m in moments.items()}, config.axis_name)
  return moments


def correct_scaling(config: config_lib.KaisaConfig, groups, captures: dict, store: dict, grads,
                    step) -> dict:
  """EKFAC's scaling with this batch's moments folded in (skipped if not finite)."""
  moments = batch_moments(config, groups, captures, store)
  ok = factors_lib.all_finite(moments) & factors_lib.all_finite(grads)
  decay = config_lib.value(config.factor_decay, step)
  return {k: d._replace(scaling=jnp.where(
              ok, decay * d.scaling + (1 - decay) * moments[k].astype(d.scaling.dtype),
              d.scaling))
          for k, d in store.items()}


# ---------------------------------------------------------------- KL clip


def kl_scale(config: config_lib.KaisaConfig, precond: dict, grads: dict, step):
  """``ν = min(1, sqrt(kl_clip / |Σ P ⊙ ∇ · lr²|))`` (1 when the sum is 0 or no clip)."""
  if config.kl_clip is None:
    return 1.0
  lr = config_lib.value(config.learning_rate, step)
  vg = sum(jnp.sum(p * grads[k].astype(p.dtype)) for k, p in precond.items()) * lr ** 2
  bound = config_lib.value(config.kl_clip, step)
  safe_vg = jnp.where(vg == 0, 1.0, jnp.abs(vg))
  return jnp.where(vg == 0, 1.0, jnp.minimum(1.0, jnp.sqrt(bound / safe_vg)))
