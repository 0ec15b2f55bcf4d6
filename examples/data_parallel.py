"""Data-parallel K-FAC (KAISA) on 8 CPU devices: pmap and shard_map, every strategy.

Trains the digits MLP of digits.py with ``kaisa + SGD-momentum`` on one
device, then data-parallel on 8 (fake CPU) devices inside ``jax.pmap`` and
inside ``jax.shard_map`` for each ``grad_worker_frac`` (1/8 MEM-OPT, 1/4 and
1/2 HYBRID-OPT, 1 COMM-OPT), on the same global batches. Prints each
strategy's placement table, then how far every run ends from the
single-device run (the device count and the strategy must not change the
answer), with the eigen data each device keeps.

  python examples/data_parallel.py            # 100 steps, about a minute
  python examples/data_parallel.py --steps 300
"""

from __future__ import annotations

import os

# Eight CPU devices stand in for 8 accelerators; set before jax is imported.
_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, PartitionSpec as P

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import digits  # noqa: E402  (the data, model, loss and K-FAC settings)

import kaisa_jax  # noqa: E402

AXIS = "batch"
FRACTIONS = {"1/8": 1 / 8, "1/4": 1 / 4, "1/2": 1 / 2, "1": 1.0}


def make_optimizer(layers, **distribution):
  return optax.chain(kaisa_jax.kaisa(layers, **digits.KFAC, **distribution),
                     optax.sgd(digits.KFAC["learning_rate"], momentum=digits.MOMENTUM))


def make_step(loss_fn, opt, axis_name=None):
  def step(params, opt_state, x, y):
    loss, grads, captures = kaisa_jax.value_and_grad(loss_fn)(params, x, y)
    updates, opt_state = opt.update(grads, opt_state, params, captures=captures)
    if axis_name is not None:
      loss = jax.lax.pmean(loss, axis_name)
    return optax.apply_updates(params, updates), opt_state, loss
  return step


def run_single(loss_fn, layers, params, batches):
  opt = make_optimizer(layers)
  step = jax.jit(make_step(loss_fn, opt))
  opt_state = opt.init(params)
  for x, y in batches:
    params, opt_state, loss = step(params, opt_state, x, y)
  return params, float(loss)


def run_pmap(loss_fn, layers, params, batches, frac):
  n = jax.device_count()
  opt = make_optimizer(layers, axis_name=AXIS, grad_worker_frac=frac)
  params = jax.tree.map(lambda a: jnp.stack([a] * n), params)  # one copy per device
  opt_state = jax.pmap(opt.init, axis_name=AXIS)(params)      # each device builds its part
  step = jax.pmap(make_step(loss_fn, opt, AXIS), axis_name=AXIS)
  split = lambda a: a.reshape((n, -1) + a.shape[1:])
  for x, y in batches:
    params, opt_state, loss = step(params, opt_state, split(x), split(y))
  return jax.tree.map(lambda a: a[0], params), float(loss[0])


def run_shard_map(loss_fn, layers, params, batches, frac):
  mesh = Mesh(np.array(jax.devices()), (AXIS,))
  opt = make_optimizer(layers, axis_name=AXIS, grad_worker_frac=frac)
  grad_workers = kaisa_jax.placement(layers, mesh.size, frac).grad_workers
  # HYBRID's grouped collectives need check_vma=False; MEM- and COMM-OPT run checked.
  check_vma = grad_workers in (1, mesh.size)
  abstract = jax.eval_shape(jax.shard_map(opt.init, mesh=mesh, in_specs=P(), out_specs=P(),
                                          check_vma=False), params)
  specs = kaisa_jax.state_specs(abstract, AXIS)
  init = jax.jit(jax.shard_map(opt.init, mesh=mesh, in_specs=P(), out_specs=specs,
                               check_vma=check_vma))
  step = jax.jit(jax.shard_map(make_step(loss_fn, opt, AXIS), mesh=mesh,
                               in_specs=(P(), specs, P(AXIS), P(AXIS)),
                               out_specs=(P(), specs, P()), check_vma=check_vma))
  opt_state = init(params)
  for x, y in batches:
    params, opt_state, loss = step(params, opt_state, x, y)
  return params, float(loss)


def relative_distance(a, b) -> float:
  """max over leaves of |a - b| / |b| (Frobenius norms)."""
  return max(float(np.linalg.norm(np.asarray(x) - np.asarray(y)) / np.linalg.norm(y))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--steps", type=int, default=100)
  parser.add_argument("--batch", type=int, default=128, help="global batch (default 128)")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  if args.batch % jax.device_count():
    raise SystemExit(f"--batch must be a multiple of the {jax.device_count()} devices")

  data = digits.load_data(args.seed)
  picks = digits.batch_indices(len(data["y_train"]), args.batch, args.steps, args.seed)
  batches = [(jnp.asarray(data["x_train"][p]), jnp.asarray(data["y_train"][p])) for p in picks]
  model = digits.MODELS["MLP"]
  loss_fn = digits.make_loss(model)
  x0, y0 = batches[0]
  params = model.init(jax.random.key(args.seed), x0)["params"]
  layers = kaisa_jax.find_layers(loss_fn, params, x0, y0)
  n = jax.device_count()

  t0 = time.perf_counter()
  reference, reference_loss = run_single(loss_fn, layers, params, batches)
  rows = [("1 device", "-", "-", f"{reference_loss:.4f}", "-", "-",
           f"{time.perf_counter() - t0:.1f}")]
  for label, frac in FRACTIONS.items():
    plan = kaisa_jax.placement(layers, n, frac)
    print(f"\ngrad_worker_frac = {label}\n{plan}")
    eigen = plan.device_bytes()[0]["eigen_bytes"]
    for name, run in (("pmap", run_pmap), ("shard_map", run_shard_map)):
      t0 = time.perf_counter()
      final, loss = run(loss_fn, layers, params, batches, frac)
      rows.append((f"{n} devices, {name}", label, plan.strategy, f"{loss:.4f}",
                   f"{relative_distance(final, reference):.1e}", f"{eigen:,}",
                   f"{time.perf_counter() - t0:.1f}"))

  header = ("run", "f", "strategy", "final batch loss", "params vs 1 device",
            "eigen bytes/device", "seconds")
  widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
  print(f"\n{args.steps} steps of kaisa + SGD-momentum on the digits MLP, global batch "
        f"{args.batch}:")
  for r in [header, tuple("-" * w for w in widths)] + rows:
    print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


if __name__ == "__main__":
  main()
