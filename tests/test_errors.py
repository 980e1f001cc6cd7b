"""Bad input: a ValueError naming jnat's op, the argument and the rule, raised when the op
is called (at trace time under jit), before any kernel runs; and the FFI handlers' own
validation when they are called directly with inconsistent attributes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jnat
from jnat import _ffi
from na_testing import (COMPILED_BACKENDS, FWD_VALIDATION_CASES, Q6_SHAPE,
                        assert_fwd_handler_rejects,
                        assert_fwd_handler_rejects_wrong_output_shape, direct_call)

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
    (dict(key=jnp.zeros((1, 8, 9, 3, 4)), value=jnp.zeros((1, 8, 9, 3, 4))),
     r"key heads \(3\) must be >= 1 and divide the query heads \(2\)"),
    (dict(key=jnp.zeros((1, 8, 9, 0, 4)), value=jnp.zeros((1, 8, 9, 0, 4))),
     r"key heads \(0\) must be >= 1"),
    (dict(query=jnp.zeros((1, 8, 9, 2, 0)), key=jnp.zeros((1, 8, 9, 2, 0)),
          value=jnp.zeros((1, 8, 9, 2, 0))), r"head_dim must be >= 1"),
    (dict(scale="abc"), r"scale='abc' \(str\) must be a static Python number"),
    (dict(scale=jnp.float32(0.5)), r"scale=.* must be a static Python number"),
    (dict(scale=np.array([0.5])), r"scale=.* must be a static Python number"),
    (dict(scale=1j), r"scale=1j \(complex\) must be a static Python number"),
    (dict(scale=float("nan")), r"scale=nan must be finite"),
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
    (dict(query=Q.astype(jnp.int32), key=Q.astype(jnp.int32), value=Q.astype(jnp.int32)),
     r"query.dtype=int32 is not supported"),
], ids=lambda x: x if isinstance(x, str) else None)
def test_bad_input_raises_value_error(overrides, match):
  with pytest.raises(ValueError, match=r"^jnat\.na2d: .*" + match):
    call(**overrides)


def test_traced_scale_is_rejected():
  with pytest.raises(ValueError, match=r"scale=.*must be a static Python number"):
    jax.jit(lambda q, s: jnat.na2d(q, q, q, kernel_size=3, scale=s)).trace(Q, 0.5)


def test_backend_missing_from_the_build(monkeypatch):
  monkeypatch.setattr(_ffi, "compiled_platforms", lambda: ("cpu",))
  with pytest.raises(ValueError, match=r"backend='cuda' is not available: .*built without it "
                                       r"\(kernels compiled for: cpu\)"):
    call(backend="cuda")


def test_backend_for_another_platform_refuses_concrete_inputs():
  """Inputs committed to a CPU device: a backend that runs only on CUDA refuses them (on any
  host, GPU or not) unless this build lacks it altogether."""
  q = jax.device_put(Q, jax.devices("cpu")[0])
  match = (r"backend='cuda' runs on cuda, but the inputs are on 'cpu'"
           if "cuda" in _ffi.compiled_platforms() else r"backend='cuda' is not available")
  with pytest.raises(ValueError, match=match):
    jnat.na2d(q, q, q, kernel_size=3, backend="cuda")


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
  with pytest.raises(ValueError, match=r"^jnat.na2d_av: attn.shape=.*prod\(kernel_size\)=9"):
    jnat.na2d_av(jnp.zeros((1, 8, 9, 2, 8)), Q, kernel_size=3)
  with pytest.raises(ValueError, match=r"^jnat.na1d_av: value.dtype=int32 is not supported"):
    jnat.na1d_av(jnp.zeros((1, 8, 2, 3), jnp.int32), jnp.zeros((1, 8, 2, 4), jnp.int32), 3)
  with pytest.raises(ValueError, match=r"value heads \(0\) must be >= 1"):
    jnat.na1d_av(jnp.zeros((1, 8, 2, 3)), jnp.zeros((1, 8, 0, 4)), 3)
  with pytest.raises(ValueError, match=r"^jnat.na1d_qk: query, key must share one dtype, got "
                                       r"query.dtype=float32, key.dtype=bfloat16\.$"):
    jnat.na1d_qk(jnp.zeros((1, 8, 2, 4)), jnp.zeros((1, 8, 2, 4), jnp.bfloat16), 3)
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


@pytest.mark.skipif("cpu" not in COMPILED_BACKENDS, reason="CPU kernels not built")
@pytest.mark.parametrize("target, name", [("jnat_na_bwd", "delta"), ("jnat_na_bwd_dlse", "dlse")])
def test_backward_handlers_name_their_row_term(target, name):
  """A row-term operand of the wrong shape: the error names the target and the operand."""
  q, stat = jnp.ones(Q6_SHAPE), jnp.zeros(Q6_SHAPE[:-1])
  results = [jax.ShapeDtypeStruct(Q6_SHAPE, jnp.float32)] * 3 + [
      jax.ShapeDtypeStruct((0,), jnp.float32)]
  args = (q, q, q, jnp.zeros((0,), jnp.float32), q, stat)
  jax.block_until_ready(direct_call(target, results, *args, stat, scale=np.float32(0.5)))
  with pytest.raises(Exception, match=f"(?s)INVALID_ARGUMENT.*{target}.*{name}"):
    jax.block_until_ready(direct_call(target, results, *args, stat[..., :1],
                                      scale=np.float32(0.5)))
