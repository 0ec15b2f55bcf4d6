"""Layers inside ``nn.scan``: the example transformer, its blocks scanned or unrolled.

Builds the character transformer of ``examples/transformer.py`` twice with
the same parameters: its blocks as separate modules ("unrolled") and as one
``nn.scan`` over a block with stacked parameters ("scan"). K-FAC gives each
slice of a stacked layer its own Kronecker block, so the two are the same
optimizer; this measures what the scan changes:

* the compile time of one jitted train step of kaisa -> AdamW (the
  example's settings, with factors every step and a decomposition every 10
  to time both), and of AdamW alone;
* the median step time of each, and kaisa's ratio to AdamW (steps that
  decompose are timed apart: their median is printed on its own line);
* how far the two models' parameters are apart after the timed steps from
  the same start (largest relative difference of a leaf), which must be
  float32 rounding.

  python benchmarks/scan.py
  python benchmarks/scan.py --blocks 2 8 --steps 40
  python benchmarks/scan.py --blocks 4 --d-model 512 --heads 8 --context 256  # accelerator-sized

On CPU the absolute times mean little: read the ratios.
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

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
import transformer  # examples/transformer.py

import kaisa_jax

VOCAB = len(transformer.VOCAB)
INV_EVERY = 10


def make_optimizer(name: str, layers):
  if name == "adamw":
    return optax.adamw(transformer.ADAMW["learning_rate"],
                       weight_decay=transformer.ADAMW["weight_decay"])
  settings = dict(transformer.KFAC_ADAMW, factor_update_steps=1, inv_update_steps=INV_EVERY)
  return optax.chain(kaisa_jax.kaisa(layers, **settings),
                     optax.adamw(settings["learning_rate"], weight_decay=0.0))


def make_step(model, name: str, layers):
  opt = make_optimizer(name, layers)
  loss_fn = transformer.make_loss(model)

  def step(params, state, x, y):
    if name == "adamw":
      grads = jax.grad(loss_fn)(params, x, y)
      updates, state = opt.update(grads, state, params)
    else:
      _, grads, captures = kaisa_jax.value_and_grad(loss_fn)(params, x, y)
      updates, state = opt.update(grads, state, params, captures=captures)
    return optax.apply_updates(params, updates), state

  return opt, jax.jit(step)


def unrolled_params(stacked: dict, blocks: int) -> dict:
  """The scanned model's parameters laid out as the unrolled model's."""
  params = {k: v for k, v in stacked.items() if k != "blocks"}
  for i in range(blocks):
    params[f"block{i}"] = jax.tree.map(lambda leaf: leaf[i], stacked["blocks"]["block"])
  return params


def run(model, name, params, batches, layers) -> dict:
  opt, step = make_step(model, name, layers)
  state = opt.init(params)
  x, y = batches[0]
  start = time.perf_counter()
  compiled = step.lower(params, state, x, y).compile()
  compile_s = time.perf_counter() - start
  times, decompose_times = [], []  # AdamW's every-10th steps are timed apart too
  for i, (x, y) in enumerate(batches):
    start = time.perf_counter()
    params, state = compiled(params, state, x, y)
    jax.block_until_ready(params)
    if i > 0:  # the first run pays for the allocations
      (decompose_times if i % INV_EVERY == 0 else times).append(time.perf_counter() - start)
  return dict(compile_s=compile_s, step_ms=1e3 * statistics.median(times),
              decompose_ms=(1e3 * statistics.median(decompose_times)
                            if decompose_times else float("nan")),
              params=params)


def relative_gap(a: dict, b: dict) -> float:
  return max(float(jnp.linalg.norm(x - y) / jnp.linalg.norm(y))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--blocks", type=int, nargs="+", default=[2, 8])
  parser.add_argument("--steps", type=int, default=31)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--d-model", type=int, default=transformer.D_MODEL)
  parser.add_argument("--heads", type=int, default=transformer.HEADS)
  parser.add_argument("--context", type=int, default=transformer.CONTEXT,
                      help="characters per window (default %(default)s)")
  parser.add_argument("--batch", type=int, default=transformer.BATCH_SIZE,
                      help="windows per batch (default %(default)s)")
  args = parser.parse_args(argv)
  rng = np.random.default_rng(args.seed)
  batches = [tuple(jnp.asarray(rng.integers(0, VOCAB, (args.batch, args.context)), jnp.int32)
                   for _ in range(2)) for _ in range(args.steps)]
  size = dict(d_model=args.d_model, heads=args.heads, context=args.context)
  print(f"jax {jax.__version__}, {jax.default_backend()}; batch {args.batch} x "
        f"{args.context}, d {args.d_model}, {args.heads} heads; {args.steps} steps, a "
        f"decomposition every {INV_EVERY}")
  header = (f"{'blocks':>6}  {'model':<8}  {'optimizer':<13}  {'compile s':>9}  "
            f"{'step ms':>8}  {'decompose ms':>12}  {'x AdamW':>7}")
  print(header)
  print("-" * len(header))
  for blocks in args.blocks:
    scanned = transformer.Transformer(vocab=VOCAB, blocks=blocks, scan=True, **size)
    unrolled = transformer.Transformer(vocab=VOCAB, blocks=blocks, **size)
    stacked = scanned.init(jax.random.key(args.seed), batches[0][0])["params"]
    models = {"unrolled": (unrolled, unrolled_params(stacked, blocks)),
              "scan": (scanned, stacked)}
    finals = {}
    for label, (model, params) in models.items():
      layers = kaisa_jax.find_layers(transformer.make_loss(model), params, *batches[0])
      assert not layers.skipped, layers.skipped
      adamw = run(model, "adamw", params, batches, layers)
      kaisa = run(model, "kaisa + adamw", params, batches, layers)
      finals[label] = kaisa["params"]
      for name, result in (("adamw", adamw), ("kaisa + adamw", kaisa)):
        ratio = result["step_ms"] / adamw["step_ms"]
        decompose = "-" if name == "adamw" else f"{result['decompose_ms']:.2f}"
        print(f"{blocks:>6}  {label:<8}  {name:<13}  {result['compile_s']:>9.2f}  "
              f"{result['step_ms']:>8.2f}  {decompose:>12}  {ratio:>7.2f}")
    gap = relative_gap(unrolled_params(finals["scan"], blocks), finals["unrolled"])
    print(f"{'':>6}  kaisa + adamw after {args.steps} steps: scan and unrolled parameters "
          f"differ by at most {gap:.1e} (relative, per leaf)")


if __name__ == "__main__":
  main()
