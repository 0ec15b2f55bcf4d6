"""Placement: which device does what, fixed before anything runs.

KAISA lays the N devices of the data-parallel axis out as a grid of
``grad_workers`` rows by ``N / grad_workers`` columns, numbered row by row
(the reference's layout):

* a column is a grad-worker group: its devices hold the eigen data of the
  layers assigned to the column and precondition their gradients;
* a row is a receiver group: it holds one device of every column, which
  serves the row the preconditioned gradients of its column's layers.

Layers go to columns greedily, largest decomposition cost first, each to the
column with the least load; within the column the A and G decompositions go
to its least loaded device (both to one device with ``colocate_factors``).
Layers fed the same input (one A between them, see ``groups.py``) are placed
as one: one column, their A decomposed once, by the first one's A worker.

With more than one column a device keeps only its column's eigen data, packed
into one flat buffer; every device's buffer has the length of the largest
column's (SPMD needs one shape), so a device holds about f of COMM-OPT's
eigen data, up to that padding.

The state keeps each layer group (``groups.py``) as one stack of blocks, so
placement is per layer but work is per group: a device decomposes the
blocks of each group it owns as one sub-stack, and a column keeps and
preconditions its layers' blocks of each group as one sub-stack
(``column_blocks``, ``worker_blocks``). The plan also owns that layout:
``pack_column`` / ``unpack_column`` for the device-local buffer, and
``layer_factors`` / ``layer_decompositions`` to read a state per layer.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence


from kaisa_jax._src import collectives
from kaisa_jax._src import eigen as eigen_lib
from kaisa_jax._src import groups as groups_lib
from kaisa_jax._src import layers as layers_lib

COST_MODELS = ("compute", "memory")


@dataclasses.dataclass(frozen=True)
class LayerPlacement:
  """Where one layer's work happens.

  Attributes:
    name: the layer name.
    a_shape, g_shape: how its factors are stored (``FactorShape``: block
      side, blocks, diagonal).
    column: its grad-worker group (index into ``Placement.columns``).
    a_worker, g_worker: the devices that decompose A and G.
  """
  name: str
  a_shape: layers_lib.FactorShape
  g_shape: layers_lib.FactorShape
  column: int
  a_worker: int
  g_worker: int

  @property
  def a_size(self) -> int:
    return self.a_shape.size

  @property
  def g_size(self) -> int:
    return self.g_shape.size

  @property
  def grad_shape(self) -> tuple[int, ...]:
    """Its gradient matrix: (g, a), or (blocks, g, a)."""
    return self.g_shape.shape[:-1] + (self.a_shape.size,)

  @property
  def grad_words(self) -> int:
    return math.prod(self.grad_shape)


@dataclasses.dataclass(frozen=True)
class Placement:
  """The static plan for N devices (see the module docstring).

  Attributes:
    num_devices: N.
    grad_workers: devices per layer that hold its eigen data (grid rows).
    layers: one ``LayerPlacement`` per layer, in registry order.
    groups: the layer groups (``LayerGroup``) whose stacks the state keeps.
    compute_method, eigenvalue_outer_product, symmetric_factors,
    factor_itemsize, inv_itemsize: what the byte counts assume.
  """
  num_devices: int
  grad_workers: int
  layers: tuple[LayerPlacement, ...]
  groups: tuple[groups_lib.LayerGroup, ...] = ()
  compute_method: str = "eigen"
  eigenvalue_outer_product: bool = True
  symmetric_factors: bool = True
  factor_itemsize: int = 4
  inv_itemsize: int = 4

  @property
  def num_columns(self) -> int:
    return self.num_devices // self.grad_workers

  @property
  def columns(self) -> tuple[tuple[int, ...], ...]:
    """Grad-worker groups: column j of the grid, ``(j, j + C, j + 2C, ...)``."""
    c = self.num_columns
    return tuple(tuple(range(j, self.num_devices, c)) for j in range(c))

  @property
  def rows(self) -> tuple[tuple[int, ...], ...]:
    """Receiver groups: row i of the grid, ``(iC, ..., iC + C - 1)``."""
    c = self.num_columns
    return tuple(tuple(range(i * c, (i + 1) * c)) for i in range(self.grad_workers))

  @property
  def strategy(self) -> str:
    """'COMM-OPT' (one group: every device holds everything), 'MEM-OPT' (one
    grad worker per layer) or 'HYBRID-OPT'; a single device counts as COMM-OPT."""
    if self.num_columns == 1:
      return "COMM-OPT"
    return "MEM-OPT" if self.grad_workers == 1 else "HYBRID-OPT"

  def column_of(self, device: int) -> int:
    return device % self.num_columns

  def layers_of_column(self, column: int) -> tuple[LayerPlacement, ...]:
    """The column's layers, in registry order (their order in the packed buffer)."""
    return tuple(l for l in self.layers if l.column == column)

  # ------------------------------------------------------- group layout

  def placed(self, name: str) -> LayerPlacement:
    return self._by_name[name]

  @functools.cached_property
  def _by_name(self) -> dict:
    return {l.name: l for l in self.layers}

  def group_of(self, name: str) -> groups_lib.LayerGroup:
    """The group that holds layer ``name``."""
    return next(g for g in self.groups if name in g.names)

  def _blocks_where(self, group: groups_lib.LayerGroup, held) -> tuple[int, ...]:
    return tuple(i for l in group.layers if held(self.placed(l.name))
                 for i in group.block_range(l.name))

  def column_blocks(self, column: int, group: groups_lib.LayerGroup) -> tuple[int, ...]:
    """The blocks of ``group``'s stack whose layers ``column`` holds, in stack order."""
    return self._blocks_where(group, lambda p: p.column == column)

  def column_a_blocks(self, column: int, group: groups_lib.LayerGroup) -> tuple[int, ...]:
    """The A-stack indices of the A blocks ``column`` holds, in stack order."""
    return tuple(i for l in group.a_layers if self.placed(l.name).column == column
                 for i in group.a_block_range(l.name))

  def column_group(self, column: int, group: groups_lib.LayerGroup) -> groups_lib.LayerGroup:
    """``group``'s members that ``column`` holds: the layout of its sub-stacks there."""
    return group.subset([l.name for l in group.layers
                         if self.placed(l.name).column == column])

  def worker_blocks(self, device: int, group: groups_lib.LayerGroup,
                    which: str) -> tuple[int, ...]:
    """The indices into ``group``'s A (``which='a'``) or G stack of the blocks
    ``device`` decomposes."""
    if which == "a":
      return tuple(i for l in group.a_layers if self.placed(l.name).a_worker == device
                   for i in group.a_block_range(l.name))
    return self._blocks_where(group, lambda p: p.g_worker == device)

  def share_shapes(self, group: groups_lib.LayerGroup, which: str,
                   blocks: int) -> list[tuple[int, ...]]:
    """Shapes of one decomposition share (``eigen.decompose_factor``) of ``blocks`` blocks."""
    diagonal = which == "a" and group.a_diagonal
    stack = group.a_stack_shape(blocks) if which == "a" else group.g_stack_shape(blocks)
    if self.compute_method == "inverse" or diagonal:
      return [stack]
    return [stack, stack[:-1]]

  def stored_shapes(self, group: groups_lib.LayerGroup, blocks=None, a_blocks=None) -> list:
    """Shapes of the fields of a decomposition of ``group``'s stack (None: not stored);
    ``blocks``, ``a_blocks`` as ``eigen.field_shapes`` takes them."""
    kind = eigen_lib.decomposition_type(self.compute_method, self.eigenvalue_outer_product)
    return eigen_lib.field_shapes(kind, group, blocks, a_blocks)

  def _stored_words(self, group: groups_lib.LayerGroup, blocks=None, a_blocks=None) -> int:
    return sum(math.prod(s) for s in self.stored_shapes(group, blocks, a_blocks)
               if s is not None)

  def _held_groups(self, column: int) -> list[groups_lib.LayerGroup]:
    """``column_group`` of every group with members in ``column``."""
    return [self.column_group(column, g) for g in self.groups if self.column_blocks(column, g)]

  def local_words(self) -> int:
    """Length of a device's packed eigen data (the largest column's), with several columns."""
    return max(sum(self._stored_words(g) for g in self._held_groups(j))
               for j in range(self.num_columns))

  # ------------------------------------------------- the state's layout

  def pack_column(self, column: int, decompositions: dict, dtype):
    """A device's eigen data: its column's share of each group, packed and padded.

    Args:
      column: the device's grad-worker group.
      decompositions: group name -> the decomposition of the column's blocks
        (``column_blocks``), for every group with blocks in the column.
      dtype: ``inv_dtype``.

    Returns:
      (local_words(),) vector.
    """
    leaves = [x for g in self._held_groups(column)
              for x in decompositions[g.name] if x is not None]
    return collectives.pad_to(collectives.pack(leaves, dtype), self.local_words())

  def unpack_column(self, column: int, packed) -> dict:
    """The inverse of ``pack_column``: {group name: decomposition of the column's blocks}."""
    kind = eigen_lib.decomposition_type(self.compute_method, self.eigenvalue_outer_product)
    held = [(g, self.stored_shapes(g)) for g in self._held_groups(column)]
    pieces = iter(collectives.unpack(
        packed, [s for _, shapes in held for s in shapes if s is not None]))
    return {g.name: kind(*[None if s is None else next(pieces) for s in shapes])
            for g, shapes in held}

  def group_decompositions(self, state) -> dict:
    """{group name: decomposition of its whole stack} from a state laid out for this plan.

    ``state`` is a ``KaisaState`` as one device or shard_map's global view
    holds it (``local_decompositions`` of every device end to end).
    """
    if self.num_columns == 1:
      if set(state.decompositions) != {g.name for g in self.groups}:
        raise ValueError(
            f"the state's decompositions ({sorted(state.decompositions)}) do not match "
            f"this placement's groups ({[g.name for g in self.groups]}).")
      return dict(state.decompositions)
    local, width = state.local_decompositions, self.local_words()
    if local is None or local.shape != (self.num_devices * width,):
      raise ValueError(
          f"local_decompositions has shape {None if local is None else local.shape}, "
          f"this placement needs ({self.num_devices * width},): pass the state as "
          "shard_map returns it (global arrays) with the placement of that run.")
    rows = local.reshape(self.num_devices, width)
    per_column = [self.unpack_column(j, rows[members[0]])
                  for j, members in enumerate(self.columns)]
    out = {}
    for g in self.groups:
      held = [j for j in range(self.num_columns) if self.column_blocks(j, g)]
      out[g.name] = eigen_lib.merge_blocks([per_column[j][g.name] for j in held],
                                           [self.column_blocks(j, g) for j in held],
                                           [self.column_a_blocks(j, g) for j in held])
    return out

  def layer_factors(self, state) -> dict:
    """{layer name: its running ``LayerFactors``}, in the layer's own shapes.

    The state keeps each group's factors as one stack; this reads them back
    per layer: (a, a) and (g, g), with a leading blocks axis for a layer of
    several blocks, (a,) for a diagonal A.

    Example:
      >>> plan = kaisa_jax.placement(layers, num_devices=1)
      >>> plan.layer_factors(opt_state[0])["Dense_0"].a_factor.shape
      (65, 65)
    """
    out = {}
    for l in self.layers:
      f = state.factors[self.group_of(l.name).name]
      out[l.name] = type(f)(self._per_layer(l.name, f.a_factor, True, l.a_shape.shape),
                            self._per_layer(l.name, f.g_factor, False, l.g_shape.shape))
    return out

  def layer_decompositions(self, state) -> dict:
    """{layer name: its latest decomposition}, in the layer's own shapes.

    Fields as ``Eigen`` / ``EigenOuter`` / ``EigenCorrected`` / ``Inverse``
    describe them for one layer: no blocks axis for a layer of one block.
    Reads the device-local eigen data too (``group_decompositions``).
    """
    groups = self.group_decompositions(state)
    out = {}
    for l in self.layers:
      d = groups[self.group_of(l.name).name]
      out[l.name] = type(d)(*[
          None if x is None else self._per_layer(l.name, x, field in eigen_lib.A_FIELDS)
          for field, x in zip(d._fields, d)])
    return out

  def _per_layer(self, name: str, stack, a_side: bool, shape=None):
    """Layer ``name``'s blocks of a group's A (``a_side``) or G-blocked ``stack``,
    without the blocks axis for one block."""
    group = self.group_of(name)
    held = group.a_block_range(name) if a_side else group.block_range(name)
    blocks = stack[held.start:held.stop]
    if shape is not None:
      return blocks.reshape(shape)
    return blocks[0] if blocks.shape[0] == 1 else blocks

  # ------------------------------------------------------------- byte counts

  def stored_words(self, a_size: int, g_size: int, a_diagonal: bool = False,
                   blocks: int = 1) -> int:
    """Words a decomposition of ``blocks`` (g_size, a_size) blocks keeps in the state."""
    group = groups_lib.LayerGroup("", a_size, g_size, a_diagonal, ())
    return self._stored_words(group, blocks, blocks)

  def outbox_words(self, groups=None) -> int:
    """Length of the decomposition-step buffer every device sends (the largest), for
    ``groups`` (default: all)."""
    groups = self.groups if groups is None else groups
    return max(sum(math.prod(s) for g in groups for which in "ag"
                   for s in self.share_shapes(g, which, len(self.worker_blocks(d, g, which))))
               for d in range(self.num_devices))

  def gradient_words(self) -> int:
    """Length of the ordinary-step buffer every device sends (the largest column)."""
    return max(sum(len(self.column_blocks(j, g)) * g.g_size * g.a_size for g in self.groups)
               for j in range(self.num_columns))

  def device_bytes(self) -> list[dict]:
    """Per device: bytes of the factors and of the eigen data in its state."""
    factors = sum(math.prod(g.a_stack_shape()) + math.prod(g.g_stack_shape())
                  for g in self.groups) * self.factor_itemsize
    if self.num_columns == 1:
      eigen = sum(self._stored_words(g) for g in self.groups)
    else:
      eigen = self.local_words()
    eigen *= self.inv_itemsize
    return [{"device": d, "factor_bytes": factors, "eigen_bytes": eigen}
            for d in range(self.num_devices)]

  def collectives(self) -> list[dict]:
    """The collectives of each kind of step and the bytes of their result on each device.

    'factor step': the all-reduce of the batch factors. 'decomposition
    step': the gathering of the decompositions within each grad-worker group
    (none with one grad worker) and the all-reduce of the rejected count.
    'every step': the all-reduce of the gradients (``registered_bytes``: the
    registered layers' share; the other parameters add theirs) and the
    gathering of the preconditioned gradients within each receiver group
    (none with one group). Gatherings are all-gathers (result: group size x
    the longest device's buffer); under shard_map's checked mode on jax <
    0.10 a gathering over all N devices is an all-reduce of the same result
    size instead (see ``collectives.gather_within``).
    """
    n = self.num_devices
    if n == 1:
      return []
    # Kernel and bias of a layer are its (g, a) gradient matrix; float32 params assumed.
    registered = sum(l.grad_words for l in self.layers) * 4
    out = [{"step": "every step", "op": "all-reduce", "what": "gradients (mean)",
            "group_size": n, "bytes": None, "registered_bytes": registered},
           {"step": "factor step", "op": "all-reduce", "what": "batch factors (mean)",
            "group_size": n,
            "bytes": sum(self._packed_factor_words(g) for g in self.groups)
                     * self.factor_itemsize}]

    def gathering(step, what, group_size, width):
      return {"step": step, "op": "all-gather", "what": what, "group_size": group_size,
              "bytes": group_size * width * self.inv_itemsize}

    if self.grad_workers > 1:
      out.append(gathering("decomposition step", "decompositions to the grad workers",
                           self.grad_workers, self.outbox_words()))
    out.append({"step": "decomposition step", "op": "all-reduce",
                "what": "count of rejected decompositions", "group_size": n, "bytes": 4})
    if self.num_columns > 1:
      out.append(gathering("every step", "preconditioned gradients to the receivers",
                           self.num_columns, self.gradient_words()))
    return out

  def _packed_factor_words(self, group: groups_lib.LayerGroup) -> int:
    """Words a group's factors send in a Factor-Reduce (upper triangles when symmetric)."""
    tri = lambda n: n * (n + 1) // 2 if self.symmetric_factors else n * n
    a = group.a_size if group.a_diagonal else tri(group.a_size)
    return group.a_blocks * a + group.blocks * tri(group.g_size)

  def table(self) -> str:
    """The plan as text: per layer, per device, per collective."""
    c = self.num_columns
    lines = [f"KAISA placement: {self.num_devices} devices, {self.grad_workers} grad "
             f"worker(s) per layer ({self.strategy}), {c} grad-worker group(s)"]
    rows = [("layer", "A size", "G size", "group", "A worker", "G worker", "grad workers")]
    for l in self.layers:
      group = self.group_of(l.name)
      owner = group.a_owner(l.name)
      a_worker = str(l.a_worker) + ("" if owner == l.name else f" ({owner}'s A)")
      rows.append((l.name, str(l.a_shape), str(l.g_shape), group.name, a_worker,
                   str(l.g_worker), ",".join(map(str, self.columns[l.column]))))
    lines += _format(rows)
    lines.append("")
    rows = [("device", "factor bytes", "eigen bytes", "decomposes")]
    for d in self.device_bytes():
      work = [f"{l.name}:A" for l in self.layers if l.a_worker == d["device"]
              and self.group_of(l.name).a_owner(l.name) == l.name]
      work += [f"{l.name}:G" for l in self.layers if l.g_worker == d["device"]]
      rows.append((str(d["device"]), f"{d['factor_bytes']:,}", f"{d['eigen_bytes']:,}",
                   " ".join(work) or "-"))
    lines += _format(rows)
    collectives = self.collectives()
    if collectives:
      lines.append("")
      rows = [("when", "collective", "what", "group", "bytes per device")]
      for k in collectives:
        size = (f"{k['bytes']:,}" if k["bytes"] is not None
                else f"params ({k['registered_bytes']:,} in registered layers)")
        rows.append((k["step"], k["op"], k["what"], str(k["group_size"]), size))
      lines += _format(rows)
    return "\n".join(lines)

  def __str__(self) -> str:
    return self.table()


def _format(rows: Sequence[Sequence[str]]) -> list[str]:
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  out = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
  out.insert(1, "  ".join("-" * w for w in widths))
  return out


def valid_fractions(num_devices: int) -> list[str]:
  return [f"{k}/{num_devices}" for k in range(1, num_devices + 1) if num_devices % k == 0]


def grad_worker_count(num_devices: int, grad_worker_frac: float) -> int:
  """``max(1, round(N f))``, checked to divide N."""
  if not 0 < grad_worker_frac <= 1:
    raise ValueError(f"grad_worker_frac must be in (0, 1], got {grad_worker_frac!r}.")
  count = max(1, round(num_devices * grad_worker_frac))
  if num_devices % count:
    raise ValueError(
        f"grad_worker_frac={grad_worker_frac!r} gives {count} grad workers per layer, "
        f"which does not divide the {num_devices} devices; valid fractions for "
        f"{num_devices} devices: {', '.join(valid_fractions(num_devices))}.")
  return count


def plan(layers: Sequence[layers_lib.Layer], num_devices: int, grad_worker_frac: float,
         *, colocate_factors: bool = True, cost_model: str = "compute",
         compute_method: str = "eigen", eigenvalue_outer_product: bool = True,
         symmetric_factors: bool = True, factor_itemsize: int = 4,
         inv_itemsize: int = 4, a_sources: tuple = ()) -> Placement:
  """The greedy KAISA assignment for ``layers`` (registry order kept).

  ``a_sources``: (layer, source) pairs, ``layer`` using ``source``'s A
  (``config.shared_a_sources``); each source and its sharers are placed as one.
  """
  if int(num_devices) != num_devices or num_devices < 1:
    raise ValueError(f"num_devices must be an integer >= 1, got {num_devices!r}.")
  if cost_model not in COST_MODELS:
    raise ValueError(f"cost_model must be one of {COST_MODELS}, got {cost_model!r}.")
  grad_workers = grad_worker_count(num_devices, grad_worker_frac)
  columns = num_devices // grad_workers
  if compute_method == "ekfac" and columns > 1:
    raise ValueError(
        f"compute_method='ekfac' needs every device to hold every eigenbasis "
        f"(grad_worker_frac=1, COMM-OPT): its eigenvalue scaling is estimated from each "
        f"device's own rows in those bases. Got grad_worker_frac={grad_worker_frac!r} on "
        f"{num_devices} devices.")
  power = 3 if cost_model == "compute" else 2
  assigned = _assign(_placement_units(layers, a_sources), columns, num_devices,
                     lambda factor: factor.cost(power), colocate_factors)
  placed = tuple(LayerPlacement(l.name, l.a_factor_shape, l.g_factor_shape, *assigned[l.name])
                 for l in layers)
  return Placement(num_devices, grad_workers, placed,
                   groups_lib.group_layers(tuple(layers), tuple(a_sources)), compute_method,
                   bool(eigenvalue_outer_product), bool(symmetric_factors),
                   factor_itemsize, inv_itemsize)


def _placement_units(layers: Sequence[layers_lib.Layer], a_sources: tuple) -> list[list]:
  """The layers as units placed as one: a layer with those that use its A, in registry order."""
  source_of = dict(a_sources)
  units: dict = {}
  for layer in layers:
    units.setdefault(source_of.get(layer.name, layer.name), []).append(layer)
  return list(units.values())


def _assign(units: list[list], columns: int, num_devices: int, cost,
            colocate_factors: bool) -> dict:
  """{layer name: (column, A worker, G worker)}: each unit, largest cost first, to the
  least loaded column, and its decompositions to the column's least loaded devices.

  A unit's A is its first layer's, decomposed once; ties go in registry order,
  so the plan is deterministic.
  """
  load = [0.0] * num_devices
  members = [list(range(j, num_devices, columns)) for j in range(columns)]
  # Work items of a unit: its A once (key None), then each layer's G (key: its name).
  items = lambda unit: [(None, unit[0].a_factor_shape)] + [(l.name, l.g_factor_shape)
                                                           for l in unit]
  unit_cost = lambda unit: sum(cost(f) for _, f in items(unit))
  assigned = {}
  for k in sorted(range(len(units)), key=lambda k: (-unit_cost(units[k]), k)):
    unit = units[k]
    column = min(range(columns), key=lambda j: (sum(load[d] for d in members[j]), j))
    least = lambda: min(members[column], key=lambda d: (load[d], d))
    workers = {}
    if colocate_factors:
      worker = least()
      load[worker] += unit_cost(unit)
      workers = {key: worker for key, _ in items(unit)}
    else:
      for key, factor in sorted(items(unit), key=lambda item: -cost(item[1])):
        workers[key] = least()
        load[workers[key]] += cost(factor)
    for l in unit:
      assigned[l.name] = (column, workers[None], workers[l.name])
  return assigned
