"""Capture: what the Flax calls of a loss give K-FAC.

A Flax method interceptor sees every supported layer call. To find the layers
it records static facts; to capture, it records each call's input and adds a
zero "probe" to its output, so that the gradient of the loss with respect to
the probe is the gradient with respect to the layer output. Probes are named
per call, so a module called twice gets both calls' rows, not their sum.

Calls made inside ``jax.checkpoint`` (``nn.remat``, ``nn.checkpoint``,
``nnx.remat``) run once per forward pass, like the others, but their inputs
are values of the checkpoint's own trace, which must not be kept. Their
inputs come back through the differentiation instead: an identity with a
custom VJP on the layer output hands the layer input to the backward pass,
which returns it as the gradient of a zero "input probe" closed over from
the loss's trace. A scan runs its body several times: each scan is given
stacked probes to scan over, one slice per iteration (``scan.py``). Calls
inside other loops and ``vmap`` cannot be told apart by one probe: their
layers are listed as skipped, with the reason.

The pipeline, one module a step:

* ``calls``: intercepts the module calls of both Flax APIs (``nnx``: the
  interceptor Flax NNX lacks) and reads each call's input and options;
* ``params``: finds a layer's kernel and bias in params, and names the layer;
* ``coverage``: which leaves of params the loss reads, and which no layer covers;
* ``transforms``: where a call sits among the JAX transforms between the
  loss's trace and its own: captured directly, through the backward pass,
  per scan iteration (``scan``: the ``lax.scan`` hook), or skipped;
* ``probes``: the zero probes a call is given, and the identity that hands
  its input back through the backward pass;
* ``api``: ``find_layers`` and ``value_and_grad``, the passes over the loss.
"""

from kaisa_jax._src.capture.api import LayerCapture, find_layers, value_and_grad

__all__ = ["LayerCapture", "find_layers", "value_and_grad"]
