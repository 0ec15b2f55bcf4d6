"""kaisa_jax.TrainState: Flax's TrainState with the captures passed to kaisa.

Flax's ImageNet train_step pattern (BatchNorm statistics as a mutable
collection, the loss's aux, a subclass with ``batch_stats``) takes the same
step as calling the optimizer by hand; under pmap the state is created inside
the map and the run equals one device on the global batch.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kaisa_jax
import test_distributed as dist


class BatchNormNet(nn.Module):

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = nn.Conv(4, (3, 3))(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    return nn.Dense(3)(jnp.tanh(x).reshape(x.shape[0], -1))


class TrainState(kaisa_jax.TrainState):
  batch_stats: Any


def imagenet_style_loss(apply_fn):
  def loss_fn(params, batch_stats, x, y):
    out, updates = apply_fn({"params": params, "batch_stats": batch_stats}, x,
                            mutable=["batch_stats"])
    return jnp.mean(jnp.sum((out - y) ** 2, axis=-1)), updates["batch_stats"]
  return loss_fn


def test_apply_gradients_with_captures_is_the_optimizer_step():
  model = BatchNormNet()
  x, y = next(dist.batches())
  variables = model.init(jax.random.key(0), x)
  loss_fn = imagenet_style_loss(model.apply)
  layers = kaisa_jax.find_layers(loss_fn, variables["params"], variables["batch_stats"], x, y)
  assert {l.kind for l in layers} == {"conv", "batch_norm", "dense"} and not layers.skipped
  tx = optax.chain(kaisa_jax.kaisa(layers, kl_clip=1e-2), optax.sgd(0.1, momentum=0.9))
  state = TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx,
                            batch_stats=variables["batch_stats"])

  @jax.jit
  def train_step(state, x, y):
    (loss, batch_stats), grads, captures = kaisa_jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, state.batch_stats, x, y)
    return state.apply_gradients(grads=grads, captures=captures, batch_stats=batch_stats), loss

  # The same steps by hand: tx.update with the captures, optax.apply_updates.
  params, opt_state, batch_stats = variables["params"], tx.init(variables["params"]), \
      variables["batch_stats"]
  for x, y in list(dist.batches())[:3]:
    state, _ = train_step(state, x, y)
    (_, new_stats), grads, captures = kaisa_jax.value_and_grad(loss_fn, has_aux=True)(
        params, batch_stats, x, y)
    updates, opt_state = tx.update(grads, opt_state, params, captures=captures)
    params, batch_stats = optax.apply_updates(params, updates), new_stats
  assert int(state.step) == 3
  for a, b in zip(jax.tree.leaves((state.params, state.batch_stats)),
                  jax.tree.leaves((params, batch_stats))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  # And the step did precondition: plain SGD-momentum gives other parameters.
  sgd = TrainState.create(apply_fn=model.apply, params=variables["params"],
                          tx=optax.sgd(0.1, momentum=0.9), batch_stats=variables["batch_stats"])
  x, y = next(dist.batches())
  (_, _), grads, _ = kaisa_jax.value_and_grad(loss_fn, has_aux=True)(
      sgd.params, sgd.batch_stats, x, y)
  plain = sgd.apply_gradients(grads=grads)  # no captures: any optax optimizer
  assert not np.allclose(np.asarray(plain.params["Dense_0"]["kernel"]),
                         np.asarray(train_step(TrainState.create(
                             apply_fn=model.apply, params=variables["params"], tx=tx,
                             batch_stats=variables["batch_stats"]), x, y)[0]
                             .params["Dense_0"]["kernel"]), rtol=1e-3)


def test_overwrite_with_gradient_entries_are_refused():
  params = {"params": {"w": jnp.ones(2)}, "_overwrite_with_gradient": {"s": jnp.ones(1)}}
  state = kaisa_jax.TrainState.create(apply_fn=None, params=params, tx=optax.sgd(0.1))
  with pytest.raises(ValueError, match="overwrite_with_gradient"):
    state.apply_gradients(grads=params)


@pytest.mark.slow
def test_created_inside_pmap_matches_one_device():
  x, y = next(dist.batches())
  layers = kaisa_jax.find_layers(dist.loss_fn, dist.initial_params(), x, y)
  single = dist.run_single(layers, "eigen")
  n = 2
  tx = dist.make_opt(layers, "eigen", axis_name=dist.AXIS)
  # With kaisa(axis_name=...), tx.init needs the axis: create the state inside the map.
  create = jax.pmap(lambda p: kaisa_jax.TrainState.create(apply_fn=dist.MODEL.apply, params=p,
                                                          tx=tx),
                    axis_name=dist.AXIS, devices=jax.devices()[:n])
  state = create(jax.tree.map(lambda a: jnp.stack([a] * n), dist.initial_params()))

  def train_step(state, x, y):
    _, grads, captures = kaisa_jax.value_and_grad(dist.loss_fn)(state.params, x, y)
    return state.apply_gradients(grads=grads, captures=captures)

  step = jax.pmap(train_step, axis_name=dist.AXIS, devices=jax.devices()[:n])
  split = lambda a: a.reshape((n, -1) + a.shape[1:])
  trajectory = []
  for x, y in dist.batches():
    state = step(state, split(x), split(y))
    trajectory.append(jax.tree.map(lambda a: a[0], state.params))
  dist.assert_trajectories_close(trajectory, single)
