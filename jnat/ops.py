"""Public neighborhood attention ops: validate, pick a backend per platform, dispatch.

``na1d/na2d/na3d`` are fused (softmax inside); ``na*d_qk`` and ``na*d_av`` are the unfused
halves for users who need to read or edit the attention weights.

A backend is an implementation module with ``na_forward``, ``na_qk`` and ``na_av`` (see
``jnat.reference`` for their contract). Which one runs is decided per platform the
computation is lowered for (``jax.lax.platform_dependent``), not by JAX's default backend:
a CPU-placed computation on a GPU host runs the CPU kernels, and one program lowered for
several platforms holds the right backend for each.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import logging
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jnat import _checks

log = logging.getLogger("jnat")


def _compiled(platform: str) -> Callable[[], bool]:
  def built() -> bool:
    from jnat import _ffi  # deferred: keeps extension import errors out of `import jnat`
    return platform in _ffi.compiled_platforms()
  return built


@dataclasses.dataclass(frozen=True)
class Backend:
  """One entry of the backend registry."""

  module: str  # implementation module: na_forward, na_qk, na_av
  platforms: tuple[str, ...] | None  # lowering platforms it runs on; None: every platform
  built: Callable[[], bool] = lambda: True  # whether this installation has it
  dtypes: tuple[str, ...] = _checks.SUPPORTED_DTYPES
  default: bool = True  # whether backend=None may pick it


# The backend registry: `backend=None` takes, for each platform, the first default entry that
# runs there, is built and supports the dtype. Adding a backend is one entry.
BACKENDS = {
    # Opt-in until it passes every GPU test and its backward beats "tiled": on its first GPU
    # run (H200, 2026-11-28, BENCHMARKS.md) 7 of the ~150 GPU tests that ran failed, and
    # forward+backward on NAT-Tiny's first stage took 49.8 ms against tiled's 6.3 ms.
    "cuda": Backend("jnat._ffi", ("cuda",), _compiled("cuda"), default=False),
    "cpu": Backend("jnat._ffi", ("cpu",), _compiled("cpu")),
    "tiled": Backend("jnat.tiled", None, dtypes=_checks.SUPPORTED_DTYPES + ("float64",)),
    "xla": Backend("jnat.reference", None, dtypes=_checks.SUPPORTED_DTYPES + ("float64",)),
}


def _platform_name(platform: str) -> str:
  """Lowering-platform name of a JAX backend or device platform ("gpu" means CUDA)."""
  return {"gpu": "cuda"}.get(platform, platform)


def _runs_on(backend: Backend, platform: str) -> bool:
  return (backend.platforms is None or platform in backend.platforms) and backend.built()


def available_backends(platform: str | None = None) -> tuple[str, ...]:
  """Backends usable on `platform` (default: JAX's default), in registry order.

  Example:
    >>> "xla" in jnat.available_backends()
    True
  """
  platform = _platform_name(platform or jax.default_backend())
  return tuple(name for name, b in BACKENDS.items() if _runs_on(b, platform))


def _plan(backend: str | None, x, name: str) -> dict[str | None, str]:
  """Backend name per lowering platform (key None: every platform not named) for input `x`."""
  dtype = np.dtype(x.dtype).name
  if backend is not None:
    if backend not in BACKENDS:
      raise ValueError(f"backend={backend!r} is unknown; use None (the platform's default) "
                       f"or one of {tuple(BACKENDS)}.")
    entry = BACKENDS[backend]
    if not entry.built():
      from jnat import _ffi
      built = ", ".join(_ffi.compiled_platforms()) or "none"
      raise ValueError(f"backend={backend!r} is not available: this installation was built "
                       f"without it (kernels compiled for: {built}).")
    if dtype not in entry.dtypes:
      raise ValueError(f"{name}.dtype={dtype} is not supported by backend={backend!r}; use one "
                       f"of {entry.dtypes} (backends 'tiled' and 'xla' also take float64).")
    return {p: backend for p in entry.platforms} if entry.platforms else {None: backend}
  plan = {}
  for candidate, entry in BACKENDS.items():
    if entry.default and dtype in entry.dtypes and entry.built():
      for platform in entry.platforms or (None,):
        plan.setdefault(platform, candidate)
  if None not in plan:
    raise ValueError(f"{name}.dtype={dtype} is not supported; use one of "
                     f"{_checks.SUPPORTED_DTYPES} or float64.")
  return plan


def _concrete_platform(*arrays) -> str | None:
  """The platform of an eager call on concrete arrays; None under tracing."""
  arrays = [a for a in arrays if a is not None]
  if any(isinstance(a, jax.core.Tracer) or not hasattr(a, "devices") for a in arrays):
    return None
  device = next(iter(arrays[0].devices()))
  if device.platform == "gpu" and "rocm" in device.client.platform_version.lower():
    return "rocm"
  return _platform_name(device.platform)


def _mesh_of(x):
  """A context in which ``x``'s Explicit mesh is the current one, if the caller did not enter
  one: arrays placed with ``jax.device_put(x, NamedSharding(mesh, spec))`` on a mesh with
  Explicit axes (``jax.make_mesh``'s default) carry it in their type, but sharding-aware
  reshapes, ``reshard`` and ``auto_axes`` inside the backends need it in context. (Under
  ``jax.jit``; eager calls on such arrays outside a mesh context fail in JAX itself.)"""
  from jnat import reference  # deferred like the backends
  mesh = reference.explicit_mesh(x) if hasattr(x, "dtype") else None  # else validation says
  if mesh is None or not jax.sharding.get_abstract_mesh().empty:
    return contextlib.nullcontext()
  return jax.sharding.use_abstract_mesh(getattr(mesh, "abstract_mesh", mesh))


def _run(plan, arrays, call):
  """``call(module, *arrays)`` on the backend `plan` names for the platform it runs on."""
  branch, by_module = {}, {}  # one function per module: platform_dependent joins equal ones
  for platform, name in plan.items():
    module = BACKENDS[name].module
    if module not in by_module:
      by_module[module] = functools.partial(call, importlib.import_module(module))
    branch[platform] = by_module[module]
  log.debug("jnat: backend %s", ", ".join(f"{name!r} on {p or 'other platforms'}"
                                          for p, name in plan.items()))
  platform = _concrete_platform(*arrays)
  if platform is not None:  # eager: the inputs' platform is where it runs
    if platform not in branch and None not in branch:
      raise ValueError(f"backend={next(iter(plan.values()))!r} runs on "
                       f"{', '.join(plan)}, but the inputs are on {platform!r}.")
    return branch.get(platform, branch.get(None))(*arrays)
  if len(by_module) == 1 and None in branch:
    return branch[None](*arrays)
  default = branch.pop(None, None)
  return jax.lax.platform_dependent(*arrays, default=default, **branch)


@contextlib.contextmanager
def _named_errors(op_name: str):
  """Prefixes validation errors with the op's public name."""
  try:
    yield
  except ValueError as e:
    raise ValueError(f"jnat.{op_name}: {e}") from None


def _neighborhood_attention(rank, query, key, value, kernel_size, stride, dilation, is_causal,
                            scale, rpb, additional_keys, additional_values, return_lse, backend):
  with _named_errors(f"na{rank}d"):
    heads = _checks.check_qkv(rank, query, key, value)
    nbhd = _checks.make_neighborhood(rank, query.shape[1:1 + rank], kernel_size, stride,
                                     dilation, is_causal)
    _checks.check_rpb(rpb, heads, nbhd)
    _checks.check_additional_kv(additional_keys, additional_values, query, key)
    scale = _checks.check_scale(scale, query.shape[-1])
    plan = _plan(backend, query, "query")
  lse_dtype = jnp.promote_types(query.dtype, jnp.float32)
  if query.size == 0:  # no batch or no heads: nothing to attend
    out, lse = jnp.zeros(query.shape, query.dtype), jnp.zeros(query.shape[:-1], lse_dtype)
  else:
    out, lse = _run(plan, (query, key, value, rpb),
                    lambda impl, q, k, v, rpb: impl.na_forward(q, k, v, nbhd, scale, rpb))
    if additional_keys is not None:
      from jnat import reference
      extra = reference.dense_attention(query, additional_keys, additional_values, scale)
      out, lse = reference.merge_by_lse(out, lse, *extra)
  return (out, lse) if return_lse else out


def _qk(rank, query, key, kernel_size, stride, dilation, is_causal, rpb, backend):
  with _named_errors(f"na{rank}d_qk"):
    heads = _checks.check_qkv(rank, query, key)
    nbhd = _checks.make_neighborhood(rank, query.shape[1:1 + rank], kernel_size, stride,
                                     dilation, is_causal)
    _checks.check_rpb(rpb, heads, nbhd)
    plan = _plan(backend, query, "query")
  if query.size == 0:
    return jnp.zeros(query.shape[:-1] + (nbhd.window_size,), query.dtype)
  return _run(plan, (query, key, rpb), lambda impl, q, k, rpb: impl.na_qk(q, k, nbhd, rpb))


def _av(rank, attn, value, kernel_size, stride, dilation, is_causal, backend):
  with _named_errors(f"na{rank}d_av"):
    v_shape = _checks.check_value(rank, value)
    nbhd = _checks.make_neighborhood(rank, v_shape[1:1 + rank], kernel_size, stride, dilation,
                                     is_causal)
    _checks.check_attn(attn, value, nbhd)
    plan = _plan(backend, value, "value")
  out_shape = attn.shape[:-1] + v_shape[-1:]
  if 0 in out_shape:
    return jnp.zeros(out_shape, value.dtype)
  return _run(plan, (attn, value), lambda impl, a, v: impl.na_av(a, v, nbhd))


_FUSED_DOC = """{rank}D neighborhood attention (NATTEN semantics), fused.

Each query attends to the keys of its window: `kernel_size` neighbours per axis, shifted
inward at the borders (never zero-padded), within its dilation group; `stride` groups
queries in blocks that share one window (stride == kernel_size is blocked attention);
`is_causal` ends the window at the query along that axis.

A window whose every logit is ``-inf`` (an ``rpb`` of ``-inf`` masks slots) contributes
nothing: without additional key/value tokens its output is 0 and its lse ``-inf`` (with
zero gradients); with them, the query attends to the additional tokens alone.

Args:
  query: ``[batch, {spatial}, heads, head_dim]``.
  key, value: ``[batch, {spatial}, kv_heads, head_dim]``; kv_heads must divide heads
    (GQA/MQA: query head h uses kv head ``h // (heads // kv_heads)``). A batch or heads
    axis of size 0 gives empty results; head_dim must be at least 1.
  kernel_size, stride, dilation: int or one int per spatial axis.
  is_causal: bool or one bool per spatial axis.
  scale: logit scale, a static Python number; default ``head_dim ** -0.5``.
  rpb: optional relative positional bias ``[heads, {rpb}]``, added to the scaled logits.
  additional_keys, additional_values: optional ``[batch, tokens, kv_heads, head_dim]`` that
    every query also attends to (merged through the log-sum-exp; no rpb, never masked).
  return_lse: also return the natural-log logsumexp of the logits ``[batch, {spatial}, heads]``
    (float32).
  backend: ``None`` (per platform: "cpu" on CPUs, "tiled" elsewhere and for float64;
    "cuda" is opt-in while it is being validated), ``"tiled"``, ``"xla"``, ``"cpu"`` or
    ``"cuda"``. The choice follows the platform the computation is lowered for.

Returns:
  The attention output, shaped like query (and the lse if `return_lse`).

Raises:
  ValueError: at trace time, before any kernel runs: on inconsistent shapes or dtypes, a
    kernel that does not fit, a stride outside ``[1, kernel_size]``, a `scale` that is not
    a static number, or a backend that is unknown, not built, lacks the dtype or does not
    run on the platform of concrete inputs.

Example:
  >>> q = k = v = jnp.ones((1, {example_shape}, 2, 16))
  >>> jnat.na{rank}d(q, k, v, kernel_size=3).shape
  (1, {example_shape}, 2, 16)
"""

_QK_DOC = """{rank}D unfused neighborhood attention logits: ``query · key`` over each window.

No scaling (scale `query` yourself, as with NATTEN's ``na{rank}d_qk``); `rpb` is added;
causally masked slots hold ``-inf``. Window slots are flattened row-major over the
kernel axes. Arguments as for ``jnat.na{rank}d``.

Returns:
  ``[batch, {spatial}, heads, prod(kernel_size)]`` in query's dtype.

Example:
  >>> q = k = jnp.ones((1, {example_shape}, 2, 16))
  >>> jnat.na{rank}d_qk(q, k, kernel_size=3).shape[-1] == 3 ** {rank}
  True
"""

_AV_DOC = """{rank}D unfused neighborhood attention: weighted sum of each window's values.

Args:
  attn: ``[batch, {spatial}, heads, prod(kernel_size)]`` weights (e.g. a softmax of
    ``na{rank}d_qk``); masked slots are ignored.
  value: ``[batch, {spatial}, kv_heads, head_dim]``.
  Other arguments as for ``jnat.na{rank}d``.

Returns:
  ``[batch, {spatial}, heads, head_dim]`` in value's dtype.
"""


def _doc(template, rank):
  spatial = ", ".join("XYZ"[3 - rank:][i] for i in range(rank)) if rank > 1 else "L"
  rpb = ", ".join(f"2*K{i}-1" for i in range(rank))
  example = ", ".join(["8"] * rank)
  return template.format(rank=rank, spatial=spatial, rpb=rpb, example_shape=example)


def _fused_op(rank):
  def op(query, key, value, kernel_size, stride=1, dilation=1, is_causal=False, scale=None,
         rpb=None, additional_keys=None, additional_values=None, return_lse=False,
         backend=None):
    with _mesh_of(query):
      return _neighborhood_attention(rank, query, key, value, kernel_size, stride, dilation,
                                     is_causal, scale, rpb, additional_keys, additional_values,
                                     return_lse, backend)
  op.__name__ = op.__qualname__ = f"na{rank}d"
  op.__doc__ = _doc(_FUSED_DOC, rank)
  return op


def _qk_op(rank):
  def op(query, key, kernel_size, stride=1, dilation=1, is_causal=False, rpb=None,
         backend=None):
    with _mesh_of(query):
      return _qk(rank, query, key, kernel_size, stride, dilation, is_causal, rpb, backend)
  op.__name__ = op.__qualname__ = f"na{rank}d_qk"
  op.__doc__ = _doc(_QK_DOC, rank)
  return op


def _av_op(rank):
  def op(attn, value, kernel_size, stride=1, dilation=1, is_causal=False, backend=None):
    with _mesh_of(value):
      return _av(rank, attn, value, kernel_size, stride, dilation, is_causal, backend)
  op.__name__ = op.__qualname__ = f"na{rank}d_av"
  op.__doc__ = _doc(_AV_DOC, rank)
  return op


na1d, na2d, na3d = (_fused_op(r) for r in (1, 2, 3))
na1d_qk, na2d_qk, na3d_qk = (_qk_op(r) for r in (1, 2, 3))
na1d_av, na2d_av, na3d_av = (_av_op(r) for r in (1, 2, 3))
