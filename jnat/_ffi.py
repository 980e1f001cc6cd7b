"""The ``"cpu"`` and ``"cuda"`` backends: the C++/CUDA kernels as XLA FFI custom calls.

The only file that knows target names and attribute encodings. Every kernel call goes
through three layers, innermost first:
  1. ``jax.ffi.ffi_call`` on rank-3-spatial arrays (1D/2D inputs get leading size-1 axes);
  2. sharding: batch and heads may stay sharded, every other axis is replicated, so
     batch/head-sharded inputs run with no all-gather: ``custom_partitioning`` with a Shardy
     rule on Auto meshes, ``shard_map`` where Explicit mesh axes put shardings in the types;
  3. ``custom_vmap``: a vmapped axis is folded into the heads axis (which also batches
     per-example rpb), then the call recurses for nested vmaps.
``custom_vjp`` sits on top: the forward saves the lse, the backward kernel returns
dq, dk, dv and drpb.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jnat import reference
from jnat._checks import Neighborhood

try:
  from jnat import _jnat_cpu
except ImportError:  # built without the CPU module (e.g. a docs-only checkout)
  _jnat_cpu = None
try:
  from jnat import _jnat_cuda
except ImportError:  # no CUDA toolkit at build time: CPU-only install
  _jnat_cuda = None

_COMPILED = tuple(name for name, module in (("cpu", _jnat_cpu), ("cuda", _jnat_cuda)) if module)
for _module, _platform in ((_jnat_cpu, "cpu"), (_jnat_cuda, "CUDA")):
  if _module is not None:
    for _target, _capsule in _module.registrations().items():
      jax.ffi.register_ffi_target(_target, _capsule, platform=_platform)


def compiled_platforms() -> tuple[str, ...]:
  """Which kernel modules this installation has ("cpu", "cuda")."""
  return _COMPILED


# Roles of the kernels' operands: what each axis is, for vmap folding and sharding rules.
# Q: [B,X,Y,Z,H,D]; KV: [B,X,Y,Z,Hkv,D]; R: rpb [H,2K0-1,2K1-1,2K2-1] (or f32[0]: no rpb);
# L: [B,X,Y,Z,H] (lse, delta); A: attention weights [B,X,Y,Z,H,prod(K)].
_RULE = {"Q": "b x y z h d", "KV": "b x y z g d", "R": "h i j l", "L": "b x y z h",
         "A": "b x y z h n"}
_HEADS_AXIS = {"Q": 4, "KV": 4, "R": 0, "L": 4, "A": 4}
_REPLICATED = ("x", "y", "z", "d", "i", "j", "l", "n", "e")

# target: (operand roles, result roles)
_TARGETS = {
    "jnat_na_fwd": (("Q", "KV", "KV", "R"), ("Q", "L")),
    "jnat_na_bwd": (("Q", "KV", "KV", "R", "Q", "L", "L"), ("Q", "KV", "KV", "R")),
    "jnat_na_bwd_dlse": (("Q", "KV", "KV", "R", "Q", "L", "L"), ("Q", "KV", "KV", "R")),
    "jnat_na_qk": (("Q", "KV", "R"), ("A",)),
    "jnat_na_qk_bwd": (("Q", "KV", "R", "A"), ("Q", "KV", "R")),
    "jnat_na_av": (("A", "KV"), ("Q",)),
    "jnat_na_av_bwd": (("A", "KV", "Q"), ("A", "KV")),
}


def _result_types(target, static, args):
  nbhd, _ = static
  sds = jax.ShapeDtypeStruct
  if target == "jnat_na_fwd":
    q = args[0]
    return [sds(q.shape, q.dtype), sds(q.shape[:-1], jnp.float32)]
  if target == "jnat_na_qk":
    q = args[0]
    return [sds(q.shape[:-1] + (nbhd.window_size,), q.dtype)]
  if target == "jnat_na_av":
    attn, v = args
    return [sds(attn.shape[:-1] + v.shape[-1:], v.dtype)]
  # Backward kernels: one gradient per differentiable input, shaped like it.
  n_grads = len(_TARGETS[target][1])
  return [sds(a.shape, a.dtype) for a in args[:n_grads]]


def _ffi_call(target, static, *args):
  nbhd, scale = static
  attrs = {name: np.asarray(value, np.int64) for name, value in (
      ("kernel_size", nbhd.kernel_size), ("stride", nbhd.stride),
      ("dilation", nbhd.dilation), ("is_causal", nbhd.is_causal))}
  if scale is not None:
    attrs["scale"] = np.float32(scale)
  results = jax.ffi.ffi_call(target, _result_types(target, static, args))(*args, **attrs)
  return tuple(results)


def _axes(entry):
  return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


@dataclasses.dataclass(frozen=True)
class _Split:
  """How a call is split over the mesh: batch and heads axes; every other axis is replicated.

  When the query heads split but the kv heads cannot split alike (MQA, or too few kv
  heads), kv stays replicated and each device picks the kv heads its query heads use.
  """

  batch: object = None
  heads: object = None
  kv_heads_split: bool = True
  group: int = 1  # query heads per kv head (global)

  def spec(self, role, has_rpb):
    if role == "R":
      return P(self.heads, None, None, None) if has_rpb else P()
    heads = self.heads if role != "KV" or self.kv_heads_split else None
    return P(self.batch, None, None, None, heads, *([None] if role != "L" else []))


def _split_axes(mesh_shape, lead_spec, args, in_roles, has_rpb) -> _Split:
  """The lead operand's batch and heads mesh axes, where they divide every operand."""
  spec = tuple(lead_spec) + (None,) * (6 - len(lead_spec))
  batch, heads = spec[0], spec[4]
  shards = lambda entry: int(np.prod([mesh_shape[a] for a in _axes(entry)]))
  q_heads = [a.shape[_HEADS_AXIS[r]] for a, r in zip(args, in_roles)
             if r not in ("KV", "R") or (r == "R" and has_rpb)]
  kv_heads = [a.shape[_HEADS_AXIS[r]] for a, r in zip(args, in_roles) if r == "KV"]
  if heads is not None and any(h % shards(heads) for h in q_heads):
    heads = None
  if batch is not None and args[0].shape[0] % shards(batch):
    batch = None
  if heads is None or not kv_heads:
    return _Split(batch, heads)
  kv_split = not kv_heads[0] % shards(heads)
  return _Split(batch, heads, kv_split, q_heads[0] // kv_heads[0])


def _local_kv_heads(split: _Split, local_heads: int):
  """The kv heads one device's query heads use, one per local kv head (may repeat)."""
  local_group = math.gcd(local_heads, split.group)
  first = jax.lax.axis_index(_axes(split.heads)) * local_heads
  return (first + jnp.arange(0, local_heads, local_group)) // split.group


def _local_call(target, static, has_rpb, split: _Split):
  """The kernel on one device's shard.

  Partial rpb gradients are summed over batch shards. With replicated kv, each device
  passes the kernel only the kv heads its query heads use; kv gradients are put back in
  place of every kv head and summed over the heads shards.
  """
  in_roles, out_roles = _TARGETS[target]
  h_axis = _HEADS_AXIS["KV"]

  def local(*args):
    index = kv_heads = None
    if split.heads is not None and not split.kv_heads_split:
      index = _local_kv_heads(split, args[0].shape[h_axis])  # lead operand: query heads
      kv_heads = next(a.shape[h_axis] for a, r in zip(args, in_roles) if r == "KV")
      args = [jnp.take(a, index, axis=h_axis) if r == "KV" else a
              for a, r in zip(args, in_roles)]
    outs = _ffi_call(target, static, *args)
    reduced = []
    for out, role in zip(outs, out_roles):
      if role == "R" and has_rpb and split.batch is not None:
        out = jax.lax.psum(out, _axes(split.batch))
      elif role == "KV" and index is not None:
        # Each local kv head's gradient back in its place (a one-hot product), summed.
        one_hot = (index[:, None] == jnp.arange(kv_heads)[None, :]).astype(jnp.float32)
        full = jnp.einsum("bxyzld,lg->bxyzgd", out.astype(jnp.float32), one_hot,
                          precision=jax.lax.Precision.HIGHEST)
        out = jax.lax.psum(full, _axes(split.heads)).astype(out.dtype)
      reduced.append(out)
    return tuple(reduced)
  return local


@functools.lru_cache(maxsize=None)
def _partitioned(target: str, has_rpb: bool):
  """The target as a ``custom_partitioning`` function of ``(static, *args)`` (Auto meshes)."""
  in_roles, out_roles = _TARGETS[target]

  @functools.partial(custom_partitioning, static_argnums=(0,))
  def call(static, *args):
    return _ffi_call(target, static, *args)

  def partition(static, mesh, arg_shapes, result_shape):
    lead = arg_shapes[0].sharding
    lead_spec = lead.spec if isinstance(lead, NamedSharding) else P()
    split = _split_axes(mesh.shape, lead_spec, arg_shapes, in_roles, has_rpb)
    shardings = lambda roles: tuple(NamedSharding(mesh, split.spec(r, has_rpb)) for r in roles)
    return (mesh, _local_call(target, static, has_rpb, split), shardings(out_roles),
            shardings(in_roles))

  placeholder = lambda r: "e" if r == "R" and not has_rpb else _RULE[r]
  rule = (", ".join(map(placeholder, in_roles)) + " -> " +
          ", ".join(map(placeholder, out_roles)))
  used = set(rule.replace(",", " ").split())
  call.def_partition(partition=partition, sharding_rule=rule,
                     need_replication_factors=tuple(f for f in _REPLICATED if f in used))
  return call


def _sharded(target, static, has_rpb, *args):
  """Explicit mesh axes carry shardings in the types: map the kernel over shards directly."""
  in_roles, out_roles = _TARGETS[target]
  sharding = jax.typeof(args[0]).sharding
  mesh = sharding.mesh
  if mesh.empty or jax.sharding.AxisType.Explicit not in mesh.axis_types:
    return _partitioned(target, has_rpb)(static, *args)
  split = _split_axes(mesh.shape, sharding.spec, args, in_roles, has_rpb)
  in_specs = tuple(split.spec(r, has_rpb) for r in in_roles)
  args = [jax.sharding.reshard(a, s) for a, s in zip(args, in_specs)]
  return jax.shard_map(_local_call(target, static, has_rpb, split), mesh=mesh,
                       in_specs=in_specs,
                       out_specs=tuple(split.spec(r, has_rpb) for r in out_roles))(*args)


def _call(target, static, *args):
  """A kernel call that supports jit, vmap (folded into heads) and sharding."""
  in_roles, out_roles = _TARGETS[target]
  has_rpb = not any(r == "R" and a.ndim == 1 for r, a in zip(in_roles, args))

  @jax.custom_batching.custom_vmap
  def call(*args):
    return _sharded(target, static, has_rpb, *args)

  @call.def_vmap
  def fold_into_heads(axis_size, in_batched, *args):
    folded = []
    for arg, role, batched in zip(args, in_roles, in_batched):
      if role == "R" and not has_rpb:
        folded.append(arg)
        continue
      if not batched:
        arg = jnp.broadcast_to(arg[None], (axis_size,) + arg.shape)
      h = _HEADS_AXIS[role]
      arg = jnp.moveaxis(arg, 0, h)
      folded.append(arg.reshape(arg.shape[:h] + (-1,) + arg.shape[h + 2:]))
    outs = call(*folded)
    unfolded = []
    for out, role in zip(outs, out_roles):
      if role == "R" and not has_rpb:
        unfolded.append(jnp.broadcast_to(out[None], (axis_size,) + out.shape))
        continue
      h = _HEADS_AXIS[role]
      out = out.reshape(out.shape[:h] + (axis_size, -1) + out.shape[h + 1:])
      unfolded.append(jnp.moveaxis(out, h, 0))
    return tuple(unfolded), (True,) * len(outs)

  return call(*args)


def _to_rank3(x, rank, spatial_at):
  """Inserts 3 - rank size-1 spatial axes at `spatial_at`."""
  return x.reshape(x.shape[:spatial_at] + (1,) * (3 - rank) + x.shape[spatial_at:])


def _from_rank3(x, rank, spatial_at):
  return x.reshape(x.shape[:spatial_at] + x.shape[spatial_at + 3 - rank:])


def _rpb_or_none(rpb_operand):
  return rpb_operand if rpb_operand.ndim > 1 else None


def _rpb_operand(rpb, rank):
  if rpb is None:
    return jnp.zeros((0,), jnp.float32)
  return _to_rank3(rpb.astype(jnp.float32), rank, 1)


def _with_reference_derivative(kernel_fn, reference_fn):
  """``kernel_fn``, made differentiable: its derivative is that of ``reference_fn``.

  The kernels have no derivative of their own. Higher-order differentiation (Hessian-vector
  products, gradient penalties) differentiates the forward and backward kernels
  themselves; the reference computes the same function, so its derivative is used.
  """
  @jax.custom_jvp
  def fn(*args):
    return kernel_fn(*args)

  @fn.defjvp
  def fn_jvp(args, tangents):
    return fn(*args), jax.jvp(reference_fn, args, tangents)[1]

  return fn


def _reference_backward(reference_fwd, n_primals):
  """``vjp(reference_fwd)`` as a function of ``(*primals, *saved outputs, cotangents)``.

  It recomputes the forward from the primals, so the saved outputs need no derivative.
  """
  def bwd(*args):
    return jax.vjp(reference_fwd, *args[:n_primals])[1](args[-1])
  return bwd


def _zero_masked_windows(out, lse):
  """Output 0, never NaN, for a fully masked window (lse -inf): the CUDA kernels leave it to
  this pass; the CPU kernels write the zeros themselves, sparing a pass over the output."""
  return jnp.where((lse == -jnp.inf)[..., None], jnp.zeros((), out.dtype), out)


def _fused_kernel_fwd(static, q, k, v, rpb):
  out, lse = _call("jnat_na_fwd", static, q, k, v, rpb)
  out = jax.lax.platform_dependent(out, lse, cpu=lambda out, lse: out,
                                   default=_zero_masked_windows)
  return out, lse


def _fused_kernel_bwd(static, q, k, v, rpb, out, lse, cotangents):
  dout, dlse = cotangents
  dout = dout.astype(q.dtype)
  # exp(logit - lse) is 0 for every slot of a fully masked window when its lse is +inf.
  lse = jnp.where(lse == -jnp.inf, jnp.inf, lse)
  call = lambda target, row_term: _call(target, static, q, k, v, rpb, dout, lse, row_term)
  # The CPU kernels sum the softmax row term rowsum(dout * out) as rowsum(p * dp) from what
  # they hold anyway, and take only dlse: no pass over dout and out before the call.
  return jax.lax.platform_dependent(
      cpu=lambda: call("jnat_na_bwd_dlse", dlse),
      default=lambda: call("jnat_na_bwd", reference.softmax_delta(dout, out, dlse)))


def _fused_reference(static):
  nbhd, scale = static
  return lambda q, k, v, rpb: reference.na_forward(q, k, v, nbhd, scale, _rpb_or_none(rpb))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _fused(q, k, v, rpb, static):
  return _fused_fwd(q, k, v, rpb, static)[0]


def _fused_fwd(q, k, v, rpb, static):
  out, lse = _with_reference_derivative(functools.partial(_fused_kernel_fwd, static),
                                        _fused_reference(static))(q, k, v, rpb)
  return (out, lse), (q, k, v, rpb, out, lse)


def _fused_bwd(static, residuals, cotangents):
  return _with_reference_derivative(
      functools.partial(_fused_kernel_bwd, static),
      _reference_backward(_fused_reference(static), 4))(*residuals, cotangents)


_fused.defvjp(_fused_fwd, _fused_bwd)


def _qk_reference(static):
  return lambda q, k, rpb: reference.na_qk(q, k, static[0], _rpb_or_none(rpb))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _qk(q, k, rpb, static):
  return _qk_fwd(q, k, rpb, static)[0]


def _qk_fwd(q, k, rpb, static):
  attn = _with_reference_derivative(lambda q, k, rpb: _call("jnat_na_qk", static, q, k, rpb)[0],
                                    _qk_reference(static))(q, k, rpb)
  return attn, (q, k, rpb)


def _qk_bwd(static, residuals, dattn):
  kernel = lambda q, k, rpb, dattn: _call("jnat_na_qk_bwd", static, q, k, rpb,
                                          dattn.astype(q.dtype))
  return _with_reference_derivative(kernel, _reference_backward(_qk_reference(static), 3))(
      *residuals, dattn)


_qk.defvjp(_qk_fwd, _qk_bwd)


def _av_reference(static):
  return lambda attn, v: reference.na_av(attn, v, static[0])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _av(attn, v, static):
  return _av_fwd(attn, v, static)[0]


def _av_fwd(attn, v, static):
  out = _with_reference_derivative(lambda attn, v: _call("jnat_na_av", static, attn, v)[0],
                                   _av_reference(static))(attn, v)
  return out, (attn, v)


def _av_bwd(static, residuals, dout):
  kernel = lambda attn, v, dout: _call("jnat_na_av_bwd", static, attn, v, dout.astype(v.dtype))
  return _with_reference_derivative(kernel, _reference_backward(_av_reference(static), 2))(
      *residuals, dout)


_av.defvjp(_av_fwd, _av_bwd)


def na_forward(query, key, value, nbhd: Neighborhood, scale: float, rpb=None):
  """Fused neighborhood attention on the compiled kernels: ``(out, lse)``."""
  r = nbhd.rank
  q, k, v = (_to_rank3(x, r, 1) for x in (query, key, value))
  out, lse = _fused(q, k, v, _rpb_operand(rpb, r), (nbhd.padded_to_rank3(), scale))
  return _from_rank3(out, r, 1), _from_rank3(lse, r, 1)


def na_qk(query, key, nbhd: Neighborhood, rpb=None):
  r = nbhd.rank
  attn = _qk(_to_rank3(query, r, 1), _to_rank3(key, r, 1), _rpb_operand(rpb, r),
             (nbhd.padded_to_rank3(), None))
  return _from_rank3(attn, r, 1)


def na_av(attn, value, nbhd: Neighborhood):
  r = nbhd.rank
  out = _av(_to_rank3(attn, r, 1), _to_rank3(value, r, 1), (nbhd.padded_to_rank3(), None))
  return _from_rank3(out, r, 1)
