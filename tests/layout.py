"""Per-layer views of a ``KaisaState`` for the tests.

The state keeps its factors and decompositions per layer *group* (the layers
whose blocks have the same shapes, one stack of blocks each); most tests
check them per layer, in each layer's own shapes, through the static plan's
accessors (``Placement.layer_factors`` and ``Placement.layer_decompositions``).

Unlike ``oracles.py`` this module calls ``kaisa_jax``: it reads the library's
state, it is not an oracle.
"""

import kaisa_jax


def plan(layers, num_devices=1, grad_worker_frac=1.0, **options):
  """``kaisa_jax.placement`` of ``layers``; ``options`` as given to ``kaisa``
  (``skip_layers``, ``compute_method``, ``eigenvalue_outer_product``, ...)."""
  return kaisa_jax.placement(layers, num_devices, grad_worker_frac, **options)


def layer_factors(layers, state, **options):
  """{layer name: its ``LayerFactors``} of ``state``, in the layer's own shapes."""
  return plan(layers, **options).layer_factors(state)


def layer_decompositions(layers, state, **options):
  """{layer name: its decomposition} of ``state``, in the layer's own shapes."""
  return plan(layers, **options).layer_decompositions(state)


def group_members(layers, **options):
  """{group name: the names of its member layers}, as the state keys them."""
  return {g.name: g.names for g in plan(layers, **options).groups}


def group_of(layers, name, **options):
  """The ``LayerGroup`` that holds layer ``name``."""
  return plan(layers, **options).group_of(name)
