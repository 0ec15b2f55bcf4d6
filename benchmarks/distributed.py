"""KAISA on 8 devices: state bytes, communication and the decomposition step.

For an MLP and a small CNN on digits-shaped data (8x8x1 images, 10 classes;
the models and data of step_time.py) and grad_worker_frac f in 1/8 (MEM-OPT),
1/4, 1/2 (HYBRID-OPT) and 1 (COMM-OPT) on 8 fake CPU devices
(--xla_force_host_platform_device_count=8, jax.shard_map over one axis), it
reports

1. per device, the bytes of factors and of eigen data in the optimizer state,
   measured on the state arrays (the local shard of each leaf on one device),
   beside the plan's figure (``kaisa_jax.placement(...).device_bytes()``),
   and the eigen bytes as a fraction of COMM-OPT's;
2. the bytes each device receives from collectives, per kind of step, from
   ``placement(...).collectives()``: every step (the gradient all-reduce of
   all parameters, and with f < 1 the gathering of the preconditioned
   gradients), plus a factor step's and a decomposition step's extra; checked
   against the all-reduces and all-gathers of the compiled HLO;
3. the wall time of a decomposition step (periods (1, 1): factors and
   decompositions every step) and of an ordinary step (periods (1, 10**6):
   factors every step, the decomposition only at step 0, before the timing),
   on 8 devices and on one device (plain jit, no axis_name) with the same
   global batch, and
     (decomposition step - ordinary step) on 8 devices
     ------------------------------------------------  (decomposition work)
     (decomposition step - ordinary step) on 1 device
   beside the raw ratio of the decomposition steps. Target: at most 1.5 x
   (each device decomposing every layer would cost about N/2 x: N devices'
   work on the 2 cores that one device's single-threaded eigh leaves half
   idle). The same difference in process CPU time is reported and judged
   too: other processes do not count in it, and spread work shows up there
   (a decomposition repeated on every device would give about N x).

The 8 devices are threads of one process on this machine's cores: work that
placement spreads over the devices shows up as total CPU time, not as a
speed-up, and the collectives are memory copies. Read the ratios, not the
absolute times. The configurations are interleaved in rounds of --block
steps so that other processes slow them alike; medians are reported. Each
model gets at least --steps timed steps per configuration, more while its
timing stays within --seconds (the CNN's short steps need many for a stable
difference). As in step_time.py, eigh runs on one OpenBLAS thread and glibc
is told not to mmap large blocks.

  python benchmarks/distributed.py
  python benchmarks/distributed.py --models mlp --steps 40 --seconds 0 --batch 512 --json out.json
"""

from __future__ import annotations

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()

import argparse
import json
import math
import re
import statistics
import sys
import time
from fractions import Fraction

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import step_time  # noqa: E402  (models, data, BLAS and malloc settings)

import kaisa_jax  # noqa: E402

NUM_DEVICES = 8
AXIS = "data"
FRACTIONS = (Fraction(1, 8), Fraction(1, 4), Fraction(1, 2), Fraction(1))
DECOMPOSE = (1, 1)         # factors and decompositions every step
ORDINARY = (1, 10**6)      # factors every step; decomposition at step 0 only
WARMUP = {DECOMPOSE: 2, ORDINARY: 3}  # ORDINARY: past step 0, which decomposes
TARGET = 1.5               # decomposition step on 8 devices / on 1 device
KAISA_LR = step_time.KAISA_LR


def strategy(frac: Fraction) -> str:
  workers = max(1, round(NUM_DEVICES * frac))
  return "MEM-OPT" if workers == 1 else "COMM-OPT" if workers == NUM_DEVICES else "HYBRID-OPT"


# ---------------------------------------------------------------- training


def make_optimizer(layers, periods, frac=None):
  """kaisa + sgd as in step_time.py; ``frac`` None: one device, no axis."""
  factor_steps, inv_steps = periods
  distributed = {} if frac is None else {"axis_name": AXIS,
                                         "grad_worker_frac": float(frac)}
  kaisa = kaisa_jax.kaisa(layers, damping=1e-3, factor_update_steps=factor_steps,
                          inv_update_steps=inv_steps, kl_clip=1e-3,
                          learning_rate=KAISA_LR, **distributed)
  return optax.chain(kaisa, optax.sgd(KAISA_LR, momentum=0.9))


def train_step(loss_fn, opt):
  """value_and_grad, the optimizer update, apply_updates (no loss returned)."""

  def step(params, state, x, y):
    _, grads, captures = kaisa_jax.value_and_grad(loss_fn)(params, x, y)
    updates, state = opt.update(grads, state, params, captures=captures)
    return optax.apply_updates(params, updates), state

  return step


def make_batches(images, labels, batch: int, count: int, seed: int, sharding) -> list:
  """``count`` batches drawn with replacement, already placed by ``sharding``."""
  rng = np.random.default_rng(seed)
  picks = rng.integers(0, len(labels), size=(count, batch))
  return [(jax.device_put(images[p], sharding), jax.device_put(labels[p], sharding))
          for p in picks]


class Runner:
  """One configuration: its compiled step, its params and state, its timings."""

  def __init__(self, label, step, params, state, batches, periods):
    self.label, self.periods = label, periods
    self.params, self.state, self.batches = params, state, batches
    x, y = batches[0]
    t0 = time.perf_counter()
    self.compiled = step.lower(params, state, x, y).compile()
    self.compile_s = time.perf_counter() - t0
    self.position = 0
    self.wall: list[float] = []
    self.cpu: list[float] = []

  def advance(self, count: int, record: bool):
    for _ in range(count):
      x, y = self.batches[self.position % len(self.batches)]
      t0, c0 = time.perf_counter(), time.process_time()
      self.params, self.state = self.compiled(self.params, self.state, x, y)
      jax.block_until_ready((self.params, self.state))
      if record:
        self.wall.append(time.perf_counter() - t0)
        self.cpu.append(time.process_time() - c0)
      self.position += 1

  def summary(self) -> dict:
    return {"median_ms": 1e3 * statistics.median(self.wall),
            "min_ms": 1e3 * min(self.wall), "max_ms": 1e3 * max(self.wall),
            "cpu_median_ms": 1e3 * statistics.median(self.cpu),
            "timed_steps": len(self.wall), "compile_s": self.compile_s,
            "step_after": int(kaisa_state(self.state).step)}


def kaisa_state(opt_state) -> kaisa_jax.KaisaState:
  return next(s for s in jax.tree.leaves(
      opt_state, is_leaf=lambda s: isinstance(s, kaisa_jax.KaisaState))
              if isinstance(s, kaisa_jax.KaisaState))


def single_runner(loss_fn, layers, params, periods, images, labels, args):
  device = jax.devices()[0]
  opt = make_optimizer(layers, periods)
  params = jax.device_put(jax.tree.map(np.asarray, params), device)  # donated by the step
  state = jax.jit(opt.init)(params)
  step = jax.jit(train_step(loss_fn, opt), donate_argnums=(0, 1))
  batches = make_batches(images, labels, args.batch, args.steps, args.seed, device)
  return Runner(f"1 device {periods}", step, params, state, batches, periods)


def sharded_runner(loss_fn, layers, params, frac, periods, images, labels, args):
  """The step in jax.shard_map over 8 devices, state specs from kaisa_jax."""
  mesh = Mesh(np.array(jax.devices()[:NUM_DEVICES]), (AXIS,))
  opt = make_optimizer(layers, periods, frac)
  # JAX types the result of grouped collectives as per-device: HYBRID-OPT needs this.
  check_vma = strategy(frac) != "HYBRID-OPT"
  abstract = jax.eval_shape(jax.shard_map(opt.init, mesh=mesh, in_specs=P(), out_specs=P(),
                                          check_vma=False), params)
  specs = kaisa_jax.state_specs(abstract, AXIS)
  params = jax.device_put(jax.tree.map(np.asarray, params), NamedSharding(mesh, P()))
  state = jax.jit(jax.shard_map(opt.init, mesh=mesh, in_specs=P(), out_specs=specs,
                                check_vma=check_vma))(params)
  step = jax.jit(jax.shard_map(train_step(loss_fn, opt), mesh=mesh,
                               in_specs=(P(), specs, P(AXIS), P(AXIS)),
                               out_specs=(P(), specs), check_vma=check_vma),
                 donate_argnums=(0, 1))
  batches = make_batches(images, labels, args.batch, args.steps, args.seed,
                         NamedSharding(mesh, P(AXIS)))
  return Runner(f"8 devices f={frac} {periods}", step, params, state, batches, periods)


# ---------------------------------------------------------------- bytes


def local_bytes(tree) -> int:
  """Bytes one device holds of ``tree``: the largest local shard of each leaf."""
  return sum(max(s.data.nbytes for s in leaf.addressable_shards)
             for leaf in jax.tree.leaves(tree))


def state_bytes(opt_state) -> dict:
  s = kaisa_state(opt_state)
  return {"factor_bytes": local_bytes(s.factors),
          "eigen_bytes": local_bytes((s.decompositions, s.local_decompositions))}


def eigen_floor(plan) -> dict:
  """What spreading the eigen data over the grad-worker groups could reach.

  ``total``: COMM-OPT's eigen bytes (every layer); ``even``: total / columns,
  an even split; ``fullest``: the most any column holds (every device's
  buffer has the fullest column's length); ``granularity``: max(even,
  largest layer), the least that whole layers allow.
  """
  per_layer = [plan.stored_words(l.a_size, l.g_size, l.a_shape.diagonal, l.a_shape.blocks)
               * plan.inv_itemsize for l in plan.layers]
  per_column = [0] * plan.num_columns
  for l, b in zip(plan.layers, per_layer):
    per_column[l.column] += b
  total = sum(per_layer)
  even = total / plan.num_columns
  return {"total": total, "even": even, "fullest": max(per_column),
          "granularity": max(even, max(per_layer))}


def decomposition_share(plan) -> float:
  """The busiest device's share of the n³ eigh cost of a decomposition step."""
  load = [0.0] * plan.num_devices
  for l in plan.layers:
    load[l.a_worker] += float(l.a_size) ** 3
    load[l.g_worker] += float(l.g_size) ** 3
  return max(load) / sum(load)


def communication(plan, param_bytes: int) -> dict:
  """Bytes per device and kind of step, from the plan."""
  sums = {"gradient_all_reduce": param_bytes, "preconditioned_gather": 0,
          "factor_step": 0, "decomposition_step": 0}
  for k in plan.collectives():
    if k["step"] == "every step" and k["bytes"] is not None:
      sums["preconditioned_gather"] += k["bytes"]
    elif k["step"] == "factor step":
      sums["factor_step"] += k["bytes"]
    elif k["step"] == "decomposition step":
      sums["decomposition_step"] += k["bytes"]
  sums["ordinary_step"] = sums["gradient_all_reduce"] + sums["preconditioned_gather"]
  sums["full_step"] = sums["ordinary_step"] + sums["factor_step"] + sums["decomposition_step"]
  by_op = {"all-reduce": param_bytes, "all-gather": 0}
  for k in plan.collectives():
    if k["bytes"] is not None:
      by_op[k["op"]] += k["bytes"]
  sums["by_op"] = by_op
  return sums


_ITEMSIZE = {"f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "bf16": 2, "f16": 2,
             "pred": 1, "s8": 1, "u8": 1}


def hlo_collective_bytes(hlo: str) -> dict:
  """Result bytes per device of the all-reduces and all-gathers in compiled HLO text."""
  totals = {"all-reduce": 0, "all-gather": 0}
  for line in hlo.splitlines():
    for op in totals:
      match = re.search(r"=\s*(.*?)\s" + op + r"(?:-start)?\(", line)
      if match:
        for dtype, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", match.group(1)):
          count = math.prod(int(d) for d in dims.split(",") if d)
          totals[op] += count * _ITEMSIZE[dtype]
  return totals


# ---------------------------------------------------------------- one model


def bench_model(name: str, images, labels, args) -> dict:
  model = step_time.MODELS[name]()
  loss_fn = step_time.make_loss(model)
  x, y = images[:args.batch], labels[:args.batch]
  params = model.init(jax.random.key(0), x)["params"]
  layers = kaisa_jax.find_layers(loss_fn, params, x, y)
  param_bytes = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(params))

  t0 = time.perf_counter()
  single = {p: single_runner(loss_fn, layers, params, p, images, labels, args)
            for p in (DECOMPOSE, ORDINARY)}
  sharded = {(f, p): sharded_runner(loss_fn, layers, params, f, p, images, labels, args)
             for f in FRACTIONS for p in (DECOMPOSE, ORDINARY)}
  runners = list(single.values()) + list(sharded.values())
  for r in runners:
    r.advance(WARMUP[r.periods], record=False)
  setup_s = time.perf_counter() - t0
  # One untimed round sizes the run: at least --steps, more while --seconds allow.
  t0 = time.perf_counter()
  for r in runners:
    r.advance(1, record=False)
  steps = max(args.steps, math.floor(args.seconds / (time.perf_counter() - t0)))
  for count in step_time.round_sizes(steps, math.ceil(steps / args.block)):
    for r in runners:
      r.advance(count, record=True)

  one = {p: single[p].summary() for p in single}
  one_diff = one[DECOMPOSE]["median_ms"] - one[ORDINARY]["median_ms"]
  one_cpu_diff = one[DECOMPOSE]["cpu_median_ms"] - one[ORDINARY]["cpu_median_ms"]
  comm_opt_eigen = None
  fractions = []
  for f in FRACTIONS:
    plan = kaisa_jax.placement(layers, NUM_DEVICES, float(f))
    planned = plan.device_bytes()
    measured = state_bytes(sharded[(f, DECOMPOSE)].state)
    comm = communication(plan, param_bytes)
    hlo = hlo_collective_bytes(sharded[(f, DECOMPOSE)].compiled.as_text())
    timing = {str(p): sharded[(f, p)].summary() for p in (DECOMPOSE, ORDINARY)}
    eight_diff = timing[str(DECOMPOSE)]["median_ms"] - timing[str(ORDINARY)]["median_ms"]
    eight_cpu_diff = (timing[str(DECOMPOSE)]["cpu_median_ms"]
                      - timing[str(ORDINARY)]["cpu_median_ms"])
    entry = {
        "grad_worker_frac": str(f), "strategy": strategy(f),
        "grad_workers": plan.grad_workers, "columns": [list(c) for c in plan.columns],
        "measured_bytes": measured,
        "plan_bytes": {"factor_bytes": max(d["factor_bytes"] for d in planned),
                       "eigen_bytes": max(d["eigen_bytes"] for d in planned)},
        "eigen_floor": eigen_floor(plan),
        "communication": comm, "hlo_bytes": hlo, "hlo_matches_plan": hlo == comm["by_op"],
        "collectives": plan.collectives(),
        "busiest_device_decomposition_share": decomposition_share(plan),
        "timing": timing,
        "decomposition_ratio": eight_diff / one_diff,
        "decomposition_ratio_of_minima": (
            (timing[str(DECOMPOSE)]["min_ms"] - timing[str(ORDINARY)]["min_ms"])
            / (one[DECOMPOSE]["min_ms"] - one[ORDINARY]["min_ms"])),
        "raw_ratio": timing[str(DECOMPOSE)]["median_ms"] / one[DECOMPOSE]["median_ms"],
        "cpu_decomposition_ratio": eight_cpu_diff / one_cpu_diff,
    }
    entry["bytes_match_plan"] = entry["measured_bytes"] == entry["plan_bytes"]
    if f == 1:
      comm_opt_eigen = measured["eigen_bytes"]
    fractions.append(entry)
  for entry in fractions:
    entry["eigen_fraction_of_comm_opt"] = entry["measured_bytes"]["eigen_bytes"] / comm_opt_eigen
  return {"model": name, "batch": args.batch, "param_bytes": param_bytes,
          "layers": [{"name": l.name, "kind": l.kind, "a_size": l.a_size,
                      "g_size": l.g_size} for l in layers],
          "timed_steps": steps, "single_device": {str(p): one[p] for p in one},
          "setup_s": setup_s, "fractions": fractions}


# ---------------------------------------------------------------- report


def format_table(rows: list, left: int = 1) -> str:
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  lines = ["  ".join(c.ljust(w) if i < left else c.rjust(w)
                     for i, (c, w) in enumerate(zip(r, widths))).rstrip() for r in rows]
  lines.insert(1, "  ".join("-" * w for w in widths))
  return "\n".join(lines)


def kib(n: int) -> str:
  return f"{n / 1024:,.1f}"


def bytes_table(result: dict) -> str:
  rows = [("f", "strategy", "factors KiB", "plan", "eigen KiB", "plan", "even split",
           "eigen / COMM-OPT", "= plan")]
  for e in result["fractions"]:
    m, p = e["measured_bytes"], e["plan_bytes"]
    rows.append((e["grad_worker_frac"], e["strategy"], kib(m["factor_bytes"]),
                 kib(p["factor_bytes"]), kib(m["eigen_bytes"]), kib(p["eigen_bytes"]),
                 kib(round(e["eigen_floor"]["even"])),
                 f"{e['eigen_fraction_of_comm_opt']:.3f}",
                 "yes" if e["bytes_match_plan"] else "NO"))
  return format_table(rows, left=2)


def comm_table(result: dict) -> str:
  rows = [("f", "grad all-reduce", "precond gather", "ordinary step", "+ factor step",
           "+ decomp step", "all three", "HLO = plan")]
  for e in result["fractions"]:
    c = e["communication"]
    rows.append((e["grad_worker_frac"], kib(c["gradient_all_reduce"]),
                 kib(c["preconditioned_gather"]), kib(c["ordinary_step"]),
                 kib(c["factor_step"]), kib(c["decomposition_step"]), kib(c["full_step"]),
                 "yes" if e["hlo_matches_plan"] else "NO"))
  return format_table(rows)


def time_table(result: dict) -> str:
  one = result["single_device"]
  d, o = str(DECOMPOSE), str(ORDINARY)
  rows = [("devices", "f", "decomp ms", "ordinary ms", "diff ms", "cpu diff ms",
           "busiest share", "diff ratio", f"<= {TARGET}", "raw ratio", "cpu diff ratio",
           f"cpu <= {TARGET}")]
  rows.append(("1", "-", f"{one[d]['median_ms']:.1f}", f"{one[o]['median_ms']:.1f}",
               f"{one[d]['median_ms'] - one[o]['median_ms']:.1f}",
               f"{one[d]['cpu_median_ms'] - one[o]['cpu_median_ms']:.1f}",
               "1.00", "1.00", "-", "1.00", "1.00", "-"))
  for e in result["fractions"]:
    t = e["timing"]
    rows.append(("8", e["grad_worker_frac"], f"{t[d]['median_ms']:.1f}",
                 f"{t[o]['median_ms']:.1f}", f"{t[d]['median_ms'] - t[o]['median_ms']:.1f}",
                 f"{t[d]['cpu_median_ms'] - t[o]['cpu_median_ms']:.1f}",
                 f"{e['busiest_device_decomposition_share']:.2f}",
                 f"{e['decomposition_ratio']:.2f}",
                 "yes" if e["decomposition_ratio"] <= TARGET else "NO",
                 f"{e['raw_ratio']:.2f}", f"{e['cpu_decomposition_ratio']:.2f}",
                 "yes" if e["cpu_decomposition_ratio"] <= TARGET else "NO"))
  return format_table(rows, left=2)


def mem_opt_lines(result: dict) -> list[str]:
  """Is MEM-OPT's eigen data about 1/N of COMM-OPT's, up to padding?

  Every device's buffer has the length of the fullest grad-worker group's
  layers (the padding); two questions: is that within 5% of 1/N of the
  total, and is it the best that whole layers allow, max(1/N, largest layer)?
  """
  e = next(e for e in result["fractions"] if Fraction(e["grad_worker_frac"]) == FRACTIONS[0])
  floor = e["eigen_floor"]
  measured = e["measured_bytes"]["eigen_bytes"]
  total = floor["total"]
  n = NUM_DEVICES
  one_nth = measured <= 1.05 * total / n
  best = measured <= 1.01 * floor["granularity"]
  return [
      f"f=1/{n} eigen bytes: {measured / total:.3f} of COMM-OPT's (1/{n} = {1 / n:.3f}); "
      f"padded to the fullest device's layers, {measured / floor['even']:.2f} x an even split; "
      f"whole layers allow at best {floor['granularity'] / total:.3f} "
      f"({len(result['layers'])} layers on {n} devices)",
      f"  about 1/{n} up to padding: {'yes' if one_nth else 'NO'}; the best whole layers "
      f"allow: {'yes' if best else 'NO'}"]


def report(results: list, args, env: dict, load: tuple, elapsed: float):
  steps = ", ".join(f"{r['model']} {r['timed_steps']}" for r in results)
  print(f"\nKAISA on {NUM_DEVICES} fake CPU devices (shard_map) vs 1 device, global batch "
        f"{args.batch}; timed steps per configuration ({steps}) interleaved in rounds of "
        f"{args.block}; {env['cpu_count']} cores, BLAS threads {env['blas_threads']}, "
        f"jax {env['jax']}" + (", malloc without mmap" if env["malloc_no_mmap"] else ""))
  busy = max(load) > env["cpu_count"] + 0.5
  note = ": other processes shared the cores, timings are noisy" if busy else ""
  print(f"load average (1 min) before {load[0]:.1f}, after {load[1]:.1f}{note}")
  print(f"note: the {NUM_DEVICES} devices are threads sharing {env['cpu_count']} cores: "
        "work that is spread over them shows up as total CPU time, not as speed-up.")
  for r in results:
    layers = ", ".join(f"{l['name']} ({l['a_size']}, {l['g_size']})" for l in r["layers"])
    print(f"\n=== {r['model']}: {layers}; params {kib(r['param_bytes'])} KiB")
    print("\nper-device optimizer state (measured on device 0's shards; plan: "
          "placement().device_bytes(); even split: COMM-OPT's eigen bytes / grad-worker groups)")
    print(bytes_table(r))
    for line in mem_opt_lines(r):
      print(line)
    print("\ncommunication per device (KiB of collective results, from "
          "placement().collectives(); HLO: all-reduce/all-gather result bytes of the "
          "compiled (1, 1) step)")
    print(comm_table(r))
    print(f"\nstep time, medians (decomp: periods {DECOMPOSE}; ordinary: "
          f"(1, 1e{round(math.log10(ORDINARY[1]))})); diff = decomp - ordinary; "
          "ratios: 8 devices / 1 device; busiest share: the plan's largest per-device share "
          "of the eigh n^3 cost")
    print(time_table(r))
  print(f"\ntarget: (decomposition step - ordinary step) on {NUM_DEVICES} devices <= "
        f"{TARGET} x the same on 1 device (every device decomposing every layer: about "
        f"N/2 = {NUM_DEVICES // 2} x on these cores). 'raw ratio' is the whole decomposition "
        "step's ratio; 'cpu diff ratio' the same difference in process CPU time.")
  print(f"\nwhole benchmark: {elapsed:.0f} s")


# ---------------------------------------------------------------- main


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--batch", type=int, default=256,
                      help="global batch, split over the 8 devices (default 256)")
  parser.add_argument("--steps", type=int, default=20,
                      help="timed steps per configuration, at least (default 20)")
  parser.add_argument("--seconds", type=float, default=25,
                      help="time more steps while the timing of a model takes less than "
                           "this (default 25)")
  parser.add_argument("--models", nargs="+", choices=sorted(step_time.MODELS),
                      default=["mlp", "cnn"])
  parser.add_argument("--json", metavar="PATH", help="write the results here")
  parser.add_argument("--block", type=int, default=2,
                      help="steps per configuration per round of the interleaving (default 2)")
  parser.add_argument("--blas-threads", type=int, default=1,
                      help="OpenBLAS threads for the LAPACK eigh (default 1; 0: leave as is)")
  parser.add_argument("--default-malloc", action="store_true",
                      help="keep glibc's mmap of large blocks")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  if args.batch % NUM_DEVICES:
    parser.error(f"--batch must be a multiple of {NUM_DEVICES}")
  return args


def main(argv=None):
  args = parse_args(argv)
  start = time.perf_counter()
  if len(jax.devices()) < NUM_DEVICES:
    sys.exit(f"need {NUM_DEVICES} devices, have {len(jax.devices())}: was jax imported "
             f"before XLA_FLAGS={_FLAG} was set?")
  load_before = os.getloadavg()[0]
  blas = step_time.blas_threads(args.blas_threads)
  malloc_no_mmap = not args.default_malloc and step_time.malloc_without_mmap()
  images, labels = step_time.digits()
  results = []
  for name in args.models:
    t0 = time.perf_counter()
    results.append(bench_model(name, images, labels, args))
    print(f"[{name}: {time.perf_counter() - t0:.0f} s, of which compile and warm-up "
          f"{results[-1]['setup_s']:.0f} s]", flush=True)
  elapsed = time.perf_counter() - start
  env = step_time.environment(blas, malloc_no_mmap)
  load = (load_before, os.getloadavg()[0])
  report(results, args, env, load, elapsed)
  if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
      json.dump({"environment": env, "num_devices": NUM_DEVICES, "batch": args.batch,
                 "min_steps": args.steps, "seconds_per_model": args.seconds,
                 "block": args.block, "load_average": load,
                 "seconds": elapsed, "target": TARGET,
                 "periods": {"decomposition": list(DECOMPOSE), "ordinary": list(ORDINARY)},
                 "results": results}, f, indent=2)
    print(f"wrote {args.json}")


if __name__ == "__main__":
  main()
