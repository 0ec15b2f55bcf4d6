"""Layers called inside nested JAX transforms: nn.remat / jax.checkpoint, loops, vmap.

A call inside jax.checkpoint (nn.remat, nn.checkpoint) is captured exactly:
its input comes back from the backward pass. Every numerical check is against
a float64 NumPy forward pass and hand-written backprop in this file, or
against ``jax.grad`` of the same loss written without remat; the captures
under remat must also equal those of the same model without it. Calls that
cannot be captured (loops that bypass jax.lax.scan, vmap, Flax NNX copies)
must be listed as skipped with their reason, not registered, and left out of
the captures. Layers inside scans are tested in test_scanned.py.
"""

import functools

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, PartitionSpec as P
from jax.tree_util import DictKey

import kaisa_jax
from oracles import (assert_close, normal_batch, np_chain, np_kron_solve, random_params,
                     scaled_mse)

BATCH = 6
# A mean loss puts 1/batch into every output gradient: scaled up so that G is
# not negligible next to the identity the factors start from.
LOSS_SCALE = 8.0


def _dense(params, *path):
  for key in path:
    params = params[key]
  return params["kernel"], params["bias"]


def _check_capture(capture, rows):
  """``capture`` holds exactly the oracle's per-call (input, output gradient) rows."""
  assert isinstance(capture, kaisa_jax.LayerCapture)
  assert len(capture.inputs) == len(capture.out_grads) == len(rows)
  for a, g, (a_np, g_np) in zip(capture.inputs, capture.out_grads, rows):
    assert_close(a, a_np)
    assert_close(g, g_np)


def _sum_of_products(capture):
  """Σ over calls of [a, 1]ᵀ g: the (in + 1, out) kernel-and-bias gradient of a Dense."""
  total = 0.0
  for a, g in zip(capture.inputs, capture.out_grads):
    a = np.asarray(a, np.float64).reshape(-1, a.shape[-1])
    a = np.concatenate([a, np.ones((a.shape[0], 1))], axis=1)
    total = total + a.T @ np.asarray(g, np.float64).reshape(a.shape[0], -1)
  return total


# --------------------------------------------------------------------------
# nn.remat around one Dense


class _RematDense(nn.Module):
  """x (3) -> h: remat'ed Dense 4 -> tanh -> o: Dense 2."""
  remat: bool = True

  @nn.compact
  def __call__(self, x):
    dense = nn.remat(nn.Dense) if self.remat else nn.Dense
    return nn.Dense(2, name="o")(jnp.tanh(dense(4, name="h")(x)))


@pytest.mark.parametrize("jit", [False, True])
def test_remat_dense_is_registered_and_captured_exactly(jit):
  model = _RematDense()
  x, t = normal_batch(BATCH, 3, 2)
  params = random_params(model, jnp.asarray(x), seed=1)
  loss_fn = scaled_mse(model, LOSS_SCALE)

  registry = kaisa_jax.find_layers(loss_fn, params, x, t)
  assert registry.names == ("h", "o")
  assert registry.skipped == ()
  assert registry["h"].kind == "dense"
  assert registry["h"].kernel_path == (DictKey("h"), DictKey("kernel"))
  assert registry["h"].bias_path == (DictKey("h"), DictKey("bias"))
  assert (registry["h"].a_size, registry["h"].g_size) == (4, 4)

  vg = kaisa_jax.value_and_grad(loss_fn)
  loss, grads, captures = (jax.jit(vg) if jit else vg)(params, x, t)
  np_loss, np_grads, np_rows = np_chain([_dense(params, "h"), _dense(params, "o")], x, t,
                                        ["tanh"], LOSS_SCALE)
  assert_close(loss, np_loss)
  assert set(captures) == {"h", "o"}
  _check_capture(captures["h"], [np_rows[0]])
  _check_capture(captures["o"], [np_rows[1]])
  for name, (dw, db) in zip(("h", "o"), np_grads):
    assert_close(grads[name]["kernel"], dw)
    assert_close(grads[name]["bias"], db)
  # a_iᵀ g_i is the kernel gradient of the same loss written without remat.
  plain = jax.grad(scaled_mse(_RematDense(remat=False), LOSS_SCALE))(params, x, t)
  total = _sum_of_products(captures["h"])
  assert_close(total[:-1], plain["h"]["kernel"])
  assert_close(total[-1], plain["h"]["bias"])


# --------------------------------------------------------------------------
# nn.remat around a block of two Denses, several remat flavours


class _GainBlock(nn.Module):
  """Dense 4 -> tanh, times its own gain (a self.param no layer holds)."""

  @nn.compact
  def __call__(self, x):
    gain = self.param("gain", nn.initializers.ones, (4,))
    return jnp.tanh(nn.Dense(4, name="h")(x)) * gain


class _RematGainNet(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.Dense(2, name="o")(nn.remat(_GainBlock)(name="block")(x))


def test_a_remat_layer_covers_its_leaves_and_its_own_param_is_uncovered():
  # Under nn.remat the layer holds copies of its parameters: it is found by
  # its scope path, and its kernel and bias count as covered all the same.
  model = _RematGainNet()
  x, t = normal_batch(BATCH, 3, 2, seed=7)
  params = random_params(model, jnp.asarray(x), seed=8)
  registry = kaisa_jax.find_layers(scaled_mse(model, LOSS_SCALE), params, x, t)
  assert registry.names == ("block/h", "o") and not registry.skipped
  gain = params["block"]["gain"]
  assert [(u.name, u.shape) for u in registry.uncovered] == [("block/gain", gain.shape)]
  dense_leaves = jax.tree.leaves((params["block"]["h"], params["o"]))
  assert registry.registered_entries == sum(leaf.size for leaf in dense_leaves)
  assert registry.plain_entries == gain.size


class _Block(nn.Module):
  """a: Dense 4 -> tanh -> b: Dense 3, each Dense remat'ed too if ``inner_remat``."""
  inner_remat: bool = False

  @nn.compact
  def __call__(self, x):
    dense = nn.remat(nn.Dense) if self.inner_remat else nn.Dense
    return dense(3, name="b")(jnp.tanh(dense(4, name="a")(x)))


class _BlockNet(nn.Module):
  """block (wrapped by ``wrap``, e.g. nn.remat) -> relu -> head: Dense 2."""
  wrap: object = None
  inner_remat: bool = False

  @nn.compact
  def __call__(self, x):
    block = (self.wrap(_Block) if self.wrap is not None else _Block)(
        inner_remat=self.inner_remat, name="block")
    return nn.Dense(2, name="head")(nn.relu(block(x)))


_REMATS = {
    # name: (the block's wrapper, remat inside the block too)
    "remat": (nn.remat, False),
    "nested_remat": (nn.remat, True),
    "nothing_saveable": (functools.partial(
        nn.remat, policy=jax.checkpoint_policies.nothing_saveable), False),
    "no_cse": (functools.partial(nn.remat, prevent_cse=False), False),
}


@pytest.mark.parametrize("remat", list(_REMATS))
def test_remat_block_captures_equal_those_without_remat(remat):
  x, t = normal_batch(BATCH, 5, 2, seed=2)
  wrap, inner_remat = _REMATS[remat]
  model = _BlockNet(wrap=wrap, inner_remat=inner_remat)
  params = random_params(_BlockNet(), jnp.asarray(x), seed=3)
  loss_fn = scaled_mse(model, LOSS_SCALE)

  registry = kaisa_jax.find_layers(loss_fn, params, x, t)
  assert registry.names == ("block/a", "block/b", "head")
  assert registry.skipped == ()
  assert registry == kaisa_jax.find_layers(scaled_mse(_BlockNet(), LOSS_SCALE), params, x, t)

  _, grads, captures = jax.jit(kaisa_jax.value_and_grad(loss_fn))(params, x, t)
  _, np_grads, np_rows = np_chain(
      [_dense(params, "block", "a"), _dense(params, "block", "b"), _dense(params, "head")],
      x, t, ["tanh", "relu"], LOSS_SCALE)
  for name, rows, (dw, db) in zip(registry.names, np_rows, np_grads):
    _check_capture(captures[name], [rows])
    total = _sum_of_products(captures[name])
    assert_close(total[:-1], dw)
    assert_close(total[-1], db)
  _, _, plain = jax.jit(kaisa_jax.value_and_grad(scaled_mse(_BlockNet(), LOSS_SCALE)))(params, x, t)
  for name in registry.names:
    for got, want in zip(captures[name].inputs + captures[name].out_grads,
                         plain[name].inputs + plain[name].out_grads):
      assert_close(got, want, rtol=1e-6)


# --------------------------------------------------------------------------
# A module called twice, inside remat (and once outside, once inside)


class _RematTwice(nn.Module):
  """z = d(tanh(d(x))), each call of the lifted module its own checkpoint."""

  @nn.compact
  def __call__(self, x):
    d = nn.remat(nn.Dense)(3, name="d")
    return d(jnp.tanh(d(x)))


class _OutsideThenInside(nn.Module):
  """z = d(tanh(d(x))), the first call in the loss's trace, the second in nn.remat."""

  def setup(self):
    self.d = nn.Dense(3)

  def __call__(self, x):
    h = self.d(x)
    return nn.remat(lambda module, h: module.d(jnp.tanh(h)))(self, h)


@pytest.mark.parametrize("model", [_RematTwice(), _OutsideThenInside()],
                         ids=["both_inside", "outside_then_inside"])
def test_shared_module_called_twice_with_remat(model):
  x, t = normal_batch(BATCH, 3, 3, seed=4)
  params = random_params(model, jnp.asarray(x), seed=5)
  loss_fn = scaled_mse(model, LOSS_SCALE)
  registry = kaisa_jax.find_layers(loss_fn, params, x, t)
  assert registry.names == ("d",)
  assert registry.skipped == ()

  _, grads, captures = jax.jit(kaisa_jax.value_and_grad(loss_fn))(params, x, t)
  d = _dense(params, "d")
  _, (first, second), rows = np_chain([d, d], x, t, ["tanh"], LOSS_SCALE)
  # The calls are captured separately, in call order, not summed.
  _check_capture(captures["d"], rows)
  assert_close(grads["d"]["kernel"], first[0] + second[0])
  assert_close(grads["d"]["bias"], first[1] + second[1])
  total = _sum_of_products(captures["d"])
  assert_close(total[:-1], first[0] + second[0])


# --------------------------------------------------------------------------
# Naming: remat'ed layers found under the prefix of their apply


class _RematOne(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.remat(nn.Dense)(3)(x)


def test_remat_layers_of_two_applies_with_nested_params():
  # Two models with the same scope path ('CheckpointDense_0'), each applied
  # with its own subtree of params: two layers, each under its own prefix.
  enc, dec = _RematOne(), _RematOne()
  x, t = normal_batch(BATCH, 3, 3, seed=6)
  params = {"enc": random_params(enc, jnp.asarray(x), seed=7),
            "dec": random_params(dec, jnp.asarray(x), seed=8)}

  def loss_fn(p, x, t):
    h = jnp.tanh(enc.apply({"params": p["enc"]}, x))
    z = dec.apply({"params": p["dec"]}, h)
    return LOSS_SCALE * 0.5 * jnp.mean(jnp.sum((z - t) ** 2, axis=-1))

  registry = kaisa_jax.find_layers(loss_fn, params, x, t)
  assert registry.names == ("enc/CheckpointDense_0", "dec/CheckpointDense_0")
  for prefix in ("enc", "dec"):
    layer = registry[f"{prefix}/CheckpointDense_0"]
    assert layer.kernel_path == (DictKey(prefix), DictKey("CheckpointDense_0"), DictKey("kernel"))
  _, _, captures = kaisa_jax.value_and_grad(loss_fn)(params, x, t)
  _, np_grads, np_rows = np_chain(
      [_dense(params, "enc", "CheckpointDense_0"), _dense(params, "dec", "CheckpointDense_0")],
      x, t, ["tanh"], LOSS_SCALE)
  for name, rows, (dw, db) in zip(registry.names, np_rows, np_grads):
    _check_capture(captures[name], [rows])
    total = _sum_of_products(captures[name])
    assert_close(total[:-1], dw)
    assert_close(total[-1], db)


# --------------------------------------------------------------------------
# Embed: integer inputs come back exactly


class _RematEmbed(nn.Module):
  rows: int = 7

  @nn.compact
  def __call__(self, ids):
    e = nn.remat(nn.Embed)(self.rows, 3, name="embed")(ids)
    return nn.Dense(2, name="head")(e)


def test_embed_inside_remat_gives_back_its_ids():
  model = _RematEmbed()
  rng = np.random.default_rng(9)
  ids = rng.integers(0, 7, size=(BATCH, 4)).astype(np.int32)
  params = random_params(model, jnp.asarray(ids), seed=10)

  def loss_fn(p, ids):
    return jnp.mean(jnp.sin(model.apply({"params": p}, ids)) * 3.0)

  registry = kaisa_jax.find_layers(loss_fn, params, ids)
  assert registry.names == ("embed", "head")
  assert registry["embed"].kind == "embed"
  _, _, captures = jax.jit(kaisa_jax.value_and_grad(loss_fn))(params, ids)
  (got_ids,), (g,) = captures["embed"]
  assert got_ids.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(got_ids), ids)
  table = np.asarray(params["embed"]["embedding"], np.float64)
  w, b = (np.asarray(v, np.float64) for v in _dense(params, "head"))
  z = table[ids] @ w + b
  dz = 3.0 * np.cos(z) / z.size
  assert_close(g, dz @ w.T)


def test_ids_too_many_for_float32_are_skipped():
  # A table of 2**24 + 1 rows: not every id is a float32 number. Shapes only.
  model = _RematEmbed(rows=2**24 + 1)
  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  shapes = {"embed": {"embedding": f32(2**24 + 1, 3)},
            "head": {"kernel": f32(3, 2), "bias": f32(2)}}
  ids = jax.ShapeDtypeStruct((2, 3), jnp.int32)
  registry = kaisa_jax.find_layers(
      lambda p, ids: jnp.sum(model.apply({"params": p}, ids)), shapes, ids)
  assert registry.names == ("head",)
  assert [(s.name, s.module_type) for s in registry.skipped] == [("embed", "Embed")]
  assert "2**24" in registry.skipped[0].reason


# --------------------------------------------------------------------------
# The sampled Fisher through remat


class _Classifier(nn.Module):
  remat: bool = True

  @nn.compact
  def __call__(self, x):
    dense = nn.remat(nn.Dense) if self.remat else nn.Dense
    return nn.Dense(4, name="out")(nn.relu(dense(5, name="hidden")(x)))


def _sampled_loss(model):
  def loss_fn(p, x, y, key):
    logits = model.apply({"params": p}, x)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, kaisa_jax.sampled_fisher_loss(logits, key)
  return loss_fn


def test_sampled_fisher_through_remat():
  rng = np.random.default_rng(11)
  x = rng.normal(size=(8, 6)).astype(np.float32)
  y = rng.integers(0, 4, size=(8,)).astype(np.int32)
  params = random_params(_Classifier(), jnp.asarray(x), seed=12)
  key = jax.random.key(13)
  vg = jax.jit(kaisa_jax.value_and_grad(_sampled_loss(_Classifier()), fisher="sampled"))
  loss, grads, captures = vg(params, x, y, key)

  true_loss = lambda p: _sampled_loss(_Classifier(remat=False))(p, x, y, key)[0]
  expected_loss, expected_grads = jax.jit(jax.value_and_grad(true_loss))(params)
  assert_close(loss, expected_loss)
  jax.tree.map(assert_close, grads, expected_grads)
  p = jax.tree.map(lambda v: np.asarray(v, np.float64), params)
  h = np.maximum(x @ p["hidden"]["kernel"] + p["hidden"]["bias"], 0)
  z = h @ p["out"]["kernel"] + p["out"]["bias"]
  prob = np.exp(z - z.max(-1, keepdims=True))
  prob /= prob.sum(-1, keepdims=True)
  g_out = np.asarray(captures["out"].out_grads[0], np.float64)
  labels = prob - len(x) * g_out  # one-hot draws from the model
  np.testing.assert_allclose(labels, np.round(labels), atol=1e-5)
  np.testing.assert_allclose(np.round(labels).sum(-1), 1.0)
  # The remat'ed layer: its input, and the sampled loss's gradient back one layer.
  assert_close(captures["hidden"].inputs[0], x)
  assert_close(captures["hidden"].out_grads[0], (g_out @ p["out"]["kernel"].T) * (h > 0))
  assert_close(captures["out"].inputs[0], h)


# --------------------------------------------------------------------------
# A kaisa step under remat


def test_kaisa_update_under_remat_matches_numpy_and_no_remat():
  x, t = normal_batch(BATCH, 3, 2, seed=14)
  params = random_params(_RematDense(), jnp.asarray(x), seed=15)
  damping, decay = 0.05, 0.5

  def one_step(model):
    loss_fn = scaled_mse(model, LOSS_SCALE)
    registry = kaisa_jax.find_layers(loss_fn, params, x, t)
    tx = kaisa_jax.kaisa(registry, damping=damping, factor_decay=decay, kl_clip=None)

    @jax.jit
    def step(params):
      _, grads, captures = kaisa_jax.value_and_grad(loss_fn)(params, x, t)
      updates, _ = jax.jit(tx.update)(grads, tx.init(params), params, captures=captures)
      return updates

    return step(params)

  updates = one_step(_RematDense())
  # float64: the factors start from I, the first step averages in the batch's
  # [a, 1]ᵀ[a, 1] / B and gᵀg / B; (G + γI)⁻¹ ∇ (A + γI)⁻¹ as a Kronecker solve.
  _, np_grads, np_rows = np_chain([_dense(params, "h"), _dense(params, "o")], x, t, ["tanh"],
                                  LOSS_SCALE)
  for name, (a, g), (dw, db) in zip(("h", "o"), np_rows, np_grads):
    a1 = np.concatenate([a, np.ones((a.shape[0], 1))], axis=1)
    factor_a = decay * np.eye(a1.shape[1]) + (1 - decay) * a1.T @ a1 / a1.shape[0]
    factor_g = decay * np.eye(g.shape[1]) + (1 - decay) * g.T @ g / g.shape[0]
    grad = np.concatenate([dw.T, db[:, None]], axis=1)  # (out, in + 1)
    precond = np_kron_solve(factor_g, factor_a, grad, damping)
    assert_close(updates[name]["kernel"], precond[:, :-1].T, rtol=1e-4)
    assert_close(updates[name]["bias"], precond[:, -1], rtol=1e-4)
  # And the very update of the model written without remat.
  jax.tree.map(lambda a, b: assert_close(a, b, rtol=1e-5), updates,
               one_step(_RematDense(remat=False)))


# --------------------------------------------------------------------------
# jax.checkpoint written in the loss


class _NnxMLP(nnx.Module):

  def __init__(self, rngs):
    self.h = nnx.Linear(3, 4, rngs=rngs)
    self.o = nnx.Linear(4, 2, rngs=rngs)

  def __call__(self, x):
    return self.o(jnp.tanh(self.h(x)))


def test_jax_checkpoint_made_inside_the_loss_is_captured():
  x, t = normal_batch(BATCH, 3, 2, seed=16)
  plain = _RematDense(remat=False)
  params = random_params(plain, jnp.asarray(x), seed=17)
  graphdef, state = nnx.split(_NnxMLP(nnx.Rngs(0)))

  def linen_loss(p, x, t):
    z = jax.checkpoint(lambda p, x: plain.apply({"params": p}, x))(p, x)
    return LOSS_SCALE * 0.5 * jnp.mean(jnp.sum((z - t) ** 2, axis=-1))

  def nnx_loss(p, x, t):
    model = nnx.merge(graphdef, p)  # closed over by the checkpointed function
    z = jax.checkpoint(lambda x: model(x))(x)
    return LOSS_SCALE * 0.5 * jnp.mean(jnp.sum((z - t) ** 2, axis=-1))

  for loss_fn, p, pure in ((linen_loss, params, params),
                           (nnx_loss, state, nnx.to_pure_dict(state))):
    registry = kaisa_jax.find_layers(loss_fn, p, x, t)
    assert registry.names == ("h", "o")
    assert registry.skipped == ()
    _, _, captures = jax.jit(kaisa_jax.value_and_grad(loss_fn))(p, x, t)
    _, _, np_rows = np_chain([_dense(pure, "h"), _dense(pure, "o")], x, t, ["tanh"],
                             LOSS_SCALE)
    _check_capture(captures["h"], [np_rows[0]])
    _check_capture(captures["o"], [np_rows[1]])


def test_jax_checkpoint_of_a_function_traced_before_is_refused():
  # jax.checkpoint(f) reuses f's trace for the same shapes: the second trace
  # of the loss would not run the layer at all.
  model = nn.Dense(3)
  x, t = normal_batch(BATCH, 3, 3, seed=18)
  params = random_params(model, jnp.asarray(x))

  def apply(p, x):
    return model.apply({"params": p}, x)

  checkpointed = jax.checkpoint(apply)
  loss_fn = lambda p, x, t: jnp.mean((checkpointed(p, x) - t) ** 2)
  with pytest.raises(ValueError, match="jax.checkpoint"):
    kaisa_jax.value_and_grad(loss_fn)(params, x, t)


# --------------------------------------------------------------------------
# Calls that cannot be captured: listed as skipped, never registered


class _Lifted(nn.Module):
  """A lifted transform around a Dense 3 -> 3 (named 'inner'), then head: Dense 2."""
  how: str

  @nn.compact
  def __call__(self, x):
    if self.how == "vmap_broadcast":
      x = nn.vmap(nn.Dense, variable_axes={"params": None}, split_rngs={"params": False})(
          3, name="inner")(x)
    elif self.how == "jit":
      x = nn.jit(nn.Dense)(3, name="inner")(x)
    return nn.Dense(2, name="head")(x)


_LOOP = "called inside a loop"
_VMAP = "called inside vmap"
_LIFTED_CASES = {
    # how: (skipped name, words of the reason)
    "vmap_broadcast": ("inner", _VMAP),
    "jit": ("inner", "other than jax.checkpoint (jit)"),
}


def _check_skipped_layer(loss_fn, params, args, skipped_name, reason_words, module_type):
  """The layer is skipped with that reason and not captured; returns (registry, grads, captures)."""
  registry = kaisa_jax.find_layers(loss_fn, params, *args)
  assert skipped_name not in registry.names
  assert [(s.name, s.module_type) for s in registry.skipped] == [(skipped_name, module_type)]
  assert reason_words in registry.skipped[0].reason
  with pytest.raises(ValueError, match="skip_layers"):
    kaisa_jax.kaisa(registry)

  _, grads, captures = kaisa_jax.value_and_grad(loss_fn)(params, *args)
  assert skipped_name not in captures
  assert set(captures) == set(registry.names)
  # The probes change nothing: the gradient is jax.grad's.
  jax.tree.map(lambda a, b: assert_close(a, b, rtol=1e-6), grads,
               jax.grad(loss_fn)(params, *args))
  return registry, grads, captures


@pytest.mark.parametrize("how", list(_LIFTED_CASES))
def test_layer_inside_a_repeating_transform_is_skipped(how):
  model = _Lifted(how)
  x, t = normal_batch(BATCH, 3, 2, seed=19)
  params = model.init(jax.random.key(0), jnp.asarray(x))["params"]
  name, words = _LIFTED_CASES[how]
  registry, grads, captures = _check_skipped_layer(
      scaled_mse(model, LOSS_SCALE), params, (x, t), name, words, "Dense")
  assert registry.names == ("head",)
  if how == "vmap_broadcast":
    # Named in skip_layers, the layer's leaves pass through kaisa unchanged.
    tx = kaisa_jax.kaisa(registry, skip_layers=(name,), kl_clip=None)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params, captures=captures)
    for update, grad in zip(jax.tree.leaves(updates["inner"]), jax.tree.leaves(grads["inner"])):
      np.testing.assert_array_equal(np.asarray(update), np.asarray(grad))
    assert not np.allclose(updates["head"]["kernel"], grads["head"]["kernel"])


class _Head(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.Dense(2, name="d")(x)


@pytest.mark.parametrize("transform", ["fori_loop", "vmap"])
def test_apply_inside_a_jax_loop_or_vmap_in_the_loss_is_skipped(transform):
  body, head = nn.Dense(3), _Head()
  x, t = normal_batch(BATCH, 3, 2, seed=20)
  params = {"body": random_params(body, jnp.asarray(x), seed=21),
            "head": random_params(head, jnp.asarray(x), seed=22)}

  def loss_fn(p, x, t):
    step = lambda h: jnp.tanh(body.apply({"params": p["body"]}, h))
    if transform == "fori_loop":
      h = jax.lax.fori_loop(0, 2, lambda i, h: step(h), x)
    else:
      h = jax.vmap(step)(x)
    z = head.apply({"params": p["head"]}, h)
    return jnp.mean((z - t) ** 2)

  words = _LOOP if transform == "fori_loop" else _VMAP
  registry, _, _ = _check_skipped_layer(loss_fn, params, (x, t), "body", words, "Dense")
  assert registry.names == ("head/d",)


def test_layer_called_directly_and_in_a_scan_is_not_registered():
  # Its captures would mix (B, ...) calls and (length, B, ...) iterations:
  # the layer is skipped altogether.
  class Mixed(nn.Module):

    @nn.compact
    def __call__(self, x):
      d = nn.Dense(3, name="d")
      x = d(x)
      x, _ = jax.lax.scan(lambda c, _: (jnp.tanh(d(c)), None), x, None, length=2)
      return nn.Dense(2, name="head")(x)

  model = Mixed()
  x, t = normal_batch(BATCH, 3, 2, seed=23)
  params = model.init(jax.random.key(0), jnp.asarray(x))["params"]
  _check_skipped_layer(scaled_mse(model, LOSS_SCALE), params, (x, t), "d",
                       "both inside and outside a scan", "Dense")


class _NnxRemat(nnx.Module):

  def __init__(self, rngs):
    self.block = nnx.Linear(3, 4, rngs=rngs)
    self.head = nnx.Linear(4, 2, rngs=rngs)

  def __call__(self, x):
    return self.head(nnx.remat(lambda block, x: jnp.tanh(block(x)))(self.block, x))


class _NnxScan(nnx.Module):

  def __init__(self, rngs):
    self.cell = nnx.Linear(3, 3, rngs=rngs)
    self.head = nnx.Linear(3, 2, rngs=rngs)

  def __call__(self, x):
    @nnx.scan(in_axes=(None, nnx.Carry, 0), out_axes=nnx.Carry)
    def loop(cell, carry, _):
      return jnp.tanh(cell(carry))

    return self.head(loop(self.cell, x, jnp.arange(2)))


@pytest.mark.parametrize("module, name", [(_NnxRemat, "Linear_3x4"), (_NnxScan, "Linear_3x3")],
                         ids=["nnx_remat", "nnx_scan"])
def test_nnx_layer_inside_a_transform_with_pure_dict_params_is_skipped(module, name):
  # With the nnx.State they are captured (test_nnx.py); a pure dict has no
  # Variables to carry their paths through the transform.
  graphdef, state = nnx.split(module(nnx.Rngs(0)))
  state = nnx.to_pure_dict(state)
  x, t = normal_batch(BATCH, 3, 2, seed=24)

  def loss_fn(p, x, t):
    return jnp.mean((nnx.merge(graphdef, p)(x) - t) ** 2)

  registry = kaisa_jax.find_layers(loss_fn, state, x, t)
  assert registry.names == ("head",)
  assert [(s.name, s.module_type) for s in registry.skipped] == [(name, "Linear")]
  assert "copy of its parameters" in registry.skipped[0].reason
  assert "nnx.State" in registry.skipped[0].reason
  _, grads, captures = kaisa_jax.value_and_grad(loss_fn)(state, x, t)
  assert set(captures) == {"head"}
  jax.tree.map(lambda a, b: assert_close(a, b, rtol=1e-6), grads,
               jax.grad(loss_fn)(state, x, t))


# --------------------------------------------------------------------------
# Multi-device


@pytest.mark.slow
@pytest.mark.compat
def test_remat_captures_under_shard_map_are_each_devices_own():
  num_devices = 2
  x, t = normal_batch(BATCH, 3, 2, seed=25)
  x, t = np.concatenate([x, x[::-1] * 0.5]), np.concatenate([t, t[::-1]])
  params = random_params(_RematDense(), jnp.asarray(x), seed=26)
  vg = kaisa_jax.value_and_grad(scaled_mse(_RematDense(), LOSS_SCALE))
  mesh = Mesh(np.array(jax.devices()[:num_devices]), ("data",))
  run = jax.jit(jax.shard_map(lambda p, x, t: vg(p, x, t)[2], mesh=mesh,
                              in_specs=(P(), P("data"), P("data")), out_specs=P("data")))
  captures = run(params, x, t)
  half = len(x) // num_devices
  for d in range(num_devices):
    sl = slice(d * half, (d + 1) * half)
    _, _, rows = np_chain([_dense(params, "h"), _dense(params, "o")], x[sl], t[sl], ["tanh"],
                          LOSS_SCALE)
    for name, (a, g) in zip(("h", "o"), rows):
      assert_close(captures[name].inputs[0][sl], a)
      assert_close(captures[name].out_grads[0][sl], g)
