"""Layer groups: layers whose factors have the same block sizes, end to end.

Layers whose A blocks have one size (and the same diagonal-ness) and whose G
blocks have one size form a *group*: a Dense and a 1x1 Conv of the same
sizes, every per-feature 2x2 block of the normalisation layers, the groups of
a grouped convolution. These tests pin the public behaviour, the
preconditioned update of every layer at every step, for models built around
such groups, so that any internal layout of the factors (per layer, or
stacked per group) must give the same numbers:

1. a chain with a group of four same-size Dense layers (one without a bias,
   whose input is one wider) between two singletons;
2. a mixed model whose groups hold different kinds (Dense, 1x1 Conv, grouped
   Conv, DenseGeneral; LayerNorm and GroupNorm blocks of different counts),
   and an Embed whose sizes equal a Dense's but whose A is diagonal;
3. layers that read the same input (q, k, v; a gated MLP's two branches; a
   layer of another output size and one without a bias on the same tensor);
4. the chain of 1 (and the mixed model of 2) on 8 devices, every
   ``grad_worker_frac``, under ``pmap`` and ``shard_map``, against one device.

The oracle: the model runs in float64 JAX with a zero probe added to every
layer output (no kaisa_jax), which gives each layer's input and output
gradient and the parameter gradients. Everything K-FAC does with them is
float64 NumPy written from the conventions (docs/design.md): rows per kind
(im2col patches / S for convolutions, x̂ per feature for norms, one-hot ids
for Embed), running factors from I, decompositions every
``inv_update_steps`` (the damping of that step frozen with the eigenvalue
outer product or the inverses), the dense solve ``(G ⊗ A + γI)⁻¹`` for the
eigen method, EKFAC's scaling, and the KL clip over every block of every
layer.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kaisa_jax
import test_distributed as dist
from oracles import (assert_close, np_damped_inverse, np_kernel_matrix, np_kron_solve,
                     np_patches, random_params)
from test_layer_kinds import _np_group_norm, _np_layer_norm, _np_rms_norm
from test_transform import hyper

LOSS_SCALE = 8.0
LR = 0.1
STEPS = 3
MOVE = 0.05  # the largest change of a parameter per step
RTOL = 1e-9


def damping_schedule(step):
  """γ halves over the steps: eigenvalue_outer_product freezes it at decomposition time."""
  return 0.05 / (1.0 + step)


# ---------------------------------------------------------------------------
# The models. ``tapped=True`` adds ``probes[name]`` to every layer's output
# and returns (output, layer inputs, layer outputs): the oracle's view.


class _Tap:
  """Calls one layer; records its input and output, the probe (if any) added to it."""

  def __init__(self, probes):
    self.probes, self.inputs, self.outputs = probes, {}, {}

  def __call__(self, module, h):
    y = module(h)
    self.inputs[module.name] = h
    if self.probes is not None:
      y = y + self.probes[module.name]
    self.outputs[module.name] = y
    return y


class _Tapped(nn.Module):
  tapped: bool = False

  def finish(self, out, tap):
    return (out, tap.inputs, tap.outputs) if self.tapped else out


class GroupNet(_Tapped):
  """(B, 4, 4, 2) -> (B, 3). A group (A 13, G 12) of four Dense layers, one without a
  bias whose input is one wider; two singletons, one with the group's A size."""

  @nn.compact
  def __call__(self, x, probes=None):
    tap = _Tap(probes)
    h = jnp.tanh(tap(nn.Dense(12, name="stem"), x.reshape(x.shape[0], -1)))  # (33, 12)
    h = jnp.tanh(tap(nn.Dense(12, name="g0"), h))
    h = jnp.tanh(tap(nn.Dense(12, name="g1"), h))
    wide = jnp.concatenate([h, jnp.mean(h ** 2, axis=-1, keepdims=True)], axis=-1)
    h = jnp.tanh(tap(nn.Dense(12, use_bias=False, name="g2"), wide))
    h = jnp.tanh(tap(nn.Dense(12, name="g3"), h))
    return self.finish(tap(nn.Dense(3, name="head"), h), tap)  # (13, 3)


class MixedNet(_Tapped):
  """(B, 4, 4, 2) -> (B, 3). Group (13, 12): a 1x1 Conv, a grouped 1x1 Conv (2
  blocks), a DenseGeneral and a Dense; group (2, 1): the blocks of a LayerNorm
  (12) and a GroupNorm (24); an Embed (diagonal 13, 12) apart; the (1, 1) blocks
  of an RMSNorm, the stem Conv and the head alone."""

  @nn.compact
  def __call__(self, x, probes=None):
    tap = _Tap(probes)
    batch = x.shape[0]
    h = jnp.tanh(tap(nn.Conv(12, (2, 2), strides=(2, 2), padding="VALID", name="stem"), x))
    h = tap(nn.LayerNorm(name="ln0"), h)  # (B, 2, 2, 12)
    h = jnp.tanh(tap(nn.Conv(12, (1, 1), name="pw"), h))
    h = tap(nn.Conv(24, (1, 1), feature_group_count=2, name="gconv"),
            jnp.concatenate([h, h ** 2], axis=-1))
    h = tap(nn.GroupNorm(num_groups=4, name="gn"), h)
    h = h[..., :12] * jnp.tanh(h[..., 12:])
    h = jnp.tanh(tap(nn.DenseGeneral((3, 4), name="dg"), h).reshape(h.shape)).mean(axis=(1, 2))
    # Token ids read off the input: 13 = the Dense's A size.
    ids = jnp.argmax(x.reshape(batch, 2, 16)[..., :13], axis=-1)
    h = h + tap(nn.Embed(13, 12, name="embed"), ids).mean(axis=1)
    h = tap(nn.RMSNorm(name="rms"), jnp.tanh(tap(nn.Dense(12, name="d"), h)))
    return self.finish(tap(nn.Dense(3, name="head"), h), tap)


class SharedNet(_Tapped):
  """(B, 4, 12) tokens -> (B, 3): attention whose q, k, v read one tensor, then a
  gated MLP whose gate and up read one tensor; on the tokens also a Dense of
  another output size (same A) and one without a bias (same G, smaller A)."""

  @nn.compact
  def __call__(self, x, probes=None):
    tap = _Tap(probes)
    q = tap(nn.Dense(12, name="q"), x)
    k = tap(nn.Dense(12, name="k"), x)
    v = tap(nn.Dense(12, name="v"), x)
    side = tap(nn.Dense(3, name="side"), x).mean(axis=1)
    lin = tap(nn.Dense(12, use_bias=False, name="lin"), x)
    weights = jax.nn.softmax(jnp.einsum("btd,bsd->bts", q, k) / np.sqrt(12.0), axis=-1)
    h = x + tap(nn.Dense(12, name="o"), jnp.einsum("bts,bsd->btd", weights, v))
    gate = tap(nn.Dense(16, name="gate"), h)
    up = tap(nn.Dense(16, name="up"), h)
    # tanh: without it every token's output gradient would be the same.
    h = jnp.tanh(h + tap(nn.Dense(12, name="down"), jax.nn.silu(gate) * up) + lin)
    return self.finish(tap(nn.Dense(3, name="head"), h.mean(axis=1)) + side, tap)


# ---------------------------------------------------------------------------
# Per kind, in float64 NumPy: a layer's K-FAC rows per block from its input
# and output gradient, and its gradient matrices per block from its leaves.


def _with_ones(rows):
  return np.concatenate([rows, np.ones((rows.shape[0], 1))], axis=1)


@dataclasses.dataclass(frozen=True)
class DenseKind:
  """Dense / DenseGeneral on (B, *positions, in): kernel (in, *out)."""
  bias: bool = True
  out_dims: int = 1
  a_diagonal = False

  def rows(self, x, gy, weight_sharing):
    n_out = int(np.prod(gy.shape[gy.ndim - self.out_dims:]))
    x = x.reshape(x.shape[0], -1, x.shape[-1])
    gy = gy.reshape(gy.shape[0], -1, n_out)
    if weight_sharing == "reduce":  # one row per example
      a, g = x.mean(axis=1), gy.sum(axis=1)
    else:  # every position a row
      a, g = x.reshape(-1, x.shape[-1]), gy.reshape(-1, n_out)
    return [(_with_ones(a) if self.bias else a, g)]

  def matrices(self, leaves):
    kernel = np.asarray(leaves["kernel"], np.float64)
    kernel = kernel.reshape(kernel.shape[0], -1)
    return [np_kernel_matrix(kernel, leaves["bias"].reshape(-1) if self.bias else None)]


@dataclasses.dataclass(frozen=True)
class ConvKind:
  """'VALID' Conv: patches and g divided by S, one block per feature group."""
  kernel_size: tuple
  strides: Optional[tuple] = None
  groups: int = 1
  bias: bool = True
  a_diagonal = False

  def rows(self, x, gy, weight_sharing):
    del weight_sharing
    c_in, c_out = x.shape[-1] // self.groups, gy.shape[-1] // self.groups
    positions = int(np.prod(gy.shape[1:-1]))
    blocks = []
    for j in range(self.groups):
      patches = np_patches(x[..., j * c_in:(j + 1) * c_in], self.kernel_size, self.strides)
      a = patches.reshape(-1, patches.shape[-1])
      a = _with_ones(a) if self.bias else a
      blocks.append((a / positions, gy[..., j * c_out:(j + 1) * c_out].reshape(-1, c_out)
                     / positions))
    return blocks

  def matrices(self, leaves):
    kernel = np.asarray(leaves["kernel"], np.float64)
    c_out = kernel.shape[-1] // self.groups
    outs = [slice(j * c_out, (j + 1) * c_out) for j in range(self.groups)]
    return [np_kernel_matrix(kernel[..., o], leaves["bias"][o] if self.bias else None)
            for o in outs]


@dataclasses.dataclass(frozen=True)
class NormKind:
  """y = x̂ scale + bias: per feature, A rows [x̂_i, 1], G rows g_i."""
  normalized: Callable
  bias: bool = True
  a_diagonal = False

  def rows(self, x, gy, weight_sharing):
    del weight_sharing
    features = x.shape[-1]
    xh, g = self.normalized(x).reshape(-1, features), gy.reshape(-1, features)
    return [(_with_ones(xh[:, i:i + 1]) if self.bias else xh[:, i:i + 1], g[:, i:i + 1])
            for i in range(features)]

  def matrices(self, leaves):
    scale = np.asarray(leaves["scale"], np.float64)
    bias = np.asarray(leaves["bias"], np.float64) if self.bias else None
    return [np.array([[scale[i]] + ([bias[i]] if self.bias else [])])
            for i in range(scale.shape[0])]


@dataclasses.dataclass(frozen=True)
class EmbedKind:
  """One-hot A rows (a diagonal factor), G rows the output gradients."""
  vocab: int
  a_diagonal = True

  def rows(self, ids, gy, weight_sharing):
    del weight_sharing
    return [(np.eye(self.vocab)[np.asarray(ids).ravel()], gy.reshape(-1, gy.shape[-1]))]

  def matrices(self, leaves):
    return [np.asarray(leaves["embedding"], np.float64).T]


def _layer_norm(x, eps=1e-6):
  return _np_layer_norm(x, (-1,), eps)


GROUP_KINDS = {"stem": DenseKind(), "g0": DenseKind(), "g1": DenseKind(),
               "g2": DenseKind(bias=False), "g3": DenseKind(), "head": DenseKind()}
MIXED_KINDS = {
    "stem": ConvKind((2, 2), (2, 2)), "ln0": NormKind(_layer_norm),
    "pw": ConvKind((1, 1)), "gconv": ConvKind((1, 1), groups=2),
    "gn": NormKind(lambda x: _np_group_norm(x, 4, 1e-6)), "dg": DenseKind(out_dims=2),
    "embed": EmbedKind(13), "d": DenseKind(),
    "rms": NormKind(lambda x: _np_rms_norm(x, (-1,), 1e-6), bias=False),
    "head": DenseKind()}
SHARED_KINDS = {name: DenseKind() for name in
                ("q", "k", "v", "side", "o", "gate", "up", "down", "head")}
SHARED_KINDS["lin"] = DenseKind(bias=False)

# (A block size, A diagonal, G block size) -> the layers with those factors, in call order.
GROUPS = {
    "group": {(33, False, 12): ["stem"], (13, False, 12): ["g0", "g1", "g2", "g3"],
              (13, False, 3): ["head"]},
    "mixed": {(9, False, 12): ["stem"], (2, False, 1): ["ln0", "gn"],
              (13, False, 12): ["pw", "gconv", "dg", "d"], (13, True, 12): ["embed"],
              (1, False, 1): ["rms"], (13, False, 3): ["head"]},
    "shared": {(13, False, 12): ["q", "k", "v", "o"], (13, False, 3): ["side", "head"],
               (17, False, 12): ["down"],
               (12, False, 12): ["lin"], (13, False, 16): ["gate", "up"]},
}
MODELS = {"group": (GroupNet(), GROUP_KINDS, (4, 4, 2)),
          "mixed": (MixedNet(), MIXED_KINDS, (4, 4, 2)),
          "shared": (SharedNet(), SHARED_KINDS, (4, 12))}


def registry_groups(registry):
  groups = {}
  for layer in registry:
    key = (layer.a_size, layer.a_diagonal, layer.g_size)
    groups.setdefault(key, []).append(layer.name)
  return groups


# ---------------------------------------------------------------------------
# The oracle.


def _mse(out, t):
  return LOSS_SCALE * 0.5 * jnp.mean(jnp.sum((out - t) ** 2, axis=-1))


@functools.lru_cache(maxsize=None)
def _layer_gradients(model_name):
  """jit of (params, x, t) -> (param grads, layer inputs, layer output grads): float64 JAX
  autodiff of the tapped model (a zero probe on every layer output), no kaisa_jax."""
  tapped = MODELS[model_name][0].clone(tapped=True)

  @jax.jit
  def fn(params, x, t):
    _, _, outputs = jax.eval_shape(lambda: tapped.apply({"params": params}, x, None))
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), outputs)

    def loss(params, probes):
      out, inputs, _ = tapped.apply({"params": params}, x, probes)
      return _mse(out, t), inputs

    (grads, out_grads), inputs = jax.grad(loss, argnums=(0, 1), has_aux=True)(params, zeros)
    return grads, inputs, out_grads

  return fn


class GroupedKfacOracle:
  """float64 K-FAC over independent Kronecker blocks, step by step.

  ``update`` takes per layer its blocks' (A rows, G rows, gradient matrix)
  and returns per layer the blocks' updates; every block keeps its own
  running factors (from I), decomposition and EKFAC scaling; the KL clip
  sums over all of them.
  """

  def __init__(self, *, damping, factor_decay, kl_clip, learning_rate, inv_update_steps,
               compute_method, eigenvalue_outer_product=True):
    self.damping, self.decay = damping, factor_decay
    self.kl_clip, self.lr = kl_clip, learning_rate
    self.inv_every, self.method, self.outer = inv_update_steps, compute_method, \
        eigenvalue_outer_product
    self.step, self.blocks, self.nus = 0, {}, []

  def _decompose(self, block, diagonal, damping, name=None):
    a, g = block["A"], block["G"]
    block["frozen"] = (a, g, damping)
    a_vals, a_vecs = (np.diag(a), np.eye(a.shape[0])) if diagonal else np.linalg.eigh(a)
    g_vals, g_vecs = np.linalg.eigh(g)
    if self.method == "ekfac":  # EKFAC depends on the bases: the data must determine them
      for vals in ([g_vals] if diagonal else [a_vals, g_vals]):
        gap = np.diff(vals).min(initial=np.inf) / vals[-1]
        assert gap > 1e-6, f"{name}: eigenvalues {gap:.1e} apart, bases ill-determined"
    block["ekfac"] = [a_vecs, g_vecs, np.outer(g_vals, a_vals)]

  def _precondition(self, block, grad, damping):
    a, g, frozen_damping = block["frozen"]
    if self.method == "inverse":
      return np_damped_inverse(g, frozen_damping) @ grad @ np_damped_inverse(a, frozen_damping)
    if self.method == "ekfac":
      a_vecs, g_vecs, scaling = block["ekfac"]
      return g_vecs @ ((g_vecs.T @ grad @ a_vecs) / (scaling + damping)) @ a_vecs.T
    return np_kron_solve(g, a, grad, frozen_damping if self.outer else damping)

  def update(self, layers, diagonal):
    t = self.step
    damping, decay = hyper(self.damping, t), hyper(self.decay, t)
    precond = {}
    for name, blocks in layers.items():
      precond[name] = []
      for i, (a_rows, g_rows, grad) in enumerate(blocks):
        block = self.blocks.setdefault(
            (name, i), {"A": np.eye(a_rows.shape[1]), "G": np.eye(g_rows.shape[1])})
        block["A"] = decay * block["A"] + (1 - decay) * a_rows.T @ a_rows / a_rows.shape[0]
        block["G"] = decay * block["G"] + (1 - decay) * g_rows.T @ g_rows / g_rows.shape[0]
        if t % self.inv_every == 0:
          self._decompose(block, diagonal[name], damping, name)
        if self.method == "ekfac":
          a_vecs, g_vecs, scaling = block["ekfac"]
          moment = ((g_rows @ g_vecs) ** 2).T @ ((a_rows @ a_vecs) ** 2) / a_rows.shape[0]
          block["ekfac"][2] = decay * scaling + (1 - decay) * moment
        precond[name].append(self._precondition(block, grad, damping))
    vg = sum(np.sum(p * grad) for name in layers
             for p, (_, _, grad) in zip(precond[name], layers[name])) * hyper(self.lr, t) ** 2
    nu = 1.0 if self.kl_clip is None else min(1.0, float(np.sqrt(self.kl_clip / abs(vg))))
    self.nus.append(nu)
    self.step += 1
    return {name: [p * nu for p in ps] for name, ps in precond.items()}


def oracle_inputs(kinds, gradients, params, x, t, g_factor_scaling, weight_sharing):
  """Per layer its blocks' float64 (A rows, G rows, gradient matrix)."""
  grads, inputs, out_grads = gradients(params, x, t)
  f64 = lambda tree: jax.tree.map(lambda v: np.asarray(v, np.float64), tree)
  grads, out_grads = f64(grads), f64(out_grads)
  # Per-example G: the gradients of each example's own loss (the batch is x's leading axis).
  g_scale = x.shape[0] if g_factor_scaling == "per_example" else 1.0
  layers = {}
  for name, kind in kinds.items():
    layer_in = np.asarray(inputs[name])
    layer_in = layer_in if kind.a_diagonal else layer_in.astype(np.float64)
    rows = kind.rows(layer_in, out_grads[name], weight_sharing)
    layers[name] = [(a, g * g_scale, m) for (a, g), m in zip(rows, kind.matrices(grads[name]))]
  return layers


def check_against_oracle(model_name, compute_method, eigenvalue_outer_product=True,
                         kl_clip=None, g_factor_scaling="loss", weight_sharing="expand",
                         batch=16, seed=0):
  """STEPS kaisa steps in float64 against the oracle, every layer's update at every
  step, a new batch each step; between steps the parameters move along kaisa's
  update. Returns the oracle."""
  model, kinds, in_shape = MODELS[model_name]
  hp = dict(damping=damping_schedule, factor_decay=0.6, kl_clip=kl_clip, learning_rate=LR,
            inv_update_steps=2, compute_method=compute_method,
            eigenvalue_outer_product=eigenvalue_outer_product)
  rng = np.random.default_rng(seed)
  data = [(rng.normal(size=(batch,) + in_shape), 2 * rng.normal(size=(batch, 3)) + 1)
          for _ in range(STEPS)]
  with jax.enable_x64(True):
    params = jax.tree.map(lambda p: jnp.asarray(p, jnp.float64),
                          random_params(model, jnp.zeros((1,) + in_shape), seed=seed + 1))
    loss_fn = lambda p, x, t: _mse(model.apply({"params": p}, x), t)
    registry = kaisa_jax.find_layers(loss_fn, params, *data[0])
    assert not registry.skipped
    assert registry_groups(registry) == GROUPS[model_name]
    assert set(registry.names) == set(kinds) == set(params)
    tx = kaisa_jax.kaisa(registry, factor_update_steps=1, factor_dtype="float64",
                         inv_dtype="float64", g_factor_scaling=g_factor_scaling,
                         weight_sharing=weight_sharing, **hp)
    oracle = GroupedKfacOracle(**hp)
    diagonal = {name: kind.a_diagonal for name, kind in kinds.items()}
    gradients = _layer_gradients(model_name)

    @jax.jit
    def step(params, state, x, t):
      _, grads, captures = kaisa_jax.value_and_grad(loss_fn)(params, x, t)
      return tx.update(grads, state, params, captures=captures)

    state = tx.init(params)
    for t, (x, y) in enumerate(data):
      updates, state = step(params, state, x, y)
      expected = oracle.update(
          oracle_inputs(kinds, gradients, params, x, y, g_factor_scaling, weight_sharing),
          diagonal)
      failed = {}
      for name, kind in kinds.items():
        assert all(leaf.dtype == jnp.float64 for leaf in jax.tree.leaves(updates[name]))
        actual = np.stack(kind.matrices(jax.tree.map(np.asarray, updates[name])))
        try:
          assert_close(actual, np.stack(expected[name]), rtol=RTOL)
        except AssertionError:
          failed[name] = np.abs(actual - expected[name]).max() / np.abs(expected[name]).max()
      assert not failed, f"step {t}: error / largest entry {failed}"
      # A step of fixed size along the update: the factors move between steps
      # and the parameters stay where the problem is well conditioned.
      size = max(float(jnp.max(jnp.abs(u))) for u in jax.tree.leaves(updates))
      params = jax.tree.map(lambda p, u: p - MOVE / size * u, params, updates)
  return oracle


# ---------------------------------------------------------------------------
# 1. A group of same-size Dense layers among singletons.


@pytest.mark.parametrize("method, outer", [
    ("eigen", True), ("eigen", False), ("inverse", True), ("ekfac", True)])
def test_dense_group_matches_oracle_over_steps(method, outer):
  # A batch of 36: every A has full rank, so that EKFAC's bases from step 0,
  # which step 1 reuses, are determined.
  oracle = check_against_oracle("group", method, outer, kl_clip=60.0, batch=36)
  assert min(oracle.nus) < 0.9, oracle.nus  # the clip, which couples the layers, acts


# ---------------------------------------------------------------------------
# 2. Different kinds in one group; a diagonal A kept apart.


@pytest.mark.parametrize("method, g_factor_scaling, kl_clip, seed", [
    ("eigen", "loss", 50.0, 3), ("inverse", "loss", 50.0, 3),
    # EKFAC with per-example G: the reference's nearly-identity G would leave
    # its eigenbases, which EKFAC depends on, ill-determined.
    pytest.param("ekfac", "per_example", 10.0, 2, marks=pytest.mark.slow)])
def test_mixed_kinds_in_one_group_match_oracle_over_steps(method, g_factor_scaling, kl_clip,
                                                          seed):
  oracle = check_against_oracle("mixed", method, kl_clip=kl_clip,
                                g_factor_scaling=g_factor_scaling, seed=seed)
  assert min(oracle.nus) < 0.9, oracle.nus


# ---------------------------------------------------------------------------
# 3. Layers that read the same tensor.


@pytest.mark.parametrize("method, weight_sharing", [
    ("eigen", "expand"), ("ekfac", "expand"),
    pytest.param("inverse", "reduce", marks=pytest.mark.slow)])
def test_layers_with_a_shared_input_match_oracle_over_steps(method, weight_sharing):
  oracle = check_against_oracle("shared", method, kl_clip=100.0, weight_sharing=weight_sharing,
                                seed=5)
  assert min(oracle.nus) < 0.9, oracle.nus
  # The setting: the layers that read one tensor have equal A (and 'lin', without
  # a bias, the leading block of it).
  a = {n: oracle.blocks[(n, 0)]["A"] for n in ("q", "k", "v", "side", "gate", "up", "lin")}
  for n in ("k", "v", "side"):
    np.testing.assert_array_equal(a[n], a["q"])
  np.testing.assert_array_equal(a["up"], a["gate"])
  assert_close(a["lin"], a["q"][:-1, :-1], rtol=1e-12)


def _shared_problem():
  model, _, in_shape = MODELS["shared"]
  rng = np.random.default_rng(3)
  x, t = rng.normal(size=(8,) + in_shape), rng.normal(size=(8, 3))
  params = random_params(model, jnp.zeros((1,) + in_shape), seed=4)
  loss_fn = lambda p, x, t: _mse(model.apply({"params": p}, x), t)
  return loss_fn, params, jnp.asarray(x, jnp.float32), jnp.asarray(t, jnp.float32)


def _flops(fn, *args) -> float:
  """XLA's FLOP count of ``fn`` lowered, before optimisation (no common-subexpression merging)."""
  return float(jax.jit(fn).lower(*args).cost_analysis()["flops"])


def test_shared_inputs_are_found_and_their_a_computed_once():
  loss_fn, params, x, t = _shared_problem()
  registry = kaisa_jax.find_layers(loss_fn, params, x, t)
  # q, k, v read x; gate and up read h. 'side' reads x too but computes a
  # different A (other kernel shape), 'lin' has no bias, 'o' reads another tensor.
  assert registry.shared_inputs == (("q", "k", "v"), ("gate", "up"))
  assert registry.a_source("v") == "q" and registry.a_source("o") == "o"
  assert "one A for layers fed the same input: q, k, v" in str(registry)
  unshared = dataclasses.replace(registry, shared_inputs=())
  runs = {}
  for name, reg in (("shared", registry), ("unshared", unshared)):
    tx = kaisa_jax.kaisa(reg, kl_clip=None)

    def update(params, state, x, t, tx=tx):
      _, grads, captures = kaisa_jax.value_and_grad(loss_fn)(params, x, t)
      return tx.update(grads, state, params, captures=captures)

    state = tx.init(params)
    runs[name] = (_flops(update, params, state, x, t), jax.jit(update)(params, state, x, t))
  # At least one A product (xᵀx, 2·rows·n² FLOPs for the rows of 8 examples x 4
  # tokens) fewer per layer that reuses another's: k and v (n = 12), up (n = 12).
  rows = x.shape[0] * x.shape[1]
  assert runs["unshared"][0] - runs["shared"][0] >= 3 * 2 * rows * 12 ** 2
  # The same updates, and per layer the same factors (the shared state holds fewer A blocks).
  layer_factors = {name: kaisa_jax.placement(reg, 1).layer_factors(runs[name][1][1])
                   for name, reg in (("shared", registry), ("unshared", unshared))}
  for a, b in zip(jax.tree.leaves((runs["shared"][1][0], layer_factors["shared"])),
                  jax.tree.leaves((runs["unshared"][1][0], layer_factors["unshared"]))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def test_shared_a_is_stored_and_decomposed_once():
  loss_fn, params, x, t = _shared_problem()
  registry = kaisa_jax.find_layers(loss_fn, params, x, t)
  tx = kaisa_jax.kaisa(registry)
  state = tx.init(params)
  plan = kaisa_jax.placement(registry, 1)
  (qkv,) = [g for g in plan.groups if "q" in g.names]
  # q, k, v, o: four G blocks, two A blocks (q's for q, k, v; o's own).
  assert (qkv.blocks, qkv.a_blocks) == (4, 2)
  assert qkv.a_index == (0, 0, 0, 1) and qkv.names == ("q", "k", "v", "o")
  assert state.factors[qkv.name].a_factor.shape == (2, 13, 13)
  assert state.decompositions[qkv.name].a_eigvecs.shape == (2, 13, 13)
  assert state.decompositions[qkv.name].inv_eigval_outer.shape == (4, 12, 13)
  per_layer = plan.layer_factors(state)
  assert per_layer["v"].a_factor.shape == (13, 13)
  # The table says whose A a layer uses; only owners decompose an A.
  rows = {line.split()[0]: line for line in plan.table().splitlines() if line.strip()}
  assert "(q's A)" in rows["k"] and "(gate's A)" in rows["up"] and "(" not in rows["o"]
  assert "q:A" in plan.table() and "k:A" not in plan.table() and "up:A" not in plan.table()


@pytest.mark.parametrize("method", ["eigen", "inverse"])
def test_a_rejected_shared_a_rejects_every_layer_that_uses_it(method):
  loss_fn, params, x, t = _shared_problem()
  registry = kaisa_jax.find_layers(loss_fn, params, x, t)
  tx = kaisa_jax.kaisa(registry, compute_method=method, kl_clip=None)
  plan = kaisa_jax.placement(registry, 1, compute_method=method)

  @jax.jit
  def step(params, state, x, t):
    _, grads, captures = kaisa_jax.value_and_grad(loss_fn)(params, x, t)
    return tx.update(grads, state, params, captures=captures)

  _, state = step(params, tx.init(params), x, t)
  # q's A, which k and v use too, is broken: the next decomposition of it is not finite.
  (qkv,) = [g for g in plan.groups if "q" in g.names]
  f = state.factors[qkv.name]
  before = state._replace(factors=dict(state.factors, **{qkv.name: f._replace(
      a_factor=f.a_factor.at[qkv.a_block_range("q").start, 0, 0].set(jnp.nan))}))
  _, after = step(params, before, 2 * x, t)
  assert int(after.rejected_decompositions) == 3  # q, k and v; not o
  old, new = plan.layer_decompositions(before), plan.layer_decompositions(after)
  for name in ("q", "k", "v"):
    for a, b in zip(jax.tree.leaves(new[name]), jax.tree.leaves(old[name])):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # o (same group, its own A) took its new decomposition.
  assert not np.allclose(np.asarray(new["o"][0]), np.asarray(old["o"][0]))
  assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves(new))


def test_weight_sharing_modes_that_differ_in_one_sharing_set_are_refused():
  loss_fn, params, x, t = _shared_problem()
  registry = kaisa_jax.find_layers(loss_fn, params, x, t)
  with pytest.raises(ValueError, match="'q' and 'v' read the same input.*'expand' and 'reduce'"):
    kaisa_jax.kaisa(registry, weight_sharing={"^v$": "reduce"})
  # The same mode for the whole set is fine.
  tx = kaisa_jax.kaisa(registry, weight_sharing={"^[qkv]$": "reduce"})
  assert dict(tx.update.args[0].a_sources) == {"k": "q", "v": "q", "up": "gate"}
  tx = kaisa_jax.kaisa(registry, skip_layers=("^q$",))
  assert dict(tx.update.args[0].a_sources) == {"v": "k", "up": "gate"}


# ---------------------------------------------------------------------------
# 4. On 8 devices, against one device on the global batch (test_distributed's
# runs: 5 steps of kaisa + SGD, decompositions every 2nd step, kl_clip on).

GROUP_MODEL, MIXED_MODEL = MODELS["group"][0], MODELS["mixed"][0]


@pytest.fixture(scope="module")
def group_layers():
  x, y = next(dist.batches())
  layers = kaisa_jax.find_layers(dist.make_loss(GROUP_MODEL), dist.initial_params(GROUP_MODEL),
                                 x, y)
  assert registry_groups(layers) == GROUPS["group"]
  return layers


@pytest.fixture(scope="module")
def group_single(group_layers):
  return {m: dist.run_single(group_layers, m, model=GROUP_MODEL) for m in ("eigen", "inverse")}


def _sweep():
  cases = []
  for method in ("eigen", "inverse"):
    for frac in (1 / 8, 2 / 8, 4 / 8, 1.0):
      for mapped in ("pmap", "shard_map"):
        compat = (method, frac, mapped) == ("eigen", 2 / 8, "shard_map")
        cases.append(pytest.param(method, frac, mapped,
                                  marks=[pytest.mark.compat] if compat else []))
  return cases


def run_on_8_devices(layers, method, frac, mapped, model):
  if mapped == "pmap":
    return dist.run_pmap(layers, method, 8, frac, model=model)
  # JAX's grouped collectives (HYBRID-OPT) need check_vma=False.
  hybrid = 1 < max(1, round(8 * frac)) < 8
  return dist.run_shard_map(layers, method, 8, frac, check_vma=not hybrid, model=model)


@pytest.mark.slow
@pytest.mark.sweep
@pytest.mark.parametrize("method, frac, mapped", _sweep())
def test_dense_group_on_8_devices_matches_single_device(group_layers, group_single, method,
                                                       frac, mapped):
  trajectory = run_on_8_devices(group_layers, method, frac, mapped, GROUP_MODEL)
  dist.assert_trajectories_close(trajectory, group_single[method])


@pytest.mark.slow
@pytest.mark.parametrize("method, frac, mapped", [
    ("eigen", 1 / 8, "pmap"), ("inverse", 2 / 8, "shard_map")])
def test_mixed_groups_on_8_devices_match_single_device(method, frac, mapped):
  x, y = next(dist.batches())
  layers = kaisa_jax.find_layers(dist.make_loss(MIXED_MODEL), dist.initial_params(MIXED_MODEL),
                                 x, y)
  assert registry_groups(layers) == GROUPS["mixed"]
  expected = dist.run_single(layers, method, model=MIXED_MODEL)
  dist.assert_trajectories_close(run_on_8_devices(layers, method, frac, mapped, MIXED_MODEL),
                                 expected)


class SharedInputNet(nn.Module):
  """Two sharing sets (q, k, v and gate, up) beside layers of their own A."""

  @nn.compact
  def __call__(self, x):
    h = x.reshape(x.shape[0], 4, 8)
    q, k, v = (nn.Dense(6, name=n)(h) for n in "qkv")
    attention = jax.nn.softmax(q @ jnp.swapaxes(k, -1, -2) / 6 ** 0.5) @ v
    h = jnp.tanh(nn.Dense(8, name="o")(attention)) + h
    h = jnp.tanh(nn.Dense(5, name="gate")(h)) * nn.Dense(5, name="up")(h)
    return nn.Dense(3, name="head")(h.reshape(h.shape[0], -1))


SHARED_MODEL = SharedInputNet()


@pytest.fixture(scope="module")
def shared_layers():
  x, y = next(dist.batches())
  layers = kaisa_jax.find_layers(dist.make_loss(SHARED_MODEL),
                                 dist.initial_params(SHARED_MODEL), x, y)
  assert layers.shared_inputs == (("q", "k", "v"), ("gate", "up"))
  return layers


@pytest.mark.slow
@pytest.mark.parametrize("method, frac, mapped, colocate", [
    ("eigen", 1 / 8, "pmap", True), ("eigen", 2 / 8, "shard_map", False),
    ("inverse", 4 / 8, "pmap", False), ("inverse", 1 / 8, "shard_map", True),
    ("eigen", 1.0, "shard_map", True)])
def test_shared_a_on_8_devices_matches_single_device(shared_layers, method, frac, mapped,
                                                    colocate):
  plan = kaisa_jax.placement(shared_layers, 8, frac, colocate_factors=colocate)
  # A sharing set is placed as one: one column, its A decomposed by its first layer's worker.
  for names in shared_layers.shared_inputs:
    placed = [plan.placed(n) for n in names]
    assert len({(p.column, p.a_worker) for p in placed}) == 1, placed
  expected = dist.run_single(shared_layers, method, model=SHARED_MODEL)
  if mapped == "pmap":
    actual = dist.run_pmap(shared_layers, method, 8, frac, model=SHARED_MODEL,
                           colocate_factors=colocate)
  else:
    actual = dist.run_shard_map(shared_layers, method, 8, frac, check_vma=frac == 1.0,
                                model=SHARED_MODEL, colocate_factors=colocate)
  # The attention's softmax amplifies float32 roundings of the summation order through
  # the eigendecompositions: 1.006e-5 on jax 0.9.1, the same for every strategy.
  dist.assert_trajectories_close(actual, expected, rtol=2e-5)


@pytest.mark.slow
def test_shared_a_collective_bytes_and_checkpoint_moves(shared_layers):
  frac = 1 / 4
  opt = optax.chain(kaisa_jax.kaisa(shared_layers, axis_name=dist.AXIS, grad_worker_frac=frac),
                    optax.sgd(dist.LR))
  init, step = dist.shard_map_program(opt, dist.data_mesh(8), check_vma=False,
                                      model=SHARED_MODEL)
  params = dist.initial_params(SHARED_MODEL)
  x, y = next(dist.batches())
  hlo = step.lower(params, jax.eval_shape(init, params), x, y).compile().as_text()
  plan = kaisa_jax.placement(shared_layers, 8, frac)
  expected = {"all-reduce": sum(p.size * 4 for p in jax.tree.leaves(params)), "all-gather": 0}
  for k in plan.collectives():
    if k["bytes"] is not None:
      expected[k["op"]] += k["bytes"]
  assert dist.collective_bytes(hlo) == expected
  # One A per sharing set crosses the Factor-Reduce: 3 A blocks (9 x 9: 8 inputs and
  # the bias) fewer than one per layer, as upper triangles.
  factor_reduce = next(k for k in plan.collectives() if k["step"] == "factor step")
  unshared = kaisa_jax.placement(dataclasses.replace(shared_layers, shared_inputs=()), 8, frac)
  saved = next(k for k in unshared.collectives() if k["step"] == "factor step")["bytes"]
  assert saved - factor_reduce["bytes"] == 3 * (9 * 10 // 2) * 4
  # A state from 8 devices at 1/4 continues on 2 at 1/2 as on one device.
  data = list(dist.batches())
  opt8 = dist.make_opt(shared_layers, "eigen", axis_name=dist.AXIS, grad_worker_frac=frac,
                       inv_update_steps=3)
  init8, step8 = dist.shard_map_program(opt8, dist.data_mesh(8), False, SHARED_MODEL)
  state = init8(params)
  for x, y in data[:2]:
    params, state = step8(params, state, x, y)
  plan2 = kaisa_jax.placement(shared_layers, 2, 1 / 2)
  params, state = jax.device_get(params), kaisa_jax.convert_state(jax.device_get(state), plan,
                                                                   plan2)
  opt2 = dist.make_opt(shared_layers, "eigen", axis_name=dist.AXIS, grad_worker_frac=1 / 2,
                       inv_update_steps=3)
  _, step2 = dist.shard_map_program(opt2, dist.data_mesh(2), False, SHARED_MODEL)
  trajectory = []
  for x, y in data[2:]:
    params, state = step2(params, state, x, y)
    trajectory.append(params)
  expected = dist.run_single(shared_layers, "eigen", model=SHARED_MODEL, inv_update_steps=3)
  dist.assert_trajectories_close(trajectory, expected[2:])
