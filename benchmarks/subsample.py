"""Factors from a subsample of the batch: their error and what a factor step saves.

On ``step_time.py``'s MLP (64 -> 512 -> 512 -> 10) and CNN on digits at one
batch size, for each ``factor_subsample`` size k (strided examples):

* error: per layer, ``|F_k - F| / |F|`` (Frobenius) of the batch factors A
  and G of k examples against those of the whole batch, both in float64
  from the same captures, the median over ``--batches`` batches; and the
  error of the preconditioned gradient, ``|P_k - P| / |P|`` over the whole
  model, P the damped Kronecker solve (``--damping``) of the whole batch's
  gradient with each layer's running factors after ``--batches`` factor
  steps (decay 0.95 from I), in float64;
* time: the median of a jitted factor step (value_and_grad, a kaisa + SGD
  update that folds in the batch's factors, no decomposition: periods
  (1, 10**9)) over an Adam step on the same batches, the sizes interleaved
  in rounds.

A default process: nothing set. On CPU read the ratios.

  python benchmarks/subsample.py
  python benchmarks/subsample.py --model cnn --batch 1024 --sizes 128 256 1024
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import step_time  # noqa: E402  (the models, data and train step)

import kaisa_jax  # noqa: E402
from kaisa_jax._src import factors as factors_lib  # noqa: E402
from kaisa_jax._src import subsample as subsample_lib  # noqa: E402

DECAY = 0.95


def batch_factors(layers, captures, size) -> dict:
  """{layer: (A, G)} of one batch in float64, from ``size`` strided examples (None: all)."""
  out = {}
  for layer in layers:
    capture = captures[layer.name]
    if size is not None:
      capture = subsample_lib.subsample_capture(layer, capture, size, None, per_example=False)
    f = factors_lib.batch_factors(layer, capture, jnp.float64)
    out[layer.name] = (np.asarray(f.a_factor), np.asarray(f.g_factor))
  return out


def preconditioned(layers, factors: dict, grads: dict, damping: float) -> np.ndarray:
  """The damped Kronecker solve of every layer's gradient matrix, end to end (float64)."""
  pieces = []
  for layer in layers:
    a, g = factors[layer.name]
    inv = lambda m: np.linalg.inv(m + damping * np.eye(m.shape[0]))
    pieces.append((inv(g) @ grads[layer.name] @ inv(a)).ravel())
  return np.concatenate(pieces)


def errors(layers, loss_fn, params, batches, sizes, damping) -> dict:
  """{size: {'A', 'G' (medians over layers and batches), 'P'}} in float64."""
  rel = lambda x, y: float(np.linalg.norm(x - y) / np.linalg.norm(y))
  running = {k: {l.name: (np.eye(l.a_size), np.eye(l.g_size)) for l in layers}
             for k in sizes + [None]}
  per_size = {k: {"A": [], "G": []} for k in sizes}
  with jax.enable_x64(True):
    params64 = jax.tree.map(lambda p: jnp.asarray(p, jnp.float64), params)
    for x, y in batches:
      _, grads, captures = kaisa_jax.value_and_grad(loss_fn)(params64, jnp.asarray(x),
                                                             jnp.asarray(y))
      full = batch_factors(layers, captures, None)
      for k in sizes + [None]:
        sampled = full if k is None else batch_factors(layers, captures, k)
        for name, (a, g) in sampled.items():
          ra, rg = running[k][name]
          running[k][name] = (DECAY * ra + (1 - DECAY) * a, DECAY * rg + (1 - DECAY) * g)
          if k is not None:
            per_size[k]["A"].append(rel(a, full[name][0]))
            per_size[k]["G"].append(rel(g, full[name][1]))
    by_path = dict(jax.tree_util.tree_flatten_with_path(grads)[0])
    mats = {l.name: np.asarray(l.grad_matrix(by_path[l.kernel_path],
                                             by_path[l.bias_path] if l.has_bias else None))
            for l in layers}
  exact = preconditioned(layers, running[None], mats, damping)
  return {k: {"A": statistics.median(v["A"]), "G": statistics.median(v["G"]),
              "P": rel(preconditioned(layers, running[k], mats, damping), exact)}
          for k, v in per_size.items()}


def factor_step_times(model, layers, params, batches, sizes, rounds) -> dict:
  """{size or 'adam': median step ms}, interleaved in ``rounds``."""
  loss_fn = step_time.make_loss(model)
  runs = {}
  for k in sizes + ["adam"]:
    if k == "adam":
      opt, captures = optax.adam(1e-3), False
    else:
      opt = optax.chain(kaisa_jax.kaisa(layers, factor_update_steps=1,
                                        inv_update_steps=10**9, factor_subsample=k),
                        optax.sgd(0.1))
      captures = True
    step = step_time.make_step(loss_fn, opt, captures)
    p = jax.tree.map(jnp.copy, params)
    state = opt.init(p)
    for x, y in batches[:3]:  # compile, and the step-0 decomposition
      p, state, loss = step(p, state, x, y)
    jax.block_until_ready(loss)
    runs[k] = [p, state, step, []]
  per_round = max(1, len(batches) // rounds)
  for r in range(rounds):
    for k, run in runs.items():
      for x, y in batches[r * per_round:(r + 1) * per_round]:
        start = time.perf_counter()
        run[0], run[1], loss = run[2](run[0], run[1], x, y)
        jax.block_until_ready(loss)
        run[3].append(time.perf_counter() - start)
  return {k: 1e3 * statistics.median(run[3]) for k, run in runs.items()}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--model", choices=sorted(step_time.MODELS), default="mlp")
  parser.add_argument("--batch", type=int, default=1024)
  parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256, 512, 1024])
  parser.add_argument("--batches", type=int, default=60,
                      help="batches for the errors (the running factors forget I: 0.95^60 = 5 %%)")
  parser.add_argument("--steps", type=int, default=100, help="timed steps per size")
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--damping", type=float, default=1e-3)
  args = parser.parse_args(argv)
  if max(args.sizes) > args.batch:
    parser.error(f"--sizes must be at most --batch ({args.batch}).")
  images, labels = step_time.digits()
  model = step_time.MODELS[args.model]()
  loss_fn = step_time.make_loss(model)
  batches = step_time.make_batches(images, labels, args.batch, args.steps + 3, seed=0)
  params = model.init(jax.random.key(0), batches[0][0][:1])["params"]
  layers = kaisa_jax.find_layers(loss_fn, params, *batches[0])
  err = errors(list(layers), loss_fn, params, batches[:args.batches], args.sizes, args.damping)
  ms = factor_step_times(model, layers, params, batches, args.sizes, args.rounds)
  print(f"{args.model}, batch {args.batch}, jax {jax.__version__}, {jax.default_backend()}, "
        f"{os.cpu_count()} cores; errors: medians over {args.batches} batches and "
        f"{len(layers)} layers, P after {args.batches} factor steps, damping {args.damping}")
  print(f"\n{'k':>5}  {'A error':>8}  {'G error':>8}  {'P error':>8}  {'factor step ms':>14}  "
        f"{'x adam':>6}  {'x k=batch':>9}")
  full = ms.get(args.batch)
  for k in args.sizes:
    vs_full = f"{ms[k] / full:9.2f}" if full else f"{'-':>9}"
    print(f"{k:>5}  {err[k]['A']:8.3f}  {err[k]['G']:8.3f}  {err[k]['P']:8.3f}  "
          f"{ms[k]:14.2f}  {ms[k] / ms['adam']:6.2f}  {vs_full}")
  print(f"adam step: {ms['adam']:.2f} ms")


if __name__ == "__main__":
  main()
