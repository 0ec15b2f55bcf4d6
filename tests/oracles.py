"""Shared float64 NumPy oracles and small utilities for the tests.

Everything here is written from the KAISA conventions alone and never calls
``kaisa_jax``: plain NumPy with explicit loops, and JAX only for shapes. The
test files import it as a plain module (``from oracles import ...``); pytest's
default ``prepend`` import mode puts ``tests/`` on ``sys.path``.

Layouts: a layer's gradient matrix is (out, C * K [+ 1]) with entry
[o, c * K + j] = kernel[pos_j, c, o] (``pos_j`` the j-th kernel position in
row-major order) and the bias as the last column; im2col patches use the same
channel-major feature order (channel, then kernel position).
"""

import jax
import jax.numpy as jnp
import numpy as np


def assert_close(actual, expected, rtol=1e-5):
  """Same shape, and equal within ``rtol`` with atol = rtol * max |expected| (float64)."""
  actual = np.asarray(actual, np.float64)
  expected = np.asarray(expected, np.float64)
  assert actual.shape == expected.shape
  scale = max(np.abs(expected).max(), 1e-30)
  np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale)


def random_params(module, *xs, seed=0, scale=0.5):
  """float32 params shaped like ``module.init(key, *xs)``, drawn N(0, scale²) in numpy.

  ``seed`` is an int or a ``np.random.Generator`` to draw from; only the
  shapes come from JAX (``eval_shape``, so nothing is compiled).
  """
  shapes = jax.eval_shape(module.init, jax.random.key(0), *xs)["params"]
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda s: jnp.asarray(rng.normal(size=s.shape) * scale, jnp.float32), shapes)


def np_kernel_matrix(kernel, bias=None):
  """(out, C * K [+1]) gradient matrix: [o, c * K + j] = kernel[pos_j, c, o], bias last."""
  kernel = np.asarray(kernel, np.float64)
  spatial, c_in, c_out = kernel.shape[:-2], kernel.shape[-2], kernel.shape[-1]
  k = int(np.prod(spatial)) if spatial else 1
  mat = np.zeros((c_out, c_in * k + (bias is not None)))
  for o in range(c_out):
    for c in range(c_in):
      for j, pos in enumerate(np.ndindex(*spatial)):
        mat[o, c * k + j] = kernel[pos + (c, o)]
    if bias is not None:
      mat[o, -1] = float(bias[o])
  return mat


def np_kernel_from_matrix(mat, kernel_shape, has_bias=False):
  """Inverse of ``np_kernel_matrix``: (kernel, bias), the bias None without one."""
  mat = np.asarray(mat, np.float64)
  spatial, c_in, c_out = kernel_shape[:-2], kernel_shape[-2], kernel_shape[-1]
  k = int(np.prod(spatial)) if spatial else 1
  kernel = np.zeros(kernel_shape)
  for o in range(c_out):
    for c in range(c_in):
      for j, pos in enumerate(np.ndindex(*spatial)):
        kernel[pos + (c, o)] = mat[o, c * k + j]
  bias = mat[:, -1].copy() if has_bias else None
  return kernel, bias


def np_same_pads(spatial, kernel_size, strides=None, dilation=None, lower=False):
  """'SAME': ceil(size / stride) outputs, the odd pad at the end ('SAME_LOWER': start)."""
  strides = strides or (1,) * len(kernel_size)
  dilation = dilation or (1,) * len(kernel_size)
  pads = []
  for size, k, s, d in zip(spatial, kernel_size, strides, dilation):
    eff = (k - 1) * d + 1
    out = -(-size // s)
    total = max((out - 1) * s + eff - size, 0)
    small, large = total // 2, total - total // 2
    pads.append((large, small) if lower else (small, large))
  return pads


def np_patches(x, kernel_size, strides=None, pads=None, kernel_dilation=None,
               input_dilation=None, circular=False):
  """im2col with explicit loops: (N, *spatial, C) -> (N, *out, C * K), channel-major.

  Unit strides and dilations and no padding ('VALID') unless given; ``pads``
  is one (low, high) pair per spatial axis, wrapping around when ``circular``.
  """
  x = np.asarray(x, np.float64)
  n, spatial, c_in = x.shape[0], x.shape[1:-1], x.shape[-1]
  ones = (1,) * len(kernel_size)
  strides = strides or ones
  pads = pads or [(0, 0)] * len(kernel_size)
  kernel_dilation = kernel_dilation or ones
  input_dilation = input_dilation or ones
  # Input (lhs) dilation: input_dilation - 1 zeros between neighbours.
  dil_shape = tuple((s - 1) * d + 1 for s, d in zip(spatial, input_dilation))
  xd = np.zeros((n,) + dil_shape + (c_in,))
  for idx in np.ndindex(*spatial):
    dst = tuple(i * d for i, d in zip(idx, input_dilation))
    xd[(slice(None),) + dst] = x[(slice(None),) + idx]
  # Padding: zeros, or wrapping around for circular.
  padded_shape = tuple(s + lo + hi for s, (lo, hi) in zip(dil_shape, pads))
  xp = np.zeros((n,) + padded_shape + (c_in,))
  for idx in np.ndindex(*padded_shape):
    src, inside = [], True
    for i, (lo, _), size in zip(idx, pads, dil_shape):
      j = i - lo
      if circular:
        j %= size
      elif not 0 <= j < size:
        inside = False
      src.append(j)
    if inside:
      xp[(slice(None),) + idx] = xd[(slice(None),) + tuple(src)]
  eff = tuple((k - 1) * d + 1 for k, d in zip(kernel_size, kernel_dilation))
  out = tuple((p - e) // s + 1 for p, e, s in zip(padded_shape, eff, strides))
  k = int(np.prod(kernel_size))
  patches = np.zeros((n,) + out + (c_in * k,))
  for opos in np.ndindex(*out):
    for j, kpos in enumerate(np.ndindex(*kernel_size)):
      src = tuple(o * s + q * d for o, s, q, d in zip(opos, strides, kpos, kernel_dilation))
      for c in range(c_in):
        patches[(slice(None),) + opos + (c * k + j,)] = xp[(slice(None),) + src + (c,)]
  return patches


def np_kron_solve(g, a, grad, damping):
  """vec(P) = (G ⊗ A + γI)⁻¹ vec(∇), row-major vec; G ∇ Aᵀ is (G ⊗ A) vec(∇)."""
  g, a, grad = (np.asarray(m, np.float64) for m in (g, a, grad))
  big = np.kron(g, a) + damping * np.eye(g.shape[0] * a.shape[0])
  return np.linalg.solve(big, grad.ravel()).reshape(grad.shape)


def np_scan_kfac_step(rows, grads, length, stacked, damping, decay):
  """float64 first K-FAC step of a Dense with bias applied ``length`` times in a scan.

  ``rows`` and ``grads`` are ``np_chain``'s, iterations first. Stacked
  parameters: one Kronecker block per iteration's slice; shared: one block
  over every iteration's rows, their gradients summed. The factors start
  from I and average in one batch's covariances with ``decay``. Returns per
  block the preconditioned gradient, (out, in + 1), the bias last.
  """
  blocks = [[i] for i in range(length)] if stacked else [list(range(length))]
  steps = []
  for its in blocks:
    a = np.concatenate([np.concatenate([rows[i][0], np.ones((rows[i][0].shape[0], 1))], axis=1)
                        for i in its])
    g = np.concatenate([rows[i][1] for i in its])
    factor_a = decay * np.eye(a.shape[1]) + (1 - decay) * a.T @ a / a.shape[0]
    factor_g = decay * np.eye(g.shape[1]) + (1 - decay) * g.T @ g / g.shape[0]
    grad = sum(np.concatenate([grads[i][0].T, grads[i][1][:, None]], axis=1) for i in its)
    steps.append(np_kron_solve(factor_g, factor_a, grad, damping))
  return steps


def np_damped_inverse(m, damping):
  """(M + γI)⁻¹ in float64."""
  m = np.asarray(m, np.float64)
  return np.linalg.inv(m + damping * np.eye(m.shape[0]))


def _acts(name):
  """(activation, its derivative as a function of the pre-activation), float64."""
  if name == "tanh":
    return np.tanh, lambda y: 1 - np.tanh(y) ** 2
  return (lambda y: np.maximum(y, 0)), (lambda y: (y > 0).astype(np.float64))


def np_chain(layers, x, t, acts, loss_scale):
  """float64 forward and manual backprop of Dense layers with ``acts`` between them.

  ``layers``: [(kernel (in, out), bias (out,)), ...]; the loss is
  ``loss_scale * 0.5 * mean_n |z_n - t_n|²`` of the last layer's output z.
  Returns (loss, [(kernel grad, bias grad)], [(layer input (B, in),
  d loss / d layer output (B, out))]).
  """
  a = [np.asarray(x, np.float64)]
  ys = []
  for i, (w, b) in enumerate(layers):
    ys.append(a[-1] @ np.asarray(w, np.float64) + np.asarray(b, np.float64))
    if i < len(layers) - 1:
      a.append(_acts(acts[i])[0](ys[-1]))
  z, t = ys[-1], np.asarray(t, np.float64)
  loss = loss_scale * 0.5 * np.mean(np.sum((z - t) ** 2, axis=-1))
  dy = [None] * len(layers)
  dy[-1] = loss_scale * (z - t) / z.shape[0]
  for i in range(len(layers) - 1, 0, -1):
    dy[i - 1] = (dy[i] @ np.asarray(layers[i][0], np.float64).T) * _acts(acts[i - 1])[1](ys[i - 1])
  grads = [(a[i].T @ dy[i], dy[i].sum(0)) for i in range(len(layers))]
  rows = [(a[i], dy[i]) for i in range(len(layers))]
  return loss, grads, rows


def scaled_mse(model, scale):
  """``loss(params, x, t) = scale · ½ mean_n |model(x)_n − t_n|²`` of a linen model.

  A mean loss puts 1/batch into every output gradient: ``scale`` keeps G from
  being negligible next to the identity the factors start from.
  """
  def loss_fn(params, x, t):
    z = model.apply({"params": params}, x)
    return scale * 0.5 * jnp.mean(jnp.sum((z - t) ** 2, axis=-1))
  return loss_fn


def normal_batch(batch, in_features, out_features, seed=0):
  """float32 inputs (batch, in_features) and targets (batch, out_features), N(0, 1)."""
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(batch, in_features)).astype(np.float32),
          rng.normal(size=(batch, out_features)).astype(np.float32))
