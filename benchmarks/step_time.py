"""Step time of ``kaisa + sgd`` relative to ``optax.adam``, one process.

For an MLP and a small CNN on digits-shaped data (8x8x1 images, 10 classes),
times one jitted train step (value_and_grad, optimizer update, apply_updates)
of K-FAC + SGD-momentum and of Adam on the same pre-generated batches, at
(factor, inverse) update periods (1, 1), (1, 10) and (10, 100). Reports the
median step time ratio, the amortized ratio (total time / steps) and, beside
it, the floor

  1 + (preconditioning FLOPs) / (forward + backward FLOPs),

with 4·g·a·(g + a) FLOPs to precondition a layer in the eigenbasis and about
6·rows·a·g for its forward and backward passes (rows = batch for Dense, batch
x output positions for Conv). Target at periods (10, 100): amortized ratio
within 1.10 x the floor. It also times a step that updates the factors but
does not decompose (periods (1, 10**9)) against an Adam step; target for a
conv model: at most 3 x. ``max/median`` is the slowest timed step over the
median one: the spike of a decomposition step; --stagger runs K-FAC with
``stagger_decompositions=True``, which spreads the groups' decompositions
over the interval.

On CPU the absolute times mean little: read the ratios. The optimizers are
interleaved in rounds so that other processes slow them alike; the load
average is printed. The process is a default one, as a user's would be: no
thread or allocator setting. kaisa_jax itself sets the OpenBLAS that
jaxlib's CPU decompositions call to one thread (``kaisa_jax/_src/
cpu_threads.py``); numpy's keeps its pool. Two options change the process
for comparison: --blas-threads N gives every BLAS pool N threads after the
library's setting (2 on 2 cores: OpenBLAS's default, one per core, whose
pool collapses when the cores are shared), and --malloc-no-mmap tells glibc
to use one arena and no mmap for large blocks (XLA mallocs each execution's
temporary buffer, and above glibc's mmap threshold, at most 32 MiB, every
step page-faults through fresh memory; Adam's CNN step at batch 1024 is at
30.5 MiB). Page faults per step are in the JSON.

  python benchmarks/step_time.py
  python benchmarks/step_time.py --blas-threads 2 --malloc-no-mmap
  python benchmarks/step_time.py --stagger --models cnn --batch-sizes 256
  python benchmarks/step_time.py --models cnn --batch-sizes 256 --steps 100 --json out.json
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import platform
import resource
import statistics
import time
from importlib import metadata
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import threadpoolctl  # a scikit-learn dependency
from sklearn.datasets import load_digits

import kaisa_jax
from kaisa_jax._src import cpu_threads

PERIODS = ((1, 1), (1, 10), (10, 100))
FACTOR_ONLY = (1, 10**9)  # factors every step, a decomposition only at step 0
FACTOR_ONLY_SHARE = 0.25  # of the timed steps: only its median is used
TARGET_PERIODS = (10, 100)
FLOOR_SLACK = 1.10
FACTOR_STEP_LIMIT = 3.0
MIN_WARMUP = 5
KAISA_LR = 0.1
ADAM_LR = 1e-3


class MLP(nn.Module):
  """64 -> 512 -> 512 -> 10, relu."""

  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(512)(x))
    x = nn.relu(nn.Dense(512)(x))
    return nn.Dense(10)(x)


class CNN(nn.Module):
  """Conv 32 -> pool -> Conv 64 -> pool -> Dense 128 -> Dense 10."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(32, (3, 3), padding="SAME")(x))
    x = nn.avg_pool(x, (2, 2), (2, 2))
    x = nn.relu(nn.Conv(64, (3, 3), padding="SAME")(x))
    x = nn.avg_pool(x, (2, 2), (2, 2))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(128)(x))
    return nn.Dense(10)(x)


MODELS = {"mlp": MLP, "cnn": CNN}


def make_loss(model: nn.Module) -> Callable:
  def loss_fn(params, x, y):
    logits = model.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  return loss_fn


def digits() -> tuple[np.ndarray, np.ndarray]:
  """Images (n, 8, 8, 1) in [0, 1] and integer labels (n,)."""
  data = load_digits()
  images = (data.images / 16.0).astype(np.float32)[..., None]
  return images, data.target.astype(np.int32)


def make_batches(images, labels, batch: int, count: int, seed: int) -> list:
  """``count`` batches drawn with replacement, already on the device."""
  rng = np.random.default_rng(seed)
  picks = rng.integers(0, len(labels), size=(count, batch))
  return [(jax.device_put(images[p]), jax.device_put(labels[p])) for p in picks]


# ---------------------------------------------------------------- FLOP model


def layer_rows(loss_fn, params, x, y) -> dict:
  """Per layer, its rows in one loss evaluation (batch x output positions)."""
  shapes = jax.eval_shape(kaisa_jax.value_and_grad(loss_fn), params, x, y)[2]
  return {name: sum(math.prod(g.shape[:-1]) for g in capture.out_grads)
          for name, capture in shapes.items()}


def flop_floor(layers, rows: dict) -> dict:
  """Preconditioning and forward+backward FLOPs, and the floor they give."""
  precondition = sum(4 * l.g_size * l.a_size * (l.g_size + l.a_size) for l in layers)
  forward_backward = sum(6 * rows[l.name] * l.a_size * l.g_size for l in layers)
  return {"precondition_flops": precondition,
          "forward_backward_flops": forward_backward,
          "floor": 1 + precondition / forward_backward}


# ---------------------------------------------------------------- training


def make_optimizer(layers, periods, stagger: bool = False):
  if periods is None:
    return optax.adam(ADAM_LR)
  factor_steps, inv_steps = periods
  kaisa = kaisa_jax.kaisa(layers, damping=1e-3, factor_update_steps=factor_steps,
                          inv_update_steps=inv_steps, kl_clip=1e-3,
                          learning_rate=KAISA_LR, stagger_decompositions=stagger)
  return optax.chain(kaisa, optax.sgd(KAISA_LR, momentum=0.9))


def make_step(loss_fn, opt, with_captures: bool):
  """The jitted train step; params and optimizer state are donated."""

  def step(params, state, x, y):
    if with_captures:
      loss, grads, captures = kaisa_jax.value_and_grad(loss_fn)(params, x, y)
      updates, state = opt.update(grads, state, params, captures=captures)
    else:
      loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
      updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  return jax.jit(step, donate_argnums=(0, 1))


def warmup_steps(periods, steps: int) -> int:
  """A whole number of inverse periods (at least MIN_WARMUP steps).

  Step 0 takes both 'due' branches and step 1 the 'not due' ones, so even the
  shortest warm-up compiles and runs every branch; a whole inverse period
  also puts the timed steps in phase, so that N steps hold N / period
  decompositions. A period longer than the run gets MIN_WARMUP steps.
  """
  if periods is None or periods[1] > steps:
    return MIN_WARMUP
  inv = periods[1]
  return inv * math.ceil(MIN_WARMUP / inv)


class Runner:
  """One optimizer on one model: its jitted step, its state and its timings."""

  def __init__(self, model, params, layers, periods, batches, stagger: bool = False):
    opt = make_optimizer(layers, periods, stagger)
    self.periods = periods
    self.step_fn = make_step(make_loss(model), opt, periods is not None)
    self.params = jax.tree.map(jnp.copy, params)  # donated by the step
    self.state = opt.init(self.params)
    self.batches = batches
    self.position = 0
    self.warmup = 0
    self.times: list[float] = []
    self.total = 0.0
    self.faults = 0
    self.loss = None

  def advance(self, count: int) -> tuple[list[float], float]:
    """Runs ``count`` steps; returns the per-step and the total seconds."""
    times = []
    start = time.perf_counter()
    for _ in range(count):
      x, y = self.batches[self.position % len(self.batches)]
      t0 = time.perf_counter()
      self.params, self.state, self.loss = self.step_fn(self.params, self.state, x, y)
      jax.block_until_ready((self.params, self.state, self.loss))
      times.append(time.perf_counter() - t0)
      self.position += 1
    return times, time.perf_counter() - start

  def warm_up(self, steps: int) -> float:
    self.warmup = warmup_steps(self.periods, steps)
    return self.advance(self.warmup)[1]

  def timed(self, count: int):
    faults = minor_faults()
    times, total = self.advance(count)
    self.faults += minor_faults() - faults
    self.times += times
    self.total += total

  def summary(self) -> dict:
    steps = len(self.times)
    return {"median_ms": 1e3 * statistics.median(self.times),
            "amortized_ms": 1e3 * self.total / steps,
            "min_ms": 1e3 * min(self.times),
            "max_ms": 1e3 * max(self.times),
            "timed_steps": steps,
            "page_faults_per_step": self.faults / steps,
            "warmup_steps": self.warmup,
            "final_loss": float(self.loss)}


def minor_faults() -> int:
  """Minor page faults of this process so far (fresh memory being touched)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def round_sizes(steps: int, rounds: int) -> list[int]:
  base, extra = divmod(steps, rounds)
  return [base + (i < extra) for i in range(rounds)]


def bench_model(name: str, batch: int, batches, steps: int, rounds: int,
                periods_list, stagger: bool = False) -> dict:
  """Times Adam and every K-FAC configuration, interleaved in ``rounds`` blocks.

  Interleaving spreads any drift in the machine's speed (other processes,
  clocks) evenly over the optimizers being compared.
  """
  model = MODELS[name]()
  x, y = batches[0]
  params = model.init(jax.random.key(0), x)["params"]
  loss_fn = make_loss(model)
  layers = kaisa_jax.find_layers(loss_fn, params, x, y)
  flops = flop_floor(layers, layer_rows(loss_fn, params, x, y))
  runners = [Runner(model, params, layers, p, batches, stagger)
             for p in (None,) + periods_list]
  warm = [r.warm_up(steps) for r in runners]
  for count in round_sizes(steps, rounds):
    for runner in runners:
      # Only the median of the factor-only step is reported: fewer steps do.
      share = FACTOR_ONLY_SHARE if runner.periods == FACTOR_ONLY else 1
      runner.timed(max(1, round(count * share)))
  adam = runners[0].summary() | {"warmup_s": warm[0]}
  result = {"model": name, "batch": batch, "adam": adam, **flops,
            "layers": [{"name": l.name, "kind": l.kind, "a_size": l.a_size,
                        "g_size": l.g_size} for l in layers],
            "kaisa": []}
  for runner, warm_s in zip(runners[1:], warm[1:]):
    timing = runner.summary() | {"warmup_s": warm_s, "periods": list(runner.periods)}
    timing["median_ratio"] = timing["median_ms"] / adam["median_ms"]
    timing["amortized_ratio"] = timing["amortized_ms"] / adam["amortized_ms"]
    timing["amortized_over_floor"] = timing["amortized_ratio"] / flops["floor"]
    result["kaisa"].append(timing)
  return result


# ---------------------------------------------------------------- report


def periods_text(periods) -> str:
  factor, inv = periods
  inv_text = f"1e{round(math.log10(inv))}" if inv >= 10**6 else str(inv)
  return f"({factor}, {inv_text})"


def target_text(result: dict, timing: dict) -> str:
  if tuple(timing["periods"]) != TARGET_PERIODS:
    return "-"
  return "yes" if timing["amortized_over_floor"] <= FLOOR_SLACK else "NO"


def table(results: list) -> str:
  header = ("model", "batch", "periods", "kaisa ms", "adam ms", "median x",
            "amort x", "floor", "amort/floor", f"<= {FLOOR_SLACK} floor", "max/median")
  rows = [header]
  for r in results:
    for t in r["kaisa"]:
      if tuple(t["periods"]) == FACTOR_ONLY:
        continue
      rows.append((r["model"], str(r["batch"]), periods_text(t["periods"]),
                   f"{t['median_ms']:.2f}", f"{r['adam']['median_ms']:.2f}",
                   f"{t['median_ratio']:.2f}", f"{t['amortized_ratio']:.2f}",
                   f"{r['floor']:.2f}", f"{t['amortized_over_floor']:.2f}",
                   target_text(r, t), f"{t['max_ms'] / t['median_ms']:.1f}"))
  widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
  lines = ["  ".join(c.rjust(w) if i > 2 else c.ljust(w)
                     for i, (c, w) in enumerate(zip(row, widths))).rstrip()
           for row in rows]
  lines.insert(1, "  ".join("-" * w for w in widths))
  return "\n".join(lines)


def factor_step_lines(results: list) -> list[str]:
  lines = []
  for r in results:
    for t in r["kaisa"]:
      if tuple(t["periods"]) != FACTOR_ONLY:
        continue
      ratio = t["median_ratio"]
      has_conv = any(l["kind"] == "conv" for l in r["layers"])
      verdict = ""
      if has_conv:
        ok = ratio <= FACTOR_STEP_LIMIT
        verdict = f"  (conv limit {FACTOR_STEP_LIMIT:.0f}x: {'yes' if ok else 'NO'})"
      lines.append(
          f"factor step / adam step  {r['model']:<4} batch {r['batch']:>5}: "
          f"{ratio:5.2f}x  ({t['median_ms']:.2f} ms / {r['adam']['median_ms']:.2f} ms)"
          f"{verdict}")
  return lines


def set_blas_threads(limit: int):
  """With ``limit`` > 0, every BLAS pool gets ``limit`` threads, overriding kaisa_jax's
  one-thread setting of jaxlib's OpenBLAS (made here first, as kaisa's first
  decomposition would make it, so that it does not undo this one)."""
  if limit:
    cpu_threads.limit_lapack_threads()
    threadpoolctl.threadpool_limits(limit, user_api="blas")


def blas_threads() -> list[str]:
  """'library: threads' of every BLAS pool the process has loaded."""
  return [f"{os.path.basename(os.path.dirname(lib['filepath']))}: {lib['num_threads']}"
          for lib in threadpoolctl.threadpool_info() if lib["user_api"] == "blas"]


def malloc_without_mmap() -> bool:
  """glibc: serve every block from one heap and keep freed memory mapped.

  XLA allocates each execution's temporary buffer with malloc. glibc maps
  blocks above its mmap threshold (at most 32 MiB) afresh and unmaps them on
  free, so every step then page-faults through its whole temporary buffer.
  """
  try:
    libc = ctypes.CDLL("libc.so.6")
  except OSError:  # not glibc: nothing to set
    return False
  m_trim_threshold, m_mmap_max, m_arena_max = -1, -4, -8
  # One arena: the per-thread arenas are mmapped heaps that shrink on free.
  return bool(libc.mallopt(m_mmap_max, 0) and libc.mallopt(m_trim_threshold, 2**30)
              and libc.mallopt(m_arena_max, 1))


def environment(blas: list[str], malloc_no_mmap: bool) -> dict:
  return {"jax": jax.__version__, "flax": metadata.version("flax"),
          "optax": optax.__version__, "backend": jax.default_backend(),
          "devices": [str(d) for d in jax.devices()], "cpu_count": os.cpu_count(),
          "blas_threads": blas, "malloc_no_mmap": malloc_no_mmap,
          "python": platform.python_version(), "machine": platform.machine()}


# ---------------------------------------------------------------- main


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--batch-sizes", type=int, nargs="+", default=[256, 1024])
  parser.add_argument("--steps", type=int, default=200,
                      help="timed steps per configuration, after warm-up (default 200)")
  parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["mlp", "cnn"])
  parser.add_argument("--json", metavar="PATH", help="write the results here")
  parser.add_argument("--rounds", type=int, default=10,
                      help="interleave the optimizers in this many blocks of steps (default 10)")
  parser.add_argument("--blas-threads", type=int, default=0,
                      help="threads for every BLAS pool, over the library's setting "
                           "(default 0: as kaisa_jax sets them)")
  parser.add_argument("--malloc-no-mmap", action="store_true",
                      help="tell glibc not to mmap large blocks (no per-step page faults once "
                           "a step's temporary buffer exceeds 32 MiB)")
  parser.add_argument("--stagger", action="store_true",
                      help="K-FAC with stagger_decompositions=True (the groups' decompositions "
                           "spread over the interval)")
  parser.add_argument("--seed", type=int, default=0)
  return parser.parse_args(argv)


def report(results: list, args, env: dict, load: tuple, elapsed: float):
  print(f"\nkaisa + sgd vs adam, {args.steps} timed steps per configuration in "
        f"{args.rounds} interleaved rounds; {env['backend']}, {env['cpu_count']} cores, "
        f"BLAS threads {env['blas_threads']}, jax {env['jax']}"
        + (", malloc without mmap" if env["malloc_no_mmap"] else ""))
  busy = max(load) > env["cpu_count"] + 0.5
  note = ": other processes shared the cores, ratios are noisy" if busy else ""
  print(f"load average (1 min) before {load[0]:.1f}, after {load[1]:.1f}{note}\n")
  print(table(results))
  print()
  for line in factor_step_lines(results):
    print(line)
  print(f"\nwhole benchmark: {elapsed:.0f} s")


def main(argv=None):
  args = parse_args(argv)
  start = time.perf_counter()
  load_before = os.getloadavg()[0]
  set_blas_threads(args.blas_threads)
  malloc_no_mmap = args.malloc_no_mmap and malloc_without_mmap()
  if args.steps < 2 * TARGET_PERIODS[1]:
    print(f"note: --steps {args.steps} holds fewer than 2 decompositions at "
          f"periods {TARGET_PERIODS}; the amortized figure is less representative.")
  images, labels = digits()
  periods_list = PERIODS + (FACTOR_ONLY,)
  results = []
  for batch in args.batch_sizes:
    batches = make_batches(images, labels, batch, args.steps, args.seed)
    for name in args.models:
      t0 = time.perf_counter()
      results.append(bench_model(name, batch, batches, args.steps, args.rounds,
                                 periods_list, args.stagger))
      print(f"[{name} batch {batch}: {time.perf_counter() - t0:.0f} s]", flush=True)
  elapsed = time.perf_counter() - start
  env = environment(blas_threads(), malloc_no_mmap)
  load = (load_before, os.getloadavg()[0])
  report(results, args, env, load, elapsed)
  if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
      json.dump({"environment": env, "steps": args.steps, "rounds": args.rounds,
                 "stagger_decompositions": args.stagger,
                 "load_average": load, "seconds": elapsed, "floor_slack": FLOOR_SLACK,
                 "factor_step_limit": FACTOR_STEP_LIMIT,
                 "target_periods": list(TARGET_PERIODS), "results": results}, f, indent=2)
    print(f"wrote {args.json}")


if __name__ == "__main__":
  main()
