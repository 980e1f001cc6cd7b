"""The "cuda" backend: lowering checks that run anywhere, kernel checks that need a GPU.

On a machine without a GPU only the first group runs: the CUDA module (when built) exposes
every target, and lowering for the "cuda" platform emits the jnat custom calls with the
attributes the handlers decode. The `gpu`-marked tests (skipped without a GPU, see
conftest.py) hold the CUDA kernels to NATTEN's golden data and to the xla reference on
random configurations, every dtype, head dims on both sides of the tensor-core buckets, the
unfused ops, determinism, and the handlers' own validation.
"""

import functools
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

import jnat
from jnat import _checks, _ffi
from na_testing import HALF_TOL, golden_cases, op, random_inputs, rel_err
from test_backends import SETTINGS, _fused_with_grads, _inputs, _nbhd_args, configs
from test_ops_golden import _args, _fused_fn

TARGETS = ("jnat_na_fwd", "jnat_na_bwd", "jnat_na_qk", "jnat_na_qk_bwd", "jnat_na_av",
           "jnat_na_av_bwd")
HAS_CUDA_MODULE = importlib.util.find_spec("jnat._jnat_cuda") is not None


# --- Anywhere: the module and the lowering. ---

@pytest.mark.skipif(not HAS_CUDA_MODULE, reason="built without the CUDA module")
def test_cuda_module_exposes_every_target():
  from jnat import _jnat_cuda
  assert sorted(_jnat_cuda.registrations()) == sorted(TARGETS)
  assert "cuda" in _ffi.compiled_platforms()


def _cuda_hlo(fn, *args):
  return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def _custom_calls(hlo):
  return sorted({t for t in TARGETS if f"custom_call @{t}(" in hlo})


NBHD = _checks.make_neighborhood(2, (10, 12), (3, 5), (1, 2), (2, 1), (False, True))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fused_lowers_to_cuda_custom_calls(dtype):
  q = jnp.zeros((2, 10, 12, 4, 32), dtype)
  kv = jnp.zeros((2, 10, 12, 2, 32), dtype)
  rpb = jnp.zeros((4, 5, 9), jnp.float32)
  fwd = lambda q, k, v, rpb: _ffi.na_forward(q, k, v, NBHD, 0.125, rpb)
  hlo = _cuda_hlo(fwd, q, kv, kv, rpb)
  assert _custom_calls(hlo) == ["jnat_na_fwd"]
  # The attributes the handler decodes: int64[3] per axis (size-1 leading axis for 2D), f32 scale.
  assert "kernel_size = dense<[1, 3, 5]> : tensor<3xi64>" in hlo
  assert "stride = dense<[1, 1, 2]> : tensor<3xi64>" in hlo
  assert "is_causal = dense<[0, 0, 1]> : tensor<3xi64>" in hlo
  assert "scale = 1.250000e-01 : f32" in hlo

  loss = lambda *a: jnp.sum(fwd(*a)[0].astype(jnp.float32))
  hlo = _cuda_hlo(jax.grad(loss, argnums=(0, 1, 2, 3)), q, kv, kv, rpb)
  assert _custom_calls(hlo) == ["jnat_na_bwd", "jnat_na_fwd"]


def test_unfused_lower_to_cuda_custom_calls():
  q = jnp.zeros((1, 10, 12, 2, 16))
  attn = jnp.zeros((1, 10, 12, 2, 15))
  qk = lambda q, k: jnp.sum(_ffi.na_qk(q, k, NBHD))
  av = lambda a, v: jnp.sum(_ffi.na_av(a, v, NBHD))
  assert _custom_calls(_cuda_hlo(jax.value_and_grad(qk, (0, 1)), q, q)) == ["jnat_na_qk", "jnat_na_qk_bwd"]
  assert _custom_calls(_cuda_hlo(jax.value_and_grad(av, (0, 1)), attn, q)) == ["jnat_na_av",
                                                                    "jnat_na_av_bwd"]


# --- On a GPU: the kernels. ---

CASES = golden_cases()


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_cuda_matches_natten(case):
  _, cfg, a = case
  dq, dk, dv, drpb, out, lse = _fused_fn(cfg["na_dim"], "cuda", **_args(cfg))(
      a["q"], a["k"], a["v"], a.get("rpb"), a["dout"])
  np.testing.assert_allclose(out, a["out"], atol=2e-5, rtol=0)
  if "lse" in a:
    np.testing.assert_allclose(lse, a["lse"], atol=2e-5, rtol=0)
  for name, grad in (("dq", dq), ("dk", dk), ("dv", dv), ("drpb", drpb)):
    if name in a:
      assert rel_err(grad, a[name]) <= 1e-4, name


@pytest.mark.gpu
@pytest.mark.parametrize("case", [c for c in CASES if "attn" in c[2]],
                         ids=[c[0] for c in CASES if "attn" in c[2]])
def test_cuda_unfused_matches_natten_weights(case):
  _, cfg, a = case
  rank = cfg["na_dim"]
  logits = op(rank, "_qk")(a["q"] * a["q"].shape[-1] ** -0.5, a["k"], rpb=a.get("rpb"),
                           backend="cuda", **_args(cfg))
  weights = jax.nn.softmax(logits, axis=-1)
  np.testing.assert_allclose(jnp.moveaxis(weights, -2, 1), a["attn"], atol=2e-6, rtol=0)
  out = op(rank, "_av")(weights, a["v"], backend="cuda", **_args(cfg))
  np.testing.assert_allclose(out, a["out"], atol=2e-5, rtol=0)


def _check_against_reference(c, inputs):
  out, lse, grads = _fused_with_grads(c, "cuda", inputs)
  ref_out, ref_lse, ref_grads = _fused_with_grads(c, "xla", inputs)
  assert out.dtype == inputs[0].dtype and out.shape == inputs[0].shape
  if c["dtype"] == "float32":
    np.testing.assert_allclose(out, ref_out, atol=2e-5, rtol=0)
    np.testing.assert_allclose(lse, ref_lse, atol=2e-5, rtol=0)
    for g, r in zip(grads, ref_grads):
      assert rel_err(g, r) <= 1e-4
  else:
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref_out, np.float32),
                               **HALF_TOL[c["dtype"]])
    np.testing.assert_allclose(lse, ref_lse, atol=1e-3, rtol=0)
    for g, r in zip(grads, ref_grads):
      assert rel_err(np.asarray(g, np.float32), np.asarray(r, np.float32)) <= 2e-2


@pytest.mark.gpu
@SETTINGS
@given(c=configs())
def test_cuda_fused_matches_reference(c):
  _check_against_reference(c, _inputs(c))


# Head dims around the tensor-core buckets (32, 64, 128) and past them (general kernel), with
# every feature on: 2D, stride, dilation, causal axis, rpb, GQA, several query tiles.
HEAD_DIM_CASE = dict(rank=2, batch=2, spatial=(19, 23), kernel_size=(5, 7), stride=(2, 1),
                     dilation=(1, 2), is_causal=(False, True), heads=4, kv_heads=2, rpb=True,
                     extra_tokens=0, seed=7)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("dim", [8, 12, 16, 32, 40, 64, 96, 128, 160, 256, 320])
def test_cuda_head_dims(dim, dtype):
  c = dict(HEAD_DIM_CASE, dim=dim, dtype=dtype)
  _check_against_reference(c, _inputs(c))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("c", [
    dict(rank=1, spatial=(700,), kernel_size=(63,), stride=(1,), dilation=(1,),
         is_causal=(False,), dim=64),
    dict(rank=2, spatial=(56, 56), kernel_size=(7, 7), stride=(1, 1), dilation=(1, 1),
         is_causal=(False, False), dim=32),
    dict(rank=2, spatial=(40, 44), kernel_size=(7, 7), stride=(1, 1), dilation=(4, 3),
         is_causal=(True, False), dim=32),
    dict(rank=3, spatial=(10, 12, 9), kernel_size=(3, 5, 3), stride=(1, 2, 3),
         dilation=(2, 1, 1), is_causal=(False, False, True), dim=64),
], ids=["1d-k63", "2d-nat", "2d-dilated-causal", "3d"])
def test_cuda_larger_problems(c, dtype):
  c = dict(c, batch=1, heads=2, kv_heads=1, rpb=True, extra_tokens=0, seed=3, dtype=dtype)
  _check_against_reference(c, _inputs(c))


@pytest.mark.gpu
@settings(SETTINGS, max_examples=max(SETTINGS.max_examples // 4, 10))
@given(c=configs())
def test_cuda_unfused_matches_reference(c):
  q, k, v, rpb, _, _ = _inputs(c, "float32")
  rank, args = c["rank"], _nbhd_args(c)

  def loss(q, k, v, rpb, backend):
    logits = op(rank, "_qk")(q, k, rpb=rpb, backend=backend, **args)
    out = op(rank, "_av")(jax.nn.softmax(logits, axis=-1), v, backend=backend, **args)
    finite = jnp.where(jnp.isfinite(logits), logits, 0.0)
    return jnp.sum(out * jnp.cos(out)) + jnp.sum(jnp.sin(finite)), (out, logits)

  argnums = (0, 1, 2, 3) if rpb is not None else (0, 1, 2)
  grad = jax.jit(jax.grad(loss, argnums, has_aux=True), static_argnums=4)
  grads, (out, logits) = grad(q, k, v, rpb, "cuda")
  ref_grads, (ref_out, ref_logits) = grad(q, k, v, rpb, "xla")
  np.testing.assert_array_equal(np.isinf(logits), np.isinf(ref_logits))
  np.testing.assert_allclose(logits, ref_logits, atol=2e-5, rtol=1e-6)
  np.testing.assert_allclose(out, ref_out, atol=2e-5, rtol=0)
  for g, r in zip(grads, ref_grads):
    assert rel_err(g, r) <= 1e-4


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_cuda_unfused_half_and_single(dtype):
  c = dict(HEAD_DIM_CASE, dim=32, dtype=dtype)
  q, k, v, rpb, _, _ = _inputs(c)
  args = _nbhd_args(c)
  weights = jax.nn.softmax(jnat.na2d_qk(q, k, rpb=rpb, backend="xla", **args).astype(
      jnp.float32), -1).astype(dtype)
  out = jnat.na2d_av(weights, v, backend="cuda", **args)
  assert out.dtype == jnp.dtype(dtype)
  np.testing.assert_allclose(np.asarray(out, np.float32),
                             np.asarray(jnat.na2d_av(weights, v, backend="xla", **args),
                                        np.float32),
                             **HALF_TOL.get(dtype, dict(atol=2e-5, rtol=1e-6)))
  cu = jnat.na2d_qk(q, k, rpb=rpb, backend="cuda", **args)
  ref = jnat.na2d_qk(q, k, rpb=rpb, backend="xla", **args)
  np.testing.assert_array_equal(np.isinf(np.asarray(cu, np.float32)),
                                np.isinf(np.asarray(ref, np.float32)))
  tol = HALF_TOL.get(dtype, dict(atol=2e-5, rtol=1e-6))
  finite = np.isfinite(np.asarray(ref, np.float32))
  np.testing.assert_allclose(np.asarray(cu, np.float32)[finite],
                             np.asarray(ref, np.float32)[finite], **tol)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_cuda_backward_is_deterministic(dtype):
  c = dict(HEAD_DIM_CASE, dim=64, dtype=dtype)
  inputs = _inputs(c)
  first = _fused_with_grads(c, "cuda", inputs)
  second = _fused_with_grads(c, "cuda", inputs)
  for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second)):
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


@pytest.mark.gpu
def test_cuda_default_backend_on_gpu():
  assert jnat.available_backends("gpu")[0] == "cuda"
  q = jnp.ones((1, 9, 8, 2, 16), jnp.bfloat16)
  np.testing.assert_allclose(np.asarray(jnat.na2d(q, q, q, kernel_size=3), np.float32), 1.0)


@pytest.mark.gpu
def test_cuda_vmap_and_jit():
  q, k, v, rpb, _, _ = random_inputs(5, 3, (9, 10), 2, 1, 16, rpb_shape=(5, 5))
  f = lambda backend: jax.jit(jax.vmap(
      lambda q, k, v: jnat.na2d(q[None], k[None], v[None], kernel_size=3, rpb=rpb,
                                backend=backend)[0]))
  np.testing.assert_allclose(f("cuda")(q, k, v), f("xla")(q, k, v), atol=2e-5, rtol=0)


# --- The handlers' own validation, called directly with attributes that lie. ---

def _direct(target, results, *args, **attrs):
  base = dict(kernel_size=np.array([1, 3, 3], np.int64), stride=np.array([1, 1, 1], np.int64),
              dilation=np.array([1, 1, 1], np.int64), is_causal=np.array([0, 0, 0], np.int64))
  base.update(attrs)
  return jax.ffi.ffi_call(target, results)(*args, **base)


@functools.lru_cache(maxsize=None)
def _q6():
  return jnp.ones((1, 1, 8, 9, 2, 4))


@pytest.mark.gpu
@pytest.mark.parametrize("attrs, args, match", [
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
], ids=lambda x: None)
def test_cuda_handler_validates_directly(attrs, args, match):
  q = _q6()
  no_rpb = jnp.zeros((0,), jnp.float32)
  args = {
      None: (q, q, q, no_rpb),
      "gqa": (q, jnp.ones((1, 1, 8, 9, 3, 4)), jnp.ones((1, 1, 8, 9, 3, 4)), no_rpb),
      "spatial": (q, q[:, :, :4], q[:, :, :4], no_rpb),
      "rpb": (q, q, q, jnp.zeros((2, 1, 3, 3))),
      "rank": (q[0], q[0], q[0], no_rpb),
      "dtype": (q, q, q.astype(jnp.bfloat16), no_rpb),
  }[args]
  results = [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(q.shape[:-1],
                                                                          jnp.float32)]
  with pytest.raises(Exception, match="(?i)INVALID_ARGUMENT") as info:
    jax.block_until_ready(_direct("jnat_na_fwd", results, *args, scale=np.float32(0.5), **attrs))
  assert any(w.lower() in str(info.value).lower() for w in match.split("|")), str(info.value)


@pytest.mark.gpu
def test_cuda_handler_rejects_wrong_output_shape():
  q = _q6()
  bad = [jax.ShapeDtypeStruct((1, 1, 8, 9, 2, 5), jnp.float32),
         jax.ShapeDtypeStruct(q.shape[:-1], jnp.float32)]
  with pytest.raises(Exception, match="(?i)INVALID_ARGUMENT"):
    jax.block_until_ready(_direct("jnat_na_fwd", bad, q, q, q, jnp.zeros((0,), jnp.float32),
                                  scale=np.float32(1)))
