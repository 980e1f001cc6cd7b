"""Run in a subprocess with 4 CPU devices by test_sharding.py (device count is fixed at start).

Prints one JSON line per case: errors against the single-device result and the collectives
found in the compiled HLO.
"""

import contextlib
import functools
import json
import re
import sys

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jnat

KERNEL = dict(kernel_size=(3, 5), stride=(1, 2), dilation=(2, 1), is_causal=(False, True))
BOTH = ("data", "model")

# (name, q/k/v/rpb spec, heads, kv_heads, kv spec, additional kv tokens). Head-sharded
# GQA/MQA layouts keep kv sharded alike where its heads divide, or replicated.
CASES = [
    ("batch", P(BOTH), 8, 8, P(BOTH), 0),
    ("both", P("data", None, None, "model"), 8, 8, P("data", None, None, "model"), 2),
    ("gqa-kv-sharded", P(None, None, None, BOTH), 8, 4, P(None, None, None, BOTH), 0),
    ("gqa-kv-replicated", P(None, None, None, BOTH), 8, 2, P(), 2),
    ("mqa", P(None, None, None, BOTH), 4, 1, P(), 0),
    ("mqa-extra", P("data", None, None, "model"), 4, 1, P("data"), 3),
    ("gqa-6-3", P("data", None, None, "model"), 6, 3, P("data"), 0),
    ("gqa-6-3-extra", P(None, None, None, "model"), 6, 3, P(), 2),
]


# Mesh axis types, and whether the mesh is entered with jax.set_mesh around the call.
MODES = [(AxisType.Auto, True), (AxisType.Explicit, True), (AxisType.Explicit, False)]


def mode_name(axis_type, mesh_in_context):
  return str(axis_type) + ("" if mesh_in_context else " without jax.set_mesh")


def inputs(heads, kv_heads, extra):
  keys = jax.random.split(jax.random.key(0), 7)
  q = jax.random.normal(keys[0], (4, 8, 10, heads, 8))
  k = jax.random.normal(keys[1], (4, 8, 10, kv_heads, 8))
  v = jax.random.normal(keys[2], (4, 8, 10, kv_heads, 8))
  rpb = jax.random.normal(keys[3], (heads, 5, 9))
  dout = jax.random.normal(keys[4], q.shape)
  ak = jax.random.normal(keys[5], (4, extra, kv_heads, 8)) if extra else None
  av = jax.random.normal(keys[6], (4, extra, kv_heads, 8)) if extra else None
  return q, k, v, rpb, dout, ak, av


def loss_and_grads(backend):
  def loss(q, k, v, rpb, dout, ak, av):
    out = jnat.na2d(q, k, v, rpb=rpb, additional_keys=ak, additional_values=av,
                    backend=backend, **KERNEL)
    return jnp.sum(out * dout)
  return jax.value_and_grad(loss, argnums=(0, 1, 2, 3))


def collectives(hlo):
  return sorted(set(re.findall(r"\b(all-gather|all-reduce|all-to-all|collective-permute|"
                               r"reduce-scatter)\b", hlo)))


def pad(spec):
  return tuple(spec) + (None,) * (5 - len(spec))


@functools.lru_cache(maxsize=None)
def single_device(backend, case):
  """The loss and gradients on one device: the expected values of both mesh types."""
  name, spec, heads, kv_heads, kv_spec, extra = case
  return jax.jit(loss_and_grads(backend))(*inputs(heads, kv_heads, extra))


def run(backend, axis_type, case, mesh_in_context):
  name, spec, heads, kv_heads, kv_spec, extra = case
  args = inputs(heads, kv_heads, extra)
  ref_loss, ref_grads = single_device(backend, case)
  mesh = jax.make_mesh((2, 2), BOTH, axis_types=(axis_type,) * 2)
  specs = [spec, kv_spec, kv_spec, P(pad(spec)[3]), spec, P(kv_spec[0] if kv_spec else None),
           P(kv_spec[0] if kv_spec else None)]
  # Without jax.set_mesh, Explicit axes reach jnat only through the arrays' types.
  with jax.set_mesh(mesh) if mesh_in_context else contextlib.nullcontext():
    sharded = [None if a is None else jax.device_put(a, NamedSharding(mesh, s))
               for a, s in zip(args, specs)]
    compiled = jax.jit(loss_and_grads(backend)).lower(*sharded).compile()  # compiled once
    hlo = compiled.as_text()
    loss, grads = compiled(*sharded)
  err = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(grads, ref_grads))
  return dict(backend=backend, axis_type=mode_name(axis_type, mesh_in_context), case=name, loss_err=abs(float(loss - ref_loss)),
              grad_err=err, dq_keeps_sharding=pad(grads[0].sharding.spec) == pad(spec),
              collectives=collectives(hlo),
              gathered_shapes=sorted(set(re.findall(r"= (\w+\[[\d,]+\][^ ]*) all-gather", hlo))))


if __name__ == "__main__":
  jax.config.update("jax_num_cpu_devices", 4)  # before any JAX operation; CASES is importable
  backends, names = sys.argv[1].split(","), sys.argv[2:] or [c[0] for c in CASES]
  for backend in backends:
    for axis_type, in_context in MODES:
      for case in (c for c in CASES if c[0] in names):
        try:
          print(json.dumps(run(backend, axis_type, case, in_context)), flush=True)
        except Exception as e:  # reported, so one failing layout does not hide the others
          print(json.dumps(dict(backend=backend, axis_type=mode_name(axis_type, in_context),
                                case=case[0],
                                error=f"{type(e).__name__}: {str(e)[:400]}")), flush=True)
