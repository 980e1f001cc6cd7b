"""NAT and DiNAT image classifiers (Hassani et al., CVPR 2023; Hassani & Shi, 2022).

One class covers both: DiNAT is NAT whose blocks alternate dilations. Submodules and
parameters carry the names of the reference PyTorch implementation (``patch_embed/proj_0``
for ``patch_embed.proj.0``, ``levels_0/blocks_1/attn/qkv`` ...), so released checkpoints
convert by a fixed rule (``jnat.convert``). Images are NHWC; any resolution works (levels
smaller than a window are padded by the attention layer).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jnat.nn import NeighborhoodAttention
from jnat.nn import dropout
from jnat.nn import trunc_normal_init

Array = jax.Array

# Convolutions keep PyTorch's default init, kaiming_uniform(a=√5): U(±1/√fan_in).
conv_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
# PyTorch's LayerNorm epsilon (Flax defaults to 1e-6).
LAYER_NORM_EPS = 1e-5


def conv_bias_init(fan_in: int):
  """PyTorch's default convolution bias init, U(±1/√fan_in)."""
  bound = fan_in ** -0.5
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound,
                                                                  bound)


class _Module(nn.Module):
  """Shared dtype attributes and the layer factories every NAT part uses."""

  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def norm(self, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=self.dtype, param_dtype=self.param_dtype,
                        name=name)

  def dense(self, features: int, name: str) -> nn.Dense:
    return nn.Dense(features, dtype=self.dtype, param_dtype=self.param_dtype,
                    kernel_init=trunc_normal_init, name=name)

  def conv(self, features: int, fan_in: int, name: str, use_bias: bool = True) -> nn.Conv:
    """3×3 stride-2 convolution padded by 1 on every side, as ``nn.Conv2d(..., padding=1)``.

    (Flax's "SAME" would pad even-sized inputs only at the end and shift every output.)
    """
    return nn.Conv(features, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)),
                   use_bias=use_bias, dtype=self.dtype, param_dtype=self.param_dtype,
                   kernel_init=conv_init, bias_init=conv_bias_init(9 * fan_in), name=name)


class ConvTokenizer(_Module):
  """Two 3×3 stride-2 convolutions (3 → C/2 → C, no activation between) and a LayerNorm."""

  embed_dim: int = 64

  @nn.compact
  def __call__(self, images: Array) -> Array:
    x = self.conv(self.embed_dim // 2, images.shape[-1], "proj_0")(images)
    x = self.conv(self.embed_dim, self.embed_dim // 2, "proj_1")(x)
    return self.norm("norm")(x)


class ConvDownsampler(_Module):
  """3×3 stride-2 convolution C → 2C without bias, then LayerNorm."""

  @nn.compact
  def __call__(self, x: Array) -> Array:
    dim = x.shape[-1]
    return self.norm("norm")(self.conv(2 * dim, dim, "reduction", use_bias=False)(x))


class DropPath(nn.Module):
  """Stochastic depth: drops the whole residual branch of a sample with probability ``rate``."""

  rate: float

  @nn.compact
  def __call__(self, x: Array, deterministic: bool) -> Array:
    if deterministic or self.rate == 0:
      return x
    return dropout(x, self.rate, self.make_rng("dropout"),
                   mask_shape=(x.shape[0],) + (1,) * (x.ndim - 1))


class Mlp(_Module):
  """Linear → GELU (exact, as torch's default) → Linear, with dropout after each."""

  hidden: int = 0
  drop: float = 0.0

  @nn.compact
  def __call__(self, x: Array, deterministic: bool) -> Array:
    dim = x.shape[-1]
    x = nn.gelu(self.dense(self.hidden, "fc1")(x), approximate=False)
    x = nn.Dropout(self.drop)(x, deterministic=deterministic)
    return nn.Dropout(self.drop)(self.dense(dim, "fc2")(x), deterministic=deterministic)


@dataclasses.dataclass(frozen=True)
class BlockConfig:
  """Hyperparameters shared by the blocks of one level (see ``NAT`` for their meaning)."""

  num_heads: int
  kernel_size: int = 7
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  qk_scale: float | None = None
  drop: float = 0.0
  attn_drop: float = 0.0
  layer_scale: float | None = None
  backend: str | None = None


class NATBlock(_Module):
  """Pre-norm transformer block: x + γ1·NA(LN(x)), then x + γ2·MLP(LN(x)).

  The layer scales γ (``gamma1``, ``gamma2``) exist only when ``layer_scale`` is set.
  """

  config: BlockConfig = BlockConfig(num_heads=1)
  dilation: int = 1
  drop_path: float = 0.0

  @nn.compact
  def __call__(self, x: Array, deterministic: bool) -> Array:
    c, dim = self.config, x.shape[-1]
    attn = NeighborhoodAttention(
        num_heads=c.num_heads, kernel_size=(c.kernel_size,) * 2, dilation=self.dilation,
        qkv_bias=c.qkv_bias, rel_pos_bias=True, qk_scale=c.qk_scale, attn_drop=c.attn_drop,
        proj_drop=c.drop, dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=trunc_normal_init, backend=c.backend, name="attn")
    mlp = Mlp(hidden=int(dim * c.mlp_ratio), drop=c.drop, dtype=self.dtype,
              param_dtype=self.param_dtype, name="mlp")
    drop_path = DropPath(self.drop_path)
    branches = (lambda y: attn(self.norm("norm1")(y), deterministic),
                lambda y: mlp(self.norm("norm2")(y), deterministic))
    for i, branch in enumerate(branches, start=1):
      y = branch(x)
      if c.layer_scale is not None:
        gamma = self.param(f"gamma{i}", nn.initializers.constant(c.layer_scale), (dim,),
                           self.param_dtype)
        y = y * gamma.astype(y.dtype)
      x = x + drop_path(y, deterministic)
    return x


class NATLevel(_Module):
  """The blocks of one resolution, then (except at the last level) a downsampler.

  Returns:
    ``(features, x)``: the blocks' output and the downsampled input of the next level.
  """

  config: BlockConfig = BlockConfig(num_heads=1)
  dilations: Sequence[int] = (1,)
  drop_paths: Sequence[float] = (0.0,)
  downsample: bool = True

  @nn.compact
  def __call__(self, x: Array, deterministic: bool) -> tuple[Array, Array]:
    for j, (dilation, drop_path) in enumerate(zip(self.dilations, self.drop_paths)):
      x = NATBlock(config=self.config, dilation=dilation, drop_path=drop_path,
                   dtype=self.dtype, param_dtype=self.param_dtype,
                   name=f"blocks_{j}")(x, deterministic)
    if not self.downsample:
      return x, x
    return x, ConvDownsampler(dtype=self.dtype, param_dtype=self.param_dtype,
                              name="downsample")(x)


class NAT(_Module):
  """NAT / DiNAT classifier on NHWC images.

  Attributes:
    embed_dim: channels of the first level (doubled at each level).
    depths: blocks per level.
    num_heads: attention heads per level.
    mlp_ratio: MLP hidden width over block width.
    kernel_size: neighborhood size (square).
    dilations: per level, one dilation per block (DiNAT); None means 1 everywhere (NAT).
    num_classes: logits; 0 gives the pooled features instead of logits.
    drop_rate: dropout after the stem, in MLPs and after attention projections.
    attn_drop_rate: dropout on attention weights.
    drop_path_rate: stochastic depth, rising linearly from 0 to this over all blocks.
    layer_scale: initial value of the per-channel layer scales, or None for none.
    qkv_bias: whether the qkv projections have biases.
    qk_scale: attention logit scale; ``head_dim ** -0.5`` when None.
    dtype: computation dtype.
    param_dtype: parameter dtype.
    backend: neighborhood attention backend; None picks the fastest.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from jnat import models
    >>> model = models.nat_nano(num_classes=10)
    >>> images = jnp.zeros((1, 64, 64, 3))
    >>> params = model.init(jax.random.key(0), images)["params"]
    >>> model.apply({"params": params}, images).shape
    (1, 10)
  """

  embed_dim: int = 64
  depths: Sequence[int] = (3, 4, 18, 5)
  num_heads: Sequence[int] = (2, 4, 8, 16)
  mlp_ratio: float = 3.0
  kernel_size: int = 7
  dilations: Sequence[Sequence[int]] | None = None
  num_classes: int = 1000
  drop_rate: float = 0.0
  attn_drop_rate: float = 0.0
  drop_path_rate: float = 0.2
  layer_scale: float | None = None
  qkv_bias: bool = True
  qk_scale: float | None = None
  backend: str | None = None

  @nn.compact
  def __call__(self, images: Array, train: bool = False, return_features: bool = False):
    """Classifies images.

    Args:
      images: ``[batch, height, width, channels]``.
      train: enables dropout and stochastic depth (needs the ``'dropout'`` rng).
      return_features: also return intermediate features.

    Returns:
      Logits ``[batch, num_classes]``; with ``return_features``, ``(logits, features)``
      where ``features`` maps ``"stem"`` and ``"level_i"`` (each level's output before its
      downsampler, ``[batch, h, w, c]``) and ``"pooled"`` (``[batch, c]``) to arrays.
    """
    deterministic = not train
    dilations = self.dilations or [[1] * depth for depth in self.depths]
    if [len(d) for d in dilations] != list(self.depths):
      raise ValueError(f"dilations={self.dilations} must give one dilation per block "
                       f"(depths={self.depths}).")
    drop_paths = np.linspace(0.0, self.drop_path_rate, sum(self.depths)).tolist()
    x = ConvTokenizer(embed_dim=self.embed_dim, dtype=self.dtype, param_dtype=self.param_dtype,
                      name="patch_embed")(images)
    x = nn.Dropout(self.drop_rate)(x, deterministic=deterministic)
    features = {"stem": x}
    for i, depth in enumerate(self.depths):
      first = sum(self.depths[:i])
      config = BlockConfig(
          num_heads=self.num_heads[i], kernel_size=self.kernel_size, mlp_ratio=self.mlp_ratio,
          qkv_bias=self.qkv_bias, qk_scale=self.qk_scale, drop=self.drop_rate,
          attn_drop=self.attn_drop_rate, layer_scale=self.layer_scale, backend=self.backend)
      level = NATLevel(config=config, dilations=tuple(dilations[i]),
                       drop_paths=tuple(drop_paths[first:first + depth]),
                       downsample=i < len(self.depths) - 1, dtype=self.dtype,
                       param_dtype=self.param_dtype, name=f"levels_{i}")
      features[f"level_{i}"], x = level(x, deterministic)
    x = self.norm("norm")(x).mean(axis=(1, 2))
    features["pooled"] = x
    if self.num_classes:
      x = self.dense(self.num_classes, "head")(x)
    return (x, features) if return_features else x


def weight_decay_mask(params) -> Any:
  """True for the parameters that take weight decay: kernels, not norms, biases or rpb.

  As the reference (timm's rule plus NAT's ``no_weight_decay_keywords = {'rpb'}``): every
  parameter of rank ≤ 1 (LayerNorm scales and biases, biases, layer scales) and every
  ``rpb`` is exempt. Use with ``optax.adamw(..., mask=weight_decay_mask)``.
  """
  def decays(path, leaf):
    name = getattr(path[-1], "key", getattr(path[-1], "name", None))
    return jnp.ndim(leaf) > 1 and name != "rpb"

  return jax.tree_util.tree_map_with_path(decays, params)
