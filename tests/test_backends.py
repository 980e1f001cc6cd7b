"""Property tests: the compiled kernels agree with the pure-JAX reference everywhere.

Random valid configurations (rank, sizes, kernel, stride, dilation, causal, rpb, GQA,
additional key/value tokens, dtype); forward, lse and every gradient. The xla reference
itself is pinned to NATTEN by test_ops_golden.py and checked numerically in float64 here.
JNAT_PROPERTY_EXAMPLES sets the number of random configurations (default 200).
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

from na_testing import ALL_BACKENDS, COMPILED_BACKENDS, HALF_TOL, op, random_inputs, rel_err

EXAMPLES = int(os.environ.get("JNAT_PROPERTY_EXAMPLES", "200"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))


@st.composite
def configs(draw, max_rank=3):
  rank = draw(st.integers(1, max_rank))
  max_kernel = {1: 9, 2: 5, 3: 3}[rank]
  axes = []
  for _ in range(rank):
    kernel = draw(st.integers(2, max_kernel))
    dilation = draw(st.integers(1, 3))
    length = draw(st.integers(kernel * dilation, kernel * dilation + {1: 12, 2: 5, 3: 3}[rank]))
    axes.append(dict(kernel=kernel, dilation=dilation, length=length,
                     stride=draw(st.integers(1, kernel)), causal=draw(st.booleans())))
  kv_heads = draw(st.sampled_from([1, 2]))
  # Edges: an empty batch or heads axis; head 0's rpb all -inf (every window fully masked).
  empty = draw(st.sampled_from([None] * 18 + ["batch", "heads"]))
  rpb = draw(st.booleans())
  return dict(
      rank=rank, batch=0 if empty == "batch" else draw(st.integers(1, 2)), kv_heads=kv_heads,
      heads=0 if empty == "heads" else kv_heads * draw(st.sampled_from([1, 2, 3])),
      dim=draw(st.sampled_from([4, 8, 16, 32])), masked=rpb and draw(st.integers(0, 5)) == 0,
      spatial=tuple(a["length"] for a in axes),
      kernel_size=tuple(a["kernel"] for a in axes), stride=tuple(a["stride"] for a in axes),
      dilation=tuple(a["dilation"] for a in axes), is_causal=tuple(a["causal"] for a in axes),
      rpb=rpb, extra_tokens=draw(st.sampled_from([0, 0, 1, 3])),
      dtype=draw(st.sampled_from(["float32"] * 4 + ["bfloat16", "float16"])),
      seed=draw(st.integers(0, 2**16)))


def _nbhd_args(c):
  return dict(kernel_size=c["kernel_size"], stride=c["stride"], dilation=c["dilation"],
              is_causal=c["is_causal"])


def _inputs(c, dtype=None):
  q, k, v, rpb, ak, av = random_inputs(
      c["seed"], c["batch"], c["spatial"], c["heads"], c["kv_heads"], c["dim"],
      dtype or c["dtype"], tuple(2 * k - 1 for k in c["kernel_size"]) if c["rpb"] else None,
      c["extra_tokens"])
  if c.get("masked") and c["heads"]:
    rpb = rpb.at[0].set(-jnp.inf)
  return q, k, v, rpb, ak, av


def _fused_with_grads(c, backend, inputs):
  q, k, v, rpb, ak, av = inputs
  def loss(q, k, v, rpb, ak, av):
    out, lse = op(c["rank"])(q, k, v, rpb=rpb, additional_keys=ak, additional_values=av,
                             return_lse=True, backend=backend, **_nbhd_args(c))
    # Fixed pseudo-random cotangents for out and lse, so both gradient paths are exercised.
    w_out = jnp.cos(jnp.arange(out.size, dtype=jnp.float32)).reshape(out.shape)
    w_lse = jnp.sin(jnp.arange(lse.size, dtype=jnp.float32)).reshape(lse.shape)
    return jnp.sum(out.astype(jnp.float32) * w_out) + jnp.sum(lse * w_lse), (out, lse)
  argnums = tuple(i for i, x in enumerate(inputs) if x is not None)
  grads, (out, lse) = jax.jit(jax.grad(loss, argnums=argnums, has_aux=True))(*inputs)
  return out, lse, grads


def _check_fused_against_reference(c, backend):
  """Forward, lse and every gradient of ``backend`` against the xla reference."""
  inputs = _inputs(c)
  out, lse, grads = _fused_with_grads(c, backend, inputs)
  ref_out, ref_lse, ref_grads = _fused_with_grads(c, "xla", inputs)
  assert out.dtype == inputs[0].dtype and out.shape == inputs[0].shape
  if c["dtype"] == "float32":
    np.testing.assert_allclose(out, ref_out, atol=2e-5, rtol=0)
    np.testing.assert_allclose(lse, ref_lse, atol=2e-5, rtol=0)
    for g, r in zip(grads, ref_grads):
      assert rel_err(g, r) <= 1e-4
  else:
    tol = HALF_TOL[c["dtype"]]
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref_out, np.float32),
                               **tol)
    np.testing.assert_allclose(lse, ref_lse, atol=1e-3, rtol=0)
    for g, r in zip(grads, ref_grads):
      assert rel_err(np.asarray(g, np.float32), np.asarray(r, np.float32)) <= 2e-2


@pytest.mark.skipif(not COMPILED_BACKENDS, reason="no compiled kernels in this build")
@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
@SETTINGS
@given(c=configs())
def test_fused_matches_reference(backend, c):
  _check_fused_against_reference(c, backend)


def _check_unfused_against_reference(c, backend):
  """na*d_qk -> softmax -> na*d_av of ``backend`` and its gradients against the xla reference."""
  q, k, v, rpb, _, _ = _inputs(dict(c, masked=False), "float32")  # softmax of all -inf: NaN
  rank, args = c["rank"], _nbhd_args(c)

  def pipeline(q, k, v, rpb, backend):
    logits = op(rank, "_qk")(q, k, rpb=rpb, backend=backend, **args)
    weights = jax.nn.softmax(logits, axis=-1)
    return op(rank, "_av")(weights, v, backend=backend, **args), logits

  def loss(q, k, v, rpb, backend):
    out, logits = pipeline(q, k, v, rpb, backend)
    finite = jnp.where(jnp.isfinite(logits), logits, 0.0)
    return jnp.sum(out * jnp.cos(out)) + jnp.sum(jnp.sin(finite)), (out, logits)

  argnums = (0, 1, 2, 3) if rpb is not None else (0, 1, 2)
  grad = jax.jit(jax.grad(loss, argnums, has_aux=True), static_argnums=4)
  grads, (out, logits) = grad(q, k, v, rpb, backend)
  ref_grads, (ref_out, ref_logits) = grad(q, k, v, rpb, "xla")
  np.testing.assert_array_equal(np.isinf(logits), np.isinf(ref_logits))
  np.testing.assert_allclose(logits, ref_logits, atol=2e-5, rtol=1e-6)
  np.testing.assert_allclose(out, ref_out, atol=2e-5, rtol=0)
  for g, r in zip(grads, ref_grads):
    assert rel_err(g, r) <= 1e-4


@pytest.mark.skipif(not COMPILED_BACKENDS, reason="no compiled kernels in this build")
@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
@settings(SETTINGS, max_examples=max(EXAMPLES // 4, 10))
@given(c=configs())
def test_unfused_matches_reference(backend, c):
  _check_unfused_against_reference(c, backend)


@pytest.mark.parametrize("c", [
    dict(rank=1, spatial=(11,), kernel_size=(4,), stride=(3,), dilation=(2,), is_causal=(True,),
         heads=2, kv_heads=1, extra_tokens=2, rpb=True),
    dict(rank=2, spatial=(6, 7), kernel_size=(3, 2), stride=(2, 1), dilation=(1, 2),
         is_causal=(False, True), heads=2, kv_heads=2, extra_tokens=0, rpb=True),
    dict(rank=3, spatial=(4, 3, 5), kernel_size=(2, 3, 2), stride=(1, 1, 2), dilation=(2, 1, 1),
         is_causal=(True, False, False), heads=1, kv_heads=1, extra_tokens=1, rpb=True),
], ids=["1d", "2d", "3d"])
def test_reference_gradients_float64(c):
  """The reference's autodiff gradients against finite differences, in float64."""
  with jax.enable_x64(True):
    q, k, v, rpb, ak, av = random_inputs(3, 1, c["spatial"], c["heads"], c["kv_heads"], 4,
                                         jnp.float64, tuple(2 * k - 1 for k in c["kernel_size"]),
                                         c["extra_tokens"])
    rpb = rpb.astype(jnp.float64)
    def f(q, k, v, rpb, *extra):
      ak, av = extra if extra else (None, None)
      out, lse = op(c["rank"])(q, k, v, rpb=rpb, additional_keys=ak, additional_values=av,
                               return_lse=True, backend="xla", **_nbhd_args(c))
      return out, lse
    args = (q, k, v, rpb) + ((ak, av) if ak is not None else ())
    check_grads(f, args, order=1, modes=("rev",), eps=1e-6, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("extra_tokens", [0, 3])
def test_fully_masked_window(backend, extra_tokens):
  """Head 0's windows are fully masked: without extra tokens, output 0 and lse -inf; with
  them, attention over the extra tokens alone (dense NumPy oracle); gradients finite."""
  c = dict(rank=1, batch=1, spatial=(9,), kernel_size=(3,), stride=(1,), dilation=(1,),
           is_causal=(False,), heads=2, kv_heads=1, dim=4, rpb=True, masked=True,
           extra_tokens=extra_tokens, dtype="float32", seed=1)
  inputs = _inputs(c)
  out, lse, grads = _fused_with_grads(c, backend, inputs)
  q, _, _, _, ak, av = (np.asarray(x, np.float64) if x is not None else None for x in inputs)
  if extra_tokens:
    logits = np.einsum("bld,bmd->blm", q[:, :, 0], ak[:, :, 0]) * c["dim"] ** -0.5
    want_lse = np.log(np.exp(logits).sum(-1))
    want_out = np.einsum("blm,bmd->bld", np.exp(logits - want_lse[..., None]), av[:, :, 0])
  else:
    want_lse, want_out = np.full((1, 9), -np.inf), np.zeros((1, 9, 4))
  np.testing.assert_allclose(lse[..., 0], want_lse, atol=2e-5, rtol=0)
  np.testing.assert_allclose(out[..., 0, :], want_out, atol=2e-5, rtol=0)
  assert np.isfinite(lse[..., 1]).all()
  for g in grads:
    assert np.isfinite(np.asarray(g)).all()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("empty", ["batch", "heads"])
def test_empty_batch_or_heads(backend, empty):
  c = dict(rank=2, batch=0 if empty == "batch" else 1, spatial=(5, 6), kernel_size=(3, 3),
           stride=(1, 1), dilation=(1, 1), is_causal=(False, False),
           heads=0 if empty == "heads" else 2, kv_heads=1, dim=4, rpb=True, extra_tokens=2,
           dtype="float32", seed=0)
  inputs = _inputs(c)
  out, lse, grads = _fused_with_grads(c, backend, inputs)
  assert out.shape == inputs[0].shape and lse.shape == inputs[0].shape[:-1]
  assert [g.shape for g in grads] == [x.shape for x in inputs if x is not None]
  for g in grads:
    assert not np.asarray(g).any()
  q, k, *_ = inputs
  assert op(2, "_qk")(q, k, kernel_size=3, backend=backend).shape == q.shape[:-1] + (9,)
  attn = jnp.zeros(q.shape[:-1] + (9,))
  assert op(2, "_av")(attn, k, kernel_size=3, backend=backend).shape == q.shape


def test_reference_tables_do_not_grow_with_the_input():
  """Tracing a long 1D input must not build host tables of its size (2**24 x 3 int32 slots
  would take 192 MiB)."""
  import tracemalloc
  q = jax.ShapeDtypeStruct((1, 2**24, 1, 1), jnp.float32)
  tracemalloc.start()
  try:
    out = jax.eval_shape(lambda q: op(1)(q, q, q, kernel_size=3, backend="xla"), q)
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  assert out.shape == q.shape
  assert peak < 64 << 20, peak


def test_reference_bfloat16_gradients_accumulate_in_float32():
  """Many windows overlap each key: dk/dv summed in bfloat16 lose ~3x more than the
  kernels' float32 accumulation. Compared with float32 on the same rounded inputs."""
  c = dict(rank=1, batch=1, spatial=(256,), kernel_size=(31,), stride=(1,), dilation=(1,),
           is_causal=(False,), heads=4, kv_heads=1, dim=32, rpb=False, extra_tokens=0,
           dtype="bfloat16", seed=4)
  low = _inputs(c)
  high = tuple(None if x is None else x.astype(jnp.float32) for x in low)
  _, _, grads_low = _fused_with_grads(c, "xla", low)
  _, _, grads_high = _fused_with_grads(c, "xla", high)
  for name, g, r in zip(("dq", "dk", "dv"), grads_low, grads_high):
    assert rel_err(np.asarray(g, np.float32), r) <= 5e-3, name  # bfloat16 sums: 7.5e-3
