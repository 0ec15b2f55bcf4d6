"""A deep autoencoder on scikit-learn's digits: K-FAC's classic showcase.

The network squeezes each 8x8 digit (64 pixels) through a 16-unit code and
rebuilds it (64-128-64-16-64-128-64, tanh), trained to the squared error
``0.5 * sum((x_hat - x)^2)`` per image, mean over the batch. Deep, narrow and
badly conditioned, it is the kind of problem where curvature pays (Martens
and Grosse trained its MNIST big brother in the K-FAC paper).

It trains with ``kaisa + sgd``, Adam and SGD-momentum on the same batches at
two batch sizes: 128 and 1024 (of 1437 training images), the large batch
being where a second-order method should gain the most over first-order
ones. It prints a table (steps and seconds to a training-loss target, final
training and test loss) and writes ``autoencoder.png`` and
``autoencoder.json`` to ``--out``.

Run from the repository root::

  python examples/autoencoder.py            # about a minute on 2 CPU cores
  python examples/autoencoder.py --quick    # a few steps, for tests
"""

from __future__ import annotations

import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp

import kaisa_jax

import digits  # the data, the training loop and the report, shared with the main demo

BATCH_SIZES = (128, 1024)
TARGET = 0.5  # training loss; about 13 at the start
ADAM_LR = 3e-3
SGD_LR = 0.03
# From benchmarks/convergence.py's grid at batch 128 (the best there; a KL
# clip of 1e-2 or more failed at that batch size). Per-example G lets the
# same damping serve both batch sizes.
KFAC = dict(learning_rate=0.3, damping=0.01, factor_decay=0.95, factor_update_steps=5,
            inv_update_steps=20, kl_clip=1e-3, g_factor_scaling="per_example")


class Autoencoder(nn.Module):
  """64 -> 128 -> 64 -> 16 (the code) -> 64 -> 128 -> 64, tanh between."""
  widths: tuple[int, ...] = (128, 64, 16, 64, 128)

  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    pixels = x.shape[-1]
    for width in self.widths:
      x = nn.tanh(nn.Dense(width)(x))
    return nn.Dense(pixels)(x)


def squared_error(reconstruction: jax.Array, images: jax.Array) -> jax.Array:
  """Per image: ``0.5 * sum((reconstruction - image)^2)`` over its pixels."""
  diff = reconstruction - images.reshape(images.shape[0], -1)
  return 0.5 * jnp.sum(diff * diff, axis=-1)


def make_loss(model: nn.Module):
  """The mean squared error ``loss(params, x, y)``; ``y`` is ignored (it is x)."""

  def loss_fn(params, x, y):
    del y
    return squared_error(model.apply({"params": params}, x), x).mean()

  return loss_fn


def make_evaluate(model: nn.Module):
  """A jitted ``evaluate(params, x, y) -> {"loss": mean squared error}``."""

  @jax.jit
  def evaluate(params, x, y):
    del y
    return {"loss": squared_error(model.apply({"params": params}, x), x).mean()}

  return evaluate


OPTIMIZERS = ("kaisa + sgd", "adam", "sgd")


def load_data(seed: int) -> dict:
  """The digits split of the main demo; the targets are the images themselves."""
  data = digits.load_data(seed)
  return dict(data, y_train=data["x_train"], y_test=data["x_test"])


def main(argv=None):
  args = digits.parse_args(argv, name="autoencoder", steps=400, target=TARGET,
                           description=__doc__)
  os.makedirs(args.out, exist_ok=True)
  data = load_data(args.seed)
  model = Autoencoder()
  make_optimizer = functools.partial(digits.make_optimizer, kfac=KFAC, adam_lr=ADAM_LR,
                                     sgd_lr=SGD_LR)
  problem = digits.Problem(model, make_loss(model), make_evaluate(model), make_optimizer)
  params = model.init(jax.random.key(args.seed), data["x_train"][:1])["params"]
  print("layers K-FAC preconditions")
  print(kaisa_jax.find_layers(problem.loss_fn, params, data["x_train"][:8], data["x_train"][:8]))

  curves, summary = {}, []
  for batch_size in BATCH_SIZES:
    label = f"batch {batch_size}"
    batches = digits.batch_indices(len(data["x_train"]), batch_size, args.steps, args.seed)
    curves[label] = {}
    for opt_name in OPTIMIZERS:
      curve = digits.train(problem, opt_name, data, batches, args.eval_every, args.seed,
                           desc=f"{label} {opt_name}")
      curves[label][opt_name] = curve
      summary.append(digits.summarize(dict(batch=batch_size, optimizer=opt_name), curve,
                                      args.target))

  print()
  print(digits.format_table(summary, args.target, ("batch", "optimizer")))
  print("loss: 0.5 * squared error summed over the 64 pixels, mean over images; "
        "seconds: training steps only")
  config = dict(steps=args.steps, batch_sizes=BATCH_SIZES, eval_every=args.eval_every,
                target=args.target, seed=args.seed, adam_lr=ADAM_LR, sgd_lr=SGD_LR,
                momentum=digits.MOMENTUM, kfac=KFAC, backend=jax.default_backend())
  png = os.path.join(args.out, "autoencoder.png")
  json_path = os.path.join(args.out, "autoencoder.json")
  digits.plot(curves, args.target, png)
  digits.write_json(json_path, config, summary, curves)
  print(f"wrote {png} and {json_path}")


if __name__ == "__main__":
  main()
