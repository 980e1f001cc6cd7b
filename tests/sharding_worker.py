"""Run in a subprocess with 4 CPU devices by test_sharding.py (device count is fixed at start).

Prints one JSON line per case: errors against the single-device result and the collectives
found in the compiled HLO.
"""

import json
import re
import sys

import jax

jax.config.update("jax_num_cpu_devices", 4)

import jax.numpy as jnp  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jnat  # noqa: E402

KERNEL = dict(kernel_size=(3, 5), stride=(1, 2), dilation=(2, 1), is_causal=(False, True))


def inputs(kv_heads):
  keys = jax.random.split(jax.random.key(0), 5)
  q = jax.random.normal(keys[0], (4, 8, 10, 8, 8))
  k = jax.random.normal(keys[1], (4, 8, 10, kv_heads, 8))
  v = jax.random.normal(keys[2], (4, 8, 10, kv_heads, 8))
  rpb = jax.random.normal(keys[3], (8, 5, 9))
  dout = jax.random.normal(keys[4], q.shape)
  return q, k, v, rpb, dout


def loss_and_grads(backend):
  def loss(q, k, v, rpb, dout):
    out = jnat.na2d(q, k, v, rpb=rpb, backend=backend, **KERNEL)
    return jnp.sum(out * dout)
  return jax.value_and_grad(loss, argnums=(0, 1, 2, 3))


def collectives(hlo):
  return sorted(set(re.findall(r"\b(all-gather|all-reduce|all-to-all|collective-permute|"
                               r"reduce-scatter)\b", hlo)))


def pad(spec):
  return tuple(spec) + (None,) * (5 - len(spec))


def run(backend, axis_type, layout, kv_heads):
  args = inputs(kv_heads)
  ref_loss, ref_grads = jax.jit(loss_and_grads(backend))(*args)
  mesh = jax.make_mesh((2, 2), ("data", "model"), axis_types=(axis_type,) * 2)
  spec = {"batch": P(("data", "model")), "heads": P(None, None, None, ("data", "model")),
          "both": P("data", None, None, "model")}[layout]
  rpb_spec = P(spec[3]) if len(spec) > 3 else P()
  shardings = [NamedSharding(mesh, spec)] * 3 + [NamedSharding(mesh, rpb_spec),
                                                 NamedSharding(mesh, spec)]
  with jax.set_mesh(mesh):
    sharded = [jax.device_put(a, s) for a, s in zip(args, shardings)]
    fn = jax.jit(loss_and_grads(backend))
    hlo = fn.lower(*sharded).compile().as_text()
    loss, grads = fn(*sharded)
  err = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(grads, ref_grads))
  return dict(backend=backend, axis_type=str(axis_type), layout=layout, kv_heads=kv_heads,
              loss_err=abs(float(loss - ref_loss)), grad_err=err,
              dq_keeps_sharding=pad(grads[0].sharding.spec) == pad(spec),
              collectives=collectives(hlo),
              gathered_shapes=sorted(set(re.findall(r"= (\w+\[[\d,]+\][^ ]*) all-gather", hlo))))


if __name__ == "__main__":
  for backend in sys.argv[1:]:
    for axis_type in (AxisType.Auto, AxisType.Explicit):
      for layout in ("batch", "heads", "both"):
        for kv_heads in (8, 4):
          print(json.dumps(run(backend, axis_type, layout, kv_heads)), flush=True)
