"""jit, vmap (nested, per-example rpb), grad and remat on every backend."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jnat
from jnat import _ffi
from na_testing import ALL_BACKENDS, COMPILED_BACKENDS, random_inputs, rel_err

NEEDS_CPU_KERNELS = pytest.mark.skipif("cpu" not in COMPILED_BACKENDS, reason="CPU kernels not built")

KW = dict(kernel_size=(3, 4), stride=(1, 2), dilation=(2, 1), is_causal=(True, False))


def _inputs(leading=()):
  q, k, v, rpb, ak, av = random_inputs(1, 2, (7, 9), 4, 2, 8, rpb_shape=(5, 7), extra_tokens=2)
  if leading:
    grow = lambda x, s: jax.random.normal(jax.random.key(s), leading + x.shape, x.dtype)
    q, k, v, rpb = grow(q, 1), grow(k, 2), grow(v, 3), grow(rpb, 4)
  return q, k, v, rpb, ak, av


def _loss(backend):
  def loss(q, k, v, rpb, ak, av):
    out = jnat.na2d(q, k, v, rpb=rpb, additional_keys=ak, additional_values=av, backend=backend,
                    **KW)
    return jnp.sum(jnp.sin(out))
  return loss


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_jit_matches_eager_and_hits_cache(backend):
  traces = []

  def f(q, k, v):
    traces.append(1)
    return jnat.na2d(q, k, v, backend=backend, **KW)

  q, k, v, *_ = _inputs()
  jitted = jax.jit(f)
  np.testing.assert_allclose(jitted(q, k, v), f(q, k, v), atol=1e-6)
  jitted(q + 1, k, v)
  assert len(traces) == 2  # one eager call, one trace: the second jitted call hit the cache


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_vmap_matches_loop_with_per_example_rpb(backend):
  q, k, v, rpb, ak, av = _inputs(leading=(3,))
  f = lambda q, k, v, rpb: jnat.na2d(q, k, v, rpb=rpb, backend=backend, **KW)
  # key is shared across the vmapped axis: exercises broadcasting of unbatched operands.
  got = jax.jit(jax.vmap(f, in_axes=(0, None, 0, 0)))(q, k[0], v, rpb)
  want = jnp.stack([f(q[i], k[0], v[i], rpb[i]) for i in range(3)])
  np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_nested_vmap_of_grad(backend):
  q, k, v, rpb, ak, av = _inputs(leading=(2, 2))
  grad = jax.grad(_loss(backend), argnums=(0, 1, 2, 3))
  batched = jax.jit(jax.vmap(jax.vmap(grad, in_axes=(0, 0, 0, 0, None, None)),
                             in_axes=(0, 0, 0, 0, None, None)))(q, k, v, rpb, ak, av)
  for i in range(2):
    for j in range(2):
      single = grad(q[i, j], k[i, j], v[i, j], rpb[i, j], ak, av)
      for b, s in zip(batched, single):
        np.testing.assert_allclose(b[i, j], s, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_remat_gives_same_gradients(backend):
  args = _inputs()
  plain = jax.jit(jax.grad(_loss(backend), argnums=(0, 1, 2, 3, 4, 5)))(*args)
  remat = jax.jit(jax.grad(jax.checkpoint(_loss(backend)), argnums=(0, 1, 2, 3, 4, 5)))(*args)
  for a, b in zip(plain, remat):
    np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_unfused_under_vmap_and_grad(backend):
  q, k, v, rpb, *_ = _inputs(leading=(2,))
  def pipeline(q, k, v, rpb):
    attn = jax.nn.softmax(jnat.na2d_qk(q, k, rpb=rpb, backend=backend, **KW), axis=-1)
    return jnp.sum(jnp.cos(jnat.na2d_av(attn, v, backend=backend, **KW)))
  grad = jax.grad(pipeline, argnums=(0, 1, 2, 3))
  batched = jax.jit(jax.vmap(grad))(q, k, v, rpb)
  for i in range(2):
    for b, s in zip(batched, grad(q[i], k[i], v[i], rpb[i])):
      np.testing.assert_allclose(b[i], s, atol=2e-5, rtol=1e-5)


def test_reference_chunking_matches_single_pass(monkeypatch):
  """Large inputs run in rematerialised chunks of rows; results must not change."""
  from jnat import reference
  args = _inputs()
  grad = lambda: jax.grad(_loss("xla"), argnums=(0, 1, 2, 3))  # fresh function: no cache hit
  whole = jax.jit(grad())(*args)
  monkeypatch.setattr(reference, "_CHUNK_ELEMENTS", 2000)  # forces chunks of one row
  assert "scan" in str(jax.make_jaxpr(grad())(*args))
  chunked = jax.jit(grad())(*args)
  for a, b in zip(whole, chunked):  # only float32 summation order may differ
    assert rel_err(a, b) <= 1e-6


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_bfloat16_rpb_is_accepted(backend):
  q, k, v, rpb, *_ = _inputs()
  low = rpb.astype(jnp.bfloat16)
  got = jnat.na2d(q, k, v, rpb=low, backend=backend, **KW)
  want = jnat.na2d(q, k, v, rpb=low.astype(jnp.float32), backend=backend, **KW)
  np.testing.assert_allclose(got, want, atol=1e-6)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_second_order_gradients_match_reference(backend):
  """grad of grad (fused and unfused): the kernels' backward is differentiable too.

  The kernels take their second derivative from the reference by construction, so this
  checks the wiring (the first derivative inside comes from the kernels); the reference's
  own second order is held to finite differences in test_backends' float64 check_grads.
  """
  q, k, v, rpb, ak, av = _inputs()
  def fused(q, backend):
    return jnp.sum(jax.grad(lambda q: _loss(backend)(q, k, v, rpb, ak, av))(q) ** 2)
  def unfused(q, backend):
    def loss(q):
      attn = jax.nn.softmax(jnat.na2d_qk(q, k, rpb=rpb, backend=backend, **KW), axis=-1)
      return jnp.sum(jnp.sin(jnat.na2d_av(attn, v, backend=backend, **KW)))
    return jnp.sum(jax.grad(loss)(q) ** 2)
  for f in (fused, unfused):
    got = jax.jit(jax.grad(f), static_argnums=1)(q, backend)
    want = jax.jit(jax.grad(f), static_argnums=1)(q, "xla")
    assert rel_err(got, want) <= 1e-4


def _lowered(fn, platform, *args):
  return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()


def test_backend_follows_the_lowering_platform():
  """backend=None picks per lowering platform, whatever JAX's default backend is."""
  q, k, v, *_ = _inputs()
  fn = lambda q, k, v: jnat.na2d(q, k, v, **KW)
  for platform in ("cpu", "cuda", "rocm", "tpu"):
    hlo = _lowered(fn, platform, q, k, v)
    kernel = platform == "cpu" and "cpu" in _ffi.compiled_platforms()  # "cuda" is opt-in
    assert ("custom_call @jnat_na_fwd(" in hlo) == kernel, platform


@NEEDS_CPU_KERNELS
def test_cpu_backward_takes_dlse_not_the_row_term():
  """On CPU the backward kernel sums rowsum(dout * out) itself (jnat_na_bwd_dlse); other
  platforms get jnat_na_bwd and the row term computed before the call."""
  q, k, v, *_ = _inputs()
  loss = lambda q, k, v: jnp.sum(jnp.sin(jnat.na2d(q, k, v, backend="cpu", **KW)))
  hlo = _lowered(jax.grad(loss, argnums=(0, 1, 2)), "cpu", q, k, v)
  assert "custom_call @jnat_na_bwd_dlse(" in hlo and "custom_call @jnat_na_bwd(" not in hlo


@NEEDS_CPU_KERNELS
def test_explicit_backend_under_jit_ignores_default_backend(monkeypatch):
  """On a GPU host, a CPU-placed jit with backend="cpu" runs the CPU kernels: the choice
  must not consult jax.default_backend() (simulated here)."""
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  q, k, v, *_ = _inputs()
  got = jax.jit(lambda q, k, v: jnat.na2d(q, k, v, backend="cpu", **KW))(q, k, v)
  want = jnat.na2d(q, k, v, backend="xla", **KW)
  np.testing.assert_allclose(got, want, atol=2e-5)


@NEEDS_CPU_KERNELS
def test_explicit_backend_lowered_for_another_platform_fails():
  q, k, v, *_ = _inputs()
  with pytest.raises(NotImplementedError, match="platform_index.*not found for platform tpu"):
    _lowered(lambda q, k, v: jnat.na2d(q, k, v, backend="cpu", **KW), "tpu", q, k, v)
