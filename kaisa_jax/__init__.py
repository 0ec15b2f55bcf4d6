"""kaisa_jax: distributed K-FAC (KAISA) as an optax transformation for Flax.

The public surface is three functions:

* ``find_layers(loss_fn, params, *args)``: the static registry of the Flax
  layers a loss calls;
* ``value_and_grad(loss_fn)``: ``jax.value_and_grad`` that also returns the
  layer captures K-FAC needs;
* ``kaisa(layers, ...)``: the preconditioner, an optax transformation.
"""

from kaisa_jax._src.capture import LayerCapture, find_layers, value_and_grad
from kaisa_jax._src.eigen import Eigen, EigenOuter, Inverse
from kaisa_jax._src.factors import LayerFactors
from kaisa_jax._src.layers import LayerRegistry
from kaisa_jax._src.transform import AccumulationState, KaisaState, kaisa

__version__ = "0.1.0"

__all__ = [
    "find_layers", "value_and_grad", "kaisa",
    "LayerRegistry", "LayerCapture", "KaisaState", "AccumulationState",
    "LayerFactors", "Eigen", "EigenOuter", "Inverse",
]
