"""The NAT and DiNAT variants, and ``create`` to build one with its parameters.

Shapes follow the papers and the reference implementation:
  - NAT: Hassani, Walton, Li, Li, Shi, "Neighborhood Attention Transformer", CVPR 2023,
    Table 1 (ImageNet-1K classification).
  - DiNAT: Hassani, Shi, "Dilated Neighborhood Attention Transformer", arXiv:2209.15001,
    Table 2 (ImageNet-1K; DiNAT-L pre-trained on ImageNet-22K). Dilations are those used at
    224² input: each level's dilated blocks see the whole 56/28/14/7 level.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from jnat.models import checkpoint as ckpt
from jnat.models.nat import NAT

_NAT_SHAPES = dict(kernel_size=7, depths=(3, 4, 18, 5))

nat_mini = functools.partial(NAT, embed_dim=64, depths=(3, 4, 6, 5), num_heads=(2, 4, 8, 16),
                             mlp_ratio=3.0, drop_path_rate=0.2, kernel_size=7)
nat_tiny = functools.partial(NAT, embed_dim=64, num_heads=(2, 4, 8, 16), mlp_ratio=3.0,
                             drop_path_rate=0.2, **_NAT_SHAPES)
nat_small = functools.partial(NAT, embed_dim=96, num_heads=(3, 6, 12, 24), mlp_ratio=2.0,
                              drop_path_rate=0.3, layer_scale=1e-5, **_NAT_SHAPES)
nat_base = functools.partial(NAT, embed_dim=128, num_heads=(4, 8, 16, 32), mlp_ratio=2.0,
                             drop_path_rate=0.5, layer_scale=1e-5, **_NAT_SHAPES)


def dinat_dilations(depths, dilations=(8, 4, 2, 1)):
  """Per-block dilations, alternating 1 and the level's: ``((1, 8, 1), (1, 4, 1, 4), ...)``."""
  return tuple(tuple(d if j % 2 else 1 for j in range(depth))
               for depth, d in zip(depths, dilations))


def _dilated(variant: Callable[..., NAT]) -> Callable[..., NAT]:
  depths = variant.keywords["depths"]
  return functools.partial(variant, dilations=dinat_dilations(depths))


dinat_mini = _dilated(nat_mini)
dinat_tiny = _dilated(nat_tiny)
dinat_small = _dilated(nat_small)
dinat_base = _dilated(nat_base)
dinat_large = _dilated(functools.partial(NAT, embed_dim=192, num_heads=(6, 12, 24, 48),
                                         mlp_ratio=2.0, drop_path_rate=0.35, **_NAT_SHAPES))

# Not from the papers: small models for tests and smoke runs on small images.
nat_nano = functools.partial(NAT, embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8),
                             mlp_ratio=2.0, kernel_size=3, drop_path_rate=0.1)
dinat_nano = functools.partial(nat_nano, depths=(2, 2, 2, 1),
                               dilations=dinat_dilations((2, 2, 2, 1), (4, 2, 2, 1)))

VARIANTS: dict[str, Callable[..., NAT]] = {
    "nat_nano": nat_nano, "nat_mini": nat_mini, "nat_tiny": nat_tiny,
    "nat_small": nat_small, "nat_base": nat_base,
    "dinat_nano": dinat_nano, "dinat_mini": dinat_mini, "dinat_tiny": dinat_tiny,
    "dinat_small": dinat_small, "dinat_base": dinat_base, "dinat_large": dinat_large,
}

# (parameters in millions, GFLOPs at 224²) as published, one multiply-add counted as one FLOP.
PAPER_STATS: dict[str, tuple[float, float]] = {
    "nat_mini": (20, 2.7), "nat_tiny": (28, 4.3), "nat_small": (51, 7.8),
    "nat_base": (90, 13.7),
    "dinat_mini": (20, 2.7), "dinat_tiny": (28, 4.3), "dinat_small": (51, 7.8),
    "dinat_base": (90, 13.7), "dinat_large": (200, 30.6),
}

# Params do not depend on the resolution: initialise on a small image to keep it cheap.
_INIT_SHAPE = (1, 32, 32, 3)


def get(name: str, **overrides) -> NAT:
  """The variant ``name`` (a key of ``VARIANTS``) with ``overrides`` applied.

  Raises:
    ValueError: for an unknown name.
  """
  if name not in VARIANTS:
    raise ValueError(f"Unknown model {name=}; choose one of {sorted(VARIANTS)}.")
  return VARIANTS[name](**overrides)


def abstract_params(model: NAT, in_chans: int = 3):
  """Shapes and dtypes of ``model``'s parameters, without computing anything."""
  images = jax.ShapeDtypeStruct(_INIT_SHAPE[:-1] + (in_chans,), jnp.float32)
  return jax.eval_shape(model.init, jax.random.key(0), images)["params"]


def create(name: str, *, checkpoint: str | None = None, rng: jax.Array | None = None,
           **overrides) -> tuple[NAT, dict]:
  """Builds a variant and its parameters, fresh or restored from a checkpoint.

  Args:
    name: a key of ``VARIANTS``, e.g. ``"nat_tiny"``.
    checkpoint: directory written by ``jnat.convert`` (or ``jnat.models.checkpoint.save``);
      its saved settings (``num_classes``, ``layer_scale``) are applied first.
    rng: key for fresh initialisation (default ``jax.random.key(0)``); unused with a
      checkpoint.
    **overrides: model attributes, e.g. ``num_classes=10`` or ``dtype=jnp.bfloat16``.

  Returns:
    ``(model, params)``; run it with ``model.apply({"params": params}, images)``.

  Raises:
    ValueError: for an unknown name, a checkpoint of another model, or parameters whose
      names or shapes do not match the model.

  Example:
    >>> from jnat import models
    >>> model, params = models.create("nat_nano", num_classes=10)
    >>> params["head"]["kernel"].shape
    (256, 10)
  """
  if checkpoint is None:
    model = get(name, **overrides)
    images = jnp.zeros(_INIT_SHAPE, jnp.float32)
    rng = jax.random.key(0) if rng is None else rng
    return model, jax.jit(model.init)(rng, images)["params"]
  saved = ckpt.load(checkpoint)
  if saved.model != name:
    raise ValueError(f"{checkpoint=} holds {saved.model!r}, not {name!r}.")
  model = get(name, **{**saved.config, **overrides})
  params = ckpt.match(saved.params, abstract_params(model))
  return model, params


def count_params(params) -> int:
  """Number of scalars in a parameter tree (of arrays, or of their shapes)."""
  return sum(x.size for x in jax.tree.leaves(params))
