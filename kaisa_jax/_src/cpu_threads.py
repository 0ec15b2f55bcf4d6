"""CPU threads: the decompositions' LAPACK runs on one thread, set by the library itself.

On the CPU backend jaxlib computes ``eigh`` and Cholesky with the LAPACK of
scipy's OpenBLAS, which keeps a pool of one thread per core beside XLA's own
intra-op pool. The two oversubscribe the cores, and OpenBLAS's threads spin
while they wait for work: a decomposition then stalls on threads that are not
running. Measured on 2 cores (jax 0.10.2, another process busy), a float32
``eigh`` in a jitted step took 236 ms for a 129 x 129 factor with OpenBLAS's
default pool and 1.1 ms on one thread (513 x 513: 355 ms and 40 ms).

So the first time ``kaisa`` builds a decomposition for the CPU backend
(``limit_lapack_threads``, called while tracing), it sets the OpenBLAS
libraries the process has loaded to one thread, once per process, except
numpy's own copy: numpy's matrix products keep their threads (where numpy
and scipy share one OpenBLAS, as conda installs them, it is limited). It leaves
them alone when ``OPENBLAS_NUM_THREADS`` or ``OMP_NUM_THREADS`` is set. To
give them another count, set it after the first step, e.g. with
``threadpoolctl.threadpool_limits(n, user_api="blas")``.
"""

from __future__ import annotations

import importlib
import os
import threading

import numpy as np
import threadpoolctl

_ENV_SETTINGS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")
_lock = threading.Lock()
_done = False


def _is_numpys(path: str) -> bool:
  """Whether ``path`` is the BLAS bundled inside numpy's own wheel."""
  package = os.path.dirname(os.path.abspath(np.__file__))
  return path.startswith(package + os.sep) or path.startswith(package + ".libs" + os.sep)


def limit_lapack_threads() -> list[str]:
  """Sets the OpenBLAS that jaxlib's CPU decompositions call to one thread, once.

  Returns:
    The paths of the libraries this call limited: none after the first call,
    when the environment sets the thread counts, or with another BLAS (MKL,
    Accelerate). An OpenBLAS that numpy shares with scipy (a conda install)
    is limited too.

  Example:
    >>> limit_lapack_threads()  # on the first call, e.g.
    ['.../site-packages/scipy.libs/libscipy_openblas-6cdc3b4a.so']
  """
  global _done
  with _lock:
    if _done:
      return []
    _done = True
    if any(name in os.environ for name in _ENV_SETTINGS):
      return []
    importlib.import_module("scipy.linalg.cython_lapack")  # loads the LAPACK jaxlib calls
    controller = threadpoolctl.ThreadpoolController()
    paths = [lib["filepath"] for lib in controller.info()
             if lib["internal_api"] == "openblas" and not _is_numpys(lib["filepath"])]
    if paths:
      controller.select(filepath=paths).limit(limits=1)
    return paths
