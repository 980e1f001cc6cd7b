"""PyTorch reference of NATTEN's attention module and of the NAT / DiNAT classifiers.

Written for the tests, inference only, with the parameter names of NATTEN's
``NeighborhoodAttention{1,2,3}D`` and of the original NAT/DiNAT classification code
(``patch_embed.proj.0``, ``levels.0.blocks.0.attn.qkv``, ``gamma1`` ...), so that its
``state_dict()`` looks like a released checkpoint. Attention is a plain gather-and-mask
implementation of NATTEN's semantics (0.17 with relative positional bias, plus 0.21's
stride), checked against NATTEN's own outputs in ``tests/data``. It shares no code with
jnat, so agreement between the two is evidence, not tautology.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def _axis_neighbours(length, kernel, stride, dilation, causal):
  """Key position, validity and bias offset of every window slot of every query on one axis.

  Returns three ``[length, kernel]`` arrays. The window is placed by the query's stride
  block (its centre, or its last query when causal) inside the query's dilation group,
  shifted inward at the borders; causal slots after the query are invalid.
  """
  keys = np.zeros((length, kernel), np.int64)
  valid = np.ones((length, kernel), bool)
  bias = np.zeros((length, kernel), np.int64)
  for i in range(length):
    group, gi = i % dilation, i // dilation
    group_len = len(range(group, length, dilation))
    block = gi - gi % stride
    if causal:
      leader = min(block + stride - 1, group_len - 1)
      start = max(leader - kernel + 1, 0)
    else:
      leader = min(block + stride // 2, group_len - 1)
      start = min(max(leader - kernel // 2, 0), group_len - kernel)
    slots = start + np.arange(kernel)
    keys[i] = group + slots * dilation
    bias[i] = slots - gi + kernel - 1
    if causal:
      valid[i] = slots <= gi
  return keys, valid, bias


@functools.lru_cache(maxsize=None)
def neighbourhood_tables(shape, kernel_size, stride, dilation, is_causal):
  """Flat key index, validity and flat bias index, each ``[prod(shape), prod(kernel)]``."""
  rank = len(shape)
  keys, valid, bias = 0, True, 0
  for a, args in enumerate(zip(shape, kernel_size, stride, dilation, is_causal)):
    # Lay axis a's [L, K] tables out as [1, .., L, .., 1, 1, .., K, .., 1] and combine the
    # axes row-major, so the result is indexed [*query position, *window slot].
    grid = [1] * (2 * rank)
    grid[a], grid[rank + a] = shape[a], kernel_size[a]
    k, ok, b = (t.reshape(grid) for t in _axis_neighbours(*args))
    keys = keys * shape[a] + k
    bias = bias * (2 * kernel_size[a] - 1) + b
    valid = valid & ok
  flat = (math.prod(shape), math.prod(kernel_size))
  full = lambda t: np.broadcast_to(t, tuple(shape) + tuple(kernel_size)).reshape(flat).copy()
  return full(keys), full(valid), full(bias)


def neighbourhood_attention(q, k, v, kernel_size, stride=None, dilation=None, is_causal=None,
                            scale=None, rpb=None):
  """NATTEN semantics on heads-last tensors ``[B, *spatial, H, D]``; ``rpb`` ``[H, 2K-1, ...]``.

  Computes ``softmax(q·k * scale + rpb)`` over each window, as NATTEN 0.17's modules did
  with ``na*d_qk(q * scale, k, rpb)`` → softmax → ``na*d_av``.
  """
  b, *shape, heads, dim = q.shape
  rank = len(shape)
  stride = stride or (1,) * rank
  dilation = dilation or (1,) * rank
  is_causal = is_causal or (False,) * rank
  keys, valid, bias = (torch.from_numpy(t) for t in neighbourhood_tables(
      tuple(shape), tuple(kernel_size), tuple(stride), tuple(dilation), tuple(is_causal)))
  scale = dim ** -0.5 if scale is None else scale
  qf, kf, vf = (t.reshape(b, -1, heads, dim) for t in (q, k, v))
  logits = torch.einsum("bnhd,bnwhd->bhnw", qf * scale, kf[:, keys])
  if rpb is not None:
    logits = logits + rpb.reshape(heads, -1)[:, bias]
  logits = logits.masked_fill(~valid, float("-inf"))
  out = torch.einsum("bhnw,bnwhd->bnhd", logits.softmax(-1), vf[:, keys])
  return out.reshape(q.shape)


class NeighborhoodAttention(nn.Module):
  """NATTEN's ``NeighborhoodAttention{1,2,3}D`` on channels-last ``[B, *spatial, C]``.

  Inputs smaller than ``kernel_size * dilation`` are zero-padded at the end of each axis
  before the qkv projection and cropped after attention, as the original NAT code does.
  """

  def __init__(self, dim, num_heads, kernel_size, dilation=1, stride=1, is_causal=False,
               rel_pos_bias=True, qkv_bias=True, qk_scale=None, rank=2):
    super().__init__()
    per_axis = lambda x: tuple(x) if isinstance(x, (tuple, list)) else (x,) * rank
    self.num_heads = num_heads
    self.head_dim = dim // num_heads
    self.scale = qk_scale or self.head_dim ** -0.5
    self.kernel_size, self.dilation = per_axis(kernel_size), per_axis(dilation)
    self.stride, self.is_causal = per_axis(stride), per_axis(is_causal)
    self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
    if rel_pos_bias:
      self.rpb = nn.Parameter(torch.zeros(num_heads, *[2 * k - 1 for k in self.kernel_size]))
      nn.init.trunc_normal_(self.rpb, std=0.02, mean=0.0, a=-2.0, b=2.0)
    else:
      self.register_parameter("rpb", None)
    self.proj = nn.Linear(dim, dim)

  def forward(self, x):
    b, *shape, c = x.shape
    window = [k * d for k, d in zip(self.kernel_size, self.dilation)]
    pads = [max(0, w - s) for w, s in zip(window, shape)]
    if any(pads):
      # F.pad lists (before, after) pairs from the last axis backwards; channels first.
      x = F.pad(x, [0, 0] + [p for pad in reversed(pads) for p in (0, pad)])
    padded = x.shape[1:-1]
    qkv = self.qkv(x).reshape(b, *padded, 3, self.num_heads, self.head_dim)
    q, k, v = qkv.unbind(-3)
    x = neighbourhood_attention(q, k, v, self.kernel_size, self.stride, self.dilation,
                                self.is_causal, self.scale, self.rpb)
    x = x.reshape(b, *padded, c)[(slice(None),) + tuple(slice(0, s) for s in shape)]
    return self.proj(x)


class ConvTokenizer(nn.Module):

  def __init__(self, in_chans, embed_dim):
    super().__init__()
    self.proj = nn.Sequential(
        nn.Conv2d(in_chans, embed_dim // 2, kernel_size=3, stride=2, padding=1),
        nn.Conv2d(embed_dim // 2, embed_dim, kernel_size=3, stride=2, padding=1))
    self.norm = nn.LayerNorm(embed_dim)

  def forward(self, x):
    return self.norm(self.proj(x).permute(0, 2, 3, 1))


class ConvDownsampler(nn.Module):

  def __init__(self, dim):
    super().__init__()
    self.reduction = nn.Conv2d(dim, 2 * dim, kernel_size=3, stride=2, padding=1, bias=False)
    self.norm = nn.LayerNorm(2 * dim)

  def forward(self, x):
    return self.norm(self.reduction(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


class Mlp(nn.Module):

  def __init__(self, dim, hidden):
    super().__init__()
    self.fc1 = nn.Linear(dim, hidden)
    self.act = nn.GELU()
    self.fc2 = nn.Linear(hidden, dim)

  def forward(self, x):
    return self.fc2(self.act(self.fc1(x)))


class NATLayer(nn.Module):

  def __init__(self, dim, num_heads, kernel_size, dilation, mlp_ratio, layer_scale):
    super().__init__()
    self.norm1 = nn.LayerNorm(dim)
    self.attn = NeighborhoodAttention(dim, num_heads, kernel_size, dilation=dilation)
    self.norm2 = nn.LayerNorm(dim)
    self.mlp = Mlp(dim, int(dim * mlp_ratio))
    self.layer_scale = layer_scale is not None
    if self.layer_scale:
      self.gamma1 = nn.Parameter(layer_scale * torch.ones(dim))
      self.gamma2 = nn.Parameter(layer_scale * torch.ones(dim))

  def forward(self, x):
    g1, g2 = (self.gamma1, self.gamma2) if self.layer_scale else (1.0, 1.0)
    x = x + g1 * self.attn(self.norm1(x))
    return x + g2 * self.mlp(self.norm2(x))


class NATBlock(nn.Module):

  def __init__(self, dim, depth, num_heads, kernel_size, dilations, downsample, mlp_ratio,
               layer_scale):
    super().__init__()
    self.blocks = nn.ModuleList([
        NATLayer(dim, num_heads, kernel_size, dilations[i], mlp_ratio, layer_scale)
        for i in range(depth)])
    self.downsample = ConvDownsampler(dim) if downsample else None

  def forward(self, x):
    for block in self.blocks:
      x = block(x)
    return x if self.downsample is None else self.downsample(x)


class NAT(nn.Module):
  """NAT, or DiNAT when ``dilations`` (one list per level) is given; NCHW images in."""

  def __init__(self, embed_dim, mlp_ratio, depths, num_heads, kernel_size=7, dilations=None,
               num_classes=1000, in_chans=3, layer_scale=None):
    super().__init__()
    dilations = dilations or [[1] * d for d in depths]
    self.patch_embed = ConvTokenizer(in_chans, embed_dim)
    self.levels = nn.ModuleList([
        NATBlock(embed_dim * 2 ** i, depth, num_heads[i], kernel_size, dilations[i],
                 i < len(depths) - 1, mlp_ratio, layer_scale)
        for i, depth in enumerate(depths)])
    num_features = embed_dim * 2 ** (len(depths) - 1)
    self.norm = nn.LayerNorm(num_features)
    self.head = nn.Linear(num_features, num_classes)

  def forward(self, x):
    x = self.patch_embed(x)
    for level in self.levels:
      x = level(x)
    return self.head(self.norm(x).flatten(1, 2).mean(1))
