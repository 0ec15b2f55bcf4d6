"""The registry: which kind handles a Flax module, and the layers a loss calls.

``LAYER_KINDS`` lists every kind, most specific first; ``kind_of`` picks
the kind of a module, ``unsupported_reason`` says why a Flax layer that no
kind handles is skipped, and ``LayerRegistry`` is the static, hashable
result of ``find_layers``, with the ``UncoveredParam`` leaves no layer
covers.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import flax.linen as nn
from flax import nnx

from kaisa_jax._src.layers.base import KeyPath, Layer, Skipped
from kaisa_jax._src.layers.conv import Conv
from kaisa_jax._src.layers.dense import Dense, DenseGeneral, Einsum
from kaisa_jax._src.layers.embed import Embed
from kaisa_jax._src.layers.norms import BatchNorm, GroupNorm, LayerNorm, RMSNorm

# Flax layers with parameters that no kind handles (yet): find_layers lists
# them as skipped instead of leaving them unnoticed.
_UNSUPPORTED_MODULES = (
    ((nn.ConvTranspose, nnx.ConvTranspose), "transposed convolutions are not supported yet"),
    ((nn.ConvLocal,), "unshared (local) convolutions are not supported yet"),
)


def unsupported_reason(module: nn.Module) -> Optional[str]:
  """Why a Flax layer that no kind handles cannot be preconditioned, or None."""
  if kind_of(module) is not None:
    return None
  for classes, reason in _UNSUPPORTED_MODULES:
    if isinstance(module, classes):
      return reason
  return None


# Most specific first: a kind's ``matches`` may accept subclasses.
LAYER_KINDS = (DenseGeneral, Einsum, Dense, Conv, Embed, LayerNorm, RMSNorm, GroupNorm, BatchNorm)


def kind_of(module: nn.Module):
  """The layer kind class handling ``module``, or None."""
  for kind in LAYER_KINDS:
    if kind.matches(module):
      return kind
  return None


@dataclasses.dataclass(frozen=True)
class UncoveredParam:
  """A leaf of params that the loss reads but no registered or skipped layer holds.

  Such a leaf (a custom module's own ``self.param`` used with ``jnp.dot``, a
  hand-written norm's scale, a raw ``nnx.Param``) follows the plain
  gradient: ``kaisa`` accepts it only with ``allow_plain_gradient=True``.

  Attributes:
    name: its key path joined by '/', e.g. 'Block_0/w' (an ``nnx.State``'s
      '.value' dropped).
    path: its key path in params.
    shape: its shape, e.g. (64, 32).

  Example:
    >>> [(u.name, u.shape, u.size) for u in layers.uncovered]
    [('Block_0/w', (64, 32), 2048)]
  """
  name: str
  path: KeyPath
  shape: tuple[int, ...]

  @property
  def size(self) -> int:
    """Its entries, e.g. 2048 for a (64, 32) kernel."""
    return math.prod(self.shape)


@dataclasses.dataclass(frozen=True)
class LayerRegistry:
  """Static, hashable registry of the Flax layers a loss function calls.

  Attributes:
    layers: the supported layers, in call order.
    skipped: layers found but not supported, with the reason.
    shared_inputs: sets of layers (names, registry order) fed the very same
      input in every call and computing A from it the same way (the q, k
      and v projections of one attention block, the branches of a gated
      MLP): their A factor is one, computed, stored and decomposed once
      (``a_source``).
    uncovered: the leaves of params the loss reads that no registered or
      skipped layer holds, in params order (see ``UncoveredParam``).
    registered_entries: the entries of the registered layers' kernels and
      biases (preconditioned unless named in ``kaisa(skip_layers=...)``).
    plain_entries: the entries of the other leaves the loss reads, the
      skipped layers' and the uncovered ones: they follow the plain
      gradient. Both counts are 0 in a registry not made by ``find_layers``.
  """
  layers: tuple[Layer, ...]
  skipped: tuple[Skipped, ...] = ()
  shared_inputs: tuple[tuple[str, ...], ...] = ()
  uncovered: tuple[UncoveredParam, ...] = ()
  registered_entries: int = 0
  plain_entries: int = 0

  def a_source(self, name: str) -> str:
    """The layer whose A statistics layer ``name`` reuses: the first of its
    shared-input set, or ``name`` itself."""
    for names in self.shared_inputs:
      if name in names:
        return names[0]
    return name

  @property
  def names(self) -> tuple[str, ...]:
    return tuple(layer.name for layer in self.layers)

  def __getitem__(self, name: str) -> Layer:
    for layer in self.layers:
      if layer.name == name:
        return layer
    raise KeyError(name)

  def __len__(self) -> int:
    return len(self.layers)

  def __iter__(self):
    return iter(self.layers)

  def table(self) -> str:
    """One row per layer, skipped layer and uncovered leaf, then the entry counts."""
    rows = [("layer", "kind", "A size", "G size")]
    rows += [(l.name, l.kind, str(l.a_factor_shape), str(l.g_factor_shape))
             for l in self.layers]
    rows += [(s.name, f"skipped: {s.reason}", "-", "-") for s in self.skipped]
    rows += [(u.name, f"uncovered {u.shape}: plain gradient", "-", "-")
             for u in self.uncovered]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                       for i, (c, w) in enumerate(zip(r, widths))).rstrip()
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines += [f"one A for layers fed the same input: {', '.join(names)}"
              for names in self.shared_inputs]
    if self.registered_entries or self.plain_entries:
      lines.append(self._entries_line())
    return "\n".join(lines)

  def _entries_line(self) -> str:
    """How many parameter entries are preconditioned, how many follow the plain gradient."""
    total = self.registered_entries + self.plain_entries
    uncovered = sum(u.size for u in self.uncovered)
    line = (f"parameters: {self.registered_entries:,} in registered layers "
            f"({100 * self.registered_entries / total:.1f} %), {self.plain_entries:,} "
            "follow the plain gradient")
    if not self.plain_entries:
      return line
    return (f"{line} ({self.plain_entries - uncovered:,} in skipped layers, "
            f"{uncovered:,} uncovered)")

  def __str__(self) -> str:
    return self.table()

  def __repr__(self) -> str:
    return f"LayerRegistry(\n{self.table()}\n)"
