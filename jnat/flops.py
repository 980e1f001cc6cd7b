"""Parameter and FLOP counts of Flax models, counted the way the NAT papers count them.

FLOPs here are multiply-adds (fvcore's convention, used by the NAT/DiNAT/Swin papers) of
matrix products, convolutions and neighborhood attention: ``q·k`` and ``weights·v`` each
cost ``batch · tokens · heads · head_dim · window``. Normalisation, activations, softmax
and additions are not counted. Dense and convolution work is read off the model's jaxpr;
each ``jnat.nn.NeighborhoodAttention`` core is intercepted and counted from its shapes,
whatever backend would run it.

Command line (every variant at 224²)::

  python -m jnat.flops [--resolution 224]
"""

from __future__ import annotations

import argparse
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.extend import core as jax_core

from jnat import models
from jnat.nn import NeighborhoodAttention


def _dot_general_macs(eqn) -> int:
  lhs, rhs = (v.aval.shape for v in eqn.invars)
  (_, rhs_contract), (_, rhs_batch) = eqn.params["dimension_numbers"]
  rhs_kept = [d for i, d in enumerate(rhs) if i not in rhs_contract and i not in rhs_batch]
  return math.prod(lhs) * math.prod(rhs_kept)


def _conv_macs(eqn) -> int:
  kernel = eqn.invars[1].aval.shape
  out = eqn.outvars[0].aval.shape
  out_features = kernel[eqn.params["dimension_numbers"].rhs_spec[0]]
  return math.prod(out) * math.prod(kernel) // out_features


def _sub_jaxprs(value):
  if isinstance(value, jax_core.ClosedJaxpr):
    yield value.jaxpr
  elif isinstance(value, jax_core.Jaxpr):
    yield value
  elif isinstance(value, (tuple, list)):
    for item in value:
      yield from _sub_jaxprs(item)


def jaxpr_macs(jaxpr) -> int:
  """Multiply-adds of the matrix products and convolutions in a jaxpr (nested included).

  A ``scan`` body counts once per iteration, a ``cond`` by its costliest branch, a
  ``while`` body once (its trip count is unknown).
  """
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      total += _dot_general_macs(eqn)
    elif name == "conv_general_dilated":
      total += _conv_macs(eqn)
    else:
      inner = [jaxpr_macs(sub) for v in eqn.params.values() for sub in _sub_jaxprs(v)]
      if name == "cond":
        total += max(inner, default=0)
      else:
        total += sum(inner) * (eqn.params["length"] if name == "scan" else 1)
  return total


def _attention_macs(query_shape, kernel_size) -> int:
  batch, *spatial, heads, head_dim = query_shape
  rank = len(spatial)
  window = math.prod(kernel_size) if not isinstance(kernel_size, int) else kernel_size ** rank
  return 2 * batch * math.prod(spatial) * heads * head_dim * window


def profile(model: nn.Module, image_shape: tuple[int, ...]) -> tuple[int, int]:
  """Parameter count and multiply-adds of one forward pass, without running it.

  Args:
    model: a Flax linen model taking one image batch.
    image_shape: input shape, e.g. ``(1, 224, 224, 3)``.

  Returns:
    ``(parameters, macs)``; ``macs / 1e9`` is the papers' "GFLOPs".

  Example:
    >>> from jnat import flops, models
    >>> params, macs = flops.profile(models.nat_nano(), (1, 64, 64, 3))
  """
  attention = []

  def count_attention(next_fun, args, kwargs, context):
    if isinstance(context.module, NeighborhoodAttention) and context.method_name == "attend":
      query = args[0]
      attention.append(_attention_macs(query.shape, context.module.kernel_size))
      return jnp.zeros_like(query)  # The attention itself must not reach the jaxpr.
    return next_fun(*args, **kwargs)

  images = jax.ShapeDtypeStruct(image_shape, jnp.float32)
  # Initialisation runs one forward pass: its jaxpr holds the forward's products and its
  # output shapes are the parameters, so one trace gives both counts.
  with nn.intercept_methods(count_attention):
    closed, shapes = jax.make_jaxpr(model.init, return_shape=True)(jax.random.key(0), images)
  return models.count_params(shapes["params"]), jaxpr_macs(closed.jaxpr) + sum(attention)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description="Parameters and GFLOPs of the NAT/DiNAT zoo.")
  parser.add_argument("--resolution", type=int, default=224)
  parser.add_argument("--models", nargs="*", default=list(models.VARIANTS),
                      choices=list(models.VARIANTS))
  args = parser.parse_args(argv)
  print(f"{'model':<12} {'params (M)':>10} {'GFLOPs':>8}   paper ({args.resolution}²: M / G)")
  for name in args.models:
    params, macs = profile(models.get(name), (1, args.resolution, args.resolution, 3))
    paper = models.PAPER_STATS.get(name)
    note = f"{paper[0]:g} / {paper[1]:g}" if paper and args.resolution == 224 else "-"
    print(f"{name:<12} {params / 1e6:>10.2f} {macs / 1e9:>8.2f}   {note}")


if __name__ == "__main__":
  main()
