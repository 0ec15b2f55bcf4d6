"""XLA flags for the tests, set before jax is imported (subprocesses inherit them).

Eight CPU devices for the multi-device tests; the other tests run on the
first device as usual. The tests' programs are tiny, so compiling them
costs more than running them: LLVM's optimisation level 0 compiles them
about 30 % faster. It does not change the results: the order of the
floating-point operations is fixed by XLA's own passes, and LLVM may not
reorder them without fast-math, which XLA leaves off.
"""

import os

for _flag in ("--xla_force_host_platform_device_count=8", "--xla_backend_optimization_level=0"):
  if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
