"""Shared helpers of the op tests: golden data, tolerances, random inputs."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

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
