"""A small decoder-only transformer on generated text: K-FAC (KAISA) against AdamW.

The text is made here, by a small probabilistic grammar (``make_corpus``): short
stories about people handing each other things, counting and describing
animals. It is deterministic (Python's ``random`` with a fixed seed), needs
no download, and has what a language model should learn beyond letter
frequencies: words, agreement of a verb with a subject several words back
("the fox near the owls runs", "the foxes near the owl run"), names and
things that come back a sentence later ("mia gave leo the red cup. now leo has
the red cup."), and counting ("five, six, seven"). The second sentence about
a gift can only be predicted by copying from the first, which is what
attention is for.

The model is character-level: token and learned position embeddings
(``nn.Embed``), two pre-LayerNorm blocks of causal multi-head self-attention
(``nn.DenseGeneral`` projections) and a gelu MLP (``nn.Dense`` d -> 4d -> d), a
final LayerNorm and an untied ``nn.Dense`` head to the characters. The loss is
the mean cross-entropy of the next character over every position.

K-FAC preconditions the layers ``kaisa_jax.find_layers`` registers: here
every module, each by its own kind of block (the embeddings with a diagonal
A, the LayerNorms per feature, the attention projections as DenseGeneral
layers over the flattened heads, the MLP and the head as Dense layers).
Layers it lists as skipped (a kind or configuration the library cannot
precondition, as with older versions) are passed to ``skip_layers`` and
follow the plain gradient, like modules it does not list at all; the layer
table printed at the start says which is which. The Dense and DenseGeneral
layers see (batch, T, d) inputs, shared over the T positions:
``weight_sharing`` ('expand' or 'reduce') says how those enter the factors.

Optimizers, fed the same batches from the same initial parameters:

* ``adamw``: ``optax.adamw`` (weight decay on kernels and embeddings only);
* ``kaisa + sgd``: ``kaisa_jax.kaisa`` with per-example G scaling, chained
  before SGD with momentum;
* ``kaisa + adamw``: the same preconditioner chained before AdamW.

Every ``--eval-every`` steps it measures the loss on a fixed held-out
validation text and on a fixed slice of the training text (both outside the
clock). It prints a table (steps and seconds to the validation-loss target,
final losses) and writes ``transformer.png`` and ``transformer.json`` to
``--out``. The hyperparameters are the ones ``benchmarks/convergence.py
--tasks transformer`` chose on its grid (AdamW's weight decay aside: see
``ADAMW``).

Run from the repository root::

  python examples/transformer.py            # a few minutes on 2 CPU cores
  python examples/transformer.py --quick    # a few steps, for tests
"""

from __future__ import annotations

import math
import os
import random
import re
import string

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax

import kaisa_jax

import digits  # the training loop and the table, shared with the main demo

matplotlib.use("Agg")
import matplotlib.pyplot as plt

# The model and the data.
D_MODEL = 64
HEADS = 4
BLOCKS = 2
CONTEXT = 64  # characters per training window
CORPUS_CHARS = 600_000
VALID_FRACTION = 0.1
EVAL_WINDOWS = 128  # fixed windows each loss is measured on (8,192 characters)
BATCH_SIZE = 32

# Training.
TARGET = 0.5  # validation loss (nats per character)
# From benchmarks/convergence.py --tasks transformer (its grid's choices on
# seed 0). AdamW: lr 3e-3 was the best of {1e-3, 3e-3, 1e-2}; weight decay 0
# and 0.1 both reached the target at step 350 (0 won on seconds): 0.1 here,
# the usual AdamW.
ADAMW = dict(learning_rate=3e-3, weight_decay=0.1)  # "adamw"
# kaisa before SGD-momentum ("kaisa/pe"): learning_rate is SGD's (and the KL clip's).
KFAC = dict(learning_rate=0.3, damping=0.1, factor_decay=0.95, factor_update_steps=5,
            inv_update_steps=20, kl_clip=1e-2, g_factor_scaling="per_example",
            weight_sharing="expand")
# kaisa before AdamW ("kaisa/adamw"): the same periods and scaling, no KL clip,
# learning_rate is AdamW's (no weight decay, as in the benchmark).
KFAC_ADAMW = dict(KFAC, learning_rate=3e-3, damping=1e-2, kl_clip=None,
                  weight_sharing="expand")
MOMENTUM = 0.9
OPTIMIZERS = ("adamw", "kaisa + sgd", "kaisa + adamw")
# Every character the grammar can write; the token of a character is its index.
VOCAB = "\n ,." + string.ascii_lowercase


# --------------------------------------------------------------------------- text

_NAMES = ("anna", "ben", "cleo", "dan", "eva", "finn", "gus", "hana", "ivo", "jade", "kai",
          "lena", "max", "mia", "nils", "olga", "pia", "rosa", "sam", "tom", "uma", "vera",
          "will", "zoe")
_THINGS = ("apple", "book", "cup", "drum", "hat", "kite", "lamp", "map", "pen", "ring",
           "shoe", "spoon", "box", "bell", "coin", "key")
_COLORS = ("red", "blue", "green", "black", "white", "yellow", "brown", "pink")
_ANIMALS = ("fox", "owl", "cat", "dog", "bear", "frog", "duck", "wolf", "mouse", "goose")
_PLURALS = {"fox": "foxes", "box": "boxes", "wolf": "wolves", "mouse": "mice", "goose": "geese"}
_VERBS = ("run", "sleep", "sing", "jump", "swim", "hide", "eat", "play")
_PLACES = ("the river", "the hill", "the barn", "the wood", "the lake", "the field")
_NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
            "ten", "eleven", "twelve")


def _plural(noun: str) -> str:
  return _PLURALS.get(noun, noun + "s")


def _gift(rng: random.Random) -> str:
  """Two people and a thing; the second sentence repeats them (copying)."""
  a, b = rng.sample(_NAMES, 2)
  thing = f"{rng.choice(_COLORS)} {rng.choice(_THINGS)}"
  first = rng.choice((f"{a} gave {b} the {thing}.", f"{a} found the {thing} and gave it to {b}."))
  second = rng.choice((f"now {b} has the {thing}.", f"{b} thanked {a} for the {thing}."))
  return f"{first} {second}"


def _animals(rng: random.Random) -> str:
  """A subject, a distracting noun of the other number, then the verb agreeing
  with the subject."""
  subject, other = rng.sample(_ANIMALS, 2)
  plural = rng.random() < 0.5
  subject_word = _plural(subject) if plural else subject
  other_word = other if plural else _plural(other)
  verb = rng.choice(_VERBS)
  verb_word = verb if plural else verb + "s"
  return (f"the {subject_word} near the {other_word} {verb_word} "
          f"by {rng.choice(_PLACES)}.")


def _count(rng: random.Random) -> str:
  """A run of consecutive numbers: predictable once it has started."""
  start = rng.randrange(0, 9)
  length = rng.randrange(3, min(6, 13 - start) + 1)
  run = ", ".join(_NUMBERS[start:start + length])
  return f"{rng.choice(_NAMES)} counted {run}."


def _have(rng: random.Random) -> str:
  """A number word and the noun's number agreeing with it."""
  n = rng.randrange(1, 8)
  thing = rng.choice(_THINGS)
  noun = thing if n == 1 else _plural(thing)
  return f"{rng.choice(_NAMES)} has {_NUMBERS[n]} {rng.choice(_COLORS)} {noun}."


_SENTENCES = (_gift, _gift, _animals, _count, _have)


def make_corpus(num_chars: int = CORPUS_CHARS, seed: int = 0) -> str:
  """Generated stories, one per line, at least ``num_chars`` characters.

  Python's ``random`` with a fixed seed makes the same text on every machine.
  """
  rng = random.Random(seed)
  lines, total = [], 0
  while total < num_chars:
    line = " ".join(rng.choice(_SENTENCES)(rng) for _ in range(rng.randrange(2, 5)))
    lines.append(line)
    total += len(line) + 1
  return "\n".join(lines) + "\n"


def load_data(context: int = CONTEXT, num_chars: int = CORPUS_CHARS) -> dict:
  """The corpus as (windows, context) int32 inputs and next-character targets.

  The last ``VALID_FRACTION`` of the stories is held out. Training windows
  start every ``context // 2`` characters (overlapping, so that every
  character is seen at two positions of the context); validation windows do
  not overlap and only the first ``EVAL_WINDOWS`` of them are kept: the fixed
  set every validation loss is measured on.
  """
  text = make_corpus(num_chars)
  split = text.index("\n", int(len(text) * (1 - VALID_FRACTION))) + 1
  lookup = np.full(256, -1, np.int32)
  lookup[[ord(c) for c in VOCAB]] = np.arange(len(VOCAB))
  tokens = lookup[np.frombuffer(text.encode("ascii"), np.uint8)]
  assert tokens.min() >= 0, "the grammar wrote a character that is not in VOCAB"

  def windows(part: np.ndarray, stride: int):
    starts = np.arange(0, len(part) - context - 1, stride)
    idx = starts[:, None] + np.arange(context + 1)
    return part[idx[:, :-1]], part[idx[:, 1:]]

  x_train, y_train = windows(tokens[:split], context // 2)
  x_valid, y_valid = windows(tokens[split:], context)
  return dict(x_train=x_train, y_train=y_train, x_test=x_valid[:EVAL_WINDOWS],
              y_test=y_valid[:EVAL_WINDOWS])


# --------------------------------------------------------------------------- model


class Block(nn.Module):
  """Pre-LayerNorm causal self-attention, then a pre-LayerNorm gelu MLP."""
  d_model: int
  heads: int

  @nn.compact
  def __call__(self, x):
    head_dim = self.d_model // self.heads
    h = nn.LayerNorm(name="ln_attn")(x)
    # (batch, T, d) -> (batch, T, heads, head_dim) per projection.
    q, k, v = (nn.DenseGeneral((self.heads, head_dim), name=name)(h)
               for name in ("query", "key", "value"))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(head_dim)
    length = x.shape[1]
    causal = jnp.tril(jnp.ones((length, length), bool))
    scores = jnp.where(causal, scores, jnp.finfo(scores.dtype).min)
    mixed = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)
    # (batch, T, heads, head_dim) -> (batch, T, d): one projection over both axes.
    x = x + nn.DenseGeneral(self.d_model, axis=(-2, -1), name="out")(mixed)
    h = nn.LayerNorm(name="ln_mlp")(x)
    h = nn.gelu(nn.Dense(4 * self.d_model, name="mlp_in")(h))
    return x + nn.Dense(self.d_model, name="mlp_out")(h)


class ScanBlock(nn.Module):
  """``Block`` with the (carry, x) -> (carry, y) signature ``nn.scan`` wants."""
  d_model: int
  heads: int

  @nn.compact
  def __call__(self, x, _):
    return Block(self.d_model, self.heads, name="block")(x), None


class Transformer(nn.Module):
  """Characters in, next-character logits out: (batch, T) -> (batch, T, vocab).

  With ``scan``, the blocks are one ``nn.scan`` over a Block whose parameters
  are stacked (``blocks``, ...): traced and compiled once, and K-FAC gives
  each slice its own Kronecker blocks, as it does the separate blocks.
  """
  vocab: int
  d_model: int = D_MODEL
  heads: int = HEADS
  blocks: int = BLOCKS
  context: int = CONTEXT
  scan: bool = False

  @nn.compact
  def __call__(self, tokens):
    # Positions are given per example, (batch, T) like the tokens, so that
    # both embeddings see the batch as their leading axis.
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    x = (nn.Embed(self.vocab, self.d_model, name="embed")(tokens)
         + nn.Embed(self.context, self.d_model, name="position")(positions))
    if self.scan:
      stack = nn.scan(ScanBlock, variable_axes={"params": 0}, split_rngs={"params": True},
                      length=self.blocks)
      x, _ = stack(self.d_model, self.heads, name="blocks")(x, None)
    else:
      for i in range(self.blocks):
        x = Block(self.d_model, self.heads, name=f"block{i}")(x)
    x = nn.LayerNorm(name="ln_final")(x)
    return nn.Dense(self.vocab, name="head")(x)  # untied from the embedding


def make_loss(model: nn.Module):
  """The mean next-character cross-entropy ``loss(params, x, y)`` over all positions."""

  def loss_fn(params, x, y):
    logits = model.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  return loss_fn


def make_evaluate(model: nn.Module):
  """``evaluate(params, x, y) -> {"loss": ...}`` on ``EVAL_WINDOWS`` fixed windows.

  ``digits.train`` evaluates on the whole "train" and "test" splits it is
  given; the training split has about 17,000 windows, too many to measure
  every few steps, so a split is thinned to ``EVAL_WINDOWS`` windows spread
  evenly over it (the validation split has no more than that: all of it).
  """
  loss_fn = jax.jit(make_loss(model))

  def evaluate(params, x, y):
    stride = max(1, len(x) // EVAL_WINDOWS)
    return {"loss": loss_fn(params, x[::stride][:EVAL_WINDOWS], y[::stride][:EVAL_WINDOWS])}

  return evaluate


# --------------------------------------------------------------------------- optimizers


def decay_mask(params):
  """AdamW decays the kernels and the embeddings, not biases or LayerNorm scales."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], "key", None) in ("kernel", "embedding"), params)


def skipped_layers(layers: kaisa_jax.LayerRegistry) -> tuple[str, ...]:
  """``skip_layers`` patterns for every layer find_layers listed as skipped.

  Exact names (anchored and escaped: skip_layers are regular expressions
  searched in the name), so that 'block0/key' does not also skip a
  'block0/key_norm'.
  """
  return tuple(f"^{re.escape(s.name)}$" for s in layers.skipped)


def make_optimizer(name: str, layers: kaisa_jax.LayerRegistry, *, adamw: dict = ADAMW,
                   kfac: dict = KFAC, kfac_adamw: dict = KFAC_ADAMW
                   ) -> optax.GradientTransformation:
  """The optax optimizer called ``name``; K-FAC needs the layer registry.

  ``kfac`` and ``kfac_adamw`` hold the arguments of ``kaisa_jax.kaisa`` before
  SGD-momentum and before AdamW; their ``learning_rate`` is also the
  following optimizer's. Before AdamW the KL clip is off: AdamW divides each
  coordinate by its own running second moment, which undoes a clip that
  scales the whole step by one factor.
  """
  if name == "adamw":
    return optax.adamw(adamw["learning_rate"], weight_decay=adamw["weight_decay"],
                       mask=decay_mask)
  skip = skipped_layers(layers)
  if name == "kaisa + sgd":
    return optax.chain(kaisa_jax.kaisa(layers, skip_layers=skip, **kfac),
                       optax.sgd(kfac["learning_rate"], momentum=MOMENTUM))
  if name == "kaisa + adamw":
    return optax.chain(kaisa_jax.kaisa(layers, skip_layers=skip, **kfac_adamw),
                       optax.adamw(kfac_adamw["learning_rate"], weight_decay=0.0))
  raise ValueError(f"unknown optimizer {name!r}")


# --------------------------------------------------------------------------- reporting


def summarize(optimizer: str, curve: dict, target: float) -> dict:
  """``digits.summarize``'s row, with steps and seconds to the *validation* target."""
  row = digits.summarize(dict(optimizer=optimizer), curve, target)
  valid = dict(curve, train_loss=curve["test_loss"])  # first_reached reads "train_loss"
  row["steps_to_target"], row["seconds_to_target"] = digits.first_reached(valid, target)
  return row


def plot(curves: dict, target: float, path: str):
  """Validation loss against steps and seconds; training-sample loss dotted."""
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for i, (name, curve) in enumerate(curves.items()):
    for ax, x_key in zip(axes, ("step", "seconds")):
      color = f"C{i}"
      ax.plot(curve[x_key], curve["test_loss"], marker=".", color=color,
              label=f"{name} (validation)")
      ax.plot(curve[x_key], curve["train_loss"], linestyle=":", color=color,
              label=f"{name} (training sample)")
  for ax, x_label in zip(axes, ("step", "seconds (training only)")):
    ax.axhline(target, color="gray", linestyle="--", linewidth=1, label=f"target {target:g}")
    ax.set_xlabel(x_label)
    ax.set_ylabel("cross-entropy per character (nats)")
    ax.set_title(f"transformer: loss vs {x_label.split()[0]}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


# --------------------------------------------------------------------------- main


def main(argv=None):
  args = digits.parse_args(argv, name="transformer", steps=600, target=TARGET,
                           description=__doc__)
  if args.quick:
    num_chars = 60_000  # the smoke run needs little text
  else:
    num_chars = CORPUS_CHARS
  os.makedirs(args.out, exist_ok=True)
  data = load_data(num_chars=num_chars)
  model = Transformer(vocab=len(VOCAB))
  problem = digits.Problem(model, make_loss(model), make_evaluate(model),
                           make_optimizer)
  batches = digits.batch_indices(len(data["x_train"]), BATCH_SIZE, args.steps, args.seed)
  params = model.init(jax.random.key(args.seed), data["x_train"][:1])["params"]
  layers = kaisa_jax.find_layers(problem.loss_fn, params, data["x_train"][:BATCH_SIZE],
                                 data["y_train"][:BATCH_SIZE])
  print(f"{len(VOCAB)} characters, {len(data['x_train'])} training windows of "
        f"{CONTEXT}; {sum(p.size for p in jax.tree.leaves(params)):,} parameters")
  print("layers K-FAC preconditions (skipped ones and unlisted modules follow the gradient)")
  print(layers)
  print()

  curves, summary = {}, []
  for opt_name in OPTIMIZERS:
    curve = digits.train(problem, opt_name, data, batches, args.eval_every, args.seed,
                         desc=opt_name)
    curves[opt_name] = curve
    summary.append(summarize(opt_name, curve, args.target))

  print()
  print(digits.format_table(summary, args.target, ("optimizer",)))
  print("target and 'test loss': validation loss (held-out text); 'final train loss': a fixed "
        f"sample of {EVAL_WINDOWS} training windows; seconds: training steps only")
  config = dict(steps=args.steps, batch_size=BATCH_SIZE, context=CONTEXT, d_model=D_MODEL,
                heads=HEADS, blocks=BLOCKS, vocab=len(VOCAB), corpus_chars=num_chars,
                eval_every=args.eval_every, target=args.target, seed=args.seed,
                adamw=ADAMW, kfac=KFAC, kfac_adamw=KFAC_ADAMW, momentum=MOMENTUM,
                registered=list(layers.names), skipped=[s.name for s in layers.skipped],
                backend=jax.default_backend())
  png = os.path.join(args.out, "transformer.png")
  json_path = os.path.join(args.out, "transformer.json")
  plot(curves, args.target, png)
  digits.write_json(json_path, config, summary, curves)
  print(f"wrote {png} and {json_path}")


if __name__ == "__main__":
  main()
