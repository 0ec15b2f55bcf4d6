"""Fisher: the loss whose output gradients make the sampled (true) Fisher.

The empirical Fisher builds G from the gradients of the loss at the data's
targets. The Fisher of the original K-FAC paper (Martens and Grosse, 2015)
takes them at targets drawn from the model's own predictive distribution.
``sampled_fisher_loss`` is that loss: the negative log-likelihood of targets
sampled from ``outputs``, the samples held constant, so its gradient with
respect to the outputs is a draw whose second moment is the per-example
Fisher of the output distribution.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

FISHER_TYPES = ("empirical", "sampled")
DISTRIBUTIONS = ("softmax", "sigmoid", "gaussian")


def sampled_fisher_loss(outputs: jax.Array, key: jax.Array,
                        distribution: str = "softmax") -> jax.Array:
  """The mean negative log-likelihood of targets sampled from the model itself.

  Return it as the second value of the loss given to
  ``kaisa_jax.value_and_grad(loss_fn, fisher="sampled")``: the gradient comes
  from the real loss, the K-FAC output gradients from this one. Its scale
  must match the real loss's: a mean over the batch of the per-example loss
  below.

  Args:
    outputs: (batch, ..., classes) logits for 'softmax' (softmax
      cross-entropy), (batch, ...) logits for 'sigmoid' (sigmoid
      cross-entropy summed over the non-batch axes), or (batch, ...)
      predictions for 'gaussian' (``0.5 * sum((outputs - target)²)`` over the
      non-batch axes: a unit-variance Gaussian).
    key: a ``jax.random`` key; use a fresh one every step.
    distribution: 'softmax', 'sigmoid' or 'gaussian'.

  Returns:
    A scalar: the loss at the sampled targets, averaged over the batch
    (the leading axis). Its gradient with respect to ``outputs`` is, per
    example, ``(softmax(outputs) - onehot(sample)) / batch`` (softmax),
    ``(sigmoid(outputs) - sample) / batch`` (sigmoid) or ``-noise / batch``
    (gaussian, noise ~ N(0, I)).

  Example:
    >>> def loss_fn(params, x, y, key):
    ...   logits = model.apply({"params": params}, x)
    ...   loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    ...   return loss, kaisa_jax.sampled_fisher_loss(logits, key)
    >>> loss, grads, captures = kaisa_jax.value_and_grad(
    ...     loss_fn, fisher="sampled")(params, x, y, key)
  """
  if distribution not in DISTRIBUTIONS:
    raise ValueError(
        f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}.")
  if jnp.ndim(outputs) < 1:
    raise ValueError(
        f"outputs must have a leading batch axis, got shape {jnp.shape(outputs)}.")
  outputs_const = jax.lax.stop_gradient(outputs)
  batch_axes = tuple(range(1, jnp.ndim(outputs)))
  if distribution == "softmax":
    labels = jax.random.categorical(key, outputs_const, axis=-1)
    per_example = optax.softmax_cross_entropy_with_integer_labels(outputs, labels)
    per_example = jnp.sum(per_example, axis=tuple(range(1, per_example.ndim)))
  elif distribution == "sigmoid":
    labels = jax.random.bernoulli(key, jax.nn.sigmoid(outputs_const)).astype(outputs.dtype)
    per_example = jnp.sum(optax.sigmoid_binary_cross_entropy(outputs, labels), axis=batch_axes)
  else:
    targets = outputs_const + jax.random.normal(key, outputs.shape, outputs.dtype)
    per_example = 0.5 * jnp.sum((outputs - targets) ** 2, axis=batch_axes)
  return jnp.mean(per_example)
