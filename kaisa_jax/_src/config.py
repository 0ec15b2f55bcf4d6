"""Config: the arguments of ``kaisa`` checked once into a small static config.

Everything here runs in Python before (or while) tracing: argument checks
with messages that name the argument and what to do, the layers that are
preconditioned, and ``KaisaConfig``, which the stage functions of
``steps.py`` and ``state.py`` take as their first argument.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import warnings
from typing import Any, Callable, Hashable, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

try:  # JAX's axis environment, not public: only for jax 0.9's legacy pmap
  from jax._src import core as _jax_core
except ImportError:  # pragma: no cover
  _jax_core = None

from kaisa_jax._src import eigen as eigen_lib
from kaisa_jax._src import groups as groups_lib
from kaisa_jax._src import layers as layers_lib
from kaisa_jax._src import placement as placement_lib
from kaisa_jax._src import subsample as subsample_lib
from kaisa_jax._src.layers import scanned as scanned_lib

ScalarOrSchedule = Union[float, jax.Array, Callable[[jax.Array], jax.Array]]

# How G is scaled: see kaisa(g_factor_scaling=...).
G_FACTOR_SCALINGS = ("loss", "per_example")


def value(hyperparameter, step):
  return hyperparameter(step) if callable(hyperparameter) else hyperparameter


def _concrete(value) -> Optional[float]:
  """The value as a float when it is known at trace time, else None."""
  if callable(value) or isinstance(value, jax.core.Tracer):
    return None
  return float(value)


def check_positive_int(name: str, value) -> int:
  if isinstance(value, jax.core.Tracer):
    raise ValueError(
        f"{name} must be a static Python int; with optax.inject_hyperparams "
        f"list it in static_args.")
  if int(value) != value or int(value) < 1:
    raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
  return int(value)


def _check_hyperparameters(damping, factor_decay, kl_clip, learning_rate):
  checks = [
      ("damping", damping, lambda v: v > 0, "> 0"),
      ("factor_decay", factor_decay, lambda v: 0 < v <= 1, "in (0, 1]"),
      ("learning_rate", learning_rate, lambda v: v >= 0, ">= 0"),
  ]
  if kl_clip is not None:
    checks.append(("kl_clip", kl_clip, lambda v: v > 0, "> 0 (or None to disable)"))
  for name, value, ok, want in checks:
    v = _concrete(value)
    if v is not None and not ok(v):
      raise ValueError(f"{name} must be {want}, got {value!r}.")


def _check_bool(name: str, value) -> bool:
  if not isinstance(value, (bool, np.bool_)):
    raise ValueError(f"{name} must be True or False, got {value!r}.")
  return bool(value)


def check_dtype(name: str, dtype):
  dtype = jnp.dtype(dtype)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"{name} must be a floating dtype, got {dtype}.")
  if dtype.itemsize == 8 and not jax.config.jax_enable_x64:
    raise ValueError(
        f"{name}={dtype} needs jax.config.update('jax_enable_x64', True); "
        "without it JAX would silently compute in float32.")
  return dtype


def active_layers(layers: layers_lib.LayerRegistry, skip_layers: Sequence[str],
                  allow_plain_gradient: bool = False,
                  check_uncovered: bool = True) -> tuple[layers_lib.Layer, ...]:
  """The registered layers that no ``skip_layers`` pattern matches, in registry order.

  Unless ``allow_plain_gradient``, raises if a parameter would follow the
  plain gradient without the user having said so: a layer the registry
  lists as skipped that no pattern names, or (``check_uncovered``) any
  uncovered leaf.
  """
  patterns = [re.compile(p) for p in skip_layers]
  named = lambda name: any(p.search(name) for p in patterns)
  if not allow_plain_gradient:
    unnamed = [s for s in layers.skipped if not named(s.name)]
    uncovered = layers.uncovered if check_uncovered else ()
    problems = ([_skipped_message(unnamed, skip_layers)] if unnamed else []) + (
        [_uncovered_message(uncovered)] if uncovered else [])
    if problems:
      raise ValueError("\n".join(problems))
  return tuple(l for l in layers.layers if not named(l.name))


def _skipped_message(unnamed, skip_layers: Sequence[str]) -> str:
  """Every skipped layer no pattern names, and the ``skip_layers`` value that names them all."""
  lines = [f"  {s.name!r} ({s.module_type}): {s.reason}" for s in unnamed]
  # Anchored, so that naming 'Dense_1' does not also leave 'Dense_10' out.
  ready = tuple(skip_layers) + tuple(f"^{re.escape(s.name)}$" for s in unnamed)
  return (f"{len(unnamed)} layer(s) cannot be preconditioned yet:\n" + "\n".join(lines)
          + f"\nPass skip_layers={ready!r} to leave them to the plain gradient "
          "(or allow_plain_gradient=True to accept every parameter that is not preconditioned).")


def _uncovered_message(uncovered) -> str:
  """Every uncovered leaf, by path and shape, and what to do about them."""
  lines = [f"  {u.name!r} {u.shape}" for u in uncovered]
  return (f"{len(uncovered)} parameter(s) the loss reads are held by no registered layer "
          "(a module's own self.param used with jnp.dot, a hand-written norm, a raw "
          "nnx.Param):\n" + "\n".join(lines)
          + "\nPass allow_plain_gradient=True to leave them to the plain gradient, or compute "
          "them with a Flax layer kaisa_jax registers (nn.Dense, nn.Einsum, nn.RMSNorm, ...: "
          "see the layer kinds in the README).")


def with_weight_sharing(active: tuple[layers_lib.Layer, ...],
                         weight_sharing) -> tuple[layers_lib.Layer, ...]:
  """The active layers, each Dense layer set to its weight-sharing mode.

  A string applies to every Dense layer; a mapping from regular expressions
  to modes applies the first that matches a layer's name ('expand' if none).
  """
  if isinstance(weight_sharing, str):
    rules = [(None, weight_sharing)]
  elif isinstance(weight_sharing, Mapping):
    rules = [(re.compile(pattern), mode) for pattern, mode in weight_sharing.items()]
  else:
    raise ValueError(
        f"weight_sharing must be one of {layers_lib.WEIGHT_SHARING} or a mapping from "
        f"layer-name regular expressions to them, got {weight_sharing!r}.")
  for _, mode in rules:
    if mode not in layers_lib.WEIGHT_SHARING:
      raise ValueError(
          f"weight_sharing modes are {layers_lib.WEIGHT_SHARING}, got {mode!r}.")
  resolved = []
  for layer in active:
    mode = next((m for p, m in rules if p is None or p.search(layer.name)), "expand")
    # A layer inside a scan shares the weights of its kind's own calls.
    scan = layer if isinstance(layer, scanned_lib.Scanned) else None
    inner = layer.inner if scan else layer
    if isinstance(inner, layers_lib.Dense):
      inner = dataclasses.replace(inner, weight_sharing=mode)
      layer = scan.with_inner(inner) if scan else inner
    elif mode != "expand" and isinstance(weight_sharing, Mapping):
      raise ValueError(
          f"weight_sharing={mode!r} was asked for layer {layer.name!r}, a {layer.kind} "
          "layer; it applies to Dense layers (a convolution keeps the reference's "
          "convention over its positions). Narrow the regular expression.")
    resolved.append(layer)
  return tuple(resolved)


def leaves_by_path(tree) -> dict:
  return {path: leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def check_params(layers, tree, what: str):
  """Trace-time check that every layer's kernel/bias is in ``tree`` with its shape."""
  leaves = leaves_by_path(tree)
  for layer in layers:
    kernel = leaves.get(layer.kernel_path)
    if kernel is None or tuple(kernel.shape) != layer.kernel_shape:
      got = None if kernel is None else tuple(kernel.shape)
      raise ValueError(
          f"layer {layer.name!r}: {what} kernel at "
          f"{jax.tree_util.keystr(layer.kernel_path)} has shape {got}, the "
          f"registry says {layer.kernel_shape}; call find_layers on the same "
          "params structure.")
    if layer.has_bias and layer.bias_path not in leaves:
      raise ValueError(
          f"layer {layer.name!r}: {what} has no bias at "
          f"{jax.tree_util.keystr(layer.bias_path)}.")


def check_captures(registry: layers_lib.LayerRegistry, layers, captures):
  if captures is None:
    raise ValueError(
        "kaisa update needs captures=...: call "
        "opt.update(grads, state, params, captures=captures) with the captures "
        "from kaisa_jax.value_and_grad.")
  known = set(registry.names) | {s.name for s in registry.skipped}
  unknown = sorted(set(captures) - known)
  if unknown:
    raise ValueError(
        f"captures for layers not in the registry: {unknown}; run find_layers "
        "on the same loss function.")
  missing = sorted(l.name for l in layers if l.name not in captures)
  if missing:
    raise ValueError(
        f"no captures for registered layers {missing}; the loss given to "
        "kaisa_jax.value_and_grad must call them.")


def bound_device_axes() -> tuple:
  """The names of the device axes bound where this is traced, or ().

  Inside ``jax.shard_map``, and ``jax.pmap`` (which jax 0.9 and later run
  through shard_map), the public abstract mesh names them as its manual
  axes. jax 0.9's legacy pmap (``jax_pmap_shmap_merge=False``) binds its
  axis outside any mesh: there jax's axis environment, not public (and
  holding vmap's named axes too), is read instead.
  """
  axes = tuple(jax.sharding.get_abstract_mesh().manual_axes)
  if axes or getattr(jax.config, "jax_pmap_shmap_merge", True):
    return axes
  axis_names = getattr(_jax_core, "unsafe_get_axis_names", None)
  return tuple(axis_names()) if axis_names else ()


# The start of the warning below, to filter it by: warnings.filterwarnings(
# 'ignore', message=UNREDUCED_AXES_WARNING).
UNREDUCED_AXES_WARNING = "kaisa: no axis_name"


def warn_if_unreduced(axis_name) -> None:
  """Warns when ``kaisa`` without ``axis_name`` is traced inside a device map.

  Each device would then precondition with its own gradients and factors,
  and data-parallel replicas drift apart without an error.
  """
  axes = () if axis_name is not None else bound_device_axes()
  if axes:
    warnings.warn(
        f"{UNREDUCED_AXES_WARNING}, but its update is traced inside jax.pmap / "
        f"jax.shard_map over {', '.join(map(repr, axes))}: each device preconditions with its "
        "own gradients and factors, so data-parallel replicas drift apart. Pass "
        f"kaisa(..., axis_name={axes[0]!r}) to average them over the devices. If per-device "
        "updates are intended (the axis does not split the batch), silence this with "
        f"warnings.filterwarnings('ignore', message={UNREDUCED_AXES_WARNING!r}).",
        stacklevel=3)


@dataclasses.dataclass(frozen=True, eq=False)
class KaisaConfig:
  """The checked arguments of one ``kaisa`` transformation.

  Attributes:
    registry: the ``LayerRegistry`` given to ``kaisa``.
    layers: the preconditioned layers in registry order, each Dense set to
      its weight-sharing mode.
    damping, factor_decay, kl_clip, learning_rate: floats or schedules
      (``kl_clip`` may be None).
    factor_update_steps, inv_update_steps, accumulation_steps: static periods.
    compute_method, outer: the decomposition ('eigen' / 'inverse' /
      'ekfac'), and ``eigenvalue_outer_product``.
    factor_dtype, inv_dtype: numpy dtypes.
    axis_name: the data-parallel axis, or None.
    g_factor_scaling: 'loss' or 'per_example'.
    registry_layers: the preconditioned layers as the registry has them
      (before weight sharing): the placement and the state layout depend on
      these alone, so ``kaisa_jax.placement`` describes any ``kaisa`` on them.
    placement_options: the keyword arguments of ``placement_lib.plan``
      other than the layers and the device count, among them ``a_sources``.
    factor_subsample: examples (int) or fraction of each batch (float) the
      factor statistics are computed from, or None for all.
    factor_subsample_seed: None for strided examples, else the seed of a
      random draw each step (``subsample.py``).
    stagger_decompositions: spread the groups' decompositions over the
      ``inv_update_steps`` interval (``schedule.py``).
  """
  registry: layers_lib.LayerRegistry
  layers: tuple
  damping: Any
  factor_decay: Any
  kl_clip: Any
  learning_rate: Any
  factor_update_steps: int
  inv_update_steps: int
  accumulation_steps: int
  compute_method: str
  outer: bool
  factor_dtype: Any
  inv_dtype: Any
  axis_name: Optional[Hashable]
  g_factor_scaling: str
  registry_layers: tuple
  placement_options: tuple
  factor_subsample: Any = None
  factor_subsample_seed: Optional[int] = None
  stagger_decompositions: bool = False

  @property
  def a_sources(self) -> tuple:
    """(layer, source) pairs: ``layer`` shares ``source``'s input and computes A
    from it the same way, so it uses ``source``'s A (stored once)."""
    return dict(self.placement_options)["a_sources"]

  def plan(self, num_devices: int) -> placement_lib.Placement:
    """The static placement on ``num_devices`` devices (cached)."""
    return _plan(self.registry_layers, num_devices, self.placement_options)

  def groups(self, plan: placement_lib.Placement) -> tuple[groups_lib.LayerGroup, ...]:
    """``plan``'s groups with each member as this config sets it (weight sharing)."""
    return _resolved_groups(plan.groups, self.layers)

  def axis_size(self) -> int:
    """Devices along ``axis_name`` (1 without one), at trace time."""
    if self.axis_name is None:
      return 1
    try:
      return int(lax.axis_size(self.axis_name))
    except NameError as e:
      raise ValueError(
          f"kaisa(axis_name={self.axis_name!r}): the axis is not bound here; call "
          "tx.init and tx.update inside jax.pmap or jax.shard_map over that axis.") from e

  def current_plan(self) -> placement_lib.Placement:
    return self.plan(self.axis_size())

  def device_index(self):
    return lax.axis_index(self.axis_name) if self.axis_name is not None else 0

  def g_share(self, parts: int) -> float:
    """What one of ``parts`` equal sub-batches' G weighs in the whole batch's.

    Under a mean loss each sub-batch's output gradients are ``parts`` times
    those of the whole-batch loss; per-example G carries no batch size.
    """
    return 1.0 / parts ** 2 if self.g_factor_scaling == "loss" else 1.0


def shared_a_sources(registry: layers_lib.LayerRegistry, layers: tuple) -> tuple:
  """(layer, source) pairs among the preconditioned ``layers`` with one A.

  Of each of the registry's shared-input sets, the preconditioned members
  whose signatures agree take the first one's A; a skipped member has none.
  """
  by_name = {l.name: l for l in layers}
  pairs = []
  for names in registry.shared_inputs:
    first: dict = {}
    for name in names:
      if name in by_name:
        source = first.setdefault(groups_lib.signature(by_name[name]), name)
        if source != name:
          pairs.append((name, source))
  return tuple(pairs)


def _check_shared_a(config: KaisaConfig):
  """Raises if weight sharing gives layers that use one A different ways to compute it."""
  if shared_a_sources(config.registry, config.layers) == config.a_sources:
    return
  by_name = {l.name: l for l in config.layers}
  mode = lambda name: getattr(getattr(by_name[name], "inner", by_name[name]),
                              "weight_sharing", None)
  for layer, source in config.a_sources:
    if groups_lib.signature(by_name[layer]) != groups_lib.signature(by_name[source]):
      raise ValueError(
          f"layers {source!r} and {layer!r} read the same input, so kaisa keeps one A for "
          f"them, but weight_sharing gives them different modes "
          f"({mode(source)!r} and {mode(layer)!r}): give the layers fed one "
          "input the same mode.")


@functools.lru_cache(maxsize=None)
def _plan(layers: tuple, num_devices: int, options: tuple) -> placement_lib.Placement:
  return placement_lib.plan(layers, num_devices, **dict(options))


@functools.lru_cache(maxsize=None)
def _resolved_groups(groups: tuple, layers: tuple) -> tuple:
  by_name = {l.name: l for l in layers}
  return tuple(dataclasses.replace(g, layers=tuple(by_name[n] for n in g.names)) for g in groups)


def placement_options(*, grad_worker_frac, colocate_factors, cost_model, compute_method,
                      eigenvalue_outer_product, symmetric_factors, factor_dtype,
                      inv_dtype, a_sources) -> tuple:
  """The placement's keyword arguments as a hashable tuple, dtypes checked."""
  if isinstance(grad_worker_frac, jax.core.Tracer):
    raise ValueError(
        "grad_worker_frac must be a static Python number; with "
        "optax.inject_hyperparams list it in static_args.")
  return tuple(dict(
      grad_worker_frac=grad_worker_frac, colocate_factors=colocate_factors,
      cost_model=cost_model, compute_method=compute_method,
      eigenvalue_outer_product=bool(eigenvalue_outer_product),
      symmetric_factors=symmetric_factors,
      factor_itemsize=check_dtype("factor_dtype", factor_dtype).itemsize,
      inv_itemsize=check_dtype("inv_dtype", inv_dtype).itemsize,
      a_sources=tuple(a_sources)).items())


def make_config(layers, *, damping, factor_decay, factor_update_steps, inv_update_steps,
                kl_clip, learning_rate, compute_method, eigenvalue_outer_product,
                accumulation_steps, skip_layers, allow_plain_gradient, factor_dtype, inv_dtype,
                axis_name, grad_worker_frac, colocate_factors, cost_model, symmetric_factors,
                g_factor_scaling, weight_sharing, factor_subsample=None,
                factor_subsample_seed=None, stagger_decompositions=False) -> KaisaConfig:
  """Checks ``kaisa``'s arguments (see its docstring) into a ``KaisaConfig``."""
  if not isinstance(layers, layers_lib.LayerRegistry):
    raise ValueError(
        f"layers must be the LayerRegistry from kaisa_jax.find_layers, got "
        f"{type(layers).__name__}.")
  if g_factor_scaling not in G_FACTOR_SCALINGS:
    raise ValueError(
        f"g_factor_scaling must be one of {G_FACTOR_SCALINGS}, got {g_factor_scaling!r}.")
  if compute_method not in eigen_lib.COMPUTE_METHODS:
    raise ValueError(
        f"compute_method must be one of {eigen_lib.COMPUTE_METHODS}, got {compute_method!r}.")
  _check_hyperparameters(damping, factor_decay, kl_clip, learning_rate)
  accumulation_steps = check_positive_int("accumulation_steps", accumulation_steps)
  if compute_method == "ekfac" and accumulation_steps > 1:
    raise ValueError(
        "compute_method='ekfac' does not support accumulation_steps > 1 yet: its "
        "eigenvalue scaling needs each micro-batch's rows in the current eigenbases.")
  if isinstance(skip_layers, str):
    skip_layers = (skip_layers,)
  registry_layers = active_layers(layers, skip_layers, allow_plain_gradient)
  subsample_size, subsample_seed = subsample_lib.check(factor_subsample, factor_subsample_seed)
  options = placement_options(
      grad_worker_frac=grad_worker_frac, colocate_factors=colocate_factors,
      cost_model=cost_model, compute_method=compute_method,
      eigenvalue_outer_product=eigenvalue_outer_product, symmetric_factors=symmetric_factors,
      factor_dtype=factor_dtype, inv_dtype=inv_dtype,
      a_sources=shared_a_sources(layers, registry_layers))
  config = KaisaConfig(
      registry=layers, layers=with_weight_sharing(registry_layers, weight_sharing),
      damping=damping, factor_decay=factor_decay, kl_clip=kl_clip,
      learning_rate=learning_rate,
      factor_update_steps=check_positive_int("factor_update_steps", factor_update_steps),
      inv_update_steps=check_positive_int("inv_update_steps", inv_update_steps),
      accumulation_steps=accumulation_steps, compute_method=compute_method,
      outer=bool(eigenvalue_outer_product),
      factor_dtype=check_dtype("factor_dtype", factor_dtype),
      inv_dtype=check_dtype("inv_dtype", inv_dtype), axis_name=axis_name,
      g_factor_scaling=g_factor_scaling, registry_layers=registry_layers,
      placement_options=options, factor_subsample=subsample_size,
      factor_subsample_seed=subsample_seed,
      stagger_decompositions=_check_bool("stagger_decompositions", stagger_decompositions))
  _check_shared_a(config)
  config.plan(1)  # checks the placement options now rather than at trace time
  return config
