"""Groups: layers whose Kronecker blocks have the same shapes, stacked as one array.

Every layer's factors are made of independent blocks (one for Dense and
Conv, one per group of a grouped convolution, one per feature of a
normalisation layer, one per slice of a layer stacked by a scan). Layers
whose blocks have the same A side, the same G side and the same storage
(dense or diagonal A) form a ``LayerGroup``: its factors are one
``(blocks, n, n)`` stack (``(blocks, n)`` for a diagonal A), its members'
blocks end to end, so that every stage (running averages, decompositions,
preconditioning, the KL-clip sum, the packing for collectives) runs once
per group, not once per layer.

A group's members are ordered by *stats signature*: layers that compute
their statistics the same way (the same kind and configuration, differing
only in name and parameter paths) sit side by side, so that their batch
statistics and gradient matrices are computed in one ``vmap`` over their
stacked captures and parameters (``stat_units``).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from kaisa_jax._src import layers as layers_lib


def signature(layer: layers_lib.Layer) -> layers_lib.Layer:
  """``layer`` without its name and parameter paths: what its statistics depend on.

  Two layers with equal signatures compute their factors, gradient matrices
  and EKFAC moments by the same function of their own captures and
  parameters. Nested layer descriptions (a scanned layer's ``inner``) are
  stripped too.
  """
  changes = {"name": "", "kernel_path": (),
             "bias_path": () if layer.has_bias else None}
  for field in dataclasses.fields(layer):
    value = getattr(layer, field.name)
    if isinstance(value, layers_lib.Layer):
      changes[field.name] = signature(value)
  return dataclasses.replace(layer, **changes)


@dataclasses.dataclass(frozen=True)
class LayerGroup:
  """Layers stacked along one block axis (see the module docstring).

  Attributes:
    name: ``'a{A side}_g{G side}'`` (``'a{n}diag_g{m}'`` for a diagonal A),
      the key of the group's factors and decompositions in ``KaisaState``.
    a_size, g_size: the side of one A block and one G block.
    a_diagonal: A blocks are diagonals, stored as ``(n,)`` rows.
    layers: the members, ordered by stats signature (then registry order).
  """
  name: str
  a_size: int
  g_size: int
  a_diagonal: bool
  layers: tuple[layers_lib.Layer, ...]

  @property
  def names(self) -> tuple[str, ...]:
    return tuple(l.name for l in self.layers)

  @property
  def member_blocks(self) -> tuple[int, ...]:
    """Blocks of each member, in member order."""
    return tuple(l.blocks for l in self.layers)

  @property
  def offsets(self) -> tuple[int, ...]:
    """Index of each member's first block in the stack."""
    return tuple(int(o) for o in np.cumsum((0,) + self.member_blocks[:-1]))

  @property
  def blocks(self) -> int:
    return sum(self.member_blocks)

  def block_range(self, name: str) -> range:
    """The stack indices of member ``name``'s blocks."""
    i = self.names.index(name)
    return range(self.offsets[i], self.offsets[i] + self.member_blocks[i])

  @property
  def a_block_shape(self) -> tuple[int, ...]:
    return (self.a_size,) if self.a_diagonal else (self.a_size, self.a_size)

  @property
  def g_block_shape(self) -> tuple[int, ...]:
    return (self.g_size, self.g_size)

  @property
  def grad_block_shape(self) -> tuple[int, ...]:
    return (self.g_size, self.a_size)

  def a_stack_shape(self, blocks: Optional[int] = None) -> tuple[int, ...]:
    """(blocks, n, n), or (blocks, n) for a diagonal A; ``blocks``: all by default."""
    return (self.blocks if blocks is None else blocks,) + self.a_block_shape

  def g_stack_shape(self, blocks: Optional[int] = None) -> tuple[int, ...]:
    return (self.blocks if blocks is None else blocks,) + self.g_block_shape

  def grad_stack_shape(self, blocks: Optional[int] = None) -> tuple[int, ...]:
    return (self.blocks if blocks is None else blocks,) + self.grad_block_shape

  def __str__(self) -> str:
    return f"{self.name} ({len(self.layers)} layers, {self.blocks} blocks)"


def group_name(layer: layers_lib.Layer) -> str:
  """The name of the group ``layer`` belongs to."""
  diag = "diag" if layer.a_diagonal else ""
  return f"a{layer.a_size}{diag}_g{layer.g_size}"


def group_layers(layers: tuple[layers_lib.Layer, ...]) -> tuple[LayerGroup, ...]:
  """The groups of ``layers``, in order of their first member in the registry.

  Within a group, members with the same ``signature`` are adjacent (in
  order of first appearance, registry order within one signature).
  """
  by_group: dict[str, list[layers_lib.Layer]] = {}
  for layer in layers:
    by_group.setdefault(group_name(layer), []).append(layer)
  groups = []
  for name, members in by_group.items():
    first_seen: dict = {}
    for layer in members:
      first_seen.setdefault(signature(layer), len(first_seen))
    ordered = sorted(members, key=lambda l: first_seen[signature(l)])  # stable
    first = ordered[0]
    groups.append(LayerGroup(name, first.a_size, first.g_size, first.a_diagonal,
                             tuple(ordered)))
  return tuple(groups)


@dataclasses.dataclass(frozen=True)
class StatUnit:
  """Adjacent members of a group computed in one ``vmap``.

  Attributes:
    layer: the first member (any member: they share a signature).
    members: their indices in the group, consecutive.
  """
  layer: layers_lib.Layer
  members: tuple[int, ...]


def stat_units(group: LayerGroup, shapes_of) -> tuple[StatUnit, ...]:
  """``group``'s members as runs of equal signature and equal capture shapes.

  Args:
    group: the group.
    shapes_of: layer name -> a hashable description of the layer's capture
      shapes (members are only stacked when theirs match).
  """
  units: list[StatUnit] = []
  key = lambda l: (signature(l), shapes_of(l.name))
  for i, layer in enumerate(group.layers):
    if units and key(units[-1].layer) == key(layer):
      units[-1] = StatUnit(units[-1].layer, units[-1].members + (i,))
    else:
      units.append(StatUnit(layer, (i,)))
  return tuple(units)


def take_blocks(stack, indices):
  """``stack[indices]`` along the block axis, with static ``indices``.

  The identity and contiguous ranges are free (no gather).
  """
  indices = tuple(int(i) for i in indices)
  if indices == tuple(range(stack.shape[0])):
    return stack
  if indices and indices == tuple(range(indices[0], indices[0] + len(indices))):
    return stack[indices[0]:indices[0] + len(indices)]
  return stack[np.asarray(indices, np.int32)]


def in_order(pieces, indices):
  """The blocks of ``pieces`` in increasing order of their stack index.

  ``indices[i]`` lists the (distinct) stack indices of the blocks piece i
  holds, ``(len(indices[i]), ...)``: e.g. the shares gathered from several
  devices. Returns ``(sum of their lengths, ...)``, ordered by index.
  """
  flat = [int(i) for idx in indices for i in idx]
  if len(pieces) == 1:
    stacked = pieces[0]
  else:
    stacked = jnp.concatenate(pieces, axis=0)
  order = np.argsort(np.asarray(flat, np.int64), kind="stable")
  return take_blocks(stacked, order)


def over_units(group: LayerGroup, units: tuple[StatUnit, ...], fn, args_of,
               block_shapes: tuple[tuple[int, ...], ...]) -> tuple:
  """``fn(layer, *args)`` for every member, as stacks in member order.

  Args:
    group, units: the group and its stat units.
    fn: ``fn(layer, *args)`` for one member, returning a tuple of arrays
      with the layer's own shapes.
    args_of: ``args_of(unit)``, the unit's arguments stacked along a new
      leading axis, one entry per member (``stacked_members`` builds them
      from per-member values).
    block_shapes: the block shape of each output.

  Returns:
    Per output k, ``(group.blocks, *block_shapes[k])``: each unit's members
    computed in one ``jax.vmap`` (a unit of one directly), reshaped to
    their blocks, concatenated.
  """
  pieces = []
  for unit in units:
    args = args_of(unit)
    if len(unit.members) == 1:  # no vmap: the plain per-layer program
      values = tuple(v[None] for v in fn(unit.layer, *jax.tree.map(lambda x: x[0], args)))
    else:
      values = jax.vmap(lambda *a: tuple(fn(unit.layer, *a)))(*args)
    pieces.append([v.reshape((-1,) + tuple(shape)) for v, shape in zip(values, block_shapes)])
  return tuple(parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=0)
               for parts in zip(*pieces))


def stacked_members(group: LayerGroup, unit: StatUnit, value_of) -> tuple:
  """``value_of(layer)`` (a tuple of pytrees) for the unit's members, stacked leaf by leaf."""
  values = [value_of(group.layers[i]) for i in unit.members]
  return jax.tree.map(lambda *xs: jnp.stack(xs), *values)


def unit_blocks(group: LayerGroup, unit: StatUnit, stack, member_shape: tuple[int, ...]):
  """The unit's blocks of ``stack`` as (members, *member_shape): one static slice.

  A unit's members are adjacent and share their block count, so their
  blocks are one contiguous run of the stack.
  """
  start = group.offsets[unit.members[0]]
  stop = start + len(unit.members) * unit.layer.blocks
  return stack[start:stop].reshape((len(unit.members),) + tuple(member_shape))
