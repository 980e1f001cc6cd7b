"""Every backend against NATTEN's own outputs and gradients (tests/data/natten_golden.npz)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from na_testing import ALL_BACKENDS, HALF_TOL, golden_cases, op, rel_err

CASES = golden_cases()


def _args(cfg):
  return dict(kernel_size=tuple(cfg["kernel_size"]), stride=tuple(cfg["stride"]),
              dilation=tuple(cfg["dilation"]), is_causal=tuple(cfg["is_causal"]))


@functools.lru_cache(maxsize=None)
def _fused_fn(rank, backend, kernel_size, stride, dilation, is_causal):
  def f(q, k, v, rpb):
    return op(rank)(q, k, v, kernel_size, stride, dilation, is_causal, rpb=rpb, return_lse=True,
                    backend=backend)
  return jax.jit(lambda q, k, v, rpb, dout: jax.vjp(f, q, k, v, rpb)[1](
      (dout, jnp.zeros(q.shape[:-1], jnp.float32))) + f(q, k, v, rpb))


def _check_fused_against_natten(case, backend):
  """Output, lse and gradients of ``backend`` against NATTEN's on one golden case."""
  _, cfg, a = case
  run = _fused_fn(cfg["na_dim"], backend, **_args(cfg))
  rpb = a.get("rpb")
  dq, dk, dv, drpb, out, lse = run(a["q"], a["k"], a["v"], rpb, a["dout"])
  np.testing.assert_allclose(out, a["out"], atol=2e-5, rtol=0)
  if "lse" in a:
    np.testing.assert_allclose(lse, a["lse"], atol=2e-5, rtol=0)
  for name, grad in (("dq", dq), ("dk", dk), ("dv", dv), ("drpb", drpb)):
    if name in a:
      assert rel_err(grad, a[name]) <= 1e-4, name


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_fused_matches_natten(case, backend):
  _check_fused_against_natten(case, backend)


def _check_unfused_against_natten(case, backend):
  """NATTEN 0.17's own pipeline: na*d_qk(q * scale, k, rpb) -> softmax -> na*d_av."""
  _, cfg, a = case
  rank = cfg["na_dim"]
  scale = a["q"].shape[-1] ** -0.5
  logits = op(rank, "_qk")(a["q"] * scale, a["k"], rpb=a.get("rpb"), backend=backend,
                           **_args(cfg))
  weights = jax.nn.softmax(logits, axis=-1)
  # NATTEN 0.17 lays weights out heads-first: [B, H, *spatial, prod(K)].
  np.testing.assert_allclose(jnp.moveaxis(weights, -2, 1), a["attn"], atol=2e-6, rtol=0)
  out = op(rank, "_av")(weights, a["v"], backend=backend, **_args(cfg))
  np.testing.assert_allclose(out, a["out"], atol=2e-5, rtol=0)


WEIGHT_CASES = [c for c in CASES if "attn" in c[2]]


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("case", WEIGHT_CASES, ids=[c[0] for c in WEIGHT_CASES])
def test_unfused_matches_natten_weights(case, backend):
  _check_unfused_against_natten(case, backend)


HALF_CASES = [c for c in CASES if c[0] in ("v021-c06", "v021-c10", "v017-c06")]


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("case", HALF_CASES, ids=[c[0] for c in HALF_CASES])
def test_half_precision_close_to_float32(case, backend, dtype):
  _, cfg, a = case
  run = _fused_fn(cfg["na_dim"], backend, **_args(cfg))
  cast = lambda x: jnp.asarray(x, dtype)
  rpb = a.get("rpb")
  low = run(cast(a["q"]), cast(a["k"]), cast(a["v"]), rpb, cast(a["dout"]))
  # The float32 reference runs on the same rounded inputs, so only the kernel's error shows.
  ref = _fused_fn(cfg["na_dim"], "xla", **_args(cfg))(
      *(jnp.asarray(cast(a[n]), jnp.float32) for n in ("q", "k", "v")), rpb,
      jnp.asarray(cast(a["dout"]), jnp.float32))
  out_low, out_ref = low[4], ref[4]
  assert out_low.dtype == jnp.dtype(dtype)
  np.testing.assert_allclose(np.asarray(out_low, np.float32), out_ref, **HALF_TOL[dtype])
  for g_low, g_ref in zip(low[:3], ref[:3]):
    assert rel_err(np.asarray(g_low, np.float32), g_ref) <= 2e-2
