"""The op tests' oracles, in one place: golden data, the tolerance table, the checks that hold
a backend to NATTEN or to the xla reference, the random shape buckets, direct handler calls.

Compiling dominates these tests' time, so every check runs through a jitted function cached
per neighbourhood signature (jit's own cache then keys on shapes and dtypes), and the random
configurations come from a fixed pool of shape buckets: each bucket compiles once per
backend and is reused by every random input drawn for it.
"""

import functools
import json
import os
import pathlib
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

import jnat
from jnat import _ffi, reference
from jnat._checks import Neighborhood

DATA = pathlib.Path(__file__).parent / "data"
# On JAX's default platform: every backend, the reference first; those with compiled kernels
# (custom calls, named after their platform), which the property tests hold to the reference.
ALL_BACKENDS = ("xla",) + tuple(b for b in jnat.available_backends() if b != "xla")
COMPILED_BACKENDS = tuple(b for b in ALL_BACKENDS if b in _ffi.compiled_platforms())


# --- Tolerances. ---

class Close(NamedTuple):
  """Elementwise: |actual - expected| <= atol + rtol * |expected|."""
  atol: float
  rtol: float


class RelErr(NamedTuple):
  """Whole array: ||actual - expected|| / ||expected|| <= max (gradients: a few large sums
  dominate, so an elementwise bound would be set by the smallest entries)."""
  max: float


GRADS = ("dq", "dk", "dv", "drpb", "dak", "dav")  # dak, dav: of the additional keys/values
HALF_DTYPES = ("bfloat16", "float16")

# (dtypes, quantity) -> bound. dtypes: the run under test's dtype, or "<its dtype>/float32"
# when the expected values come from a float32 run of the same rounded inputs (only the
# tested run's own rounding shows). Otherwise the expected values are NATTEN's golden data or
# the xla reference in the same dtype: for half precision both round their results alike, so
# those bounds differ from the "/float32" ones for a reason.
TOLERANCES = {
    ("float32", "out"): Close(atol=2e-5, rtol=0),
    ("float32", "lse"): Close(atol=2e-5, rtol=0),
    ("float32", "logits"): Close(atol=2e-5, rtol=1e-6),  # na*d_qk, rpb included
    ("float32", "weights"): Close(atol=2e-6, rtol=0),  # softmax of the logits vs NATTEN 0.17's
    **{("float32", g): RelErr(1e-4) for g in GRADS},
    # Half precision, flash-attention style budget; lse is float32 whatever the inputs.
    ("bfloat16", "out"): Close(atol=3e-2, rtol=3e-2),
    ("bfloat16", "logits"): Close(atol=3e-2, rtol=3e-2),
    ("float16", "out"): Close(atol=5e-3, rtol=5e-3),
    **{(d, "lse"): Close(atol=1e-3, rtol=0) for d in HALF_DTYPES},
    **{(d, g): RelErr(2e-2) for d in HALF_DTYPES for g in GRADS},
    ("bfloat16/float32", "out"): Close(atol=3e-2, rtol=3e-2),
    ("float16/float32", "out"): Close(atol=5e-3, rtol=5e-3),
    # Gradients accumulated in float32: summed in bfloat16 they miss this by ~1.5x.
    **{("bfloat16/float32", g): RelErr(5e-3) for g in ("dq", "dk", "dv")},
    **{("float16/float32", g): RelErr(2e-2) for g in ("dq", "dk", "dv")},
}


def rel_err(actual, expected):
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  return float(np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-30))


def assert_close(actual, expected, dtypes, quantity):
  """``actual`` against ``expected`` to TOLERANCES[dtypes, quantity] (a dtype may stand for
  ``dtypes`` where the expected values are of the same dtype)."""
  bound = TOLERANCES[dtypes if "/" in str(dtypes) else str(jnp.dtype(dtypes)), quantity]
  actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
  if isinstance(bound, RelErr):
    err = rel_err(actual, expected)
    assert err <= bound.max, f"{quantity} ({dtypes}): relative error {err:.3g} > {bound.max}"
  else:
    np.testing.assert_allclose(actual, expected, atol=bound.atol, rtol=bound.rtol,
                               err_msg=f"{quantity} ({dtypes})")


# --- Inputs. ---

def op(rank, kind=""):
  return getattr(jnat, f"na{rank}d{kind}")


def nbhd_args(c):
  return dict(kernel_size=tuple(c["kernel_size"]), stride=tuple(c["stride"]),
              dilation=tuple(c["dilation"]), is_causal=tuple(c["is_causal"]))


def random_inputs(seed, batch, spatial, heads, kv_heads, dim, dtype=jnp.float32, rpb_shape=None,
                  extra_tokens=0):
  """q, k, v, rpb (float32), additional keys and values (None without extra tokens). Drawn by
  NumPy: jax.random would compile a sampler for every new shape."""
  rng = np.random.default_rng(seed)
  normal = lambda shape: jnp.asarray(rng.standard_normal(shape, np.float32)).astype(dtype)
  q = normal((batch, *spatial, heads, dim))
  k = normal((batch, *spatial, kv_heads, dim))
  v = normal((batch, *spatial, kv_heads, dim))
  rpb = None if rpb_shape is None else normal((heads, *rpb_shape)).astype(jnp.float32)
  ak = av = None
  if extra_tokens:
    ak = normal((batch, extra_tokens, kv_heads, dim))
    av = normal((batch, extra_tokens, kv_heads, dim))
  return q, k, v, rpb, ak, av


def config_inputs(c, dtype=None):
  """random_inputs for config ``c`` (seed included); ``masked``: head 0's rpb all -inf, so
  every window of head 0 is fully masked."""
  q, k, v, rpb, ak, av = random_inputs(
      c["seed"], c["batch"], c["spatial"], c["heads"], c["kv_heads"], c["dim"],
      dtype or c["dtype"], tuple(2 * k - 1 for k in c["kernel_size"]) if c["rpb"] else None,
      c["extra_tokens"])
  if c.get("masked") and c["heads"]:
    rpb = rpb.at[0].set(-jnp.inf)
  return q, k, v, rpb, ak, av


def _random_bucket(rng):
  """One shape bucket: every feature of the op at small sizes (sizes, kernel, stride,
  dilation, causal, GQA, rpb, additional tokens, dtype; sometimes an empty batch or heads)."""
  rank = int(rng.integers(1, 4))
  max_kernel, max_extra = {1: 9, 2: 5, 3: 3}[rank], {1: 12, 2: 5, 3: 3}[rank]
  axes = []
  for _ in range(rank):
    kernel, dilation = int(rng.integers(2, max_kernel + 1)), int(rng.integers(1, 4))
    axes.append((kernel * dilation + int(rng.integers(0, max_extra + 1)), kernel,
                 int(rng.integers(1, kernel + 1)), dilation, bool(rng.integers(0, 2))))
  spatial, kernel_size, stride, dilation, is_causal = (tuple(x) for x in zip(*axes))
  kv_heads = int(rng.choice([1, 2]))
  empty = rng.choice([""] * 18 + ["batch", "heads"])
  return dict(rank=rank, batch=0 if empty == "batch" else int(rng.integers(1, 3)),
              spatial=spatial, kv_heads=kv_heads,
              heads=0 if empty == "heads" else kv_heads * int(rng.choice([1, 2, 3])),
              dim=int(rng.choice([4, 8, 16, 32])), kernel_size=kernel_size, stride=stride,
              dilation=dilation, is_causal=is_causal, rpb=bool(rng.integers(0, 2)),
              extra_tokens=int(rng.choice([0, 0, 1, 3])),
              dtype=str(rng.choice(["float32"] * 4 + ["bfloat16", "float16"])))


# The random configurations' shapes: property tests draw seeds (and fully masked windows)
# within each bucket. Seed 7 of NumPy's generator gives a pool with every feature
# (test_backends.test_buckets_cover_every_feature).
BUCKETS = [_random_bucket(rng) for rng in [np.random.default_rng(7)] for _ in range(32)]

# Property tests: JNAT_PROPERTY_EXAMPLES random configurations (at least) over the buckets.
EXAMPLES = int(os.environ.get("JNAT_PROPERTY_EXAMPLES", "200"))
SETTINGS = settings(deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))
SEEDS, MASKS = st.integers(0, 2**16), st.integers(0, 5)


def per_bucket(examples):
  """Examples per bucket so that the pool holds at least ``examples`` configurations."""
  return max(-(-examples // len(BUCKETS)), 1)


def bucket_config(bucket, seed, mask):
  """A random configuration: bucket ``bucket``'s shapes, inputs from ``seed``; head 0's windows
  fully masked when the bucket has an rpb and ``mask`` is 0."""
  c = BUCKETS[bucket]
  return dict(c, seed=seed, masked=c["rpb"] and mask == 0)


# --- Compiled runs, cached per neighbourhood signature. ---

def _signature(c):
  return (c["rank"], *nbhd_args(c).values(), bool(c["rpb"]), bool(c["extra_tokens"]))


@functools.lru_cache(maxsize=None)
def _fused_grad_fn(backend, rank, kernel_size, stride, dilation, is_causal, rpb, extra):
  def loss(q, k, v, rpb, ak, av):
    out, lse = op(rank)(q, k, v, kernel_size, stride, dilation, is_causal, rpb=rpb,
                        additional_keys=ak, additional_values=av, return_lse=True,
                        backend=backend)
    # Fixed pseudo-random cotangents for out and lse, so both gradient paths are exercised.
    w_out = jnp.cos(jnp.arange(out.size, dtype=jnp.float32)).reshape(out.shape)
    w_lse = jnp.sin(jnp.arange(lse.size, dtype=jnp.float32)).reshape(lse.shape)
    return jnp.sum(out.astype(jnp.float32) * w_out) + jnp.sum(lse * w_lse), (out, lse)
  argnums = (0, 1, 2) + ((3,) if rpb else ()) + ((4, 5) if extra else ())
  return jax.jit(jax.grad(loss, argnums=argnums, has_aux=True))


def grad_names(inputs):
  return [n for n, x in zip(("dq", "dk", "dv", "drpb", "dak", "dav"), inputs) if x is not None]


def fused_with_grads(c, backend, inputs):
  """out, lse and the gradients (in grad_names order) of a loss on both, by ``backend``."""
  grads, (out, lse) = _fused_grad_fn(backend, *_signature(c))(*inputs)
  return out, lse, grads


@functools.lru_cache(maxsize=None)
def _unfused_grad_fn(backend, rank, kernel_size, stride, dilation, is_causal, rpb, extra):
  del extra  # the unfused ops take no additional tokens
  args = dict(kernel_size=kernel_size, stride=stride, dilation=dilation, is_causal=is_causal)

  def loss(q, k, v, rpb):
    logits = op(rank, "_qk")(q, k, rpb=rpb, backend=backend, **args)
    out = op(rank, "_av")(jax.nn.softmax(logits, axis=-1), v, backend=backend, **args)
    finite = jnp.where(jnp.isfinite(logits), logits, 0.0)
    return jnp.sum(out * jnp.cos(out)) + jnp.sum(jnp.sin(finite)), (out, logits)
  return jax.jit(jax.grad(loss, (0, 1, 2, 3) if rpb else (0, 1, 2), has_aux=True))


# --- Checks against the xla reference. ---

def check_fused_against_reference(c, backend):
  """Forward, lse and every gradient of ``backend`` against the xla reference, on config
  ``c``'s inputs (in its dtype)."""
  inputs = config_inputs(c)
  out, lse, grads = fused_with_grads(c, backend, inputs)
  ref_out, ref_lse, ref_grads = fused_with_grads(c, "xla", inputs)
  assert out.dtype == inputs[0].dtype and out.shape == inputs[0].shape
  assert_close(out, ref_out, c["dtype"], "out")
  assert_close(lse, ref_lse, c["dtype"], "lse")
  for name, g, r in zip(grad_names(inputs), grads, ref_grads, strict=True):
    assert g.dtype == (jnp.float32 if name == "drpb" else inputs[0].dtype), name
    assert_close(g, r, c["dtype"], name)


def check_unfused_against_reference(c, backend):
  """na*d_qk -> softmax -> na*d_av of ``backend`` and its gradients against the xla reference
  (float32; no fully masked windows: softmax of all -inf is NaN)."""
  inputs = config_inputs(dict(c, masked=False), "float32")[:4]
  grads, (out, logits) = _unfused_grad_fn(backend, *_signature(c))(*inputs)
  ref_grads, (ref_out, ref_logits) = _unfused_grad_fn("xla", *_signature(c))(*inputs)
  np.testing.assert_array_equal(np.isinf(logits), np.isinf(ref_logits))
  assert_close(logits, ref_logits, "float32", "logits")
  assert_close(out, ref_out, "float32", "out")
  for name, g, r in zip(grad_names(inputs), grads, ref_grads, strict=True):
    assert_close(g, r, "float32", name)


def check_both_backward_targets():
  """The CPU serves the backward twice: jnat_na_bwd takes the softmax row term delta (the
  contract every backend shares), jnat_na_bwd_dlse (what jnat's CPU lowering calls) sums
  rowsum(dout * out) itself and takes only dlse. Both, and the forward they start from,
  called directly against the reference, with a non-zero dlse, rpb, GQA, strides, dilation
  and a causal axis."""
  nbhd = Neighborhood((5, 3, 3), (1, 2, 1), (1, 1, 2), (False, False, True))
  q, k, v, rpb, _, _ = random_inputs(5, 2, (9, 7, 8), 4, 2, 16, rpb_shape=(9, 5, 5))
  static, scale = (nbhd, 0.25), 0.25
  out, lse = _ffi._call("jnat_na_fwd", static, q, k, v, rpb)
  forward = lambda q, k, v, rpb: reference.na_forward(q, k, v, nbhd, scale, rpb)
  want_out, want_lse = forward(q, k, v, rpb)
  assert_close(out, want_out, "float32", "out")
  assert_close(lse, want_lse, "float32", "lse")
  rng = np.random.default_rng(6)
  dout = jnp.asarray(rng.standard_normal(out.shape, np.float32))
  dlse = jnp.asarray(rng.standard_normal(lse.shape, np.float32))
  want = jax.vjp(forward, q, k, v, rpb)[1]((dout, dlse))
  delta = reference.softmax_delta(dout, out, dlse)
  for target, row_term in (("jnat_na_bwd", delta), ("jnat_na_bwd_dlse", dlse)):
    got = _ffi._call(target, static, q, k, v, rpb, dout, lse, row_term)
    for name, g, w in zip(("dq", "dk", "dv", "drpb"), got, want, strict=True):
      assert_close(g, w, "float32", name)


# --- NATTEN's golden data. ---

class GoldenCase(NamedTuple):
  name: str  # "<NATTEN version tag>-<config name>", e.g. "v021-c06"
  config: dict
  arrays: dict


def golden_cases():
  """NATTEN reference configs of both NATTEN versions, in file order."""
  data = np.load(DATA / "natten_golden.npz")
  cases = []
  for tag in ("v021", "v017"):
    for cfg in json.loads(str(data[f"{tag}_meta_json"]))["configs"]:
      prefix = f"{tag}_{cfg['name']}__"
      arrays = {k[len(prefix):]: data[k] for k in data.files if k.startswith(prefix)}
      cases.append(GoldenCase(f"{tag}-{cfg['name']}", cfg, arrays))
  return cases


GOLDEN = {case.name: case for case in golden_cases()}
WEIGHT_CASES = [name for name, case in GOLDEN.items() if "attn" in case.arrays]


@functools.lru_cache(maxsize=None)
def natten_vjp_fn(rank, backend, kernel_size, stride, dilation, is_causal):
  """jit of (q, k, v, rpb, dout) -> (out, lse, (dq, dk, dv, drpb)), NATTEN's golden protocol:
  the cotangent of out is ``dout``, that of lse zero."""
  def f(q, k, v, rpb):
    return op(rank)(q, k, v, kernel_size, stride, dilation, is_causal, rpb=rpb,
                    return_lse=True, backend=backend)

  def run(q, k, v, rpb, dout):
    (out, lse), vjp = jax.vjp(f, q, k, v, rpb)
    return out, lse, vjp((dout, jnp.zeros(lse.shape, jnp.float32)))
  return jax.jit(run)


def natten_args(cfg):
  return cfg["na_dim"], nbhd_args(cfg)


def check_fused_against_natten(name, backend):
  """Output, lse and gradients of ``backend`` against NATTEN's on golden case ``name``."""
  cfg, a = GOLDEN[name].config, GOLDEN[name].arrays
  rank, args = natten_args(cfg)
  out, lse, (dq, dk, dv, drpb) = natten_vjp_fn(rank, backend, *args.values())(
      a["q"], a["k"], a["v"], a.get("rpb"), a["dout"])
  assert_close(out, a["out"], "float32", "out")
  if "lse" in a:
    assert_close(lse, a["lse"], "float32", "lse")
  for quantity, grad in (("dq", dq), ("dk", dk), ("dv", dv), ("drpb", drpb)):
    if quantity in a:
      assert_close(grad, a[quantity], "float32", quantity)


@functools.lru_cache(maxsize=None)
def _natten_unfused_fn(rank, backend, kernel_size, stride, dilation, is_causal):
  args = dict(kernel_size=kernel_size, stride=stride, dilation=dilation, is_causal=is_causal)

  def run(q, k, v, rpb):
    logits = op(rank, "_qk")(q * q.shape[-1] ** -0.5, k, rpb=rpb, backend=backend, **args)
    weights = jax.nn.softmax(logits, axis=-1)
    return weights, op(rank, "_av")(weights, v, backend=backend, **args)
  return jax.jit(run)


def check_unfused_against_natten(name, backend):
  """NATTEN 0.17's own pipeline: na*d_qk(q * scale, k, rpb) -> softmax -> na*d_av."""
  cfg, a = GOLDEN[name].config, GOLDEN[name].arrays
  rank, args = natten_args(cfg)
  weights, out = _natten_unfused_fn(rank, backend, *args.values())(a["q"], a["k"], a["v"],
                                                                   a.get("rpb"))
  # NATTEN 0.17 lays weights out heads-first: [B, H, *spatial, prod(K)].
  assert_close(jnp.moveaxis(weights, -2, 1), a["attn"], "float32", "weights")
  assert_close(out, a["out"], "float32", "out")


# --- A handler called directly, with attributes that lie about the buffers. ---

def direct_call(target, results, *args, **attrs):
  """``target``'s FFI handler on ``args``, with 3x3 window attributes unless ``attrs`` say else."""
  base = dict(kernel_size=np.array([1, 3, 3], np.int64), stride=np.array([1, 1, 1], np.int64),
              dilation=np.array([1, 1, 1], np.int64), is_causal=np.array([0, 0, 0], np.int64))
  base.update(attrs)
  return jax.ffi.ffi_call(target, results)(*args, **base)


Q6_SHAPE = (1, 1, 8, 9, 2, 4)

# jnat_na_fwd calls that break one rule each: (attributes, inputs (see fwd_inputs), words of
# which the error must name one).
FWD_VALIDATION_CASES = [
    (dict(kernel_size=np.array([1, 3], np.int64)), None, "kernel_size"),
    (dict(kernel_size=np.array([1, 30, 3], np.int64)), None, "kernel"),
    (dict(kernel_size=np.array([1, 0, 3], np.int64)), None, "kernel"),
    (dict(kernel_size=np.array([1, 1, 3], np.int64)), None, "kernel"),  # >= 2, as in Python
    (dict(stride=np.array([1, 0, 1], np.int64)), None, "stride"),
    (dict(stride=np.array([1, 4, 1], np.int64)), None, "stride"),
    (dict(dilation=np.array([1, 0, 1], np.int64)), None, "dilation"),
    (dict(dilation=np.array([1, 3, 4], np.int64)), None, "dilation|kernel"),
    (dict(is_causal=np.array([0, 2, 0], np.int64)), None, "causal"),
    (dict(), "gqa", "head"),
    (dict(), "spatial", "shape|spatial|match"),
    (dict(), "rpb", "rpb"),
    (dict(), "rank", "rank"),
    (dict(), "dtype", "dtype"),
]


def fwd_inputs(kind=None):
  """q, k, v, rpb for jnat_na_fwd: consistent (None), or inconsistent in the named way.

  Built on demand, so that collecting the tests creates no arrays.
  """
  q = jnp.ones(Q6_SHAPE)
  kv_gqa = jnp.ones(Q6_SHAPE[:-2] + (3, Q6_SHAPE[-1]))
  no_rpb = jnp.zeros((0,), jnp.float32)
  return {
      None: (q, q, q, no_rpb),
      "gqa": (q, kv_gqa, kv_gqa, no_rpb),
      "spatial": (q, q[:, :, :4], q[:, :, :4], no_rpb),
      "rpb": (q, q, q, jnp.zeros((2, 1, 3, 3))),
      "rank": (q[0], q[0], q[0], no_rpb),
      "dtype": (q, q, q.astype(jnp.bfloat16), no_rpb),
  }[kind]


def fwd_results(out_shape=Q6_SHAPE):
  return [jax.ShapeDtypeStruct(out_shape, jnp.float32),
          jax.ShapeDtypeStruct(Q6_SHAPE[:-1], jnp.float32)]


def assert_fwd_handler_rejects(attrs, inputs, match):
  """The jnat_na_fwd handler fails with INVALID_ARGUMENT, naming one of ``match``'s words."""
  with pytest.raises(Exception, match="(?i)INVALID_ARGUMENT") as info:
    jax.block_until_ready(direct_call("jnat_na_fwd", fwd_results(), *fwd_inputs(inputs),
                                      scale=np.float32(0.5), **attrs))
  assert any(w.lower() in str(info.value).lower() for w in match.split("|")), str(info.value)


def assert_fwd_handler_rejects_wrong_output_shape():
  with pytest.raises(Exception, match="(?i)INVALID_ARGUMENT"):
    jax.block_until_ready(direct_call("jnat_na_fwd", fwd_results(Q6_SHAPE[:-1] + (5,)),
                                      *fwd_inputs(), scale=np.float32(1)))
