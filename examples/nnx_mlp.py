"""K-FAC (KAISA) on a Flax NNX model: an MLP on scikit-learn's digits.

The NNX pattern: split the model into a graph definition and its parameters
(an ``nnx.State``, a pytree of arrays), write the loss as a function of the
parameters that rebuilds the model with ``nnx.merge``, and hand kaisa_jax
that loss and those parameters, exactly as for a flax.linen model::

  graphdef, params = nnx.split(model)
  def loss_fn(params, x, y):
    logits = nnx.merge(graphdef, params)(x)
    ...
  layers = kaisa_jax.find_layers(loss_fn, params, x, y)

``kaisa + sgd`` (K-FAC chained before SGD with momentum) and ``adam`` are
trained on the same minibatches from the same initial weights, each step
under ``jax.jit``; the losses are printed as they go. The 8x8 digits ship
inside the scikit-learn wheel (no download).

Run from the repository root::

  python examples/nnx_mlp.py              # 200 steps per optimizer, about 10 s on 2 CPU cores
  python examples/nnx_mlp.py --steps 20
  python examples/nnx_mlp.py --scan-blocks 4   # the hidden layers stacked, under nnx.scan

With ``--scan-blocks K`` the second hidden layer becomes K residual blocks
whose parameters are stacked by ``nnx.vmap`` and applied in turn by
``nnx.scan``, each block under ``nnx.remat``: K-FAC keeps one Kronecker
block per slice (the registry shows 'dense (scan, K stacked)').
"""

from __future__ import annotations

import argparse

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn import datasets

import kaisa_jax

import digits  # the training step shared with the main demo

BATCH_SIZE = 128
KFAC = dict(learning_rate=0.1, damping=0.1, factor_decay=0.9, factor_update_steps=5,
            inv_update_steps=20, kl_clip=1e-3)


class Residual(nnx.Module):
  """x + relu(Linear(x)), width kept."""

  def __init__(self, rngs: nnx.Rngs, hidden: int):
    self.dense = nnx.Linear(hidden, hidden, rngs=rngs)

  def __call__(self, x):
    return x + jax.nn.relu(self.dense(x))


class MLP(nnx.Module):
  """64 pixels -> 128 -> 128 -> 10 classes, ReLU.

  With ``scan_blocks`` K > 0, the second hidden layer is K residual blocks,
  stacked (their kernels (K, 128, 128)) and scanned over.
  """

  def __init__(self, rngs: nnx.Rngs, hidden: int = 128, scan_blocks: int = 0):
    self.hidden1 = nnx.Linear(64, hidden, rngs=rngs)
    if scan_blocks:
      make = nnx.vmap(lambda rngs: Residual(rngs, hidden), in_axes=0, out_axes=0)
      self.blocks = make(rngs.split(scan_blocks))
    else:
      self.hidden2 = nnx.Linear(hidden, hidden, rngs=rngs)
    self.out = nnx.Linear(hidden, 10, rngs=rngs)

  def __call__(self, x):  # x: (batch, 64) -> logits (batch, 10)
    x = jax.nn.relu(self.hidden1(x))
    if hasattr(self, "blocks"):
      apply = nnx.remat(lambda block, x: block(x))
      x = nnx.scan(apply, in_axes=(0, nnx.Carry), out_axes=nnx.Carry)(self.blocks, x)
    else:
      x = jax.nn.relu(self.hidden2(x))
    return self.out(x)


def load_digits():
  """(1797, 64) float32 pixels in [0, 1] and (1797,) int32 labels."""
  digits = datasets.load_digits()
  return (digits.data / 16.0).astype(np.float32), digits.target.astype(np.int32)


def make_optimizer(name: str, layers: kaisa_jax.LayerRegistry) -> optax.GradientTransformation:
  if name == "kaisa + sgd":
    return optax.chain(kaisa_jax.kaisa(layers, **KFAC),
                       optax.sgd(KFAC["learning_rate"], momentum=0.9))
  return optax.adam(3e-3)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--steps", type=int, default=200, help="training steps per optimizer")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--scan-blocks", type=int, default=0,
                      help="K > 0: the second hidden layer as K stacked residual blocks "
                           "under nnx.scan")
  args = parser.parse_args(argv)

  x_all, y_all = load_digits()
  graphdef, params0 = nnx.split(MLP(nnx.Rngs(args.seed), scan_blocks=args.scan_blocks))

  def loss_fn(params, x, y):
    logits = nnx.merge(graphdef, params)(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  layers = kaisa_jax.find_layers(loss_fn, params0, x_all[:BATCH_SIZE], y_all[:BATCH_SIZE])
  print(layers, end="\n\n")

  rng = np.random.default_rng(args.seed)
  batches = [rng.choice(len(x_all), BATCH_SIZE, replace=False) for _ in range(args.steps)]
  full_loss = jax.jit(loss_fn)

  for name in ("kaisa + sgd", "adam"):
    opt = make_optimizer(name, layers)
    train_step = jax.jit(digits.make_train_step(loss_fn, opt, uses_captures=name == "kaisa + sgd"))
    params, opt_state = params0, opt.init(params0)
    print(f"{name}:")
    for step, idx in enumerate(batches):
      params, opt_state, loss = train_step(params, opt_state, x_all[idx], y_all[idx])
      if step % max(1, args.steps // 10) == 0 or step == args.steps - 1:
        print(f"  step {step:4d}  batch loss {float(loss):.4f}")
    logits = nnx.merge(graphdef, params)(jnp.asarray(x_all))
    accuracy = float(jnp.mean(jnp.argmax(logits, -1) == y_all))
    print(f"  final loss on all 1797 digits {float(full_loss(params, x_all, y_all)):.4f}, "
          f"accuracy {accuracy:.3f}")


if __name__ == "__main__":
  main()
