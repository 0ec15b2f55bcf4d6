"""KAISA across two processes: the same answer as training in one process.

Two worker processes (tests/multiprocess_worker.py), 4 CPU devices each, join
one JAX job through ``jax.distributed.initialize`` on 127.0.0.1 with gloo
collectives, and train test_distributed.py's model with
``kaisa(axis_name=..., grad_worker_frac=f)`` inside a ``jax.shard_map`` over
the 8 global devices, for f = 1/8 (MEM-OPT), 1/2 (HYBRID) and 1 (COMM-OPT)
and both compute methods. The all-reduces then span both processes, and so
do HYBRID's grouped collectives among grad workers (its grid columns are
(0, 2, 4, 6) and (1, 3, 5, 7), process 0 holding devices 0-3); the optimizer
state's device-local leaves live partly on devices the other process owns.

The reference is the same training on one device with the global batch,
computed here: test_distributed.py checks that it equals the one-process
8-device shard_map for every strategy. The parameters after every step must
match it (norm-relative error <= 1e-5 per leaf), and the two processes must
hold bit-identical copies, since the parameters' out_spec says replicated.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import kaisa_jax
from multiprocess_worker import FRACTIONS, METHODS, NUM_PROCESSES, case_key
from test_distributed import (STEPS, assert_trajectories_close, batches, initial_params,
                              loss_fn, run_single)

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)
WORKER = os.path.join(TESTS, "multiprocess_worker.py")
# The whole test costs about 70 CPU-seconds, mostly each worker compiling its
# own copy of the six programs: 45-75 s on 2 shared cores. The margin is for
# slower machines; without a limit, a worker stuck in a collective whose peer
# died would hang the suite.
TIMEOUT_S = 180
GRACE_S = 10


def free_port() -> int:
  """A port nobody listens on now (the OS picks it); the coordinator binds it next."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start_workers(out_dir):
  port = free_port()
  env = dict(os.environ)
  # The workers must import this checkout's kaisa_jax and test_distributed,
  # whatever is installed. They set their own XLA_FLAGS (4 devices) before
  # importing jax, replacing the 8 that conftest.py put in this environment.
  env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
  procs, logs = [], []
  for i in range(NUM_PROCESSES):
    # Files, not pipes: a worker blocked on a full pipe while we wait on the
    # other one would stall both at their next collective.
    log = open(out_dir / f"worker_{i}.log", "w")
    logs.append(log)
    procs.append(subprocess.Popen(
        [sys.executable, WORKER, str(i), str(port), str(out_dir)],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
  return procs, logs


def worker_output(out_dir, limit=4000) -> str:
  parts = []
  for i in range(NUM_PROCESSES):
    text = (out_dir / f"worker_{i}.log").read_text(errors="replace")
    parts.append(f"--- worker {i} (last {limit} characters) ---\n{text[-limit:]}")
  return "\n".join(parts)


def wait_for_workers(procs, deadline):
  """Wait until every worker has exited; return why any had to be killed, or None.

  Once one worker fails, the other gets GRACE_S to fail on its own (its
  error is usually the collective that lost its peer) and is then killed
  rather than left waiting for its collectives' own timeouts.
  """
  while True:
    codes = [proc.poll() for proc in procs]
    if None not in codes:
      return None
    now = time.monotonic()
    if any(code not in (None, 0) for code in codes):
      deadline = min(deadline, now + GRACE_S)
      reason = f"killed {GRACE_S} s after the other worker failed"
    else:
      reason = f"killed after {TIMEOUT_S} s"
    if now > deadline:
      return reason
    time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.compat
def test_two_processes_match_single_device(tmp_path):
  procs, logs = start_workers(tmp_path)
  deadline = time.monotonic() + TIMEOUT_S
  killed = None
  try:
    # The reference is computed while the workers start up and compile.
    x, y = next(batches())
    layers = kaisa_jax.find_layers(loss_fn, initial_params(), x, y)
    expected = {method: run_single(layers, method) for method in METHODS}
    killed = wait_for_workers(procs, deadline)
  finally:
    # Whatever went wrong here, no worker outlives the test.
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
    for log in logs:
      log.close()
  codes = [proc.returncode for proc in procs]
  note = f" ({killed})" if killed else ""
  assert codes == [0] * NUM_PROCESSES, f"exit codes {codes}{note}\n{worker_output(tmp_path)}"

  treedef = jax.tree.structure(initial_params())
  num_leaves = treedef.num_leaves
  results = [np.load(tmp_path / f"params_{i}.npz") for i in range(NUM_PROCESSES)]
  failures = []
  for method in METHODS:
    for frac in FRACTIONS:
      copies = [[jax.tree.unflatten(treedef, [result[case_key(method, frac, t, j)]
                                              for j in range(num_leaves)])
                 for t in range(STEPS)] for result in results]
      case = f"{method}, grad_worker_frac={frac}"
      # Collect every failing case before failing: which strategies break
      # says more than the first one alone.
      try:
        assert_trajectories_close(copies[0], expected[method])
      except AssertionError as error:
        failures.append(f"{case}: {error}")
      for i, copy in enumerate(copies[1:], start=1):
        for a, b in zip(jax.tree.leaves(copy), jax.tree.leaves(copies[0])):
          if not np.array_equal(a, b):
            failures.append(f"{case}: process {i} holds other parameters than process 0")
            break
  assert not failures, "\n".join(failures)
