"""Property tests: the compiled kernels agree with the pure-JAX reference everywhere.

Random valid configurations (rank, sizes, kernel, stride, dilation, causal, rpb, GQA,
additional key/value tokens, dtype, empty axes, fully masked windows); forward, lse and every
gradient. The configurations' shapes come from na_testing.BUCKETS, so that each compiles
once; the inputs are drawn afresh for every configuration. The xla reference itself is
pinned to NATTEN by test_ops_golden.py and checked numerically in float64 here.
JNAT_PROPERTY_EXAMPLES sets the number of random configurations (default 200).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from jax.test_util import check_grads

from na_testing import (ALL_BACKENDS, BUCKETS, COMPILED_BACKENDS, EXAMPLES, MASKS, SEEDS,
                        SETTINGS, assert_close, bucket_config, check_fused_against_reference,
                        check_unfused_against_reference, config_inputs, fused_with_grads,
                        grad_names, nbhd_args, op, per_bucket, random_inputs)

@pytest.mark.skipif(not COMPILED_BACKENDS, reason="no compiled kernels in this build")
@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
@pytest.mark.parametrize("bucket", range(len(BUCKETS)))
@settings(SETTINGS, max_examples=per_bucket(EXAMPLES))
@given(seed=SEEDS, mask=MASKS)
def test_fused_matches_reference(backend, bucket, seed, mask):
  check_fused_against_reference(bucket_config(bucket, seed, mask), backend)


@pytest.mark.skipif(not COMPILED_BACKENDS, reason="no compiled kernels in this build")
@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
@pytest.mark.parametrize("bucket", range(len(BUCKETS)))
@settings(SETTINGS, max_examples=per_bucket(EXAMPLES // 4))
@given(seed=SEEDS)
def test_unfused_matches_reference(backend, bucket, seed):
  check_unfused_against_reference(bucket_config(bucket, seed, mask=1), backend)


def test_buckets_cover_every_feature():
  """The pool holds every rank, dtype, head dim, odd and even kernels, stride, dilation,
  causal and non-causal axes, GQA, rpb (in 3D and in half precision), additional tokens and
  empty batch and heads axes (a guard against an unlucky pool)."""
  seen = set()
  for c in BUCKETS:
    seen |= {f"rank{c['rank']}", c["dtype"], f"dim{c['dim']}"}
    seen |= {"odd" if k % 2 else "even" for k in c["kernel_size"]}
    seen |= {"causal" if x else "non-causal" for x in c["is_causal"]}
    seen |= {"stride" for s in c["stride"] if s > 1} | {"dilation" for d in c["dilation"] if d > 1}
    seen |= {"gqa"} if c["heads"] > c["kv_heads"] else set()
    seen |= {"extra"} if c["extra_tokens"] else set()
    seen |= {"empty batch"} if not c["batch"] else {"empty heads"} if not c["heads"] else set()
    if c["rpb"]:
      seen |= {"rpb", f"rpb rank{c['rank']}", f"rpb {c['dtype']}"}
  assert seen >= {"rank1", "rank2", "rank3", "float32", "bfloat16", "float16", "dim4", "dim8",
                  "dim16", "dim32", "odd", "even", "causal", "non-causal", "stride",
                  "dilation", "gqa", "extra", "empty batch", "empty heads", "rpb",
                  "rpb rank3", "rpb bfloat16", "rpb float16"}, seen


@pytest.mark.parametrize("c", [
    dict(rank=1, spatial=(11,), kernel_size=(4,), stride=(3,), dilation=(2,), is_causal=(True,),
         heads=2, kv_heads=1, extra_tokens=2, rpb=True),
    dict(rank=2, spatial=(6, 7), kernel_size=(3, 2), stride=(2, 1), dilation=(1, 2),
         is_causal=(False, True), heads=2, kv_heads=2, extra_tokens=0, rpb=True),
    dict(rank=3, spatial=(4, 3, 5), kernel_size=(2, 3, 2), stride=(1, 1, 2), dilation=(2, 1, 1),
         is_causal=(True, False, False), heads=1, kv_heads=1, extra_tokens=1, rpb=True),
], ids=["1d", "2d", "3d"])
def test_reference_gradients_float64(c):
  """The reference's autodiff gradients, first and second order, against finite differences
  in float64."""
  with jax.enable_x64(True):
    q, k, v, rpb, ak, av = random_inputs(3, 1, c["spatial"], c["heads"], c["kv_heads"], 4,
                                         jnp.float64, tuple(2 * k - 1 for k in c["kernel_size"]),
                                         c["extra_tokens"])
    rpb = rpb.astype(jnp.float64)
    @jax.jit
    def f(q, k, v, rpb, *extra):
      ak, av = extra if extra else (None, None)
      return op(c["rank"])(q, k, v, rpb=rpb, additional_keys=ak, additional_values=av,
                           return_lse=True, backend="xla", **nbhd_args(c))
    args = (q, k, v, rpb) + ((ak, av) if ak is not None else ())
    check_grads(f, args, order=2, modes=("rev",), eps=1e-6, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("extra_tokens", [0, 3])
def test_fully_masked_window(backend, extra_tokens):
  """Head 0's windows are fully masked: without extra tokens, output 0 and lse -inf; with
  them, attention over the extra tokens alone (dense NumPy oracle); gradients finite."""
  c = dict(rank=1, batch=1, spatial=(9,), kernel_size=(3,), stride=(1,), dilation=(1,),
           is_causal=(False,), heads=2, kv_heads=1, dim=4, rpb=True, masked=True,
           extra_tokens=extra_tokens, dtype="float32", seed=1)
  inputs = config_inputs(c)
  out, lse, grads = fused_with_grads(c, backend, inputs)
  q, _, _, _, ak, av = (np.asarray(x, np.float64) if x is not None else None for x in inputs)
  if extra_tokens:
    logits = np.einsum("bld,bmd->blm", q[:, :, 0], ak[:, :, 0]) * c["dim"] ** -0.5
    want_lse = np.log(np.exp(logits).sum(-1))
    want_out = np.einsum("blm,bmd->bld", np.exp(logits - want_lse[..., None]), av[:, :, 0])
  else:
    want_lse, want_out = np.full((1, 9), -np.inf), np.zeros((1, 9, 4))
  assert_close(lse[..., 0], want_lse, "float32", "lse")
  assert_close(out[..., 0, :], want_out, "float32", "out")
  assert np.isfinite(lse[..., 1]).all()
  for g in grads:
    assert np.isfinite(np.asarray(g)).all()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_large_rpb_keeps_every_gradient(backend):
  """A bias of 95 on every rpb entry leaves the softmax unchanged but takes exp(bias) past
  float32's range: the padding lanes of a partial tile of queries (zero q and dout rows) must
  still add nothing to the rpb gradient, which the CPU kernels sum by lane (13 causal tokens:
  no tile width divides them, and the last tile's lanes share one rpb offset)."""
  c = dict(rank=1, batch=1, spatial=(13,), kernel_size=(5,), stride=(1,), dilation=(1,),
           is_causal=(True,), heads=2, kv_heads=2, dim=8, rpb=True, extra_tokens=0,
           dtype="float32", seed=3)
  q, k, v, rpb, ak, av = config_inputs(c)
  inputs = (q, k, v, rpb + 95.0, ak, av)
  out, lse, grads = fused_with_grads(c, backend, inputs)
  ref_out, ref_lse, ref_grads = fused_with_grads(c, "xla", config_inputs(c))
  assert_close(out, ref_out, "float32", "out")
  for name, g, r in zip(grad_names(inputs), grads, ref_grads, strict=True):
    assert_close(g, r, "float32", name)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("empty", ["batch", "heads"])
def test_empty_batch_or_heads(backend, empty):
  c = dict(rank=2, batch=0 if empty == "batch" else 1, spatial=(5, 6), kernel_size=(3, 3),
           stride=(1, 1), dilation=(1, 1), is_causal=(False, False),
           heads=0 if empty == "heads" else 2, kv_heads=1, dim=4, rpb=True, extra_tokens=2,
           dtype="float32", seed=0)
  inputs = config_inputs(c)
  out, lse, grads = fused_with_grads(c, backend, inputs)
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


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_axes_beyond_int32_are_rejected_before_tracing_kernels(backend):
  q = jax.ShapeDtypeStruct((1, 2**31, 1, 1), jnp.float32)
  with pytest.raises(ValueError, match=r"spatial axis 0 has 2147483648 positions.*int32"):
    jax.eval_shape(lambda q: op(1)(q, q, q, kernel_size=3, backend=backend), q)


def test_reference_bfloat16_gradients_accumulate_in_float32():
  """Many windows overlap each key: dk/dv summed in bfloat16 lose ~3x more than the
  kernels' float32 accumulation. Compared with float32 on the same rounded inputs."""
  c = dict(rank=1, batch=1, spatial=(256,), kernel_size=(31,), stride=(1,), dilation=(1,),
           is_causal=(False,), heads=4, kv_heads=1, dim=32, rpb=False, extra_tokens=0,
           dtype="bfloat16", seed=4)
  low = config_inputs(c)
  high = tuple(None if x is None else x.astype(jnp.float32) for x in low)
  _, _, grads_low = fused_with_grads(c, "xla", low)
  _, _, grads_high = fused_with_grads(c, "xla", high)
  for name, g, r in zip(grad_names(low), grads_low, grads_high, strict=True):
    assert_close(g, r, "bfloat16/float32", name)
