"""The sampled Fisher: sampled_fisher_loss and value_and_grad(fisher="sampled")."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, PartitionSpec as P

import kaisa_jax
from oracles import assert_close

BATCH, CLASSES = 3, 4


def assert_trees_close(actual, expected):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  jax.tree.map(assert_close, actual, expected)


def per_example_grads(distribution, outputs, keys):
  """(samples, batch, ...) gradients of the sampled loss w.r.t. the outputs."""
  grad = jax.grad(lambda o, k: kaisa_jax.sampled_fisher_loss(o, k, distribution))
  return np.asarray(jax.jit(jax.vmap(grad, in_axes=(None, 0)))(outputs, keys), np.float64)


def np_fisher(distribution, outputs):
  """Per example, the analytic Fisher of the output distribution (float64)."""
  z = np.asarray(outputs, np.float64)
  if distribution == "softmax":
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.stack([np.diag(q) - np.outer(q, q) for q in p])
  if distribution == "sigmoid":
    p = 1 / (1 + np.exp(-z))
    return np.stack([np.diag(q * (1 - q)) for q in p])
  return np.stack([np.eye(z.shape[-1])] * z.shape[0])


@pytest.mark.parametrize("distribution", ["softmax", "sigmoid", "gaussian"])
def test_second_moment_is_the_fisher(distribution):
  rng = np.random.default_rng(0)
  outputs = jnp.asarray(rng.normal(size=(BATCH, CLASSES)) * 1.5, jnp.float32)
  samples = 20000
  g = per_example_grads(distribution, outputs, jax.random.split(jax.random.key(1), samples))
  g *= BATCH  # the mean over the batch puts 1/batch into each example's gradient
  expected = np_fisher(distribution, outputs)
  moment = np.einsum("sbi,sbj->bij", g, g) / samples
  # Monte Carlo: 20000 draws of entries of size <= 1 give errors of about 1e-2.
  np.testing.assert_allclose(moment, expected, atol=0.03)
  np.testing.assert_allclose(g.mean(axis=0), 0.0, atol=0.03)  # unbiased: E[g] = 0


@pytest.mark.parametrize("distribution", ["softmax", "sigmoid"])
def test_each_draw_is_a_prediction_minus_a_label(distribution):
  rng = np.random.default_rng(2)
  outputs = jnp.asarray(rng.normal(size=(BATCH, CLASSES)), jnp.float32)
  g = BATCH * per_example_grads(distribution, outputs, jax.random.split(jax.random.key(3), 50))
  z = np.asarray(outputs, np.float64)
  if distribution == "softmax":
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
  else:
    p = 1 / (1 + np.exp(-z))
  labels = p[None] - g  # must be 0/1: one-hot (softmax) or Bernoulli draws (sigmoid)
  np.testing.assert_allclose(labels, np.round(labels), atol=1e-5)
  assert set(np.unique(np.round(labels))) <= {0.0, 1.0}
  if distribution == "softmax":
    np.testing.assert_allclose(np.round(labels).sum(-1), 1.0)


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Dense(5)(x))
    return nn.Dense(CLASSES)(h)


MODEL = MLP()


def loss_with_fisher(params, x, y, key):
  logits = MODEL.apply({"params": params}, x)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  return loss, kaisa_jax.sampled_fisher_loss(logits, key)


def true_loss(params, x, y):
  return loss_with_fisher(params, x, y, jax.random.key(0))[0]


def mlp_batch(seed, batch=8):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(batch, 6)).astype(np.float32)
  y = rng.integers(0, CLASSES, size=(batch,)).astype(np.int32)
  return x, y


def test_value_and_grad_sampled_takes_grads_from_the_loss_and_captures_from_the_samples():
  x, y = mlp_batch(4)
  params = MODEL.init(jax.random.key(5), x)["params"]
  key = jax.random.key(6)
  loss, grads, captures = jax.jit(kaisa_jax.value_and_grad(loss_with_fisher, fisher="sampled"))(
      params, x, y, key)
  expected_loss, expected_grads = jax.value_and_grad(true_loss)(params, x, y)
  assert_close(loss, expected_loss)
  assert_trees_close(grads, expected_grads)

  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  h = np.maximum(x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"], 0)
  z = h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]
  prob = np.exp(z - z.max(-1, keepdims=True))
  prob /= prob.sum(-1, keepdims=True)
  g_out = np.asarray(captures["Dense_1"].out_grads[0], np.float64)
  labels = prob - len(x) * g_out  # one-hot draws, not the data's labels
  np.testing.assert_allclose(labels, np.round(labels), atol=1e-5)
  np.testing.assert_allclose(np.round(labels).sum(-1), 1.0)
  # The hidden layer's output gradient is the same sampled loss's, back one layer.
  g_hidden = (g_out @ p["Dense_1"]["kernel"].T) * (h > 0)
  assert_close(captures["Dense_0"].out_grads[0], g_hidden)
  assert_close(captures["Dense_0"].inputs[0], x)
  # And it is not the empirical one (the data's labels).
  _, _, empirical = kaisa_jax.value_and_grad(true_loss)(params, x, y)
  assert not np.allclose(empirical["Dense_1"].out_grads[0], g_out)


def test_sampled_fisher_under_shard_map_is_each_devices_own():
  num_devices = 2
  x, y = mlp_batch(7, batch=8)
  params = MODEL.init(jax.random.key(8), x)["params"]
  key = jax.random.key(9)
  mesh = Mesh(np.array(jax.devices()[:num_devices]), ("data",))
  vg = kaisa_jax.value_and_grad(loss_with_fisher, fisher="sampled")

  def per_device(params, x, y, key):
    _, grads, captures = vg(params, x, y, key)
    _, empirical_grads, _ = kaisa_jax.value_and_grad(true_loss)(params, x, y)
    return grads, empirical_grads, captures

  run = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P("data"), P("data"), P()),
                              out_specs=(P(), P(), P("data"))))
  grads, empirical_grads, captures = run(params, x, y, key)
  half = len(x) // num_devices
  for d in range(num_devices):
    sl = slice(d * half, (d + 1) * half)
    _, _, local = jax.jit(vg)(params, x[sl], y[sl], key)
    assert_close(captures["Dense_1"].out_grads[0][sl], local["Dense_1"].out_grads[0])
  # The gradient is the loss's, reduced over the devices as the empirical path's is.
  assert_trees_close(grads, empirical_grads)


@pytest.mark.parametrize("call, match", [
    (lambda: kaisa_jax.value_and_grad(true_loss, fisher="true"), "fisher must be one of"),
    (lambda: kaisa_jax.sampled_fisher_loss(jnp.zeros((2, 3)), jax.random.key(0), "poisson"),
     "distribution must be one of"),
    (lambda: kaisa_jax.sampled_fisher_loss(jnp.zeros(()), jax.random.key(0)), "leading batch axis"),
    (lambda: kaisa_jax.value_and_grad(true_loss, fisher="sampled")(
        MODEL.init(jax.random.key(0), jnp.zeros((1, 6)))["params"], *mlp_batch(0)),
     "must return \\(loss, fisher_loss\\)"),
])
def test_bad_fisher_input_raises(call, match):
  with pytest.raises(ValueError, match=match):
    call()
