"""Warm-started eigenbases: refreshing the previous basis instead of a full eigh.

K-FAC (eigen) preconditions a layer's gradient ∇ with the eigenbases of its
running factors, ``P = QG [(QGᵀ ∇ QA) / (dG dAᵀ + γ)] QAᵀ``, recomputed every
``inv_update_steps`` (10 here) with ``eigh``. Between decompositions the
factors drift slowly (running averages, decay 0.95), so the previous basis
is nearly right: this measures, over a real training run, what a refresh of
it with matrix products costs and how good its preconditioned gradient is.

How:

1. Record. Train ``step_time.py``'s model on digits with its K-FAC + SGD
   (damping 1e-3, factors every step, decompositions every 10, kl_clip 1e-3,
   lr 0.1, momentum 0.9) for ``--steps`` steps, and keep each layer's running
   factors (``placement(...).layer_factors``) after every decomposition step
   and every ``--every``-th step, with that step's gradient matrices.
2. Replay. Every method walks the decomposition steps (every 10) in float32,
   jitted, keeping a basis and eigenvalues per factor: at step 0 a full
   ``eigh``; afterwards a refresh of the previous basis from the current
   factor, a full ``eigh`` every ``k`` decompositions ("eigh/k"), or when the
   previous basis' residual ``|F Q - Q diag(QᵀFQ)|_F / |F|_F`` exceeds
   ``--residual`` ("res>τ"). The refreshes:

   * ``cqr``: one or two power steps ``Y = (F + γI) Q`` with a Cholesky-QR
     (``C = YᵀY = LLᵀ``, ``Q = Y L⁻ᵀ``) of the columns in descending
     eigenvalue order (what makes it a power step: each column is
     orthogonalised against the larger ones), twice (CholeskyQR2), the columns
     normalised first (C becomes a correlation matrix instead of having the
     factor's condition number, 1e8 here, squared) and the first pass's C
     shifted by ``n·eps``;
   * ``cqr raw``: the same without the normalisation and the shift. It gives
     NaN as soon as a factor has an exact zero row (a dead unit or input);
     the running factors of this run keep 0.95^t of their identity start, so
     it survives here;
   * ``polar``: the polar factor of ``Y`` by Newton-Schulz (matmuls only);
     since F is SPD, ``polar(F Q) = Q`` exactly: a no-op at best;
   * ``jacobi``: one simultaneous Jacobi sweep, matmuls only: with
     ``B = QᵀFQ``, rotate every resolved pair (``|2B_ij| < |B_jj - B_ii|``) by
     ``½ atan(2B_ij / (B_jj - B_ii))`` at once, ``Q ← Q polar(I + Θ)``, the
     polar factor by Newton-Schulz scaled by the Gram's row-sum norm (``|Θ|``
     reaches tens here, from the many small eigenvalues' pairs, and 6
     iterations do not converge: see ``orth``);
   * ``keep``: the basis unchanged (``eigh/50``: decomposing 5x less often),
     and ``rayleigh``: unchanged with the eigenvalues ``diag(QᵀFQ)`` renewed.

   Every method's eigenvalues are the Rayleigh quotients of its basis,
   clamped at 0 (eigh's own for eigh, the old ones for keep).
3. Error. At every recorded step, every layer's ``P`` from the method's
   latest basis against the exact ``P`` from float64 ``eigh`` of that step's
   factors, ``|P - P_exact|_F / |P_exact|_F``: the median and 90th percentile
   over layers and steps. The baseline (eigh every 10) errs by staleness
   between decompositions. ``orth`` is the largest ``|QᵀQ - I|_F`` a method's
   bases reached, ``bad`` how many of its bases held a NaN (which the library
   would have to catch).
4. Time. The jitted float32 refresh, and the library's decomposition
   (``eigen.decompose_factor``: LAPACK eigh), of the model's largest A and G
   and of a stack of 4 G blocks, medians of ``--repeats`` interleaved rounds.
   ``x eigh`` is the time over eigh's, ``amort.`` that of a whole schedule
   (refreshes and the full eighs it did) over eigh every time, at the 513
   (largest A) size.

A default process: nothing set in the environment; the library's own LAPACK
thread setting (``cpu_threads``) is applied first. On a shared CPU read the
ratios.

  python benchmarks/refresh.py
  python benchmarks/refresh.py --model cnn --steps 200
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
import threadpoolctl  # a scikit-learn dependency, and the library's

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import step_time  # noqa: E402  (the models, data and K-FAC optimizer)

import kaisa_jax  # noqa: E402
from kaisa_jax._src import cpu_threads  # noqa: E402
from kaisa_jax._src import eigen as eigen_lib  # noqa: E402

PERIOD = 10  # inv_update_steps of the recorded run
DAMPING = 1e-3  # step_time.make_optimizer's
STACK = 4  # blocks in the timed stack
NEWTON_SCHULZ_STEPS = 6  # from 0.5 to 1 within float32 rounding
POLAR_STEPS = 10  # for polar(F Q), whose singular values span the factor's spectrum


# ---------------------------------------------------------------- recording


class Snapshot(NamedTuple):
  """One step of the run: each layer's running factors and gradient matrix."""
  step: int
  factors: dict  # {layer: (A, G)} float32
  grads: Optional[dict]  # {layer: ∇ (g, a)} float32; None on steps not evaluated


def record(model_name: str, batch: int, steps: int, every: int) -> tuple[list, list]:
  """Trains the model; returns (layers, snapshots of the decomposition and evaluated steps)."""
  images, labels = step_time.digits()
  model = step_time.MODELS[model_name]()
  loss_fn = step_time.make_loss(model)
  batches = step_time.make_batches(images, labels, batch, steps, seed=0)
  params = model.init(jax.random.key(0), batches[0][0][:1])["params"]
  layers = kaisa_jax.find_layers(loss_fn, params, *batches[0])
  if any(l.blocks > 1 or l.a_diagonal for l in layers):
    raise ValueError("one dense block per factor expected")
  opt = step_time.make_optimizer(layers, (1, PERIOD))
  plan = kaisa_jax.placement(layers, 1)

  @jax.jit
  def train_step(params, state, x, y):
    _, grads, captures = kaisa_jax.value_and_grad(loss_fn)(params, x, y)
    updates, state = opt.update(grads, state, params, captures=captures)
    by_path = dict(jax.tree_util.tree_flatten_with_path(grads)[0])
    mats = {l.name: l.grad_matrix(by_path[l.kernel_path],
                                  by_path[l.bias_path] if l.has_bias else None)
            for l in layers}
    return optax.apply_updates(params, updates), state, mats

  state = opt.init(params)
  snapshots = []
  for step, (x, y) in enumerate(batches):
    # The factors after this step's update are those its decomposition (if
    # due) used and that precondition this step's gradient.
    params, state, mats = train_step(params, state, x, y)
    evaluated = step % every == 0
    if evaluated or step % PERIOD == 0:
      factors = {name: (np.asarray(f.a_factor), np.asarray(f.g_factor))
                 for name, f in plan.layer_factors(state[0]).items()}
      grads = {k: np.asarray(v) for k, v in mats.items()} if evaluated else None
      snapshots.append(Snapshot(step, factors, grads))
  return list(layers), snapshots


# ---------------------------------------------------------------- refreshes
# Each takes a float32 factor F (..., n, n) and the previous basis Q (..., n, n)
# (columns in ascending eigenvalue order, as eigh's) and returns the new basis.


def _t(m):
  return jnp.swapaxes(m, -1, -2)


def _matmul(x, y):
  # On GPU a float32 matmul defaults to TF32 (10 mantissa bits): too coarse
  # for a basis whose errors the preconditioner divides by γ.
  return jnp.matmul(x, y, precision=jax.lax.Precision.HIGHEST)


def rayleigh(f, q):
  """diag(QᵀFQ), clamped at 0 as the library clamps eigh's eigenvalues."""
  return jnp.maximum(jnp.sum(q * _matmul(f, q), axis=-2), 0)


def cholesky_qr(y, passes: int, stabilised: bool):
  """Q of Y = QR (Gram-Schmidt's, column order kept) via Cholesky of YᵀY."""
  eps = jnp.finfo(y.dtype).eps
  for i in range(passes):
    if stabilised:
      # QR's Q does not depend on the columns' scale; normalised columns make
      # YᵀY a correlation matrix, whose conditioning is the columns' angles',
      # not the factor's spectrum squared.
      y = y / jnp.linalg.norm(y, axis=-2, keepdims=True)
    gram = _matmul(_t(y), y)
    if stabilised and i == 0:
      # Shifted CholeskyQR: a shift of the order of the rounding makes the
      # Cholesky succeed on a numerically singular Gram; the next pass (whose
      # Gram is near I, unshifted) restores the orthogonality it costs.
      n = y.shape[-1]
      gram = gram + n * eps * jnp.eye(n, dtype=y.dtype)
    chol = jnp.linalg.cholesky(gram)
    y = _t(jax.scipy.linalg.solve_triangular(chol, _t(y), lower=True))
  return y


def power_cqr(f, q, steps: int, stabilised: bool = True):
  """Power steps ``(F + γI) Q`` orthogonalised by CholeskyQR2, largest first."""
  eye = jnp.eye(f.shape[-1], dtype=f.dtype)
  shifted = f + DAMPING * eye if stabilised else f
  for _ in range(steps):
    # Descending order: each column is orthogonalised against the larger
    # ones, which is what turns the product into a power step.
    order = jnp.argsort(-rayleigh(f, q), axis=-1)
    q = jnp.take_along_axis(q, order[..., None, :], axis=-1)
    q = cholesky_qr(_matmul(shifted, q), 2, stabilised)
    q = q[..., ::-1]
  return q


def newton_schulz_polar(x, steps: int):
  """The polar factor of X, whose singular values must lie in (0, √3)."""
  for _ in range(steps):
    x = 1.5 * x - 0.5 * _matmul(x, _matmul(_t(x), x))
  return x


def power_polar(f, q):
  """polar((F + γI) Q): equal to Q itself (F SPD), shown for what it costs."""
  y = _matmul(f + DAMPING * jnp.eye(f.shape[-1], dtype=f.dtype), q)
  y = y / jnp.linalg.norm(y, axis=(-2, -1), keepdims=True)  # singular values <= 1
  return newton_schulz_polar(y, POLAR_STEPS)


def jacobi(f, q, sweeps: int):
  """Simultaneous Jacobi rotations of every pair of columns, matmuls only."""
  n = f.shape[-1]
  eye = jnp.eye(n, dtype=f.dtype)
  for _ in range(sweeps):
    b = _matmul(_t(q), _matmul(f, q))
    d = jnp.diagonal(b, axis1=-2, axis2=-1)
    gap = d[..., None, :] - d[..., :, None]  # B_jj - B_ii at (i, j)
    # The 2x2 Jacobi angle ½ atan(2 B_ij / gap), antisymmetric, 0 on the diagonal.
    # Only pairs the first-order theory resolves (|2 B_ij| < |gap|): the
    # others are (near) degenerate, and rotating them all at once interferes.
    resolved = jnp.abs(2 * b) < jnp.abs(gap)
    theta = jnp.where(resolved, 0.5 * jnp.arctan(2 * b / jnp.where(resolved, gap, 1)), 0)
    # I + Θ (Θ antisymmetric) has singular values >= 1, the largest squared at
    # most the Gram's row-sum norm: scaled by it into (0, 1].
    u = eye + theta
    gram_norm = jnp.max(jnp.sum(jnp.abs(_matmul(_t(u), u)), axis=-1), axis=-1)
    rotation = newton_schulz_polar(u / jnp.sqrt(gram_norm)[..., None, None],
                                   NEWTON_SCHULZ_STEPS)
    q = _matmul(q, rotation)
  return q


def residual(f, q):
  """|F Q - Q diag(QᵀFQ)|_F / |F|_F: how far Q is from an eigenbasis of F."""
  fq = _matmul(f, q)
  r = fq - q * jnp.sum(q * fq, axis=-2, keepdims=True)
  return jnp.linalg.norm(r, axis=(-2, -1)) / jnp.linalg.norm(f, axis=(-2, -1))


def eigh_basis(f):
  vals, vecs = jnp.linalg.eigh(f, symmetrize_input=False)
  return vecs, jnp.maximum(vals, 0)


# ---------------------------------------------------------------- methods


class Method(NamedTuple):
  """A decomposition schedule: ``refresh`` between full eighs (None: eigh every time)."""
  name: str
  refresh: Optional[Callable]
  full_every: Optional[int] = None  # decompositions per full eigh; None: step 0 only
  residual: bool = False  # a full eigh when the previous basis' residual exceeds --residual
  keep_values: bool = False  # eigenvalues kept with the basis (plain staleness)


def keep(f, q):
  return q


def methods() -> list[Method]:
  cqr1 = lambda f, q: power_cqr(f, q, 1)
  jac1 = lambda f, q: jacobi(f, q, 1)
  return [
      Method("eigh (baseline)", None),
      Method("keep, eigh/5 (=eigh every 50)", keep, 5, keep_values=True),
      Method("rayleigh, eigh/5", keep, 5),
      Method("polar(FQ) NS, eigh/5", power_polar, 5),
      Method("cqr raw x1", lambda f, q: power_cqr(f, q, 1, stabilised=False)),
      Method("cqr x1", cqr1),
      Method("cqr x2", lambda f, q: power_cqr(f, q, 2)),
      Method("cqr x1, eigh/5", cqr1, 5),
      Method("cqr x1, eigh/10", cqr1, 10),
      Method("cqr x1, res>τ", cqr1, residual=True),
      Method("jacobi x1", jac1),
      Method("jacobi x1, eigh/5", jac1, 5),
  ]


class Basis(NamedTuple):
  vecs: np.ndarray
  vals: np.ndarray


def replay(method: Method, snapshots: list, threshold: float) -> tuple[dict, int, int]:
  """Runs the schedule over the decomposition steps.

  Returns ({step: {layer: (A basis, G basis)}} at each decomposition step,
  the number of full eighs, the number of refreshes).
  """
  refresh = jax.jit(method.refresh) if method.refresh else None
  full, check = jax.jit(eigh_basis), jax.jit(residual)
  eighs, refreshes, current, out = 0, 0, {}, {}
  decompositions = [s for s in snapshots if s.step % PERIOD == 0]
  for count, snap in enumerate(decompositions):
    due = (refresh is None or count == 0
           or (method.full_every and count % method.full_every == 0))
    new = {}
    for name, pair in snap.factors.items():
      bases = []
      for i, factor in enumerate(pair):
        f = jnp.asarray(factor)
        if not due and method.residual:
          prev = current[name][i]
          due_here = float(check(f, jnp.asarray(prev.vecs))) > threshold
        else:
          due_here = due
        if due_here:
          vecs, vals = full(f)
          eighs += 1
        else:
          prev = current[name][i]
          vecs = refresh(f, jnp.asarray(prev.vecs))
          vals = prev.vals if method.keep_values else rayleigh(f, vecs)
          refreshes += 1
        bases.append(Basis(np.asarray(vecs), np.asarray(vals)))
      new[name] = tuple(bases)
    current = new
    out[snap.step] = current
  return out, eighs, refreshes


# ---------------------------------------------------------------- errors


def precondition(grad, a: Basis, g: Basis) -> np.ndarray:
  """K-FAC's eigen preconditioning of one layer's gradient, in float64."""
  qa, qg = a.vecs.astype(np.float64), g.vecs.astype(np.float64)
  scale = np.outer(g.vals, a.vals).astype(np.float64) + DAMPING
  return qg @ ((qg.T @ grad @ qa) / scale) @ qa.T


def exact_basis(factor) -> Basis:
  vals, vecs = np.linalg.eigh(factor.astype(np.float64))
  return Basis(vecs, np.maximum(vals, 0))


def exact_preconditioned(snapshots) -> dict:
  """{step: {layer: P}} from float64 eigh of each evaluated step's own factors."""
  out = {}
  for snap in snapshots:
    if snap.grads is None:
      continue
    out[snap.step] = {
        name: precondition(snap.grads[name].astype(np.float64), exact_basis(a), exact_basis(g))
        for name, (a, g) in snap.factors.items()}
  return out


def errors(bases: dict, snapshots, exact: dict) -> list[float]:
  """|P - P_exact| / |P_exact| of every layer at every evaluated step."""
  out = []
  for snap in snapshots:
    if snap.grads is None:
      continue
    latest = bases[snap.step - snap.step % PERIOD]
    for name, p_exact in exact[snap.step].items():
      p = precondition(snap.grads[name].astype(np.float64), *latest[name])
      out.append(float(np.linalg.norm(p - p_exact) / np.linalg.norm(p_exact)))
  return out


def basis_health(bases: dict) -> tuple[float, int]:
  """(largest |QᵀQ - I|_F, bases holding a NaN) over a run."""
  worst, bad = 0.0, 0
  for per_layer in bases.values():
    for pair in per_layer.values():
      for basis in pair:
        q = basis.vecs.astype(np.float64)
        if not np.all(np.isfinite(q)):
          bad += 1
          continue
        worst = max(worst, float(np.linalg.norm(q.T @ q - np.eye(q.shape[0]))))
  return worst, bad


def previous_residuals(snapshots) -> list[float]:
  """The residual of each factor's last eigh basis at the next decomposition (float32)."""
  decompositions = [s for s in snapshots if s.step % PERIOD == 0]
  out = []
  for before, now in zip(decompositions, decompositions[1:]):
    for name, pair in now.factors.items():
      for i, factor in enumerate(pair):
        q, _ = eigh_basis(jnp.asarray(before.factors[name][i]))
        out.append(float(residual(jnp.asarray(factor), q)))
  return out


# ---------------------------------------------------------------- time


def timed_factors(layers, snapshots) -> dict:
  """{label: (factor, previous basis)}: the largest A and G, a stack of G blocks."""
  decompositions = [s for s in snapshots if s.step % PERIOD == 0]
  before, now = decompositions[-2], decompositions[-1]
  a_layer = max(layers, key=lambda l: l.a_size)
  g_layer = max(layers, key=lambda l: l.g_size)
  pick = lambda snap, layer, i: jnp.asarray(snap.factors[layer.name][i])
  previous = lambda f: eigh_basis(f)[0]
  out = {}
  for label, layer, i in ((f"A {a_layer.a_size}", a_layer, 0), (f"G {g_layer.g_size}", g_layer, 1)):
    out[label] = (pick(now, layer, i), previous(pick(before, layer, i)))
  stack = jnp.stack([pick(s, g_layer, 1) for s in decompositions[-STACK:]])
  out[f"{STACK}x G {g_layer.g_size}"] = (stack, previous(
      jnp.stack([pick(s, g_layer, 1) for s in decompositions[-STACK - 1:-1]])))
  return out


def library_eigh(f, q):
  """What a decomposition step runs today (a stack block by block on CPU)."""
  stack = f if f.ndim == 3 else f[None]
  vecs, vals = eigen_lib.decompose_factor(stack, False, DAMPING, "eigen", jnp.float32)
  return vecs if f.ndim == 3 else vecs[0]


def refresh_times(candidates: dict, factors: dict, repeats: int) -> dict:
  """{(candidate, label): median ms}, the candidates interleaved in rounds."""
  compiled = {}
  for cname, fn in candidates.items():
    for label, (f, q) in factors.items():
      c = jax.jit(fn).lower(f, q).compile()
      jax.block_until_ready(c(f, q))
      compiled[cname, label] = (c, f, q)
  times = {key: [] for key in compiled}
  for _ in range(repeats):
    for key, (c, f, q) in compiled.items():
      start = time.perf_counter()
      jax.block_until_ready(c(f, q))
      times[key].append(time.perf_counter() - start)
  return {key: 1e3 * statistics.median(t) for key, t in times.items()}


def with_values(refresh):
  """A refresh as timed: the new basis and its Rayleigh quotients."""
  def run(f, q):
    vecs = refresh(f, q)
    return vecs, rayleigh(f, vecs)
  return run


def candidate_name(method: Method) -> str:
  """The timed computation behind a method's refreshes."""
  if method.refresh is None:
    return "eigh"
  return "rayleigh" if method.refresh is keep else method.name.split(",")[0]


# ---------------------------------------------------------------- report


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--model", choices=sorted(step_time.MODELS), default="mlp")
  parser.add_argument("--batch", type=int, default=1024)
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--every", type=int, default=7,
                      help="evaluate every N-th step (coprime with 10 to see every offset)")
  parser.add_argument("--residual", type=float, default=2e-3,
                      help="τ: a full eigh when the previous basis' residual exceeds it")
  parser.add_argument("--repeats", type=int, default=9, help="interleaved timing rounds")
  args = parser.parse_args(argv)
  cpu_threads.limit_lapack_threads()  # as the library's first decomposition would

  start = time.perf_counter()
  layers, snapshots = record(args.model, args.batch, args.steps, args.every)
  # numpy's float64 evaluation (not timed) on one thread: its default pool
  # ran 2-3x slower on this shared 2-core machine.
  with threadpoolctl.threadpool_limits(1, user_api="blas"):
    exact = exact_preconditioned(snapshots)
    res = previous_residuals(snapshots)
    rows = []
    for m in methods():
      bases, eighs, refreshes = replay(m, snapshots, args.residual)
      err = errors(bases, snapshots, exact)
      rows.append((m, err, eighs, refreshes, *basis_health(bases)))

  candidates = {"eigh": library_eigh, "rayleigh": rayleigh}
  for m in methods():
    if m.refresh is not None and m.refresh is not keep:
      candidates.setdefault(candidate_name(m), with_values(m.refresh))
  factors = timed_factors(layers, snapshots)
  ms = refresh_times(candidates, factors, args.repeats)
  labels = list(factors)

  print(f"{args.model}, batch {args.batch}, {args.steps} steps, decompositions every {PERIOD}, "
        f"damping {DAMPING}, errors every {args.every} steps over {len(layers)} layers; "
        f"jax {jax.__version__}, {jax.default_backend()}, {os.cpu_count()} cores, "
        f"load {os.getloadavg()[0]:.1f}; {time.perf_counter() - start:.0f} s")
  print(f"residual of the last eigh basis at the next decomposition: median "
        f"{np.median(res):.1e}, p90 {np.percentile(res, 90):.1e}, max {np.max(res):.1e}; "
        f"τ = {args.residual:g}")
  print("\ntimes (ms, float32, jitted, medians of interleaved rounds):")
  print(f"{'':22}" + "".join(f"{label:>12}" for label in labels) + f"{'x eigh':>8}")
  for cname in candidates:
    ratio = ms[cname, labels[0]] / ms["eigh", labels[0]]
    print(f"{cname:22}" + "".join(f"{ms[cname, label]:12.2f}" for label in labels)
          + f"{ratio:8.2f}")
  print(f"\n{'method':32}{'eighs':>6}{'refr.':>6}{'amort.':>8}{'median':>10}{'p90':>10}"
        f"{'max':>10}{'orth':>9}{'bad':>5}")
  eigh_ms = ms["eigh", labels[0]]
  for m, err, eighs, refreshes, orth, bad in rows:
    cname = candidate_name(m)
    cost = eighs * eigh_ms + refreshes * (0 if m.keep_values else ms[cname, labels[0]])
    amort = cost / ((eighs + refreshes) * eigh_ms)
    finite = [e for e in err if np.isfinite(e)]
    stats = (f"{np.median(finite):10.2e}{np.percentile(finite, 90):10.2e}{np.max(finite):10.2e}"
             if finite else f"{'nan':>10}" * 3)
    print(f"{m.name:32}{eighs:6d}{refreshes:6d}{amort:8.2f}{stats}{orth:9.1e}{bad:5d}")


if __name__ == "__main__":
  main()
