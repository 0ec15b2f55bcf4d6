"""Layer kinds: what K-FAC needs to know about each supported Flax layer.

Every kind is a frozen (hashable, static) dataclass describing one layer, built
from a Flax module call by ``from_call``, and answers four questions:

* ``a_stats(inputs)``: the unnormalised activation covariance of one call and
  its row count, so that several calls of a shared module add up;
* ``g_stats(out_grads)``: the same for the output gradients;
* ``kernel_matrix(kernel)``: the kernel as the (g_size, a_size) matrix the
  Kronecker factors act on (the base class appends the bias as the last
  column in ``grad_matrix``);
* ``kernel_from_matrix(matrix)``: the inverse of ``kernel_matrix``.

A kind also says how its factors are stored (``a_factor_shape``,
``g_factor_shape``): one dense matrix each (Dense, Conv), ``blocks``
independent Kronecker blocks (grouped convolutions, the per-feature blocks
of normalisation layers), or a diagonal A (Embed).

``base`` holds the ``Layer`` interface and ``FactorShape``; one module per
family of kinds (``dense``, ``conv``, ``embed``, ``norms``) extends it, and
``registry`` lists them. Adding a layer kind means one new module with its
class, plus listing it in ``registry.LAYER_KINDS``.
"""

from kaisa_jax._src.layers.base import FactorShape, KeyPath, Layer, Skipped, UnsupportedLayer
from kaisa_jax._src.layers.conv import Conv
from kaisa_jax._src.layers.dense import WEIGHT_SHARING, Dense, DenseGeneral, Einsum
from kaisa_jax._src.layers.embed import Embed
from kaisa_jax._src.layers.norms import BatchNorm, GroupNorm, LayerNorm, RMSNorm, ScaleAndShift
from kaisa_jax._src.layers.registry import (LAYER_KINDS, LayerRegistry, UncoveredParam, kind_of,
                                            unsupported_reason)

__all__ = [
    "FactorShape", "KeyPath", "Layer", "Skipped", "UnsupportedLayer", "Conv", "WEIGHT_SHARING",
    "Dense", "DenseGeneral", "Einsum", "Embed", "BatchNorm", "GroupNorm", "LayerNorm", "RMSNorm",
    "ScaleAndShift", "LAYER_KINDS", "LayerRegistry", "UncoveredParam", "kind_of",
    "unsupported_reason",
]
