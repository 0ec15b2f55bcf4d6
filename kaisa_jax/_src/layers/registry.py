"""The registry: which kind handles a Flax module, and the layers a loss calls.

``LAYER_KINDS`` lists every kind, most specific first; ``kind_of`` picks
the kind of a module, ``unsupported_reason`` says why a Flax layer that no
kind handles is skipped, and ``LayerRegistry`` is the static, hashable
result of ``find_layers``.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import flax.linen as nn
from flax import nnx

from kaisa_jax._src.layers.base import Layer, Skipped
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
  """
  layers: tuple[Layer, ...]
  skipped: tuple[Skipped, ...] = ()
  shared_inputs: tuple[tuple[str, ...], ...] = ()

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
    rows = [("layer", "kind", "A size", "G size")]
    rows += [(l.name, l.kind, str(l.a_factor_shape), str(l.g_factor_shape))
             for l in self.layers]
    rows += [(s.name, f"skipped: {s.reason}", "-", "-") for s in self.skipped]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                       for i, (c, w) in enumerate(zip(r, widths))).rstrip()
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines += [f"one A for layers fed the same input: {', '.join(names)}"
              for names in self.shared_inputs]
    return "\n".join(lines)

  def __str__(self) -> str:
    return self.table()

  def __repr__(self) -> str:
    return f"LayerRegistry(\n{self.table()}\n)"
