"""K-FAC (KAISA) against Adam and SGD-momentum on scikit-learn's digits.

Trains a Flax MLP and a small Flax CNN on the 8x8 digits that ship inside the
scikit-learn wheel (no download), each with three optimizers fed exactly the
same minibatches from the same initial parameters:

* ``kaisa + sgd``: ``kaisa_jax.kaisa`` chained before SGD with momentum;
* ``adam``: ``optax.adam``;
* ``sgd``: ``optax.sgd`` with momentum.

Every ``--eval-every`` steps the loss on the whole training set is measured
(outside the clock). At the end it prints a table (steps and seconds to reach
the training-loss target, final training loss, final test accuracy) and writes
``digits.png`` (training loss against steps and against seconds) and
``digits.json`` (every curve and the summary) to ``--out``.

Timing: each train step is compiled ahead of time, before the clock starts,
so the seconds are training compute only: no compilation, no evaluation.

Run from the repository root::

  python examples/digits.py               # the full comparison, about a minute on 2 CPU cores
  python examples/digits.py --quick       # a few steps, for tests
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
import tqdm
from sklearn import datasets
from sklearn import model_selection

import kaisa_jax

matplotlib.use("Agg")
import matplotlib.pyplot as plt

# Hyperparameters, shared by both models.
BATCH_SIZE = 128
TEST_SIZE = 360  # of 1797 images: 1437 to train on, 360 to test on
ADAM_LR = 3e-3
SGD_LR = 0.1
MOMENTUM = 0.9
KFAC = dict(
    learning_rate=0.1,  # of the SGD that follows; kaisa uses it for the KL clip
    # With a mean loss the output gradients carry 1/batch, so the batch G
    # factors are tiny (~1e-6) and G starts as the identity: damping of this
    # size keeps the preconditioned step in check as the identity decays.
    damping=0.1,
    factor_decay=0.9,
    factor_update_steps=5,
    inv_update_steps=20,
    kl_clip=1e-3,
)
OPTIMIZERS = ("kaisa + sgd", "adam", "sgd")


# --------------------------------------------------------------------------- data


def load_data(seed: int) -> dict[str, np.ndarray]:
  """The digits as (N, 8, 8, 1) float32 images in [0, 1] and int32 labels."""
  digits = datasets.load_digits()
  images = (digits.images / 16.0).astype(np.float32)[..., None]
  labels = digits.target.astype(np.int32)
  x_train, x_test, y_train, y_test = model_selection.train_test_split(
      images, labels, test_size=TEST_SIZE, random_state=seed, stratify=labels)
  return dict(x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)


def batch_indices(num_examples: int, batch_size: int, steps: int,
                  seed: int) -> np.ndarray:
  """(steps, batch_size) example indices: successive shuffled epochs.

  The incomplete batch at the end of each epoch is dropped, so that every
  step sees a full batch (one compiled shape).
  """
  rng = np.random.default_rng(seed)
  per_epoch = num_examples // batch_size
  epochs = -(-steps // per_epoch)
  batches = [rng.permutation(num_examples)[:per_epoch * batch_size]
             .reshape(per_epoch, batch_size) for _ in range(epochs)]
  return np.concatenate(batches)[:steps]


# --------------------------------------------------------------------------- models


class MLP(nn.Module):
  """Two hidden ReLU layers on the flattened image."""
  hidden: int = 128

  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(self.hidden)(x))
    x = nn.relu(nn.Dense(self.hidden)(x))
    return nn.Dense(10)(x)


class CNN(nn.Module):
  """Two 3x3 convolutions (the second with stride 2) and a dense classifier."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(16, (3, 3))(x))  # (B, 8, 8, 16)
    x = nn.relu(nn.Conv(32, (3, 3), strides=(2, 2))(x))  # (B, 4, 4, 32)
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(64)(x))
    return nn.Dense(10)(x)


MODELS = {"MLP": MLP(), "CNN": CNN()}


def make_loss(model: nn.Module) -> Callable[..., jax.Array]:
  """The mean cross-entropy ``loss(params, x, y)`` of ``model``."""

  def loss_fn(params, x, y):
    logits = model.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  return loss_fn


def make_evaluate(model: nn.Module) -> Callable[..., dict[str, jax.Array]]:
  """A jitted ``evaluate(params, x, y) -> {"loss": mean loss, "accuracy": ...}``."""

  @jax.jit
  def evaluate(params, x, y):
    logits = model.apply({"params": params}, x)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == y)}

  return evaluate


@dataclasses.dataclass(frozen=True)
class Problem:
  """What ``train`` needs to know about a model: its loss, metrics and optimizers.

  ``evaluate(params, x, y)`` returns a dict of metrics with "loss" among
  them; ``make_optimizer(name, layers)`` builds the optimizer called name.
  """
  model: nn.Module
  loss_fn: Callable[..., jax.Array]
  evaluate: Callable[..., dict[str, jax.Array]]
  make_optimizer: Callable[[str, kaisa_jax.LayerRegistry], optax.GradientTransformation]


def digits_problem(model: nn.Module) -> Problem:
  return Problem(model, make_loss(model), make_evaluate(model), make_optimizer)


# --------------------------------------------------------------------------- optimizers


def make_optimizer(name: str, layers: kaisa_jax.LayerRegistry, *, kfac: dict = KFAC,
                   adam_lr: float = ADAM_LR, sgd_lr: float = SGD_LR):
  """The optax optimizer called ``name``; K-FAC needs the layer registry.

  ``kfac`` holds the arguments of ``kaisa_jax.kaisa``; its ``learning_rate``
  is also the learning rate of the SGD-momentum that follows it.
  """
  if name == "kaisa + sgd":
    return optax.chain(
        kaisa_jax.kaisa(layers, **kfac),
        optax.sgd(kfac["learning_rate"], momentum=MOMENTUM))
  if name == "adam":
    return optax.adam(adam_lr)
  if name == "sgd":
    return optax.sgd(sgd_lr, momentum=MOMENTUM)
  raise ValueError(f"unknown optimizer {name!r}")


def make_train_step(loss_fn, opt: optax.GradientTransformation, uses_captures: bool):
  """``train_step(params, opt_state, x, y) -> (params, opt_state, loss)``.

  K-FAC needs the layer captures, which ``kaisa_jax.value_and_grad`` returns
  with the gradient; the first-order optimizers use ``jax.value_and_grad``.
  """

  def train_step(params, opt_state, x, y):
    if uses_captures:
      loss, grads, captures = kaisa_jax.value_and_grad(loss_fn)(params, x, y)
      updates, opt_state = opt.update(grads, opt_state, params, captures=captures)
    else:
      loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
      updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return train_step


# --------------------------------------------------------------------------- training


def train(problem: Problem, opt_name: str, data, batches: np.ndarray,
          eval_every: int, seed: int, desc: str) -> dict[str, Any]:
  """Trains ``problem``'s model with one optimizer; returns its curves.

  The clock runs only over training steps: it is stopped for evaluation,
  and the step is compiled (ahead of time) before it starts.
  """
  x, y = data["x_train"], data["y_train"]
  params = problem.model.init(jax.random.key(seed), x[:1])["params"]
  layers = kaisa_jax.find_layers(problem.loss_fn, params, x[batches[0]], y[batches[0]])
  opt = problem.make_optimizer(opt_name, layers)
  opt_state = opt.init(params)
  step_fn = jax.jit(make_train_step(problem.loss_fn, opt, opt_name.startswith("kaisa")))
  step_fn = step_fn.lower(params, opt_state, x[batches[0]], y[batches[0]]).compile()

  curve = dict(step=[], seconds=[])

  def record(step, seconds):
    curve["step"].append(step)
    curve["seconds"].append(seconds)
    for split in ("train", "test"):
      for name, value in problem.evaluate(params, data[f"x_{split}"], data[f"y_{split}"]).items():
        curve.setdefault(f"{split}_{name}", []).append(float(value))

  record(0, 0.0)
  batch_loss, elapsed = [], 0.0
  bar = tqdm.trange(len(batches), desc=desc, leave=True, dynamic_ncols=True)
  start = time.perf_counter()
  for i in bar:
    params, opt_state, loss = step_fn(params, opt_state, x[batches[i]], y[batches[i]])
    batch_loss.append(loss)
    if (i + 1) % eval_every == 0 or i + 1 == len(batches):
      jax.block_until_ready(params)
      elapsed += time.perf_counter() - start
      record(i + 1, elapsed)
      bar.set_postfix(train_loss=f"{curve['train_loss'][-1]:.4f}")
      start = time.perf_counter()
  curve["batch_loss"] = [float(l) for l in batch_loss]
  return curve


def first_reached(curve: dict[str, list], target: float):
  """(step, seconds) of the first evaluation at or below ``target``, or Nones."""
  for step, seconds, loss in zip(curve["step"], curve["seconds"], curve["train_loss"]):
    if loss <= target:
      return int(step), seconds
  return None, None


def summarize(labels: dict[str, Any], curve, target: float) -> dict[str, Any]:
  """One table row: ``labels`` (model, optimizer, ...) and the run's figures."""
  steps, seconds = first_reached(curve, target)
  row = dict(labels, steps_to_target=steps, seconds_to_target=seconds,
             final_train_loss=curve["train_loss"][-1],
             final_test_loss=curve["test_loss"][-1],
             ms_per_step=1e3 * curve["seconds"][-1] / max(curve["step"][-1], 1))
  if "test_accuracy" in curve:
    row["final_test_accuracy"] = curve["test_accuracy"][-1]
  return row


# --------------------------------------------------------------------------- reporting


def format_table(summary: list[dict[str, Any]], target: float, labels: tuple[str, ...]) -> str:
  """The summary as an aligned text table; ``labels`` are its leading columns."""
  accuracy = "final_test_accuracy" in summary[0]
  header = labels + (f"steps to {target:g}", f"seconds to {target:g}", "final train loss",
                     "test accuracy" if accuracy else "test loss", "ms/step")
  rows = [header]
  for s in summary:
    reached = s["steps_to_target"] is not None
    rows.append(tuple(str(s[k]) for k in labels) + (
        str(s["steps_to_target"]) if reached else "not reached",
        f"{s['seconds_to_target']:.2f}" if reached else "not reached",
        f"{s['final_train_loss']:.4f}",
        f"{100 * s['final_test_accuracy']:.1f}%" if accuracy else f"{s['final_test_loss']:.4f}",
        f"{s['ms_per_step']:.2f}"))
  widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
  lines = ["  ".join(c.ljust(w) if i < len(labels) else c.rjust(w)
                     for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
  lines.insert(1, "  ".join("-" * w for w in widths))
  return "\n".join(lines)


def plot(curves: dict[str, dict[str, Any]], target: float, path: str):
  """Training loss against steps (left) and seconds (right), one row per model."""
  fig, axes = plt.subplots(len(curves), 2, figsize=(11, 4 * len(curves)),
                           squeeze=False)
  for row, (model_name, runs) in zip(axes, curves.items()):
    for opt_name, curve in runs.items():
      for ax, x_key in zip(row, ("step", "seconds")):
        ax.plot(curve[x_key], curve["train_loss"], marker=".", label=opt_name)
    for ax, x_label in zip(row, ("step", "seconds (training only)")):
      ax.axhline(target, color="gray", linestyle="--", linewidth=1,
                 label=f"target {target:g}")
      ax.set_yscale("log")
      ax.set_xlabel(x_label)
      ax.set_ylabel("training loss (full training set)")
      ax.set_title(f"{model_name}: training loss vs {x_label.split()[0]}")
      ax.grid(True, which="both", alpha=0.3)
      ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def finite_or_none(value):
  """JSON has no NaN or infinity: write them as null."""
  if isinstance(value, float) and not math.isfinite(value):
    return None
  if isinstance(value, dict):
    return {k: finite_or_none(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [finite_or_none(v) for v in value]
  return value


def write_json(path: str, config, summary, curves):
  with open(path, "w") as f:
    json.dump(finite_or_none(dict(config=config, summary=summary, curves=curves)),
              f, indent=1)


# --------------------------------------------------------------------------- main


def parse_args(argv=None, *, name: str = "digits", steps: int = 300, target: float = 0.01,
               description: str = __doc__) -> argparse.Namespace:
  """The command line of an example called ``name`` (its outputs: ``name``.png/.json)."""
  parser = argparse.ArgumentParser(description=description.split("\n\n")[0])
  parser.add_argument("--steps", type=int, default=steps, help="training steps per run")
  parser.add_argument("--eval-every", type=int, default=10,
                      help="evaluate on the full training set every this many steps")
  parser.add_argument("--target", type=float, default=target,
                      help="training-loss target for steps/seconds to target")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default=os.path.join("results", name),
                      help=f"directory for {name}.png and {name}.json")
  parser.add_argument("--quick", action="store_true",
                      help="a tiny run (20 steps) for tests")
  args = parser.parse_args(argv)
  if args.quick:
    args.steps, args.eval_every = 20, 5
  return args


def main(argv=None):
  args = parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  data = load_data(args.seed)
  batches = batch_indices(len(data["x_train"]), BATCH_SIZE, args.steps, args.seed)

  for model_name, model in MODELS.items():
    params = model.init(jax.random.key(args.seed), data["x_train"][:1])["params"]
    print(f"\n{model_name}: layers K-FAC preconditions")
    print(kaisa_jax.find_layers(make_loss(model), params, data["x_train"][:BATCH_SIZE],
                                data["y_train"][:BATCH_SIZE]))
  print()

  curves, summary = {}, []
  for model_name, model in MODELS.items():
    curves[model_name] = {}
    for opt_name in OPTIMIZERS:
      curve = train(digits_problem(model), opt_name, data, batches, args.eval_every,
                    args.seed, desc=f"{model_name} {opt_name}")
      curves[model_name][opt_name] = curve
      summary.append(summarize(dict(model=model_name, optimizer=opt_name), curve,
                               args.target))

  print()
  print(format_table(summary, args.target, ("model", "optimizer")))
  print("seconds: training steps only, compiled ahead of time, evaluation excluded")

  config = dict(steps=args.steps, batch_size=BATCH_SIZE, eval_every=args.eval_every,
                target=args.target, seed=args.seed, train_size=len(data["x_train"]),
                test_size=len(data["x_test"]), adam_lr=ADAM_LR, sgd_lr=SGD_LR,
                momentum=MOMENTUM, kfac=KFAC, backend=jax.default_backend())
  png = os.path.join(args.out, "digits.png")
  json_path = os.path.join(args.out, "digits.json")
  plot(curves, args.target, png)
  write_json(json_path, config, summary, curves)
  print(f"wrote {png} and {json_path}")


if __name__ == "__main__":
  main()
