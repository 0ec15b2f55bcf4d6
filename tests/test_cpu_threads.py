"""cpu_threads: kaisa's first CPU decomposition sets jaxlib's OpenBLAS to one thread.

Each case runs in a fresh process (the setting is made once per process),
with every BLAS pool first set to 3 threads so that the change is visible
on any core count.
"""

import json
import os
import subprocess
import sys

SCRIPT = r"""
import json, os
import flax.linen as nn, jax, jax.numpy as jnp, numpy as np, threadpoolctl
import kaisa_jax

jax.block_until_ready(jnp.linalg.eigh(jnp.eye(2)))  # jaxlib loads scipy's LAPACK
threadpoolctl.threadpool_limits(3, user_api="blas")
pools = lambda: {lib["filepath"]: lib["num_threads"] for lib in threadpoolctl.threadpool_info()
                 if lib["internal_api"] == "openblas"}
before = pools()
model = nn.Dense(4)
x, y = jnp.ones((8, 5)), jnp.zeros((8, 4))
params = model.init(jax.random.key(0), x)["params"]
loss_fn = lambda p, x, y: jnp.mean((model.apply({"params": p}, x) - y) ** 2)
tx = kaisa_jax.kaisa(kaisa_jax.find_layers(loss_fn, params, x, y))
_, grads, captures = kaisa_jax.value_and_grad(loss_fn)(params, x, y)
jax.block_until_ready(jax.jit(lambda g, s, p, c: tx.update(g, s, p, captures=c))(
    grads, tx.init(params), params, captures))
print(json.dumps({"before": before, "after": pools(),
                  "numpy_dir": os.path.dirname(np.__file__)}))
"""


def run(env_update):
  env = {k: v for k, v in os.environ.items()
         if k not in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")}
  env.update(env_update)
  out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_jaxlibs_openblas_gets_one_thread_and_numpys_keeps_its_own():
  result = run({})
  scipy_pools = [p for p in result["after"] if "scipy" in p]
  assert scipy_pools, result  # the pip wheels bundle scipy's OpenBLAS
  for path, threads in result["after"].items():
    assert result["before"][path] == 3
    numpys = path.startswith(result["numpy_dir"]) or path.startswith(result["numpy_dir"] + ".libs")
    assert threads == (3 if numpys else 1), (path, result)


def test_an_environment_setting_is_left_alone():
  result = run({"OPENBLAS_NUM_THREADS": "3"})
  assert result["after"] == result["before"] and set(result["after"].values()) == {3}, result
