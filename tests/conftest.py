"""XLA flags for the tests, set before jax is imported (subprocesses inherit them).

Eight CPU devices for the multi-device tests; the other tests run on the
first device as usual. The tests' programs are tiny, so compiling them costs
more than running them: LLVM's optimisation level 0 compiles them about 30 %
faster. It can move float32 results by roundings (measured: 7e-4 of one
update element after two eigendecompositions), which the tolerances against
float64 oracles allow for; where two float32 programs are compared through
eigendecompositions, which amplify such roundings, the test runs in float64.
"""

import os

for _flag in ("--xla_force_host_platform_device_count=8", "--xla_backend_optimization_level=0"):
  if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
