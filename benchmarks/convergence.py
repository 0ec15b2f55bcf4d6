"""Convergence: steps and seconds to a training-loss target, against the peers.

Tasks (scikit-learn's digits, embedded in the wheel): the MLP and the CNN of
``examples/digits.py`` (cross-entropy) and the deep autoencoder of
``examples/autoencoder.py`` (squared error), each at two batch sizes. On
request, ``transformer``: the character-level decoder-only transformer of
``examples/transformer.py`` on its generated text, at batch 32, with a
*validation*-loss target, against AdamW (its own optimizers and grids, see
``TASK_OPTIMIZERS`` and ``TASK_GRIDS``).

Optimizers, all in this process, from the same initial parameters on the
same batches:

* ``adam``, ``sgd`` (momentum 0.9): optax;
* ``adamw``: optax, weight decay on kernels and embeddings only;
* ``kaisa``: ``kaisa_jax.kaisa`` (G as the loss gives it, the reference's
  convention) chained before SGD-momentum;
* ``kaisa/pe``: the same with ``g_factor_scaling="per_example"``;
* ``kaisa/reduce``: ``kaisa/pe`` with ``weight_sharing="reduce"`` (on
  request, with the ``tokens`` task: a Dense network over the 8 image rows
  as tokens, where K-FAC-expand and K-FAC-reduce differ);
* ``kaisa/sampled``: ``kaisa/pe`` with the sampled Fisher
  (``value_and_grad(fisher="sampled")``, targets drawn from the model's
  softmax or unit Gaussian; on request);
* ``kaisa/ekfac``: ``kaisa/pe`` with ``compute_method="ekfac"``
  (eigenvalue-corrected K-FAC; on request);
* ``kaisa/adamw``, ``kaisa/reduce-adamw``: ``kaisa/pe`` (weight sharing
  'expand', resp. 'reduce') chained before AdamW instead of SGD-momentum,
  without the KL clip (AdamW rescales every coordinate by its own second
  moment, so a clip that scales the whole step by one factor does little);
* ``kfac-jax``: DeepMind's ``kfac_jax.Optimizer`` with a fixed learning rate,
  momentum 0.9 and a fixed damping, the same factor and inverse periods as
  ours (skipped with a message when ``kfac_jax`` is not installed; its
  release 0.0.8 needs jax 0.9.1 and flax 0.12.6).

Protocol. Every optimizer gets the same kind of small grid (learning rates,
and damping and KL clip for the K-FAC ones), run on the grid seed; the configuration
that reaches the target in the fewest steps (fewest seconds on a tie; the
lowest final loss if none reaches it) is then run on the report seeds (the
initial parameters and the batch order change with the seed). The training
loss on the whole training set is measured every ``--eval-every`` steps,
outside the clock; each step function is compiled before the clock starts
(ours ahead of time, kfac-jax's by warm-up steps on a throw-away copy). A run
stops at the target, at the step budget, or when its loss is not finite.
The grid varies the learning rate and damping through
``optax.inject_hyperparams``, so ours compile once per task.

Run from the repository root::

  python benchmarks/convergence.py                 # every task (tens of minutes)
  python benchmarks/convergence.py --tasks mlp --batch-sizes 128
  python benchmarks/convergence.py --tasks tokens --optimizers adam kaisa/pe kaisa/reduce
  python benchmarks/convergence.py --optimizers adam sgd kaisa/pe kaisa/sampled
  python benchmarks/convergence.py --tasks autoencoder mlp --optimizers adam kaisa/pe kaisa/ekfac
  python benchmarks/convergence.py --tasks transformer      # AdamW against K-FAC, ~13 min
  python benchmarks/convergence.py --quick         # a smoke run

It prints a table per task and a summary, and writes ``convergence.json``,
``convergence.md`` (the tables) and ``convergence.png`` (loss against steps
and seconds, the chosen configurations on the first report seed) to
``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import statistics
import sys
import time
from typing import Any, Callable, Optional

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax

import kaisa_jax

import autoencoder  # examples/autoencoder.py
import digits  # examples/digits.py
import transformer  # examples/transformer.py

matplotlib.use("Agg")
import matplotlib.pyplot as plt

try:
  import kfac_jax
except ImportError:  # the peer is optional
  kfac_jax = None

MOMENTUM = 0.9


@dataclasses.dataclass(frozen=True)
class Task:
  """A model, its loss and its loss target.

  By default the data are the digits, the target is on the loss over the
  whole training set and the batch sizes are 128 and 1024. ``load_data``
  (returning x_train, y_train, x_test, y_test), ``eval_split`` ('test': the
  target is on the held-out split's loss) and ``batch_sizes`` change that.
  """
  model: Any
  kind: str  # 'classify' (softmax cross-entropy) or 'reconstruct' (squared error)
  target: float
  load_data: Optional[Callable[[], dict]] = None
  eval_split: str = "train"
  batch_sizes: tuple[int, ...] = (128, 1024)

  @property
  def loss_key(self) -> str:
    """The name of the measured loss in a curve."""
    return "train_loss" if self.eval_split == "train" else "valid_loss"


class TokenMLP(nn.Module):
  """The 8 image rows as 8 tokens of 8 pixels: two Dense layers shared over the
  tokens, then a dense classifier on all of them (the weight-sharing study)."""

  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[0], 8, -1)  # (B, 8 tokens, 8 pixels)
    x = nn.relu(nn.Dense(64)(x))
    x = nn.relu(nn.Dense(64)(x))  # (B, 8, 64)
    return nn.Dense(10)(x.reshape(x.shape[0], -1))


TASKS = {
    "mlp": Task(digits.MLP(), "classify", target=0.005),
    "cnn": Task(digits.CNN(), "classify", target=0.005),
    "autoencoder": Task(autoencoder.Autoencoder(), "reconstruct", target=0.35),
    "tokens": Task(TokenMLP(), "classify", target=0.005),
    # The next-character cross-entropy (nats) over every position, measured on
    # 128 held-out windows of 64 characters; AdamW reaches it in about 350
    # steps, at the end of the fast fall and before the slow tail.
    "transformer": Task(transformer.Transformer(vocab=len(transformer.VOCAB)), "classify",
                        target=transformer.TARGET, load_data=transformer.load_data,
                        eval_split="test", batch_sizes=(transformer.BATCH_SIZE,)),
}
# The weight-sharing study (K-FAC-expand against K-FAC-reduce on "tokens")
# runs on request: --tasks tokens --optimizers adam kaisa/pe kaisa/reduce.
DEFAULT_TASKS = ("mlp", "cnn", "autoencoder")

# The grids. Every optimizer gets four learning rates' worth of search. Ours
# also get the damping and the KL clip: when the clip is active the step is
# lr * nu * P with nu ~ 1/lr, so kl_clip, not lr, sets its length. kfac-jax
# (no clip in this setting) gets three learning rates and three dampings.
# Damping means different things: with 'loss' scaling a mean loss puts
# 1/batch² into G (G ~ 1e-6 here), with 'per_example' (and in kfac-jax) G is
# the per-example Fisher block.
_KFAC_GRID = dict(learning_rate=(0.1, 0.3), damping=(1e-2, 1e-1), kl_clip=(1e-3, 1e-2, 1e-1))
GRIDS = {
    "adam": dict(learning_rate=(1e-3, 3e-3, 1e-2, 3e-2)),
    "sgd": dict(learning_rate=(0.03, 0.1, 0.3, 1.0)),
    "kaisa": _KFAC_GRID,
    "kaisa/pe": _KFAC_GRID,
    "kaisa/reduce": _KFAC_GRID,
    "kaisa/sampled": _KFAC_GRID,
    "kaisa/ekfac": _KFAC_GRID,
    "kfac-jax": dict(learning_rate=(0.03, 0.1, 0.3), damping=(1e-3, 1e-2, 1e-1)),
    # The transformer's: AdamW and K-FAC chained before it.
    "adamw": dict(learning_rate=(1e-3, 3e-3, 1e-2), weight_decay=(0.0, 0.1)),
    "kaisa/adamw": dict(learning_rate=(1e-3, 3e-3, 1e-2), damping=(1e-2, 1e-1)),
    "kaisa/reduce-adamw": dict(learning_rate=(1e-3, 3e-3, 1e-2), damping=(1e-2, 1e-1)),
}
OPTIMIZERS = tuple(GRIDS)
DEFAULT_OPTIMIZERS = tuple(
    name for name in OPTIMIZERS
    if name not in ("kaisa/reduce", "kaisa/sampled", "kaisa/ekfac", "adamw", "kaisa/adamw",
                    "kaisa/reduce-adamw"))
FIRST_ORDER = ("adam", "sgd", "adamw")
# A task's own optimizers, when --optimizers is not given, and its own grids
# (in place of GRIDS' entries).
# (The transformer's kaisa/reduce, before SGD, on request: its runs are the
# longest, and expand against reduce is compared before AdamW.)
TASK_OPTIMIZERS = {
    "transformer": ("adamw", "kaisa/adamw", "kaisa/reduce-adamw", "kaisa/pe"),
}
TASK_GRIDS = {
    # Four configurations each, to keep a full run within about 20 minutes on
    # 2 CPU cores. kl_clip=1e-1 diverged after 300-400 steps in a trial run
    # (lr 0.1 and 0.3, damping 1e-2); 1e-2 did not.
    "transformer": {
        "kaisa/pe": dict(learning_rate=(0.1, 0.3), damping=(1e-2, 1e-1), kl_clip=(1e-2,)),
        "kaisa/reduce": dict(learning_rate=(0.1, 0.3), damping=(1e-2, 1e-1), kl_clip=(1e-2,)),
    },
}
# Shared by both K-FAC libraries: the curvature every FACTOR_EVERY steps, the
# decompositions (kfac-jax: inverses) every INVERSE_EVERY.
FACTOR_EVERY, INVERSE_EVERY, FACTOR_DECAY = 5, 20, 0.95


# --------------------------------------------------------------------------- losses


def per_example_loss(task: Task, model_out, y, x):
  if task.kind == "classify":
    return optax.softmax_cross_entropy_with_integer_labels(model_out, y)
  return autoencoder.squared_error(model_out, x)


def make_fisher_loss(task: Task):
  """``loss(params, x, y, key) -> (loss, sampled Fisher loss)`` for fisher='sampled'."""
  distribution = "softmax" if task.kind == "classify" else "gaussian"

  def loss_fn(params, x, y, key):
    out = task.model.apply({"params": params}, x)
    loss = per_example_loss(task, out, y, x).mean()
    return loss, kaisa_jax.sampled_fisher_loss(out, key, distribution)

  return loss_fn


def make_loss(task: Task, register: bool = False):
  """``loss(params, x, y)``, the batch mean; ``register`` tells kfac-jax what it is."""

  def loss_fn(params, x, y):
    out = task.model.apply({"params": params}, x)
    if register:
      if task.kind == "classify":
        kfac_jax.register_softmax_cross_entropy_loss(out, y)
      else:  # kfac-jax's squared error is sum((t - p)²) per example: weight 0.5
        kfac_jax.register_squared_error_loss(out, x.reshape(x.shape[0], -1), weight=0.5)
    return per_example_loss(task, out, y, x).mean()

  return loss_fn


# --------------------------------------------------------------------------- our optimizers


def optax_optimizer(name: str, layers) -> optax.GradientTransformation:
  """The optimizer ``name`` with its grid's hyperparameters injected (placeholders)."""
  sgd = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1, momentum=MOMENTUM)
  # The mask is a function of the params, not a schedule: static.
  adamw = optax.inject_hyperparams(optax.adamw, static_args=("mask",))(
      learning_rate=1e-3, weight_decay=0.0, mask=transformer.decay_mask)
  if name == "adam":
    return optax.inject_hyperparams(optax.adam)(learning_rate=1e-3)
  if name == "sgd":
    return sgd
  if name == "adamw":
    return adamw
  scaling = "loss" if name == "kaisa" else "per_example"
  weight_sharing = "reduce" if name in ("kaisa/reduce", "kaisa/reduce-adamw") else "expand"
  then_adamw = name in ("kaisa/adamw", "kaisa/reduce-adamw")
  kfac = optax.inject_hyperparams(
      kaisa_jax.kaisa,
      static_args=("factor_update_steps", "inv_update_steps", "accumulation_steps",
                   "grad_worker_frac"))(
          layers=layers, damping=0.1, learning_rate=0.1, factor_decay=FACTOR_DECAY,
          kl_clip=None if then_adamw else 1e-3, factor_update_steps=FACTOR_EVERY,
          inv_update_steps=INVERSE_EVERY, g_factor_scaling=scaling,
          weight_sharing=weight_sharing,
          compute_method="ekfac" if name == "kaisa/ekfac" else "eigen",
          # Layer kinds the library lists but cannot precondition: plain gradient.
          skip_layers=transformer.skipped_layers(layers))
  return optax.chain(kfac, adamw if then_adamw else sgd)


def set_hyperparams(state, values: dict) -> set:
  """Writes ``values`` into every injected-hyperparameter state that has them.

  Returns the names written, so that a misspelt or missing one is caught.
  """
  if hasattr(state, "hyperparams"):  # an optax.inject_hyperparams state
    written = set()
    for key, value in values.items():
      if key in state.hyperparams:
        state.hyperparams[key] = jnp.asarray(value, state.hyperparams[key].dtype)
        written.add(key)
    return written
  if isinstance(state, tuple):
    return set().union(*(set_hyperparams(inner, values) for inner in state))
  return set()


class OptaxRunner:
  """One compiled step per (task, batch size, optimizer); configs are state values."""

  def __init__(self, name: str, task: Task, x0, y0):
    self.loss_fn = make_loss(task)
    params = task.model.init(jax.random.key(0), x0[:1])["params"]
    self.uses_captures = name.startswith("kaisa")
    self.sampled = name == "kaisa/sampled"
    self.fisher_loss = make_fisher_loss(task) if self.sampled else None
    layers = (kaisa_jax.find_layers(self.loss_fn, params, x0, y0)
              if self.uses_captures else None)
    self.opt = optax_optimizer(name, layers)
    self.init = jax.jit(self.opt.init)
    self.step = jax.jit(self._step).lower(params, self.init(params), x0, y0,
                                          np.int32(0)).compile()

  def _step(self, params, state, x, y, step):
    if self.sampled:  # a fresh key every step, derived inside the compiled step
      key = jax.random.fold_in(jax.random.key(0), step)
      _, grads, captures = kaisa_jax.value_and_grad(self.fisher_loss, fisher="sampled")(
          params, x, y, key)
      updates, state = self.opt.update(grads, state, params, captures=captures)
    elif self.uses_captures:
      _, grads, captures = kaisa_jax.value_and_grad(self.loss_fn)(params, x, y)
      updates, state = self.opt.update(grads, state, params, captures=captures)
    else:
      grads = jax.grad(self.loss_fn)(params, x, y)
      updates, state = self.opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  def start(self, params, config: dict):
    state = self.init(params)
    missing = set(config) - set_hyperparams(state, config)
    if missing:
      raise ValueError(f"no injected hyperparameter named {sorted(missing)}")
    return lambda p, s, x, y, i: self.step(p, s, x, y, np.int32(i)), state


class KfacJaxRunner:
  """kfac-jax's own Optimizer; it compiles per configuration (its design)."""

  def __init__(self, task: Task, x0, y0):
    self.task, self.x0, self.y0 = task, x0, y0
    self.value_and_grad = jax.value_and_grad(
        lambda params, batch: make_loss(task, register=True)(params, *batch))

  def start(self, params, config: dict):
    opt = kfac_jax.Optimizer(
        value_and_grad_func=self.value_and_grad, l2_reg=0.0,
        use_adaptive_learning_rate=False, learning_rate_schedule=constant(config["learning_rate"]),
        use_adaptive_momentum=False, momentum_schedule=constant(MOMENTUM),
        use_adaptive_damping=False, damping_schedule=constant(config["damping"]),
        curvature_ema=FACTOR_DECAY, curvature_update_period=FACTOR_EVERY,
        inverse_update_period=INVERSE_EVERY, num_burnin_steps=0, multi_device=False)
    rng = jax.random.key(0)
    batch = (self.x0, self.y0)
    # Warm-up on a throw-away copy: kfac-jax compiles inside its first steps
    # (and donates its inputs, hence the copies).
    warm_params = copy(params)
    warm_state = opt.init(warm_params, rng, batch)
    for i in range(2):
      warm_params, warm_state, _ = opt.step(warm_params, warm_state, jax.random.fold_in(rng, i),
                                            batch=batch, global_step_int=i)
    jax.block_until_ready(warm_params)
    state = opt.init(copy(params), rng, batch)

    def step(p, s, x, y, i):
      p, s, _ = opt.step(p, s, jax.random.fold_in(rng, i), batch=(x, y), global_step_int=i)
      return p, s

    return step, state


def constant(value: float) -> Callable:
  return lambda step: jnp.asarray(value, jnp.float32)


def copy(tree):
  return jax.tree.map(lambda a: jnp.array(a, copy=True), tree)


# --------------------------------------------------------------------------- one run


def run(runner, task: Task, config: dict, data, batch_size: int, seed: int,
        max_steps: int, eval_every: int) -> dict:
  """Trains from seed's parameters on seed's batches until the target or the budget.

  The loss is measured on the task's ``eval_split`` (the whole split) and
  recorded under ``task.loss_key``.
  """
  x, y = data["x_train"], data["y_train"]
  eval_x, eval_y = data[f"x_{task.eval_split}"], data[f"y_{task.eval_split}"]
  params = task.model.init(jax.random.key(seed), x[:1])["params"]
  batches = digits.batch_indices(len(x), batch_size, max_steps, seed)
  evaluate = make_evaluate(task)
  step, state = runner.start(copy(params), config)
  params = copy(params)
  losses = [float(evaluate(params, eval_x, eval_y))]
  curve = {"step": [0], "seconds": [0.0], task.loss_key: losses}
  elapsed = 0.0
  start = time.perf_counter()
  for i, idx in enumerate(batches):
    params, state = step(params, state, x[idx], y[idx], i)
    if (i + 1) % eval_every and i + 1 < max_steps:
      continue
    jax.block_until_ready(params)
    elapsed += time.perf_counter() - start
    loss = float(evaluate(params, eval_x, eval_y))
    curve["step"].append(i + 1)
    curve["seconds"].append(elapsed)
    losses.append(loss)
    if not math.isfinite(loss) or loss <= task.target:
      break
    start = time.perf_counter()
  reached = [(s, t) for s, t, l in zip(curve["step"], curve["seconds"], losses)
             if l <= task.target]
  curve["steps_to_target"], curve["seconds_to_target"] = reached[0] if reached else (None, None)
  curve["ms_per_step"] = 1e3 * curve["seconds"][-1] / max(curve["step"][-1], 1)
  return curve


_EVALUATORS = {}


def make_evaluate(task: Task):
  """A jitted mean training loss of ``task`` (cached: one compile per task)."""
  if id(task) not in _EVALUATORS:
    _EVALUATORS[id(task)] = jax.jit(make_loss(task))
  return _EVALUATORS[id(task)]


def measured_loss(curve: dict) -> list:
  """The curve's measured losses: on the training set or, for a task with a
  held-out target, on the validation split."""
  return curve["train_loss"] if "train_loss" in curve else curve["valid_loss"]


def rank(curve: dict) -> tuple:
  """Sort key: reached first, then fewer steps, then fewer seconds, then lower loss."""
  loss = measured_loss(curve)[-1]
  if curve["steps_to_target"] is None:
    return (1, 0, 0, loss if math.isfinite(loss) else math.inf)
  return (0, curve["steps_to_target"], curve["seconds_to_target"], 0)


def configs(name: str, task_name: Optional[str] = None) -> list[dict]:
  grid = TASK_GRIDS.get(task_name, {}).get(name, GRIDS[name])
  return [dict(zip(grid, values)) for values in itertools.product(*grid.values())]


# --------------------------------------------------------------------------- one task


def benchmark_task(task_name: str, batch_size: int, optimizers, data, args) -> dict:
  task = TASKS[task_name]
  data = task_data(task_name, data)
  x0, y0 = data["x_train"][:batch_size], data["y_train"][:batch_size]
  results = {}
  for name in optimizers:
    runner = (KfacJaxRunner(task, x0, y0) if name == "kfac-jax"
              else OptaxRunner(name, task, x0, y0))
    grid = []
    for config in configs(name, task_name):
      curve = run(runner, task, config, data, batch_size, args.grid_seed,
                  args.max_steps, args.eval_every)
      grid.append(dict(config=config, steps_to_target=curve["steps_to_target"],
                       seconds_to_target=curve["seconds_to_target"],
                       final_loss=measured_loss(curve)[-1]))
      print(f"  {task_name} b{batch_size} {name:9s} {fmt_config(config):28s} "
            f"steps {fmt(curve['steps_to_target'])} seconds {fmt(curve['seconds_to_target'], 2)} "
            f"final loss {measured_loss(curve)[-1]:.4g}", flush=True)
    best = min(range(len(grid)), key=lambda k: rank_grid(grid[k]))
    config = grid[best]["config"]
    seeds = [run(runner, task, config, data, batch_size, seed, args.max_steps,
                 args.eval_every) for seed in args.seeds]
    results[name] = dict(config=config, grid=grid, seeds=seeds, **summarize(seeds))
    # Every kfac-jax configuration compiles its own step: without this the
    # process runs out of memory maps for compiled code within a full run.
    del runner
    jax.clear_caches()
    _EVALUATORS.clear()
  return results


_TASK_DATA = {}


def task_data(task_name: str, digits_data: dict) -> dict:
  """The task's data: the digits, or its own (loaded once per process)."""
  task = TASKS[task_name]
  if task.load_data is None:
    return digits_data
  if task_name not in _TASK_DATA:
    _TASK_DATA[task_name] = task.load_data()
  return _TASK_DATA[task_name]


def rank_grid(entry: dict) -> tuple:
  return rank(dict(steps_to_target=entry["steps_to_target"],
                   seconds_to_target=entry["seconds_to_target"],
                   train_loss=[entry["final_loss"]]))


def summarize(curves: list[dict]) -> dict:
  """Medians over the seeds; a run that misses the target counts as missing it."""
  steps = [c["steps_to_target"] for c in curves]
  seconds = [c["seconds_to_target"] for c in curves]
  reached = all(s is not None for s in steps)
  return dict(
      reached=f"{sum(s is not None for s in steps)}/{len(steps)}",
      median_steps=statistics.median(steps) if reached else None,
      median_seconds=statistics.median(seconds) if reached else None,
      ms_per_step=statistics.median(c["ms_per_step"] for c in curves))


# --------------------------------------------------------------------------- report


def fmt(value, digits_after: int = 0) -> str:
  if value is None:
    return "-"
  return f"{value:.{digits_after}f}"


def fmt_config(config: dict) -> str:
  names = dict(learning_rate="lr", damping="damping", kl_clip="kl_clip", weight_decay="wd")
  return " ".join(f"{names[k]}={v:g}" for k, v in config.items())


def task_table(task_name: str, batch_size: int, results: dict) -> str:
  """Markdown: per optimizer its choice, steps, seconds and ratios to the best first-order."""
  firsts = [r for n, r in results.items() if n in FIRST_ORDER and r["median_steps"] is not None]
  best_steps = min((r["median_steps"] for r in firsts), default=None)
  best_seconds = min((r["median_seconds"] for r in firsts), default=None)
  task = TASKS[task_name]
  target = f"target {task.target:g}"
  if task.eval_split != "train":
    target = f"validation-loss target {task.target:g}"
  lines = [f"**{task_name}, batch {batch_size}** ({target})", "",
           "| optimizer | chosen | reached | steps | seconds | ms/step | steps / best 1st-order "
           "| seconds / best 1st-order |",
           "|---|---|---|---:|---:|---:|---:|---:|"]
  for name, r in results.items():
    steps_ratio = (r["median_steps"] / best_steps
                   if r["median_steps"] is not None and best_steps else None)
    seconds_ratio = (r["median_seconds"] / best_seconds
                     if r["median_seconds"] is not None and best_seconds else None)
    lines.append(f"| {name} | {fmt_config(r['config'])} | {r['reached']} | "
                 f"{fmt(r['median_steps'])} | {fmt(r['median_seconds'], 2)} | "
                 f"{r['ms_per_step']:.2f} | {fmt(steps_ratio, 2)} | {fmt(seconds_ratio, 2)} |")
  return "\n".join(lines)


def plot(all_results: dict, path: str):
  rows = list(all_results.items())
  fig, axes = plt.subplots(len(rows), 2, figsize=(11, 3.6 * len(rows)), squeeze=False)
  for ax_row, (key, results) in zip(axes, rows):
    task_name = key.split(" ")[0]
    # A diverging run would stretch the axis over 30 decades: cut it off.
    top = 3 * max(measured_loss(r["seeds"][0])[0] for r in results.values())
    for name, r in results.items():
      curve = r["seeds"][0]
      for ax, x_key in zip(ax_row, ("step", "seconds")):
        ax.plot(curve[x_key], measured_loss(curve), marker=".", label=name)
    for ax, x_label in zip(ax_row, ("step", "seconds")):
      ax.axhline(TASKS[task_name].target, color="gray", linestyle="--", linewidth=1)
      ax.set_yscale("log")
      ax.set_ylim(top=top)
      ax.set_xlabel(x_label)
      ax.set_ylabel("training loss" if TASKS[task_name].eval_split == "train"
                    else "validation loss")
      ax.set_title(f"{key}: loss vs {x_label}")
      ax.grid(True, which="both", alpha=0.3)
      ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


# --------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--tasks", nargs="+", choices=list(TASKS),
                      help=f"default: {' '.join(DEFAULT_TASKS)} (--quick: mlp)")
  parser.add_argument("--batch-sizes", nargs="+", type=int,
                      help="default: each task's (128 1024; transformer: 32; --quick: the first)")
  parser.add_argument("--optimizers", nargs="+", choices=OPTIMIZERS,
                      help=f"default: {' '.join(DEFAULT_OPTIMIZERS)}, or the task's own "
                      "(transformer: " + " ".join(TASK_OPTIMIZERS["transformer"]) + ")")
  parser.add_argument("--max-steps", type=int, default=600)
  parser.add_argument("--eval-every", type=int, default=10)
  parser.add_argument("--grid-seed", type=int, default=0)
  parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3],
                      help="report seeds (the grid runs on --grid-seed)")
  parser.add_argument("--periods", nargs=2, type=int, default=[FACTOR_EVERY, INVERSE_EVERY],
                      metavar=("FACTOR", "INVERSE"),
                      help="both K-FAC libraries' factor and decomposition periods")
  parser.add_argument("--out", default=os.path.join("results", "convergence"))
  parser.add_argument("--quick", action="store_true", help="a smoke run: one task, few steps")
  args = parser.parse_args(argv)
  if args.tasks is None:
    args.tasks = ["mlp"] if args.quick else list(DEFAULT_TASKS)
  if args.quick:
    args.seeds = [1]
    args.max_steps, args.eval_every = 20, 5
    for grids in [GRIDS] + list(TASK_GRIDS.values()):
      for name, grid in grids.items():
        grids[name] = {key: values[1:2] or values[:1] for key, values in grid.items()}
  return args


def batch_sizes(task_name: str, args) -> list[int]:
  if args.batch_sizes is not None:
    return list(args.batch_sizes)
  sizes = list(TASKS[task_name].batch_sizes)
  return sizes[:1] if args.quick else sizes


def task_optimizers(task_name: str, args) -> list[str]:
  """--optimizers, else the task's own list, else the default; kfac-jax only if installed."""
  if args.optimizers is not None:
    names = list(args.optimizers)
  else:
    names = list(TASK_OPTIMIZERS.get(task_name, DEFAULT_OPTIMIZERS))
  return [name for name in names if name != "kfac-jax" or kfac_jax is not None]


def main(argv=None):
  global FACTOR_EVERY, INVERSE_EVERY
  args = parse_args(argv)
  FACTOR_EVERY, INVERSE_EVERY = args.periods
  wanted = set().union(*(
      args.optimizers or TASK_OPTIMIZERS.get(task_name, DEFAULT_OPTIMIZERS)
      for task_name in args.tasks))
  if "kfac-jax" in wanted and kfac_jax is None:
    print("kfac-jax is not installed: skipping it (pip install kfac-jax==0.0.8 "
          "jax==0.9.1 jaxlib==0.9.1 flax==0.12.6 to compare)")
  os.makedirs(args.out, exist_ok=True)
  data = digits.load_data(0)
  print(f"jax {jax.__version__} on {jax.default_backend()}; kfac-jax "
        f"{getattr(kfac_jax, '__version__', 'not installed')}")
  all_results, tables = {}, []
  for task_name in args.tasks:
    for batch_size in batch_sizes(task_name, args):
      results = benchmark_task(task_name, batch_size, task_optimizers(task_name, args), data,
                               args)
      all_results[f"{task_name} b{batch_size}"] = results
      tables.append(task_table(task_name, batch_size, results))
      print("\n" + tables[-1] + "\n", flush=True)

  settings = (f"seeds {args.seeds} (grid on seed {args.grid_seed}), at most "
              f"{args.max_steps} steps, loss on the whole training set (transformer: the "
              f"validation windows) every {args.eval_every} steps; K-FAC: factors every {FACTOR_EVERY}, "
              f"decompositions every {INVERSE_EVERY}, factor decay {FACTOR_DECAY}; jax {jax.__version__}, {jax.default_backend()}")
  with open(os.path.join(args.out, "convergence.md"), "w") as f:
    f.write(settings + "\n\n" + "\n\n".join(tables) + "\n")
  with open(os.path.join(args.out, "convergence.json"), "w") as f:
    json.dump(digits.finite_or_none(dict(settings=settings, grids=GRIDS, task_grids=TASK_GRIDS,
                                         results=all_results)), f, indent=1)
  plot(all_results, os.path.join(args.out, "convergence.png"))
  print(f"wrote convergence.md, convergence.json and convergence.png to {args.out}")


if __name__ == "__main__":
  main()
