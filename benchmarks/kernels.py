"""Kernels and compile time of one compiled train step: K-FAC against AdamW.

For each model, jits the whole train step (value_and_grad, the optimizer's
update, apply_updates) of

* ``optax.adamw(lr)`` alone, and
* ``optax.chain(kaisa_jax.kaisa(layers, ...), optax.adamw(lr))`` at each
  (factor, inverse) update period pair of ``--periods``,

times ``lower`` + ``compile`` of a fresh jitted function (one compile each,
no cache hit), and counts in the optimized HLO (``compiled.as_text()``), over
every computation (while bodies and branches included; the bodies of fusions
hold no fusions or custom calls of their own):

* fusions: instructions whose op is ``fusion``;
* custom calls: instructions whose op is ``custom-call``;
* decomposition calls: custom calls whose target names an eigendecomposition
  (``DECOMPOSITION_PATTERNS``: syev[d/j], heev[d], eigh) or a Cholesky (potrf,
  cholesky). A decomposition of a stacked factor (a ``lax.map`` over the
  stack) is one call in a while body and counts once.

Beside them, from the registry: the registered layers and the "factor groups",
the distinct (A block size, A diagonal, G block size) among the preconditioned
layers, which is what the library will batch its factor work on. The targets
(printed PASS/FAIL per model):

* K-FAC at periods (1, 1): fusions + custom calls at most 1.5 x AdamW's;
* compile time (lower + compile) at most 2 x AdamW's at periods (1, 1) and
  (10, 100);
* decomposition calls = sum over the groups of the factors decomposed per
  group: 2 (A and G), 1 where A is diagonal (a diagonal factor is its own
  eigendecomposition), i.e. one batched call per group and factor.

Models: the example transformer (``examples/transformer.py``: pre-LN, d_model
64, every module its own layer) with ``--blocks`` blocks unrolled, and a
ResNet-18-shaped CNN (3x3 stem conv, 4 stages of 2 BasicBlocks with
BatchNorm in training mode, 1x1 projections where the shape changes, global
average pool, Dense head: 20 convolutions) of base width ``--width`` on
32x32x3 images. Nothing is executed but the parameter initialisation:
the figures are properties of the compiled program, not of its run.

  python benchmarks/kernels.py
  python benchmarks/kernels.py --models resnet --width 64 --periods 1,1
  python benchmarks/kernels.py --blocks 2 --width 8 --batch 2 --out /tmp/k.json
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import re
import sys
import time
from importlib import metadata

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import kaisa_jax

_REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, os.path.join(_REPO, "examples"))
import transformer  # examples/transformer.py  # noqa: E402

LEARNING_RATE = 3e-3  # the example transformer's AdamW learning rate
# kaisa's other settings: the example's kaisa before AdamW (no KL clip,
# per-example G scaling); the periods are the benchmark's.
KAISA = {k: v for k, v in transformer.KFAC_ADAMW.items()
         if k not in ("learning_rate", "factor_update_steps", "inv_update_steps")}
PERIODS = ((1, 1), (10, 100))
KERNEL_RATIO_TARGET = (1.5, (1, 1))  # fusions + custom calls, at these periods
COMPILE_RATIO_TARGET = (2.0, ((1, 1), (10, 100)))
IMAGE_SIZE = 32
CLASSES = 10
EIGEN_PATTERNS = ("syev", "heev", "eigh")  # syev covers syevd and syevj
CHOLESKY_PATTERNS = ("potrf", "cholesky")
DECOMPOSITION_PATTERNS = EIGEN_PATTERNS + CHOLESKY_PATTERNS


# --------------------------------------------------------------------------- models


class BasicBlock(nn.Module):
  """Two 3x3 convs with BatchNorm; a 1x1 projection + BatchNorm where the shape changes."""
  features: int
  strides: int = 1

  @nn.compact
  def __call__(self, x):
    y = nn.Conv(self.features, (3, 3), self.strides, padding="SAME", use_bias=False,
                name="conv1")(x)
    y = nn.relu(nn.BatchNorm(use_running_average=False, name="bn1")(y))
    y = nn.Conv(self.features, (3, 3), padding="SAME", use_bias=False, name="conv2")(y)
    y = nn.BatchNorm(use_running_average=False, name="bn2")(y)
    if x.shape != y.shape:
      x = nn.Conv(self.features, (1, 1), self.strides, use_bias=False, name="proj")(x)
      x = nn.BatchNorm(use_running_average=False, name="proj_bn")(x)
    return nn.relu(x + y)


class ResNet18(nn.Module):
  """ResNet-18 for small images: widths width x (1, 2, 4, 8), 20 convolutions."""
  width: int = 16
  classes: int = CLASSES

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(self.width, (3, 3), padding="SAME", use_bias=False, name="stem")(x)
    x = nn.relu(nn.BatchNorm(use_running_average=False, name="stem_bn")(x))
    for stage in range(4):
      for block in range(2):
        x = BasicBlock(self.width * 2**stage, 2 if stage and not block else 1,
                       name=f"stage{stage}_block{block}")(x)
    return nn.Dense(self.classes, name="head")(x.mean(axis=(1, 2)))


def transformer_problem(args, rng) -> dict:
  """The example transformer, unrolled: loss(params, x, y) and its arguments."""
  model = transformer.Transformer(vocab=len(transformer.VOCAB), d_model=args.d_model,
                                  heads=args.heads, blocks=args.blocks,
                                  context=args.context)
  x, y = (jnp.asarray(rng.integers(0, len(transformer.VOCAB), (args.batch, args.context)),
                      jnp.int32) for _ in range(2))
  params = model.init(jax.random.key(args.seed), x)["params"]
  return dict(label=f"transformer, {args.blocks} blocks unrolled, d {args.d_model}, "
                    f"{args.heads} heads; batch {args.batch} x {args.context}",
              loss_fn=transformer.make_loss(model), has_aux=False, params=params,
              args=(x, y))


def resnet_problem(args, rng) -> dict:
  """ResNet-18 with BatchNorm in training mode: loss(params, batch_stats, x, y).

  The loss returns the updated batch statistics as its aux (``has_aux``), as
  a BatchNorm train step does; the step returns them.
  """
  model = ResNet18(width=args.width)
  x = jnp.asarray(rng.normal(size=(args.batch, IMAGE_SIZE, IMAGE_SIZE, 3)), jnp.float32)
  y = jnp.asarray(rng.integers(0, CLASSES, (args.batch,)), jnp.int32)
  variables = model.init(jax.random.key(args.seed), x)

  def loss_fn(params, batch_stats, x, y):
    logits, new = model.apply({"params": params, "batch_stats": batch_stats}, x,
                              mutable=["batch_stats"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, new["batch_stats"]

  w = args.width
  return dict(label=f"ResNet-18, widths {w}/{2 * w}/{4 * w}/{8 * w}; batch {args.batch} x "
                    f"{IMAGE_SIZE}x{IMAGE_SIZE}x3",
              loss_fn=loss_fn, has_aux=True, params=variables["params"],
              args=(variables["batch_stats"], x, y))


MODELS = {"transformer": transformer_problem, "resnet": resnet_problem}


# --------------------------------------------------------------------------- the step


def make_optimizer(layers, periods, skip):
  if periods is None:
    return optax.adamw(LEARNING_RATE)
  factor_steps, inv_steps = periods
  return optax.chain(
      kaisa_jax.kaisa(layers, factor_update_steps=factor_steps, inv_update_steps=inv_steps,
                      learning_rate=LEARNING_RATE, skip_layers=skip, **KAISA),
      optax.adamw(LEARNING_RATE))


def make_step(loss_fn, has_aux: bool, opt, with_captures: bool):
  """A fresh jitted train step (a new function: no tracing or compile cache hit)."""

  def step(params, state, *args):
    if with_captures:
      value, grads, captures = kaisa_jax.value_and_grad(loss_fn, has_aux=has_aux)(
          params, *args)
      updates, state = opt.update(grads, state, params, captures=captures)
    else:
      value, grads = jax.value_and_grad(loss_fn, has_aux=has_aux)(params, *args)
      updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state, value

  return jax.jit(step, donate_argnums=(0, 1))


def compile_step(problem, opt, with_captures: bool):
  """(lower seconds, compile seconds, optimized HLO text) of one fresh compile."""
  step = make_step(problem["loss_fn"], problem["has_aux"], opt, with_captures)
  # Abstract arguments: nothing is donated or run.
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                          (problem["params"], *problem["args"]))
  abstract = (abstract[0], jax.eval_shape(opt.init, problem["params"]), *abstract[1:])
  start = time.perf_counter()
  lowered = step.lower(*abstract)
  lowered_s = time.perf_counter() - start
  start = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  return lowered_s, compile_s, compiled.as_text()


# --------------------------------------------------------------------------- HLO


_INSTRUCTION = re.compile(r"^\s+(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*)$")
_COMPUTATION = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_TARGET = re.compile(r'custom_call_target="([^"]*)"')
# Operands naming the computations a control-flow op runs as such (not fused).
_CONTROL_FLOW = re.compile(
    r"\b(?:body|condition|true_computation|false_computation|to_apply|calls)=%?([\w.\-]+)"
    r"|branch_computations=\{([^}]*)\}")
_CONTROL_OPS = ("while", "conditional", "call", "async-start")
# Ops that are no kernel of their own outside a fusion.
_FREE_OPS = ("parameter", "constant", "tuple", "get-tuple-element", "bitcast")


def _opcode(rhs: str) -> str:
  """The op of an instruction's right-hand side ``<shape> <op>(<operands>), ...``.

  The shape is one token (``f32[64,64]{1,0}``) or a parenthesised tuple of
  them, which may hold spaces and nested parentheses.
  """
  if rhs.startswith("("):
    depth = 0
    for i, c in enumerate(rhs):
      depth += {"(": 1, ")": -1}.get(c, 0)
      if depth == 0:
        break
    rest = rhs[i + 1:]
  else:
    rest = rhs.split(" ", 1)[1] if " " in rhs else ""
  return rest.strip().split("(", 1)[0].strip()


def parse_hlo(text: str) -> tuple[dict, str]:
  """{computation name: [(op, instruction line)]} and the entry computation's name."""
  computations, entry, current = {}, None, None
  for line in text.splitlines():
    if current is None:
      match = _COMPUTATION.match(line)
      if match:
        current = match.group(2)
        computations[current] = []
        entry = current if match.group(1) else entry
    elif line.strip() == "}":
      current = None
    else:
      match = _INSTRUCTION.match(line)
      if match:
        computations[current].append((_opcode(match.group(1)), line))
  return computations, entry


def count_hlo(text: str) -> dict:
  """Fusions, custom calls (by target) and decomposition calls in every computation.

  Also ``other_ops``: the ops outside fusions (in the entry computation and
  the while / conditional / call computations it runs), parameters,
  constants, tuples and bitcasts aside: on CPU an unfused dot, convolution
  or copy is a kernel of its own too.
  """
  computations, entry = parse_hlo(text)
  ops, targets = collections.Counter(), collections.Counter()
  for instructions in computations.values():
    for op, line in instructions:
      ops[op] += 1
      if op == "custom-call":
        target = _TARGET.search(line)
        targets[target.group(1) if target else "?"] += 1
  run, todo = set(), [entry]
  while todo:
    name = todo.pop()
    if name in run or name not in computations:
      continue
    run.add(name)
    for op, line in computations[name]:
      if op in _CONTROL_OPS:
        for called, branches in _CONTROL_FLOW.findall(line):
          todo += [called] if called else re.findall(r"[\w.\-]+", branches)
  other = collections.Counter(op for name in run for op, _ in computations[name]
                              if op not in _FREE_OPS + ("fusion", "custom-call"))
  decompositions = sum(n for t, n in targets.items() if is_decomposition(t))
  return dict(fusions=ops["fusion"], custom_calls=ops["custom-call"],
              kernels=ops["fusion"] + ops["custom-call"], decompositions=decompositions,
              targets=dict(targets), other_ops=dict(other), all_ops=dict(ops))


def is_decomposition(target: str) -> bool:
  return any(p in target.lower() for p in DECOMPOSITION_PATTERNS)


# --------------------------------------------------------------------------- registry


def preconditioned(layers, skip) -> list:
  return [l for l in layers if not any(re.search(p, l.name) for p in skip)]


def factor_groups(layers) -> dict:
  """(A size, A diagonal, G size) -> [layers]: what the library will group on."""
  groups = collections.defaultdict(list)
  for l in layers:
    groups[(l.a_factor_shape.size, l.a_factor_shape.diagonal, l.g_factor_shape.size)].append(l)
  return dict(groups)


def expected_decompositions(layers) -> int:
  """One call per group and factor decomposed: 2, or 1 where a factor is diagonal."""
  total = 0
  for group in factor_groups(layers).values():
    a, g = group[0].a_factor_shape, group[0].g_factor_shape
    total += (not a.diagonal) + (not g.diagonal)
  return total


# --------------------------------------------------------------------------- main


def parse_periods(text: str) -> tuple[int, int]:
  try:
    factor, inv = (int(v) for v in text.split(","))
  except ValueError:
    raise argparse.ArgumentTypeError(f"periods are 'F,I', e.g. 10,100, not {text!r}")
  return factor, inv


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--models", nargs="+", choices=sorted(MODELS),
                      default=["transformer", "resnet"])
  parser.add_argument("--blocks", type=int, default=8, help="transformer blocks (default 8)")
  parser.add_argument("--d-model", type=int, default=transformer.D_MODEL)
  parser.add_argument("--heads", type=int, default=transformer.HEADS)
  parser.add_argument("--context", type=int, default=transformer.CONTEXT,
                      help="transformer characters per window (default %(default)s)")
  parser.add_argument("--width", type=int, default=16,
                      help="ResNet base width: stages of width x 1, 2, 4, 8 (default 16)")
  parser.add_argument("--batch", type=int, default=32,
                      help="examples per batch, both models (default 32)")
  parser.add_argument("--periods", type=parse_periods, nargs="+", default=list(PERIODS),
                      metavar="F,I", help="kaisa (factor, inverse) update periods "
                      "(default 1,1 10,100)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default=os.path.join("results", "kernels.json"),
                      help="the JSON written (default %(default)s)")
  return parser.parse_args(argv)


def bench_model(name: str, args, rng) -> dict:
  problem = MODELS[name](args, rng)
  layers = kaisa_jax.find_layers(problem["loss_fn"], problem["params"], *problem["args"])
  # Only what the library itself lists as skipped (with its reason) is skipped.
  skip = tuple(f"^{re.escape(s.name)}$" for s in layers.skipped)
  used = preconditioned(layers, skip)
  groups = factor_groups(used)
  runs = []
  for periods in [None] + list(args.periods):
    opt = make_optimizer(layers, periods, skip)
    lowered_s, compile_s, text = compile_step(problem, opt, with_captures=periods is not None)
    runs.append(dict(optimizer="adamw" if periods is None else "kaisa + adamw",
                     periods=periods, lower_s=lowered_s, compile_s=lowered_s + compile_s,
                     xla_compile_s=compile_s, **count_hlo(text)))
    print(f"  [{name} {runs[-1]['optimizer']} {periods or ''}: "
          f"{runs[-1]['compile_s']:.1f} s]", flush=True)
  adamw = runs[0]
  for run in runs:
    run["kernel_ratio"] = run["kernels"] / adamw["kernels"]
    run["compile_ratio"] = run["compile_s"] / adamw["compile_s"]
  kinds = collections.Counter(l.kind for l in layers)
  return dict(model=name, label=problem["label"], registered=len(layers),
              kinds=dict(kinds), skipped=[dict(name=s.name, reason=s.reason)
                                          for s in layers.skipped],
              preconditioned=len(used),
              groups=[dict(a_size=a, a_diagonal=d, g_size=g, layers=len(names))
                      for (a, d, g), names in groups.items()],
              expected_decompositions=expected_decompositions(used), runs=runs)


def table(result: dict) -> str:
  header = ("optimizer", "periods", "fusions", "custom calls", "fus+cc", "x AdamW",
            "compile s", "x AdamW", "decomp calls", "factor groups")
  rows = []
  for run in result["runs"]:
    kfac = run["periods"] is not None
    rows.append((run["optimizer"], f"{run['periods'][0]},{run['periods'][1]}" if kfac else "-",
                 str(run["fusions"]), str(run["custom_calls"]), str(run["kernels"]),
                 f"{run['kernel_ratio']:.2f}", f"{run['compile_s']:.2f}",
                 f"{run['compile_ratio']:.2f}", str(run["decompositions"]),
                 str(len(result["groups"])) if kfac else "-"))
  widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
  lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                     for i, (c, w) in enumerate(zip(r, widths))) for r in [header] + rows]
  lines.insert(1, "-" * len(lines[0]))
  return "\n".join(lines)


def targets(result: dict) -> list[tuple[str, bool]]:
  """(description, passed) of each target this run measured."""
  by_periods = {tuple(r["periods"]): r for r in result["runs"] if r["periods"] is not None}
  checks = []
  limit, periods = KERNEL_RATIO_TARGET
  if periods in by_periods:
    r = by_periods[periods]
    checks.append((f"fusions+custom calls at periods {periods} <= {limit} x AdamW's: "
                   f"{r['kernel_ratio']:.2f} x", r["kernel_ratio"] <= limit))
  limit, periods_list = COMPILE_RATIO_TARGET
  for periods in periods_list:
    if periods in by_periods:
      r = by_periods[periods]
      checks.append((f"compile time at periods {periods} <= {limit} x AdamW's: "
                     f"{r['compile_ratio']:.2f} x", r["compile_ratio"] <= limit))
  expected = result["expected_decompositions"]
  for periods, r in by_periods.items():
    checks.append((f"decomposition calls at periods {periods} = {expected} (groups x "
                   f"factors per group): {r['decompositions']}",
                   r["decompositions"] == expected))
  return checks


def report(result: dict):
  print(f"\n{result['model']}: {result['label']}")
  kinds = ", ".join(f"{n} {k}" for k, n in result["kinds"].items())
  print(f"{result['registered']} registered layers ({kinds}); "
        f"{result['preconditioned']} preconditioned")
  if result["skipped"]:
    print("skipped (passed in skip_layers, with the library's reason):")
    for s in result["skipped"]:
      print(f"  {s['name']}: {s['reason']}")
  else:
    print("skipped: none")
  groups = "; ".join(f"A {g['a_size']}{' (diag)' if g['a_diagonal'] else ''} x G "
                     f"{g['g_size']}: {g['layers']}" for g in result["groups"])
  print(f"{len(result['groups'])} factor groups (A size x G size: layers): {groups}")
  print(f"expected decomposition calls: {result['expected_decompositions']} (2 per group, "
        "A and G; 1 where A is diagonal)\n")
  print(table(result))
  print()
  for description, passed in targets(result):
    print(f"{'PASS' if passed else 'FAIL'}  {result['model']}: {description}")


def environment() -> dict:
  return {"jax": jax.__version__, "jaxlib": metadata.version("jaxlib"),
          "flax": metadata.version("flax"), "optax": optax.__version__, "backend": jax.default_backend(),
          "devices": [str(d) for d in jax.devices()], "cpu_count": os.cpu_count(),
          "python": platform.python_version(), "machine": platform.machine(),
          "xla_flags": os.environ.get("XLA_FLAGS", "")}


def main(argv=None) -> dict:
  args = parse_args(argv)
  start = time.perf_counter()
  load_before = os.getloadavg()[0]
  env = environment()
  print(f"jax {env['jax']}, {env['backend']} ({len(env['devices'])} devices), "
        f"{env['cpu_count']} cores, load average {load_before:.1f}; kaisa {KAISA}, "
        f"lr {LEARNING_RATE}")
  # The backend's one-time start (and XLA's) outside the timed compiles.
  jax.jit(lambda a: jnp.tanh(a) @ a).lower(jnp.ones((4, 4))).compile()
  rng = np.random.default_rng(args.seed)
  results = []
  for name in args.models:
    results.append(bench_model(name, args, rng))
    report(results[-1])
  targets_seen = collections.Counter()
  for result in results:
    for run in result["runs"]:
      targets_seen.update(run["targets"])
  print("\ncustom-call targets seen (all runs, summed; * counted as a decomposition: "
        f"contains one of {', '.join(DECOMPOSITION_PATTERNS)}):")
  for target, n in sorted(targets_seen.items()):
    print(f"  {'*' if is_decomposition(target) else ' '} {target}: {n}")
  elapsed = time.perf_counter() - start
  load = (load_before, os.getloadavg()[0])
  busy = max(load) > env["cpu_count"] + 0.5
  print(f"\nwhole benchmark: {elapsed:.0f} s; load average (1 min) before {load[0]:.1f}, "
        f"after {load[1]:.1f}" + (": other processes shared the cores, the compile times "
                                  "are noisy" if busy else ""))
  report_json = {"environment": env, "args": {k: v for k, v in vars(args).items()},
                 "kaisa": KAISA, "learning_rate": LEARNING_RATE, "seconds": elapsed,
                 "load_average": load,
                 "decomposition_patterns": list(DECOMPOSITION_PATTERNS), "results": results,
                 "targets": {r["model"]: [dict(target=d, passed=p) for d, p in targets(r)]
                             for r in results}}
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(report_json, f, indent=2)
    print(f"wrote {args.out}")
  return report_json


if __name__ == "__main__":
  main()
