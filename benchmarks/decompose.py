"""What one K-FAC decomposition costs on this backend, by algorithm.

A decomposition step eigendecomposes every layer's A and G (``"eigen"``,
``"ekfac"``) or inverts them damped (``"inverse"``). This times, for the
factor sizes of typical layers, each symmetric eigensolver JAX offers on
the default backend (``jax.lax.linalg.eigh(implementation=...)``: QR, the
LAPACK/cuSOLVER divide and conquer ``syevd``; JACOBI, ``syevj`` on GPU;
QDWH, the matrix-multiply based polar decomposition), and the damped
Cholesky inverse, in float32, one matrix and a batch of 8 blocks.

Each is checked against float64 NumPy on the same factor (a covariance
``xᵀx/rows + 1e-3 I`` of random rows, as K-FAC's A): the relative error of
the preconditioned matrix ``(G + γI)⁻¹ M`` that K-FAC builds from the
result, with γ = 1e-3, so that the algorithms are compared on what the
optimizer uses rather than on eigenvectors (which are not unique).

  python benchmarks/decompose.py
  python benchmarks/decompose.py --sizes 256 1024 --repeats 20

Times are medians of ``--repeats`` calls of one compiled function, after a
warm-up; an implementation the backend does not offer is reported as such.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

DAMPING = 1e-3
IMPLEMENTATIONS = ("default", "qr", "jacobi", "qdwh", "cholesky")


def factor(n: int, rng) -> np.ndarray:
  """A K-FAC-like factor: the covariance of 2n random rows, plus a small ridge."""
  rows = rng.standard_normal((2 * n, n)) * np.linspace(0.1, 3.0, n)  # graded spectrum
  return rows.T @ rows / (2 * n) + 1e-3 * np.eye(n)


def preconditioner(name: str):
  """``f(factors (..., n, n), m (..., n, n)) -> (factors + γI)⁻¹ m`` in float32."""
  if name == "cholesky":
    def solve(f, m):
      eye = jnp.eye(f.shape[-1], dtype=f.dtype)
      chol = jnp.linalg.cholesky(f + DAMPING * eye)
      return jax.scipy.linalg.cho_solve((chol, True), m)
    return solve
  implementation = (None if name == "default"
                    else getattr(jax.lax.linalg.EighImplementation, name.upper()))

  def solve(f, m):
    vecs, vals = jax.lax.linalg.eigh(f, implementation=implementation)
    vals = jnp.maximum(vals, 0)
    projected = jnp.swapaxes(vecs, -1, -2) @ m
    return vecs @ (projected / (vals[..., :, None] + DAMPING))
  return solve


def time_one(fn, *args, repeats: int) -> float:
  compiled = jax.jit(fn).lower(*args).compile()
  jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256, 512, 1024, 2048])
  parser.add_argument("--batch", type=int, default=8, help="blocks in the batched case")
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  rng = np.random.default_rng(args.seed)
  print(f"jax {jax.__version__}, {jax.default_backend()} ({jax.devices()[0].device_kind}); "
        f"float32, damping {DAMPING}; median of {args.repeats} calls, ms")
  header = f"{'n':>5}  {'blocks':>6}  " + "  ".join(f"{name:>17}" for name in IMPLEMENTATIONS)
  print(header + "\n" + "-" * len(header))
  for n in args.sizes:
    for blocks in (1, args.batch):
      f64 = np.stack([factor(n, rng) for _ in range(blocks)])
      m64 = rng.standard_normal((blocks, n, n))
      exact = np.linalg.solve(f64 + DAMPING * np.eye(n), m64)
      f32, m32 = jnp.asarray(f64, jnp.float32), jnp.asarray(m64, jnp.float32)
      if blocks == 1:
        f32, m32, exact = f32[0], m32[0], exact[0]
      cells = []
      for name in IMPLEMENTATIONS:
        fn = preconditioner(name)
        try:
          ms = time_one(fn, f32, m32, repeats=args.repeats)
        except Exception:  # noqa: BLE001 - an implementation this backend lacks
          cells.append(f"{'n/a':>17}")
          continue
        error = np.linalg.norm(np.asarray(fn(f32, m32), np.float64) - exact) / np.linalg.norm(exact)
        cells.append(f"{ms:8.2f} ({error:6.0e})")
      print(f"{n:>5}  {blocks:>6}  " + "  ".join(cells), flush=True)
  print("cells: milliseconds (relative error of (F + γI)⁻¹ M against float64 NumPy)")


if __name__ == "__main__":
  main()
