"""Argument normalisation and validation for the neighborhood attention ops.

Everything here reads shapes, dtypes and Python values only. It runs when the op is
called (at trace time under ``jax.jit``), before any kernel runs, so a bad call fails with
a ``ValueError`` that names the argument and the rule.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class Neighborhood:
  """Static description of the neighbourhood along each spatial axis (hashable)."""

  kernel_size: tuple[int, ...]
  stride: tuple[int, ...]
  dilation: tuple[int, ...]
  is_causal: tuple[bool, ...]

  @property
  def rank(self) -> int:
    return len(self.kernel_size)

  @property
  def window_size(self) -> int:
    return int(np.prod(self.kernel_size))

  @property
  def rpb_shape_tail(self) -> tuple[int, ...]:
    return tuple(2 * k - 1 for k in self.kernel_size)

  def padded_to_rank3(self) -> "Neighborhood":
    """The same neighbourhood on rank-3 inputs with leading size-1 axes (what kernels see)."""
    pad = 3 - self.rank
    return Neighborhood((1,) * pad + self.kernel_size, (1,) * pad + self.stride,
                        (1,) * pad + self.dilation, (False,) * pad + self.is_causal)


def per_axis(value, rank: int, name: str, kind=int) -> tuple:
  """Turns an int (or bool) or a sequence of `rank` of them into a tuple of length `rank`."""
  if isinstance(value, (bool, np.bool_)) and kind is bool:
    return (bool(value),) * rank
  if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
    if kind is bool:
      raise ValueError(f"{name}={value!r} must be a bool or a tuple of {rank} bools.")
    return (int(value),) * rank
  if isinstance(value, Sequence) and not isinstance(value, str):
    if len(value) != rank:
      raise ValueError(f"{name}={tuple(value)!r} must have one entry per spatial axis ({rank}).")
    ok = all(isinstance(x, (bool, np.bool_)) for x in value) if kind is bool else all(
        isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_)) for x in value)
    if ok:
      return tuple(kind(x) for x in value)
  expected = "bool" if kind is bool else "int"
  raise ValueError(f"{name}={value!r} must be an {expected} or a tuple of {rank} {expected}s.")


# Window tables and the reference's gathers index positions along each axis with int32.
MAX_AXIS_LENGTH = 2**31 - 1


def make_neighborhood(rank, spatial_shape, kernel_size, stride, dilation, is_causal) -> Neighborhood:
  """Normalises per-axis arguments and checks them against the spatial shape."""
  nbhd = Neighborhood(per_axis(kernel_size, rank, "kernel_size"), per_axis(stride, rank, "stride"),
                      per_axis(dilation, rank, "dilation"),
                      per_axis(is_causal, rank, "is_causal", kind=bool))
  for axis, (length, k, s, d) in enumerate(
      zip(spatial_shape, nbhd.kernel_size, nbhd.stride, nbhd.dilation)):
    if k < 2:
      raise ValueError(f"kernel_size={nbhd.kernel_size}: every kernel size must be >= 2 "
                       f"(axis {axis} has {k}).")
    if d < 1:
      raise ValueError(f"dilation={nbhd.dilation}: every dilation must be >= 1 (axis {axis}).")
    if not 1 <= s <= k:
      raise ValueError(f"stride={nbhd.stride}: every stride must be in [1, kernel_size] "
                       f"(axis {axis}: stride {s}, kernel_size {k}).")
    if length > MAX_AXIS_LENGTH:
      raise ValueError(f"spatial axis {axis} has {length} positions; jnat indexes positions with "
                       f"int32, so each spatial axis must have at most {MAX_AXIS_LENGTH}.")
    if k * d > length:
      raise ValueError(
          f"kernel_size={nbhd.kernel_size} with dilation={nbhd.dilation} does not fit the input: "
          f"kernel_size * dilation must be <= the spatial size along every axis "
          f"(axis {axis}: {k} * {d} > {length}).")
  return nbhd


def shape_of(x, name) -> tuple[int, ...]:
  shape = getattr(x, "shape", None)
  if shape is None or not hasattr(x, "dtype"):
    raise ValueError(f"{name} must be an array, got {type(x).__name__}.")
  return tuple(shape)


def _check_heads(name, shape, heads=None):
  """`shape`'s kv heads are >= 1 (and divide `heads`); its head_dim is >= 1."""
  kv_heads = shape[-2]
  if kv_heads < 1 or (heads is not None and heads % kv_heads):
    raise ValueError(f"{name} heads ({kv_heads}) must be >= 1 and divide the query heads "
                     f"({heads}) for GQA/MQA ({name}.shape={shape}).")
  if shape[-1] < 1:
    raise ValueError(f"{name}.shape={shape}: head_dim must be >= 1.")


def check_qkv(rank: int, query, key, value=None):
  """Checks `[B, *spatial, H, D]` query and key (and value) shapes, GQA allowed; returns heads."""
  named = [("query", query), ("key", key)] + ([("value", value)] if value is not None else [])
  shapes = {name: shape_of(x, name) for name, x in named}
  q_shape = shapes["query"]
  if len(q_shape) != rank + 3:
    raise ValueError(f"query.shape={q_shape} must be [batch, *spatial ({rank} axes), heads, "
                     f"head_dim] (rank {rank + 3}).")
  for name, shape in list(shapes.items())[1:]:
    if len(shape) != rank + 3:
      raise ValueError(f"{name}.shape={shape} must have rank {rank + 3} like query.shape={q_shape}.")
    if shape[:rank + 1] != q_shape[:rank + 1]:
      raise ValueError(f"{name}.shape={shape} must match query.shape={q_shape} in batch and "
                       f"spatial axes.")
  k_shape = shapes["key"]
  if "value" in shapes and k_shape != shapes["value"]:
    raise ValueError(f"key.shape={k_shape} and value.shape={shapes['value']} must be equal.")
  if k_shape[-1] != q_shape[-1]:
    raise ValueError(f"key head_dim {k_shape[-1]} must equal query head_dim {q_shape[-1]} "
                     f"({q_shape=}, {k_shape=}).")
  _check_heads("key", k_shape, q_shape[-2])
  dtypes = {name: x.dtype for name, x in named}
  if len(set(dtypes.values())) > 1:
    names = ", ".join(dtypes)
    raise ValueError(f"{names} must share one dtype, got "
                     f"{', '.join(f'{n}.dtype={d}' for n, d in dtypes.items())}.")
  return q_shape[-2]


def check_value(rank: int, value) -> tuple[int, ...]:
  """Checks an unfused op's `[B, *spatial, kv_heads, D]` value; returns its shape."""
  v_shape = shape_of(value, "value")
  if len(v_shape) != rank + 3:
    raise ValueError(f"value.shape={v_shape} must be [batch, *spatial ({rank} axes), "
                     f"kv_heads, head_dim].")
  _check_heads("value", v_shape)
  return v_shape


def check_attn(attn, value, nbhd: "Neighborhood"):
  """Checks unfused attention weights `[B, *spatial, heads, prod(K)]` against value."""
  a_shape, v_shape, rank = shape_of(attn, "attn"), tuple(value.shape), nbhd.rank
  if (len(a_shape) != rank + 3 or a_shape[:rank + 1] != v_shape[:rank + 1]
      or a_shape[-1] != nbhd.window_size or a_shape[-2] % v_shape[-2]):
    raise ValueError(
        f"attn.shape={a_shape} must be [batch, *spatial, heads, prod(kernel_size)="
        f"{nbhd.window_size}] with value's batch/spatial axes ({v_shape}) and heads a "
        f"multiple of value's {v_shape[-2]} heads.")
  if attn.dtype != value.dtype:
    raise ValueError(f"attn.dtype={attn.dtype} must equal value.dtype={value.dtype}.")


def check_scale(scale, head_dim: int) -> float:
  """The logit scale: `head_dim ** -0.5` by default, else a static finite real number."""
  if scale is None:
    return head_dim ** -0.5
  if not isinstance(scale, numbers.Real) or isinstance(scale, (bool, np.bool_)):
    raise ValueError(f"scale={scale!r} ({type(scale).__name__}) must be a static Python number "
                     f"(int or float), not an array, a traced value or a string; it is baked "
                     f"into the kernel call.")
  if not math.isfinite(scale):
    raise ValueError(f"scale={scale!r} must be finite.")
  return float(scale)


def check_rpb(rpb, heads: int, nbhd: Neighborhood):
  if rpb is None:
    return
  expected = (heads,) + nbhd.rpb_shape_tail
  if shape_of(rpb, "rpb") != expected:
    raise ValueError(f"rpb.shape={tuple(rpb.shape)} must be [heads, 2*kernel_size-1 per axis] "
                     f"= {expected}.")
  if not jnp.issubdtype(rpb.dtype, jnp.floating):  # numpy alone misses bfloat16
    raise ValueError(f"rpb.dtype={rpb.dtype} must be floating point.")


def check_additional_kv(additional_keys, additional_values, query, key):
  if additional_keys is None and additional_values is None:
    return
  if additional_keys is None or additional_values is None:
    raise ValueError("additional_keys and additional_values must be given together.")
  ak = shape_of(additional_keys, "additional_keys")
  av = shape_of(additional_values, "additional_values")
  b, heads_kv, dim = query.shape[0], key.shape[-2], query.shape[-1]
  for name, shape in (("additional_keys", ak), ("additional_values", av)):
    if len(shape) != 4 or shape[0] != b or shape[2] != heads_kv or shape[3] != dim:
      raise ValueError(f"{name}.shape={shape} must be [batch={b}, tokens, kv_heads={heads_kv}, "
                       f"head_dim={dim}].")
  if ak != av:
    raise ValueError(f"additional_keys.shape={ak} and additional_values.shape={av} must be equal.")
  if ak[1] < 1:
    raise ValueError(f"additional_keys.shape={ak} must hold at least one token.")
  if additional_keys.dtype != query.dtype or additional_values.dtype != query.dtype:
    raise ValueError("additional_keys/additional_values must have the dtype of query "
                     f"({query.dtype}), got {additional_keys.dtype}, {additional_values.dtype}.")

