"""The "cuda" backend: lowering checks that run anywhere, kernel checks that need a GPU.

On a machine without a GPU only the first group runs: the CUDA module (when built) exposes
every target, and lowering for the "cuda" platform emits the jnat custom calls with the
attributes the handlers decode. The `gpu`-marked tests (skipped without a GPU, see
conftest.py) hold the CUDA kernels to NATTEN's golden data and to the xla reference on
random configurations, every dtype, head dims on both sides of the tensor-core buckets, the
unfused ops, determinism, and the handlers' own validation.
"""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

import jnat
from jnat import _checks, _ffi
from na_testing import (BUCKETS, FWD_VALIDATION_CASES, GOLDEN, WEIGHT_CASES, assert_close,
                        assert_fwd_handler_rejects, assert_fwd_handler_rejects_wrong_output_shape,
                        bucket_config, check_fused_against_natten, check_fused_against_reference,
                        check_unfused_against_natten, check_unfused_against_reference,
                        config_inputs, fused_with_grads, nbhd_args, random_inputs)
from na_testing import EXAMPLES, MASKS, SEEDS, SETTINGS, per_bucket

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

@pytest.mark.gpu
@pytest.mark.parametrize("case", GOLDEN)
def test_cuda_matches_natten(case):
  check_fused_against_natten(case, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("case", WEIGHT_CASES)
def test_cuda_unfused_matches_natten_weights(case):
  check_unfused_against_natten(case, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("bucket", range(len(BUCKETS)))
@settings(SETTINGS, max_examples=per_bucket(EXAMPLES))
@given(seed=SEEDS, mask=MASKS)
def test_cuda_fused_matches_reference(bucket, seed, mask):
  check_fused_against_reference(bucket_config(bucket, seed, mask), "cuda")


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
  check_fused_against_reference(c, "cuda")


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
  check_fused_against_reference(c, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("bucket", range(len(BUCKETS)))
@settings(SETTINGS, max_examples=per_bucket(EXAMPLES // 4))
@given(seed=SEEDS)
def test_cuda_unfused_matches_reference(bucket, seed):
  check_unfused_against_reference(bucket_config(bucket, seed, mask=1), "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_cuda_unfused_half_and_single(dtype):
  c = dict(HEAD_DIM_CASE, dim=32, dtype=dtype)
  q, k, v, rpb, _, _ = config_inputs(c)
  args = nbhd_args(c)
  weights = jax.nn.softmax(jnat.na2d_qk(q, k, rpb=rpb, backend="xla", **args).astype(
      jnp.float32), -1).astype(dtype)
  out = jnat.na2d_av(weights, v, backend="cuda", **args)
  assert out.dtype == jnp.dtype(dtype)
  assert_close(out, jnat.na2d_av(weights, v, backend="xla", **args), dtype, "out")
  cu = np.asarray(jnat.na2d_qk(q, k, rpb=rpb, backend="cuda", **args), np.float32)
  ref = np.asarray(jnat.na2d_qk(q, k, rpb=rpb, backend="xla", **args), np.float32)
  np.testing.assert_array_equal(np.isinf(cu), np.isinf(ref))
  finite = np.isfinite(ref)
  assert_close(cu[finite], ref[finite], dtype, "logits")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_cuda_backward_is_deterministic(dtype):
  c = dict(HEAD_DIM_CASE, dim=64, dtype=dtype)
  inputs = config_inputs(c)
  first = fused_with_grads(c, "cuda", inputs)
  second = fused_with_grads(c, "cuda", inputs)
  for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second)):
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


@pytest.mark.gpu
def test_cuda_is_opt_in_on_gpu():
  assert "cuda" in jnat.available_backends("gpu")
  q = jnp.ones((1, 9, 8, 2, 16), jnp.bfloat16)
  hlo = jax.jit(lambda q: jnat.na2d(q, q, q, kernel_size=3)).lower(q).as_text()
  assert "jnat_na_fwd" not in hlo
  out = jnat.na2d(q, q, q, kernel_size=3, backend="cuda")
  np.testing.assert_allclose(np.asarray(out, np.float32), 1.0)


@pytest.mark.gpu
def test_cuda_vmap_and_jit():
  q, k, v, rpb, _, _ = random_inputs(5, 3, (9, 10), 2, 1, 16, rpb_shape=(5, 5))
  f = lambda backend: jax.jit(jax.vmap(
      lambda q, k, v: jnat.na2d(q[None], k[None], v[None], kernel_size=3, rpb=rpb,
                                backend=backend)[0]))
  assert_close(f("cuda")(q, k, v), f("xla")(q, k, v), "float32", "out")


# --- The handlers' own validation, called directly with attributes that lie. ---

@pytest.mark.gpu
@pytest.mark.parametrize("attrs, inputs, match", FWD_VALIDATION_CASES, ids=lambda x: None)
def test_cuda_handler_validates_directly(attrs, inputs, match):
  assert_fwd_handler_rejects(attrs, inputs, match)


@pytest.mark.gpu
def test_cuda_handler_rejects_wrong_output_shape():
  assert_fwd_handler_rejects_wrong_output_shape()
