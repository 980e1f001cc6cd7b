"""Every backend against NATTEN's own outputs and gradients (tests/data/natten_golden.npz)."""

import jax.numpy as jnp
import pytest

from na_testing import (ALL_BACKENDS, GOLDEN, WEIGHT_CASES, assert_close,
                        check_fused_against_natten, check_unfused_against_natten, natten_args,
                        natten_vjp_fn)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("case", GOLDEN)
def test_fused_matches_natten(case, backend):
  check_fused_against_natten(case, backend)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("case", WEIGHT_CASES)
def test_unfused_matches_natten_weights(case, backend):
  check_unfused_against_natten(case, backend)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("case", ["v021-c06", "v021-c10", "v017-c06"])
def test_half_precision_close_to_float32(case, backend, dtype):
  """The golden inputs rounded to ``dtype``; the float32 xla reference runs on the same
  rounded inputs, so only the kernel's error shows."""
  cfg, a = GOLDEN[case].config, GOLDEN[case].arrays
  rank, args = natten_args(cfg)
  rounded = {n: jnp.asarray(a[n], dtype) for n in ("q", "k", "v", "dout")}
  out, _, grads = natten_vjp_fn(rank, backend, *args.values())(
      rounded["q"], rounded["k"], rounded["v"], a.get("rpb"), rounded["dout"])
  ref_out, _, ref_grads = natten_vjp_fn(rank, "xla", *args.values())(
      *(rounded[n].astype(jnp.float32) for n in ("q", "k", "v")), a.get("rpb"),
      rounded["dout"].astype(jnp.float32))
  assert out.dtype == jnp.dtype(dtype)
  assert_close(out, ref_out, f"{dtype}/float32", "out")
  for name, grad, ref in zip(("dq", "dk", "dv"), grads, ref_grads):
    assert_close(grad, ref, f"{dtype}/float32", name)
