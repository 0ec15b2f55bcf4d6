"""TrainState: Flax's ``TrainState`` whose ``apply_gradients`` hands the captures on.

``flax.training.train_state.TrainState.apply_gradients`` calls
``tx.update(grads, opt_state, params)`` and has no way to pass ``kaisa``'s
``captures``. This subclass takes them as one more keyword; everything else
(``create``, ``replace``, extra fields such as ``batch_stats`` in a
subclass, checkpointing) is Flax's.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import optax
from flax.training import train_state


class TrainState(train_state.TrainState):
  """``flax.training.train_state.TrainState`` for optimizers that contain ``kaisa``.

  Use it as Flax's: ``TrainState.create(apply_fn=..., params=..., tx=...)``,
  subclass it to add fields (Flax's ImageNet example adds ``batch_stats``),
  and call ``apply_gradients(grads=grads, captures=captures, ...)`` with the
  captures of ``kaisa_jax.value_and_grad``. With ``kaisa(axis_name=...)``
  create the state inside the ``pmap``/``shard_map``: ``tx.init`` needs the
  axis.

  Example:
    >>> state = kaisa_jax.TrainState.create(apply_fn=model.apply, params=params, tx=opt)
    >>> loss, grads, captures = kaisa_jax.value_and_grad(loss_fn)(state.params, x, y)
    >>> state = state.apply_gradients(grads=grads, captures=captures)
  """

  def apply_gradients(self, *, grads, captures: Optional[dict] = None, **kwargs: Any):
    """One optimizer step: ``step + 1``, new ``params`` and ``opt_state``, ``kwargs`` replaced.

    Args:
      grads: gradients with the structure of ``params``.
      captures: ``kaisa_jax.value_and_grad``'s captures, passed to
        ``tx.update(..., captures=captures)``; None for an optimizer without
        ``kaisa``.
      **kwargs: other fields to replace, e.g. ``batch_stats``.
    """
    if isinstance(grads, Mapping) and train_state.OVERWRITE_WITH_GRADIENT in grads:
      raise ValueError(
          f"kaisa_jax.TrainState: grads hold {train_state.OVERWRITE_WITH_GRADIENT!r} "
          "entries (fp8 training), which this state does not support; apply those with "
          "flax's TrainState and keep kaisa for the 'params' entries.")
    extra = {} if captures is None else {"captures": captures}
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params, **extra)
    return self.replace(step=self.step + 1, params=optax.apply_updates(self.params, updates),
                        opt_state=opt_state, **kwargs)
