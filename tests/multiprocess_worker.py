"""One of the two processes of tests/test_multiprocess.py.

Usage: multiprocess_worker.py PROCESS_ID PORT OUT_DIR

Joins a 2-process JAX job (4 CPU devices here, 8 in all) coordinated on
127.0.0.1:PORT, trains the model of test_distributed.py with KAISA inside a
``jax.shard_map`` over the 8 global devices for every (compute_method,
grad_worker_frac) in METHODS x FRACTIONS, and writes this process's copy of the parameters
after every step to OUT_DIR/params_<PROCESS_ID>.npz, one key per
(method, fraction, step, leaf index in ``jax.tree.leaves`` order).

Not a test module (pytest does not collect it): the test starts two of these
and imports the constants below.
"""

import os
import re
import sys

if __name__ == "__main__":
  # Four devices per process, and only the CPU backend. The parent pytest
  # process (conftest.py) asks for 8 devices and the child inherits its
  # XLA_FLAGS, so the count is replaced, not appended to. This must happen
  # before jax is imported, which includes importing test_distributed below;
  # and only when run as a worker: the test imports this module's constants
  # and must keep its own 8 devices.
  _FLAG = "--xla_force_host_platform_device_count"
  os.environ["XLA_FLAGS"] = (re.sub(_FLAG + r"=\d+", "", os.environ.get("XLA_FLAGS", ""))
                             + f" {_FLAG}=4").strip()
  os.environ["JAX_PLATFORMS"] = "cpu"

# The model, loss, batches and optimizer are test_distributed's, so the
# single-process reference computed by the test trains exactly the same thing.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

import kaisa_jax  # noqa: E402
from test_distributed import (AXIS, batches, initial_params, loss_fn, make_opt,  # noqa: E402
                              shard_map_program)

NUM_PROCESSES = 2
LOCAL_DEVICES = 4
METHODS = ("eigen", "inverse")
# MEM-OPT (1 grad worker per layer), HYBRID (4 per layer: grad-worker groups
# are the grid columns (0, 2, 4, 6) and (1, 3, 5, 7), so the grouped
# collectives of the eigen data cross the process boundary, while the receiver
# groups (0, 1), (2, 3), ... stay inside one process) and COMM-OPT (all 8).
FRACTIONS = (1 / 8, 1 / 2, 1.0)


def case_key(method, frac, step, leaf):
  """The .npz key of one leaf after one step; the test builds the same keys."""
  return f"{method}_f{round(frac * 8)}of8_step{step}_leaf{leaf}"


def global_array(value, sharding):
  """A global jax.Array built from this process's own copy of the full value.

  Every process generates the same full batch (and the same initial params),
  so each one hands over exactly the slices its own devices hold.
  """
  value = np.asarray(value)
  return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def replicated_value(array):
  """The host value of a replicated global array, read from this process's devices.

  All addressable copies must agree bit for bit, as under run_pmap: a
  replicated out_spec is a promise that every device holds the same value.
  """
  shards = [np.asarray(shard.data) for shard in array.addressable_shards]
  for shard in shards[1:]:
    np.testing.assert_array_equal(shard, shards[0])
  return shards[0]


def train(layers, mesh, method, frac):
  """run_shard_map of test_distributed, with global arrays built per process."""
  grad_workers = max(1, round(mesh.size * frac))
  # JAX's grouped collectives (HYBRID only) need check_vma=False.
  check_vma = not 1 < grad_workers < mesh.size
  opt = make_opt(layers, method, axis_name=AXIS, grad_worker_frac=frac)
  init, step = shard_map_program(opt, mesh, check_vma)
  params = initial_params()
  replicated = NamedSharding(mesh, P())
  split = NamedSharding(mesh, P(AXIS))
  params = jax.tree.map(lambda a: global_array(a, replicated), params)
  state = init(params)
  trajectory = []
  for x, y in batches():
    params, state = step(params, state, global_array(x, split), global_array(y, split))
    trajectory.append([replicated_value(leaf) for leaf in jax.tree.leaves(params)])
  return trajectory


def main():
  process_id, port, out_dir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
  # The CPU backend has no cross-process collectives unless gloo is chosen,
  # and this must be set before the backend starts.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  address = f"127.0.0.1:{port}"
  jax.distributed.initialize(coordinator_address=address, coordinator_bind_address=address,
                             num_processes=NUM_PROCESSES, process_id=process_id,
                             initialization_timeout=60)
  assert jax.process_index() == process_id
  assert jax.process_count() == NUM_PROCESSES
  assert jax.local_device_count() == LOCAL_DEVICES, jax.local_devices()
  assert jax.device_count() == NUM_PROCESSES * LOCAL_DEVICES, jax.devices()

  # All 8 devices, in the same order on both processes (jax.devices() is
  # global and sorted), so mesh position i is the same device everywhere.
  # Process 0 holds positions 0-3: the layout FRACTIONS' comment relies on.
  mesh = Mesh(np.array(jax.devices()), (AXIS,))
  owners = [device.process_index for device in mesh.devices]
  assert owners == [0] * LOCAL_DEVICES + [1] * LOCAL_DEVICES, owners
  x, y = next(batches())
  layers = kaisa_jax.find_layers(loss_fn, initial_params(), x, y)

  results = {}
  for method in METHODS:
    for frac in FRACTIONS:
      for t, leaves in enumerate(train(layers, mesh, method, frac)):
        for i, leaf in enumerate(leaves):
          results[case_key(method, frac, t, i)] = leaf
  np.savez(os.path.join(out_dir, f"params_{process_id}.npz"), **results)
  # Leave together: process 0 hosts the coordinator, which must outlive process 1.
  jax.distributed.shutdown()


if __name__ == "__main__":
  main()
