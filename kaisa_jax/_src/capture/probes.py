"""Probes: what a layer call is given so that the backward pass captures it.

A zero output probe is added to each call's output: the gradient of the
loss with respect to it is the output gradient. The input of a call that
cannot be kept (inside ``jax.checkpoint``, or a scan that does not hand it
out) comes back as the gradient of a zero input probe, through an identity
with a custom VJP on the layer output. The shape pass records, per call,
the shapes and shard_map axes the probes are made from.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax

from kaisa_jax._src import collectives
from kaisa_jax._src import layers as layers_lib
from kaisa_jax._src.capture.params import _module_param

if TYPE_CHECKING:
  from kaisa_jax._src.capture.transforms import _Site


# Integer inputs (token ids) come back through a float32 gradient: exact for
# integers of at most 16 bits, and for the ids of a table of at most 2**24
# rows (an id out of range, rounded, stays out of range).
_MAX_EXACT_IDS = 2**24


@jax.custom_vjp
def _return_input(outputs, inputs, probe):
  """``outputs`` unchanged; its VJP gives ``inputs`` as the gradient of ``probe``.

  The layer input of a call inside jax.checkpoint cannot be kept from the
  forward pass (it belongs to the checkpoint's trace); the backward pass
  hands it out instead, as the gradient of the zero input probe (same shape,
  float32 for integer inputs) closed over from the loss's trace. The body
  runs once per forward pass, so that gradient is the input itself. In a
  scan body the probe is this iteration's slice of a stacked one.
  """
  del inputs, probe
  return outputs


def _return_input_fwd(outputs, inputs, probe):
  return outputs, inputs.astype(probe.dtype)


def _return_input_bwd(inputs, out_grads):
  # The input only rides along: no gradient flows to it through here.
  return out_grads, None, inputs


_return_input.defvjp(_return_input_fwd, _return_input_bwd)


def _comes_back_exactly(module, inputs) -> bool:
  """Whether the input probe's gradient (``_probe_dtype``) holds ``inputs`` exactly."""
  dtype = jnp.dtype(inputs.dtype)
  if jnp.issubdtype(dtype, jnp.inexact) or dtype.itemsize <= 2:
    return True
  kind = layers_lib.kind_of(module)
  return (kind is layers_lib.Embed
          and _module_param(module, kind.kernel_param).shape[0] <= _MAX_EXACT_IDS)


def _probe_dtype(dtype):
  """The dtype of the input probe of an input of ``dtype``."""
  return dtype if jnp.issubdtype(dtype, jnp.inexact) else jnp.float32


class _CallShape(NamedTuple):
  """What the shape pass learns of one layer call.

  Attributes:
    output: the output's ShapeDtypeStruct and its varying shard_map axes,
      (length, ...) for a call in a scan.
    input: for a call whose input comes back through the backward pass
      (inside jax.checkpoint, or a scan that does not emit it), the input's
      ShapeDtypeStruct and varying axes (its probe is made from them);
      None otherwise.
    how: the site's ``how``.
    frame: the index of the scan frame of a 'scan' call, else None.
    mode: the site's ``mode``.
  """
  output: tuple
  input: Any
  how: str
  frame: Optional[int]
  mode: tuple

  @classmethod
  def of(cls, site: _Site, inputs, outputs) -> "_CallShape":
    length = (site.frame.length,) if site.how == "scan" else ()
    returned = site.how != "direct" and not site.emit
    return cls(_struct_and_axes(outputs, length),
               _struct_and_axes(inputs, length) if returned else None,
               site.how, None if site.frame is None else site.frame.index, site.mode)

  def matches(self, site: _Site) -> bool:
    return (self.how, self.frame) == (
        site.how, None if site.frame is None else site.frame.index)


def _struct_and_axes(x, leading: tuple = ()) -> tuple:
  """(ShapeDtypeStruct of x with ``leading`` axes first, x's varying shard_map axes)."""
  return (jax.ShapeDtypeStruct(leading + tuple(x.shape), x.dtype),
          tuple(sorted(collectives.varying_axes(x), key=str)))


def _input_probe(shape: jax.ShapeDtypeStruct, axes: tuple) -> jax.Array:
  """The zero probe whose gradient is the input of a call inside jax.checkpoint."""
  return _zeros_varying_like(jax.ShapeDtypeStruct(shape.shape, _probe_dtype(shape.dtype)), axes)


def _zeros_varying_like(shape: jax.ShapeDtypeStruct, axes: tuple) -> jax.Array:
  """A zero probe that varies along the same shard_map axes as the layer output.

  A probe typed as replicated would have its gradient summed over the
  devices by autodiff (shard_map's checked mode), where K-FAC needs each
  device's own output gradients.
  """
  zeros = jnp.zeros(shape.shape, shape.dtype)
  return lax.pcast(zeros, axes, to="varying") if axes else zeros
