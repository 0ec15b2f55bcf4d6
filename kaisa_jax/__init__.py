"""kaisa_jax: distributed K-FAC (KAISA) as an optax transformation for Flax.

The public surface is three functions:

* ``find_layers(loss_fn, params, *args)``: the static registry of the Flax
  layers a loss calls;
* ``value_and_grad(loss_fn)``: ``jax.value_and_grad`` that also returns the
  layer captures K-FAC needs;
* ``kaisa(layers, ...)``: the preconditioner, an optax transformation.

Across devices, ``placement`` shows the static KAISA plan and
``state_specs`` gives the shard_map specs of the optimizer state and
``convert_state`` moves a saved state to another device count;
``sampled_fisher_loss`` makes the output gradients of the sampled (true)
Fisher, with ``value_and_grad(loss_fn, fisher="sampled")``; ``TrainState``
is Flax's ``TrainState`` whose ``apply_gradients`` passes the captures on.
Flax linen and NNX models are both supported.
"""

from kaisa_jax._src.capture import LayerCapture, find_layers, value_and_grad
from kaisa_jax._src.eigen import Eigen, EigenCorrected, EigenOuter, Inverse
from kaisa_jax._src.factors import LayerFactors
from kaisa_jax._src.fisher import sampled_fisher_loss
from kaisa_jax._src.layers import FactorShape, LayerRegistry, UncoveredParam
from kaisa_jax._src.placement import LayerPlacement, Placement
from kaisa_jax._src.state import AccumulationState, KaisaState, convert_state, state_specs
from kaisa_jax._src.train_state import TrainState
from kaisa_jax._src.transform import kaisa, placement

__version__ = "0.1.0"

__all__ = [
    "find_layers", "value_and_grad", "kaisa", "placement", "state_specs", "convert_state",
    "sampled_fisher_loss", "TrainState",
    "Placement", "LayerPlacement", "LayerRegistry", "UncoveredParam", "LayerCapture",
    "KaisaState", "AccumulationState",
    "LayerFactors", "FactorShape", "Eigen", "EigenOuter", "EigenCorrected", "Inverse",
]
