"""Shared helpers of the op tests: golden data, tolerances, random inputs, direct handler
calls."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jnat

DATA = pathlib.Path(__file__).parent / "data"
COMPILED_BACKENDS = tuple(b for b in jnat.available_backends() if b != "xla")  # default platform
ALL_BACKENDS = ("xla",) + COMPILED_BACKENDS

# Half precision against a float32 run of the same inputs (flash-attention style budget).
HALF_TOL = {"bfloat16": dict(atol=3e-2, rtol=3e-2), "float16": dict(atol=5e-3, rtol=5e-3)}


def golden_cases():
  """NATTEN reference configs: (id, config dict, arrays dict) for both NATTEN versions."""
  data = np.load(DATA / "natten_golden.npz")
  cases = []
  for tag in ("v021", "v017"):
    for cfg in json.loads(str(data[f"{tag}_meta_json"]))["configs"]:
      prefix = f"{tag}_{cfg['name']}__"
      arrays = {k[len(prefix):]: data[k] for k in data.files if k.startswith(prefix)}
      cases.append((f"{tag}-{cfg['name']}", cfg, arrays))
  return cases


def op(rank, kind=""):
  return getattr(jnat, f"na{rank}d{kind}")


def rel_err(actual, expected):
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  return float(np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-30))


def random_inputs(seed, batch, spatial, heads, kv_heads, dim, dtype=jnp.float32, rpb_shape=None,
                  extra_tokens=0):
  keys = jax.random.split(jax.random.key(seed), 7)
  normal = lambda k, shape: jax.random.normal(k, shape, jnp.float32).astype(dtype)
  q = normal(keys[0], (batch, *spatial, heads, dim))
  k = normal(keys[1], (batch, *spatial, kv_heads, dim))
  v = normal(keys[2], (batch, *spatial, kv_heads, dim))
  rpb = None if rpb_shape is None else normal(keys[3], (heads, *rpb_shape)).astype(jnp.float32)
  ak = av = None
  if extra_tokens:
    ak = normal(keys[4], (batch, extra_tokens, kv_heads, dim))
    av = normal(keys[5], (batch, extra_tokens, kv_heads, dim))
  return q, k, v, rpb, ak, av


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
