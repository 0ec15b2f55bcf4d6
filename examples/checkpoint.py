"""Checkpoint and resume K-FAC training with orbax.

Trains the digits MLP of ``examples/digits.py`` with ``kaisa + sgd`` for
``--steps`` steps, saving the parameters and the whole optimizer state
(running factors, eigendecompositions, step counter, momentum) every
``--save-every`` steps with an ``orbax.checkpoint.CheckpointManager``. Then
it plays a crash: a fresh process state (new parameters, new optimizer
state) restores the newest checkpoint and trains on to the end. The resumed
run must finish with exactly the parameters of an uninterrupted one; the
script checks it and exits non-zero if not.

Resuming restores the batch position too: the batch order is a function of
the seed and the step, so the restored step count says where to go on.

Run from the repository root::

  python examples/checkpoint.py                   # 60 steps, a checkpoint every 20
  python examples/checkpoint.py --steps 12 --save-every 5
"""

from __future__ import annotations

import argparse
import os
import tempfile

import jax
import numpy as np
import orbax.checkpoint as ocp

import kaisa_jax

import digits  # the data and the MLP of the main demo


def train(step_fn, params, opt_state, data, batches, start: int, stop: int,
          manager: ocp.CheckpointManager | None = None):
  """Steps ``start`` .. ``stop - 1``; saves through ``manager`` when it says so."""
  x, y = data["x_train"], data["y_train"]
  for step in range(start, stop):
    params, opt_state, _ = step_fn(params, opt_state, x[batches[step]], y[batches[step]])
    if manager is not None:
      # ``step + 1`` steps are done: the number that resumes at the right batch.
      manager.save(step + 1, args=ocp.args.StandardSave(
          {"params": params, "opt_state": opt_state}))
  return params, opt_state


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--steps", type=int, default=60)
  parser.add_argument("--save-every", type=int, default=20)
  parser.add_argument("--crash-at", type=int, default=None,
                      help="steps done before the crash (default: five sixths of --steps)")
  parser.add_argument("--dir", default=None, help="checkpoint directory (default: a temporary one)")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  crash_at = args.crash_at if args.crash_at is not None else args.steps - args.steps // 6

  data = digits.load_data(args.seed)
  batches = digits.batch_indices(len(data["x_train"]), digits.BATCH_SIZE, args.steps, args.seed)
  model = digits.MLP()
  loss_fn = digits.make_loss(model)
  init_params = model.init(jax.random.key(args.seed), data["x_train"][:1])["params"]
  x0, y0 = data["x_train"][batches[0]], data["y_train"][batches[0]]
  layers = kaisa_jax.find_layers(loss_fn, init_params, x0, y0)
  opt = digits.make_optimizer("kaisa + sgd", layers)
  step_fn = jax.jit(digits.make_train_step(loss_fn, opt, uses_captures=True))

  # The reference: one uninterrupted run.
  expected, _ = train(step_fn, init_params, opt.init(init_params), data, batches, 0, args.steps)

  with tempfile.TemporaryDirectory() as tmp:
    directory = os.path.abspath(args.dir or os.path.join(tmp, "checkpoints"))
    options = ocp.CheckpointManagerOptions(save_interval_steps=args.save_every, max_to_keep=2)
    with ocp.CheckpointManager(directory, options=options) as manager:
      train(step_fn, init_params, opt.init(init_params), data, batches, 0, crash_at, manager)
      manager.wait_until_finished()
    print(f"trained {crash_at} steps, then 'crashed'; checkpoints kept: "
          f"{sorted(os.listdir(directory))}")

    # A new start: nothing survives but the directory. The template gives orbax
    # the tree structure (KaisaState and all) and the shapes to restore into.
    fresh_params = model.init(jax.random.key(args.seed + 1), x0[:1])["params"]
    template = {"params": fresh_params, "opt_state": opt.init(fresh_params)}
    with ocp.CheckpointManager(directory, options=options) as manager:
      resume_from = manager.latest_step()
      restored = manager.restore(resume_from, args=ocp.args.StandardRestore(
          jax.tree.map(ocp.utils.to_shape_dtype_struct, template)))
  kfac_state = restored["opt_state"][0]
  # The state keeps the factors per group of same-shape layers; the plan reads them per layer.
  plan = kaisa_jax.placement(layers, num_devices=1)
  print(f"restored step {resume_from}: KaisaState.step = {int(kfac_state.step)}, "
        f"layers {sorted(plan.layer_factors(kfac_state))} "
        f"(factor groups {sorted(kfac_state.factors)})")
  resumed, _ = train(step_fn, restored["params"], restored["opt_state"], data, batches,
                     resume_from, args.steps)

  worst = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
              for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(expected)))
  print(f"resumed at step {resume_from} and trained to step {args.steps}: largest "
        f"difference from the uninterrupted run {worst:.3g}")
  if worst != 0.0:
    raise SystemExit("the resumed run differs from the uninterrupted one")
  print("identical")


if __name__ == "__main__":
  main()
