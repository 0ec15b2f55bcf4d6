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

Layers fed the very same input (the query, key and value projections of an
attention block: ``LayerRegistry.shared_inputs``) have one A between them:
the group keeps A blocks for its *A owners* only, and ``a_index`` says which
A block each G block is preconditioned with. Without shared inputs the A
and G stacks have the same blocks.
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
    a_owners: per member, the member whose A blocks it uses (itself, or the
      first member fed the same input); empty when every member has its own.
  """
  name: str
  a_size: int
  g_size: int
  a_diagonal: bool
  layers: tuple[layers_lib.Layer, ...]
  a_owners: tuple[str, ...] = ()

  def a_owner(self, name: str) -> str:
    """The member whose A blocks ``name`` uses."""
    return self.a_owners[self.names.index(name)] if self.a_owners else name

  @property
  def a_layers(self) -> tuple[layers_lib.Layer, ...]:
    """The members that own their A blocks, in member order (the A stack's order)."""
    return tuple(l for l in self.layers if self.a_owner(l.name) == l.name)

  @property
  def a_blocks(self) -> int:
    """Blocks of the A stack: the A owners' blocks."""
    return sum(l.blocks for l in self.a_layers)

  def a_block_range(self, name: str) -> range:
    """The A-stack indices of the A blocks member ``name`` uses (its owner's)."""
    owner = self.a_owner(name)
    start = 0
    for l in self.a_layers:
      if l.name == owner:
        return range(start, start + l.blocks)
      start += l.blocks
    raise KeyError(name)

  @property
  def a_index(self) -> tuple[int, ...]:
    """Per G block (stack order), the index of the A block it goes with."""
    return tuple(i for l in self.layers for i in self.a_block_range(l.name))

  @property
  def shares_a(self) -> bool:
    return self.a_blocks != self.blocks

  def sharing_sets(self) -> tuple[int, ...]:
    """Per member, the index (in ``a_layers``) of the A owner it goes with.

    A sharing set is decided as one: a decomposition of its A that is
    rejected rejects every member that uses it.
    """
    owners = [l.name for l in self.a_layers]
    return tuple(owners.index(self.a_owner(n)) for n in self.names)

  def subset(self, names) -> "LayerGroup":
    """The group of the members in ``names`` (member order kept), e.g. a column's.

    Every member's A owner must be among them.
    """
    wanted = set(names)
    keep = [i for i, n in enumerate(self.names) if n in wanted]
    owners = tuple(self.a_owners[i] for i in keep) if self.a_owners else ()
    if not set(owners) <= {self.names[i] for i in keep}:
      raise ValueError(f"{self.name}: a subset of members without the A owner of some.")
    return dataclasses.replace(self, layers=tuple(self.layers[i] for i in keep),
                               a_owners=owners)

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
    """(blocks, n, n), or (blocks, n) for a diagonal A; ``blocks``: ``a_blocks`` by default."""
    return (self.a_blocks if blocks is None else blocks,) + self.a_block_shape

  def g_stack_shape(self, blocks: Optional[int] = None) -> tuple[int, ...]:
    return (self.blocks if blocks is None else blocks,) + self.g_block_shape

  def grad_stack_shape(self, blocks: Optional[int] = None) -> tuple[int, ...]:
    return (self.blocks if blocks is None else blocks,) + self.grad_block_shape

  def __str__(self) -> str:
    shared = f", {self.a_blocks} A blocks" if self.shares_a else ""
    return f"{self.name} ({len(self.layers)} layers, {self.blocks} blocks{shared})"


def group_name(layer: layers_lib.Layer) -> str:
  """The name of the group ``layer`` belongs to."""
  diag = "diag" if layer.a_diagonal else ""
  return f"a{layer.a_size}{diag}_g{layer.g_size}"


def group_layers(layers: tuple[layers_lib.Layer, ...],
                 a_sources: tuple[tuple[str, str], ...] = ()) -> tuple[LayerGroup, ...]:
  """The groups of ``layers``, in order of their first member in the registry.

  Within a group, members with the same ``signature`` are adjacent (in
  order of first appearance, registry order within one signature).

  Args:
    layers: the preconditioned layers, in registry order.
    a_sources: (layer, source) pairs: ``layer`` uses ``source``'s A
      (``config.shared_a_sources``); both must have equal signatures.
  """
  source_of = dict(a_sources)
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
    owners = tuple(source_of.get(l.name, l.name) for l in ordered)
    groups.append(LayerGroup(name, first.a_size, first.g_size, first.a_diagonal,
                             tuple(ordered), owners if owners != tuple(l.name for l in ordered)
                             else ()))
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
