"""Layers inside scans (nn.scan, a loss's lax.scan): capture/scan.py and layers/scanned.py.

Each iteration of a scan body is captured on its own, the captures stacked
by iteration. Shared parameters (``variable_broadcast``) give one Kronecker
block with every iteration's rows; stacked parameters (``variable_axes``) one
block per slice. Checks: float64 NumPy forward and backprop of the unrolled
chain (the captures, a kaisa step), and, for the other kinds and EKFAC, the
same network written without a scan (separate layers, or one module called
in a Python loop), whose own kaisa steps the other test files check.
"""

import os
import subprocess
import sys
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kaisa_jax
from layout import layer_factors
from oracles import (assert_close, normal_batch, np_chain, np_scan_kfac_step, random_params,
                     scaled_mse)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH = 6
LENGTH = 3
LOSS_SCALE = 8.0


class _Step(nn.Module):
  """One iteration: c -> tanh(Dense 4 (c))."""

  @nn.compact
  def __call__(self, carry, _):
    return jnp.tanh(nn.Dense(4, name="d")(carry)), None


def _scan(body, stacked: bool, **kwargs):
  if stacked:
    return nn.scan(body, variable_axes={"params": 0}, split_rngs={"params": True}, **kwargs)
  return nn.scan(body, variable_broadcast="params", split_rngs={"params": False}, **kwargs)


class _ScanNet(nn.Module):
  """x (4) -> LENGTH scanned steps (named 'inner') -> head: Dense 2.

  ``remat``: '' none; 'inside': each step under nn.remat (the inputs come
  back through the backward pass); 'around': the whole scan under nn.remat.
  """
  stacked: bool
  remat: str = ""

  @nn.compact
  def __call__(self, x):
    body = nn.remat(_Step) if self.remat == "inside" else _Step
    scanned = _scan(body, self.stacked, length=LENGTH)
    if self.remat == "around":
      scanned = nn.remat(scanned)
    x, _ = scanned(name="inner")(x, None)
    return nn.Dense(2, name="head")(x)


def _steps(params, stacked):
  """The (kernel, bias) each iteration applies, in order."""
  d = params["inner"]["d"]
  if stacked:
    return [(d["kernel"][i], d["bias"][i]) for i in range(LENGTH)]
  return [(d["kernel"], d["bias"])] * LENGTH


CASES = [(True, ""), (True, "inside"), (True, "around"), (False, ""), (False, "inside"),
         (False, "around")]
IDS = ["stacked", "stacked_remat_inside", "stacked_remat_around", "shared",
       "shared_remat_inside", "shared_remat_around"]


class _GainStep(nn.Module):
  """One iteration: c -> tanh(Dense 4 (c)) * gain, the gain a self.param no layer holds."""

  @nn.compact
  def __call__(self, carry, _):
    gain = self.param("gain", nn.initializers.ones, (4,))
    return jnp.tanh(nn.Dense(4, name="d")(carry)) * gain, None


@pytest.mark.parametrize("stacked, remat", CASES, ids=IDS)
def test_a_scanned_layer_covers_its_leaves_and_a_scanned_param_is_uncovered(stacked, remat):
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      body = nn.remat(_GainStep) if remat == "inside" else _GainStep
      scanned = _scan(body, stacked, length=LENGTH)
      x, _ = (nn.remat(scanned) if remat == "around" else scanned)(name="inner")(x, None)
      return nn.Dense(2, name="head")(x)

  model = Net()
  x, t = normal_batch(BATCH, 4, 2, seed=5)
  params = random_params(model, jnp.asarray(x), seed=6)
  registry = kaisa_jax.find_layers(scaled_mse(model, LOSS_SCALE), params, x, t)
  assert registry.names == ("inner/d", "head") and not registry.skipped
  gain = params["inner"]["gain"]  # (LENGTH, 4) when stacked, (4,) when shared
  assert [(u.name, u.shape) for u in registry.uncovered] == [("inner/gain", gain.shape)]
  dense_leaves = jax.tree.leaves((params["inner"]["d"], params["head"]))
  assert registry.registered_entries == sum(leaf.size for leaf in dense_leaves)
  assert registry.plain_entries == gain.size
  with pytest.raises(ValueError, match="'inner/gain'"):
    kaisa_jax.kaisa(registry)
  kaisa_jax.kaisa(registry, allow_plain_gradient=True)


@pytest.mark.parametrize("stacked, remat", CASES, ids=IDS)
def test_scan_captures_every_iteration_exactly(stacked, remat):
  model = _ScanNet(stacked, remat)
  x, t = normal_batch(BATCH, 4, 2, seed=1)
  params = random_params(model, jnp.asarray(x), seed=2)
  loss_fn = scaled_mse(model, LOSS_SCALE)

  registry = kaisa_jax.find_layers(loss_fn, params, x, t)
  assert registry.names == ("inner/d", "head") and not registry.skipped
  layer = registry["inner/d"]
  assert layer.kernel_shape == ((LENGTH, 4, 4) if stacked else (4, 4))
  assert (layer.a_factor_shape.shape, layer.g_factor_shape.shape) == (
      ((LENGTH, 5, 5), (LENGTH, 4, 4)) if stacked else ((5, 5), (4, 4)))
  assert layer.kind == ("dense (scan, 3 stacked)" if stacked else "dense (scan)")

  loss, grads, captures = jax.jit(kaisa_jax.value_and_grad(loss_fn))(params, x, t)
  head = (params["head"]["kernel"], params["head"]["bias"])
  np_loss, np_grads, rows = np_chain(_steps(params, stacked) + [head], x, t,
                                     ["tanh"] * LENGTH, LOSS_SCALE)
  assert_close(loss, np_loss)
  (inputs,), (out_grads,) = captures["inner/d"]
  assert inputs.shape == (LENGTH, BATCH, 4)
  for i in range(LENGTH):  # iteration i is slice i of the captures
    assert_close(inputs[i], rows[i][0])
    assert_close(out_grads[i], rows[i][1])
  assert_close(captures["head"].inputs[0], rows[-1][0])
  # The probes change nothing: the gradient is jax.grad's.
  jax.tree.map(lambda a, b: assert_close(a, b, rtol=1e-6), grads,
               jax.grad(loss_fn)(params, x, t))


@pytest.mark.parametrize("stacked", [True, False], ids=["stacked", "shared"])
def test_kaisa_step_in_a_scan_matches_numpy(stacked):
  model = _ScanNet(stacked)
  x, t = normal_batch(BATCH, 4, 2, seed=3)
  params = random_params(model, jnp.asarray(x), seed=4)
  loss_fn = scaled_mse(model, LOSS_SCALE)
  damping, decay = 0.05, 0.5
  registry = kaisa_jax.find_layers(loss_fn, params, x, t)
  tx = kaisa_jax.kaisa(registry, damping=damping, factor_decay=decay, kl_clip=None)

  @jax.jit
  def step(params):
    _, grads, captures = kaisa_jax.value_and_grad(loss_fn)(params, x, t)
    return tx.update(grads, tx.init(params), params, captures=captures)[0]

  updates = step(params)
  head = (params["head"]["kernel"], params["head"]["bias"])
  _, np_grads, rows = np_chain(_steps(params, stacked) + [head], x, t, ["tanh"] * LENGTH,
                               LOSS_SCALE)
  # float64: per slice when stacked, over every iteration's rows when shared.
  expected = np_scan_kfac_step(rows, np_grads, LENGTH, stacked, damping, decay)
  d = updates["inner"]["d"]
  kernels = d["kernel"] if stacked else d["kernel"][None]
  biases = d["bias"] if stacked else d["bias"][None]
  for kernel, bias, precond in zip(kernels, biases, expected):
    assert_close(kernel, precond[:, :-1].T, rtol=1e-4)
    assert_close(bias, precond[:, -1], rtol=1e-4)


# --------------------------------------------------------------------------
# Every kind in a scan: the same as without the scan


class _KindsStep(nn.Module):
  """One iteration with a LayerNorm (per-feature blocks), a Conv and a Dense."""

  @nn.compact
  def __call__(self, carry, x_t):
    h = nn.LayerNorm(name="norm")(carry)
    h = nn.Conv(3, (2,), padding="SAME", name="conv")(h[..., None]).reshape(h.shape[0], -1)
    h = jnp.tanh(nn.Dense(4, name="dense")(h) + x_t)
    return h, jnp.sum(h, axis=-1)


class _KindsScan(nn.Module):
  """Steps over a sequence xs (LENGTH, B, 4): through nn.scan or a Python loop.

  With ``unrolled``, the stacked case is LENGTH separate modules and the
  shared case one module called LENGTH times: the same functions.
  """
  stacked: bool
  unrolled: bool = False

  @nn.compact
  def __call__(self, xs):
    carry = jnp.zeros(xs.shape[1:])
    if self.unrolled:
      shared = _KindsStep(name="inner")
      ys = []
      for i in range(LENGTH):
        step = _KindsStep(name=f"inner_{i}") if self.stacked else shared
        carry, y = step(carry, xs[i])
        ys.append(y)
      ys = jnp.stack(ys)
    else:
      carry, ys = _scan(_KindsStep, self.stacked, length=LENGTH)(name="inner")(carry, xs)
    return nn.Dense(2, name="head")(jnp.concatenate([carry, ys.T], axis=-1))


def _unrolled_params(params, stacked):
  if not stacked:
    return params
  out = {"head": params["head"]}
  for i in range(LENGTH):
    out[f"inner_{i}"] = jax.tree.map(lambda leaf: leaf[i], params["inner"])
  return out


def _kinds_data(seed):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(LENGTH, BATCH, 4)).astype(np.float32),
          rng.normal(size=(BATCH, 2)).astype(np.float32))


def _update_fn(model, params, xs, t, method, dtype="float32", g_factor_scaling="loss"):
  """(registry, init, jitted (params, state) -> (updates, state)) of a kaisa + SGD step."""
  loss_fn = scaled_mse(model, LOSS_SCALE)
  registry = kaisa_jax.find_layers(loss_fn, params, xs, t)
  opt = optax.chain(
      kaisa_jax.kaisa(registry, damping=0.05, factor_decay=0.7, kl_clip=None,
                      compute_method=method, inv_update_steps=2, factor_dtype=dtype,
                      inv_dtype=dtype, g_factor_scaling=g_factor_scaling),
      optax.sgd(0.1))

  @jax.jit
  def update(params, state):
    _, grads, captures = kaisa_jax.value_and_grad(loss_fn)(params, xs, t)
    return opt.update(grads, state, params, captures=captures)

  return registry, opt.init, update


@pytest.mark.parametrize("method", ["eigen", "inverse", "ekfac"])
@pytest.mark.parametrize("stacked", [True, False], ids=["stacked", "shared"])
def test_every_kind_in_a_scan_equals_the_unrolled_network(stacked, method):
  _check_scan_equals_unrolled(stacked, method, "loss")


@pytest.mark.parametrize("method", ["eigen", "ekfac"])
@pytest.mark.parametrize("stacked", [True, False], ids=["stacked", "shared"])
def test_per_example_g_in_a_scan_scales_by_the_batch_not_the_length(stacked, method):
  # The captures inside a scan are (length, batch, ...): B is their second axis.
  _check_scan_equals_unrolled(stacked, method, "per_example")


def _check_scan_equals_unrolled(stacked, method, g_factor_scaling):
  # In float64 throughout (model, captures, factors, decompositions): the
  # two programs fuse and order their sums differently, and in float32 that
  # rounding, amplified through the eigenbases, reached 9e-4 of an update
  # element (jax 0.11, or LLVM -O0). In float64 it stays near 1e-12.
  with jax.enable_x64(True):
    xs, t = (a.astype(np.float64) for a in _kinds_data(seed=5))
    params = jax.tree.map(lambda p: jnp.asarray(p, jnp.float64),
                          random_params(_KindsScan(stacked), jnp.asarray(xs), seed=6))
    registry, init, update = _update_fn(_KindsScan(stacked), params, xs, t, method, "float64",
                                        g_factor_scaling)
    assert not registry.skipped
    assert {l.name: l.blocks for l in registry} == {
        "inner/norm": 4 * (LENGTH if stacked else 1), "inner/conv": LENGTH if stacked else 1,
        "inner/dense": LENGTH if stacked else 1, "head": 1}
    unrolled = lambda tree: _unrolled_params(tree, stacked)
    _, init_loop, update_loop = _update_fn(_KindsScan(stacked, unrolled=True),
                                           unrolled(params), xs, t, method, "float64",
                                           g_factor_scaling)
    # Both optimizers step from the same parameters: steps 1 and 3
    # decompose, step 2 reuses; EKFAC's scaling runs on.
    state, state_loop = init(params), init_loop(unrolled(params))
    for _ in range(3):
      updates, state = update(params, state)
      expected, state_loop = update_loop(unrolled(params), state_loop)
      for actual, wanted in zip(jax.tree.leaves(unrolled(updates)), jax.tree.leaves(expected)):
        assert actual.dtype == jnp.float64
        assert_close(actual, wanted, rtol=1e-9)
      params = optax.apply_updates(params, updates)


def test_reverse_lax_scan_in_the_loss_shares_the_kernel():
  # A scan written in the loss (not nn.scan), run backwards: slice i of the
  # captures is the iteration that processes index i, as for lax.scan's ys.
  cell, head = nn.Dense(4), nn.Dense(2)
  x, t = normal_batch(BATCH, 4, 2, seed=7)
  params = {"cell": random_params(cell, jnp.asarray(x), seed=8),
            "head": random_params(head, jnp.asarray(x), seed=9)}

  def loss_fn(p, x, t):
    def body(c, scale):
      return jnp.tanh(cell.apply({"params": p["cell"]}, c)) * scale, None
    h, _ = jax.lax.scan(body, x, jnp.arange(1.0, LENGTH + 1), reverse=True)
    z = head.apply({"params": p["head"]}, h)
    return LOSS_SCALE * 0.5 * jnp.mean(jnp.sum((z - t) ** 2, axis=-1))

  registry = kaisa_jax.find_layers(loss_fn, params, x, t)
  assert registry.names == ("cell", "head")
  assert registry["cell"].kind == "dense (scan)"
  _, _, captures = kaisa_jax.value_and_grad(loss_fn)(params, x, t)
  # float64 backprop by hand: iteration k (k = 0 first) processes index
  # LENGTH - 1 - k and multiplies by its scale.
  w = np.asarray(params["cell"]["kernel"], np.float64)
  b = np.asarray(params["cell"]["bias"], np.float64)
  wh = np.asarray(params["head"]["kernel"], np.float64)
  order = list(range(LENGTH))[::-1]
  hs, ys = [np.asarray(x, np.float64)], []
  for i in order:
    ys.append(hs[-1] @ w + b)
    hs.append(np.tanh(ys[-1]) * (i + 1))
  z = hs[-1] @ wh + np.asarray(params["head"]["bias"], np.float64)
  dh = LOSS_SCALE * (z - t) / BATCH @ wh.T
  out_grads = [None] * LENGTH
  for k in range(LENGTH - 1, -1, -1):
    dy = dh * (order[k] + 1) * (1 - np.tanh(ys[k]) ** 2)
    out_grads[k] = dy
    dh = dy @ w.T
  (inputs,), (grads,) = captures["cell"]
  for k, i in enumerate(order):
    assert_close(inputs[i], hs[k])
    assert_close(grads[i], out_grads[k])


# --------------------------------------------------------------------------
# What is not captured is skipped, with the reason


def _skipped(loss_fn, params, *args):
  """(registry, {skipped name: reason}, names captured); the gradient is jax.grad's."""
  registry = kaisa_jax.find_layers(loss_fn, params, *args)
  _, grads, captures = kaisa_jax.value_and_grad(loss_fn)(params, *args)
  assert set(registry.names) <= set(captures)
  jax.tree.map(lambda a, b: assert_close(a, b, rtol=1e-6), grads,
               jax.grad(loss_fn)(params, *args))
  return registry, {s.name: s.reason for s in registry.skipped}, set(captures)


class _NestedBody(nn.Module):

  @nn.compact
  def __call__(self, carry, _):
    carry, _ = _scan(_Step, stacked=False, length=2)(name="cell")(carry, None)
    return carry, None


class _SquareStep(nn.Module):

  @nn.compact
  def __call__(self, carry, _):
    return jnp.tanh(nn.Dense(3, use_bias=False, name="d")(carry)), None


class _Unsupported(nn.Module):
  """'nested': a scan inside a scan. 'square': 3 slices of a (3, 3) kernel,
  which (3, 3, 3) holds stacked on any axis."""
  how: str

  @nn.compact
  def __call__(self, x):
    if self.how == "nested":
      x, _ = _scan(_NestedBody, stacked=False, length=2)(name="outer")(x, None)
    else:
      x, _ = _scan(_SquareStep, stacked=True, length=3)(name="inner")(x, None)
    return nn.Dense(2, name="head")(x)


def test_flax_look_ahead_trace_is_told_apart_by_type_or_name():
  # nn.scan traces its body once before the scan and drops that trace's
  # layer outputs. jax 0.9-0.10 make it a bare JaxprTrace; jax 0.11.2
  # (flax 0.12.10, measured on that version) a DynamicJaxprTrace named
  # after flax's "flax scan", under which every layer of an nn.scan was
  # listed as skipped. Both must read as the look-ahead, a real scan body
  # as "scan".
  from kaisa_jax._src.capture import transforms
  def traced(name):
    return types.SimpleNamespace(
        frame=types.SimpleNamespace(debug_info=types.SimpleNamespace(traced_for=name)))
  bare_partial_eval = type("JaxprTrace", (), {})()
  assert transforms._trace_label(traced("flax scan")) == transforms._trace_label(bare_partial_eval)
  assert transforms._trace_label(traced("scan")) == "scan"
  assert transforms._trace_label(traced("flax scan")) != "scan"


@pytest.mark.parametrize("how, name, words", [
    ("nested", "outer/cell/d", "scan inside a scan"), ("square", "inner/d", "ambiguous")])
def test_scans_we_cannot_capture_are_skipped(how, name, words):
  model = _Unsupported(how)
  x, t = normal_batch(BATCH, 4 if how == "nested" else 3, 2, seed=10)
  params = model.init(jax.random.key(0), jnp.asarray(x))["params"]
  registry, reasons, captured = _skipped(scaled_mse(model, LOSS_SCALE), params, x, t)
  assert registry.names == ("head",) and captured == {"head"}
  assert words in reasons[name]


class _EmbedStep(nn.Module):

  @nn.compact
  def __call__(self, carry, ids):
    return carry + jnp.mean(nn.Embed(5, 4, name="embed")(ids), axis=1), None


class _EmbedScan(nn.Module):
  stacked: bool

  @nn.compact
  def __call__(self, ids):
    carry = jnp.zeros((ids.shape[1], 4))
    carry, _ = _scan(_EmbedStep, self.stacked, length=LENGTH)(name="inner")(carry, ids)
    return nn.Dense(2, name="head")(carry)


@pytest.mark.parametrize("stacked", [True, False], ids=["stacked", "shared"])
def test_embed_in_a_scan(stacked):
  # Shared: one diagonal A over every iteration's tokens. Stacked: diagonal
  # factors are not stored per slice, so the layer is skipped.
  model = _EmbedScan(stacked)
  rng = np.random.default_rng(11)
  ids = jnp.asarray(rng.integers(0, 5, size=(LENGTH, BATCH, 2)), jnp.int32)
  t = jnp.asarray(rng.normal(size=(BATCH, 2)), jnp.float32)
  params = model.init(jax.random.key(0), ids)["params"]
  registry, reasons, _ = _skipped(scaled_mse(model, LOSS_SCALE), params, ids, t)
  if stacked:
    assert registry.names == ("head",)
    assert "stacked by a scan" in reasons["inner/embed"]
    return
  assert registry.names == ("inner/embed", "head")
  _, _, captures = kaisa_jax.value_and_grad(scaled_mse(model, LOSS_SCALE))(params, ids, t)
  np.testing.assert_array_equal(captures["inner/embed"].inputs[0], ids)
  # A: the token frequencies over every iteration's ids, averaged into I.
  counts = np.bincount(np.asarray(ids).ravel(), minlength=5) / ids.size
  tx = kaisa_jax.kaisa(registry, factor_decay=0.5)
  grads = jax.grad(scaled_mse(model, LOSS_SCALE))(params, ids, t)
  _, state = tx.update(grads, tx.init(params), params, captures=captures)
  assert_close(layer_factors(registry, state)["inner/embed"].a_factor, 0.5 + 0.5 * counts)


def test_the_original_scan_is_restored_and_used_elsewhere():
  original = jax.lax.scan
  model = _ScanNet(stacked=True)
  x, t = normal_batch(BATCH, 4, 2, seed=13)
  params = random_params(model, jnp.asarray(x), seed=14)

  def failing(p, x, t):
    assert jax.lax.scan is not original  # wrapped while the loss is traced
    raise RuntimeError("in the loss")

  with pytest.raises(RuntimeError, match="in the loss"):
    kaisa_jax.value_and_grad(failing)(params, x, t)
  assert jax.lax.scan is original
  kaisa_jax.find_layers(scaled_mse(model, LOSS_SCALE), params, x, t)
  assert jax.lax.scan is original


_SCANNED_TRANSFORMER_STEP = """
import sys
sys.path.insert(0, "examples")
import jax, jax.numpy as jnp, numpy as np
import kaisa_jax, transformer
model = transformer.Transformer(vocab=len(transformer.VOCAB), blocks=2, scan=True)
tokens = jnp.asarray(np.random.default_rng(0).integers(0, len(transformer.VOCAB), (32, 64)))
params = model.init(jax.random.key(0), tokens)["params"]
loss_fn = transformer.make_loss(model)
layers = kaisa_jax.find_layers(loss_fn, params, tokens, tokens)
tx = kaisa_jax.kaisa(layers, **dict(transformer.KFAC_ADAMW, factor_update_steps=1,
                                     inv_update_steps=10))
_, grads, captures = jax.jit(kaisa_jax.value_and_grad(loss_fn))(params, tokens, tokens)
state = tx.init(params)
update = jax.jit(tx.update).lower(grads, state, params, captures=captures).compile()
updates, _ = update(grads, state, params, captures=captures)
assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))
print(len([l for l in layers if "stacked" in l.kind]), "stacked layers")
"""


@pytest.mark.slow
@pytest.mark.compat
def test_scanned_transformer_decomposes_without_deadlock():
  # Its many batched decompositions (blocks of stacked layers and norms) once
  # hung jaxlib's CPU LAPACK kernels, which wait on XLA's thread pool: a
  # subprocess, so that a hang fails by its timeout instead of stalling CI.
  # One CPU device, as users run it (conftest.py asks for eight).
  env = dict(os.environ, XLA_FLAGS="")
  result = subprocess.run([sys.executable, "-c", _SCANNED_TRANSFORMER_STEP],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "8 stacked layers" in result.stdout
