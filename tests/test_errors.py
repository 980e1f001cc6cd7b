"""Bad input: a ValueError naming the argument and the rule, before any kernel runs; and the
FFI handlers' own validation when they are called directly with inconsistent attributes."""

import jax
import jax.numpy as jnp
import pytest

import jnat
from na_testing import (COMPILED_BACKENDS, FWD_VALIDATION_CASES, assert_fwd_handler_rejects,
                        assert_fwd_handler_rejects_wrong_output_shape)

Q = jnp.zeros((1, 8, 9, 2, 4))


def call(**overrides):
  args = dict(query=Q, key=Q, value=Q, kernel_size=3)
  args.update(overrides)
  return jnat.na2d(**args)


@pytest.mark.parametrize("overrides, match", [
    (dict(query=jnp.zeros((1, 8, 2, 4))), r"query.shape=.*rank 5"),
    (dict(key=jnp.zeros((1, 8, 8, 2, 4))), r"key.shape=.*match query.shape"),
    (dict(value=jnp.zeros((1, 8, 9, 2, 8))), r"key.shape=.*value.shape=.*equal"),
    (dict(key=jnp.zeros((1, 8, 9, 2, 8)), value=jnp.zeros((1, 8, 9, 2, 8))), r"head_dim"),
    (dict(key=jnp.zeros((1, 8, 9, 3, 4)), value=jnp.zeros((1, 8, 9, 3, 4))), r"must divide"),
    (dict(value=Q.astype(jnp.bfloat16)), r"share one dtype"),
    (dict(kernel_size=1), r"kernel_size=\(1, 1\).*>= 2"),
    (dict(kernel_size=(3, 3, 3)), r"kernel_size=.*one entry per spatial axis"),
    (dict(kernel_size="3"), r"kernel_size='3'"),
    (dict(kernel_size=(9, 3)), r"kernel_size \* dilation must be <= .*axis 0: 9 \* 1 > 8"),
    (dict(dilation=(1, 4)), r"axis 1: 3 \* 4 > 9"),
    (dict(dilation=0), r"dilation=.*>= 1"),
    (dict(stride=0), r"stride=.*\[1, kernel_size\]"),
    (dict(stride=(1, 4)), r"stride=.*axis 1: stride 4, kernel_size 3"),
    (dict(is_causal=1), r"is_causal=1 must be a bool"),
    (dict(rpb=jnp.zeros((2, 3, 3))), r"rpb.shape=\(2, 3, 3\) must be .*\(2, 5, 5\)"),
    (dict(additional_keys=jnp.zeros((1, 3, 2, 4))), r"given together"),
    (dict(additional_keys=jnp.zeros((1, 3, 2, 5)), additional_values=jnp.zeros((1, 3, 2, 5))),
     r"additional_keys.shape=.*head_dim=4"),
    (dict(backend="tpu-magic"), r"backend='tpu-magic' is unknown"),
    (dict(backend="cuda"), r"backend='cuda' is not available"),
    (dict(query=Q.astype(jnp.int32), key=Q.astype(jnp.int32), value=Q.astype(jnp.int32)),
     r"query.dtype=int32 is not supported"),
], ids=lambda x: x if isinstance(x, str) else None)
def test_bad_input_raises_value_error(overrides, match):
  with pytest.raises(ValueError, match=match):
    call(**overrides)


def test_errors_raise_at_trace_time_under_jit():
  with pytest.raises(ValueError, match="kernel_size"):
    jax.jit(lambda q: jnat.na2d(q, q, q, kernel_size=(9, 3))).trace(Q)


@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
def test_compiled_backend_rejects_float64(backend):
  with jax.enable_x64(True):
    q = jnp.zeros((1, 8, 9, 2, 4), jnp.float64)
    with pytest.raises(ValueError, match=r"query.dtype=float64 is not supported"):
      jnat.na2d(q, q, q, kernel_size=3, backend=backend)
    assert jnat.na2d(q, q, q, kernel_size=3).dtype == jnp.float64  # None falls back to xla


def test_unfused_bad_input():
  with pytest.raises(ValueError, match=r"attn.shape=.*prod\(kernel_size\)=9"):
    jnat.na2d_av(jnp.zeros((1, 8, 9, 2, 8)), Q, kernel_size=3)
  with pytest.raises(ValueError, match=r"attn.dtype=.*value.dtype"):
    jnat.na2d_av(jnp.zeros((1, 8, 9, 2, 9), jnp.bfloat16), Q, kernel_size=3)
  with pytest.raises(ValueError, match=r"stride="):
    jnat.na2d_qk(Q, Q, kernel_size=3, stride=5)


# --- The handlers themselves, called directly with attributes that lie about the buffers. ---

@pytest.mark.skipif("cpu" not in COMPILED_BACKENDS, reason="CPU kernels not built")
@pytest.mark.parametrize("attrs, inputs, match", FWD_VALIDATION_CASES, ids=lambda x: None)
def test_handler_validates_directly(attrs, inputs, match):
  assert_fwd_handler_rejects(attrs, inputs, match)


@pytest.mark.skipif("cpu" not in COMPILED_BACKENDS, reason="CPU kernels not built")
def test_handler_rejects_wrong_output_shape():
  assert_fwd_handler_rejects_wrong_output_shape()
