"""The Flax modules: NATTEN parity, padding, dropout, dtypes and the NNX twin.

Parity tests compare against ``tests/torch_nat.py``'s copy of NATTEN's module (its own
attention, checked against NATTEN's outputs in ``test_convert.py``), with weights moved
over by ``jnat.convert``, which also checks that the parameter trees match name for name.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jnat
from jnat import convert
from jnat import nnx as jnat_nnx
from jnat.nn import NeighborhoodAttention

BACKENDS = jnat.available_backends()


@dataclasses.dataclass(frozen=True)
class Case:
  shape: tuple  # spatial
  kernel_size: int | tuple
  dilation: int | tuple = 1
  stride: int | tuple = 1
  is_causal: bool | tuple = False
  rel_pos_bias: bool = True
  qkv_bias: bool = True
  qk_scale: float | None = None
  heads: int = 2

  def per_axis(self, value):
    return tuple(value) if isinstance(value, tuple) else (value,) * len(self.shape)


CASES = {
    "1d": Case((20,), 5, dilation=2),
    "1d-causal-stride-even": Case((17,), 4, stride=2, is_causal=True, rel_pos_bias=False),
    "2d-dilated": Case((9, 11), (3, 5), dilation=(2, 1), qk_scale=0.3),
    "2d-causal-rpb": Case((8, 7), 3, is_causal=(True, False), qkv_bias=False),
    "2d-stride": Case((10, 9), (4, 3), stride=(2, 3)),
    "2d-padded": Case((5, 6), 7),
    "2d-padded-dilated": Case((4, 9), (3, 3), dilation=2, heads=1),
    "3d-padded": Case((4, 5, 6), (3, 3, 3), dilation=(1, 2, 1)),
    "3d-causal-stride": Case((5, 4, 6), 3, stride=(1, 2, 3), is_causal=(True, False, True),
                             rel_pos_bias=False),
}


def _natten_module(case, channels, seed=0):
  torch = pytest.importorskip("torch")
  import torch_nat

  torch.manual_seed(seed)
  module = torch_nat.NeighborhoodAttention(
      channels, case.heads, case.per_axis(case.kernel_size), dilation=case.per_axis(case.dilation),
      stride=case.per_axis(case.stride), is_causal=case.per_axis(case.is_causal),
      rel_pos_bias=case.rel_pos_bias, qkv_bias=case.qkv_bias, qk_scale=case.qk_scale,
      rank=len(case.shape))
  if module.rpb is not None:
    torch.nn.init.normal_(module.rpb, std=1.0)  # NATTEN's 0.02 would hide a mis-indexed bias
  return module


def _linen_module(case, **kwargs):
  return NeighborhoodAttention(
      num_heads=case.heads, kernel_size=case.kernel_size, stride=case.stride,
      dilation=case.dilation, is_causal=case.is_causal, qkv_bias=case.qkv_bias,
      rel_pos_bias=case.rel_pos_bias, qk_scale=case.qk_scale, **kwargs)


def _inputs(case, channels=8, batch=2, seed=0):
  shape = (batch, *case.shape, channels)
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_natten_module(name, backend):
  torch = pytest.importorskip("torch")
  case = CASES[name]
  x = _inputs(case)
  natten = _natten_module(case, x.shape[-1])
  layer = _linen_module(case, backend=backend)
  params = convert.convert_state_dict(natten.state_dict())
  fresh = jax.eval_shape(layer.init, jax.random.key(0), x)["params"]
  assert jax.tree.map(np.shape, params) == jax.tree.map(np.shape, fresh)
  with torch.no_grad():
    expected = natten(torch.from_numpy(x)).numpy()
  with jax.default_matmul_precision("highest"):  # no TF32 on GPUs
    out = jax.jit(layer.apply)({"params": params}, x)
  np.testing.assert_allclose(np.asarray(out), expected, atol=2e-5, rtol=0)


def test_gradients_match_natten_module():
  torch = pytest.importorskip("torch")
  case = CASES["2d-padded-dilated"]
  x = _inputs(case)
  natten = _natten_module(case, x.shape[-1])
  cotangent = np.random.default_rng(1).normal(size=x.shape).astype(np.float32)
  (natten(torch.from_numpy(x)) * torch.from_numpy(cotangent)).sum().backward()
  expected = convert.convert_state_dict({k: p.grad for k, p in natten.named_parameters()})
  params = convert.convert_state_dict(natten.state_dict())
  loss = lambda p: jnp.sum(_linen_module(case).apply({"params": p}, x) * cotangent)
  with jax.default_matmul_precision("highest"):
    grads = jax.jit(jax.grad(loss))(params)
  jax.tree.map(lambda g, e: np.testing.assert_allclose(g, e, atol=1e-4, rtol=1e-4), grads,
               expected)


def test_rank_and_shape_errors():
  layer = NeighborhoodAttention(num_heads=2, kernel_size=(3, 3))
  with pytest.raises(ValueError, match="kernel_size"):
    layer.init(jax.random.key(0), jnp.ones((1, 8, 8, 8, 4)))
  with pytest.raises(ValueError, match="divisible"):
    layer.init(jax.random.key(0), jnp.ones((1, 8, 8, 5)))
  with pytest.raises(ValueError, match="one kernel size per spatial axis"):
    jnat_nnx.NeighborhoodAttention(8, 2, 3, rel_pos_bias=True, rngs=nnx.Rngs(0))


DROPOUT = Case((6, 7), 3, dilation=(2, 1))


def _init(layer, x, seed=0):
  """Random parameters of the layer's shapes (cheaper than compiling its init)."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(functools.partial(layer.init, deterministic=True), jax.random.key(0),
                          x)["params"]
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.3, s.shape), s.dtype), shapes)


def _apply(layer, params, x, **kwargs):
  return jax.jit(functools.partial(layer.apply, **kwargs))({"params": params}, x)


def _train(layer, params, x, seed):
  return layer.apply({"params": params}, x, deterministic=False,
                     rngs={"dropout": jax.random.key(seed)})


@pytest.mark.parametrize("rates", [(0.4, 0.0), (0.0, 0.3), (0.2, 0.2)],
                         ids=["attn_drop", "proj_drop", "both"])
def test_dropout_is_deterministic_given_the_rng(rates):
  x = _inputs(DROPOUT)
  layer = _linen_module(DROPOUT, attn_drop=rates[0], proj_drop=rates[1])
  params = _init(layer, x)
  train = jax.jit(lambda seed: _train(layer, params, x, seed))
  a, b, c = train(1), train(1), train(2)
  np.testing.assert_array_equal(a, b)
  assert np.abs(a - c).max() > 1e-3
  # Without dropout (deterministic, or rates of 0) the fused op gives the same result.
  plain = _apply(_linen_module(DROPOUT), params, x)
  np.testing.assert_allclose(_apply(layer, params, x, deterministic=True), plain, atol=1e-6)
  assert np.abs(a - plain).max() > 1e-3


def test_attention_dropout_is_unbiased():
  # Inverted dropout on the softmax weights: averaged over masks it gives the plain output.
  x = _inputs(DROPOUT, batch=1)
  layer = _linen_module(DROPOUT, attn_drop=0.5)
  params = _init(layer, x)
  samples = jax.jit(jax.vmap(lambda seed: _train(layer, params, x, seed)))(jnp.arange(1000))
  plain = _apply(layer, params, x, deterministic=True)
  spread = samples.std(0) / np.sqrt(len(samples))
  assert np.all(np.abs(samples.mean(0) - plain) < 5 * spread + 1e-6)
  assert spread.max() > 1e-3


def test_bfloat16_compute_with_float32_params():
  case = CASES["2d-dilated"]
  x = _inputs(case)
  layer = _linen_module(case)
  params = _init(layer, x)
  half = _linen_module(case, dtype=jnp.bfloat16)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(
      jax.eval_shape(half.init, jax.random.key(0), x)))
  out = _apply(half, params, x)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32), _apply(layer, params, x),
                             atol=5e-2, rtol=5e-2)
  grads = jax.jit(jax.grad(lambda p: half.apply({"params": p}, x).astype(jnp.float32).sum()))(
      params)
  assert all(g.dtype == jnp.float32 and np.isfinite(g).all() for g in jax.tree.leaves(grads))
  assert np.abs(grads["rpb"]).max() > 0


def _nnx_module(case, channels, **kwargs):
  return jnat_nnx.NeighborhoodAttention(
      channels, case.heads, case.per_axis(case.kernel_size), stride=case.stride,
      dilation=case.dilation, is_causal=case.is_causal, qkv_bias=case.qkv_bias,
      rel_pos_bias=case.rel_pos_bias, qk_scale=case.qk_scale, **kwargs)


@pytest.mark.parametrize("name", ["2d-padded-dilated", "3d-causal-stride"])
def test_nnx_matches_linen(name):
  case = CASES[name]
  x = _inputs(case)
  params = _init(_linen_module(case), x)
  layer = _nnx_module(case, x.shape[-1], rngs=nnx.Rngs(1))
  state = nnx.state(layer, nnx.Param)
  shapes = jax.tree.map(np.shape, nnx.to_pure_dict(state))
  assert shapes == jax.tree.map(np.shape, params)
  nnx.replace_by_pure_dict(state, params)
  nnx.update(layer, state)
  np.testing.assert_allclose(nnx.jit(layer)(x), _apply(_linen_module(case), params, x),
                             atol=1e-6)


def test_nnx_dropout_follows_train_and_eval():
  x = _inputs(DROPOUT)
  make = lambda **rates: _nnx_module(DROPOUT, x.shape[-1], rngs=nnx.Rngs(params=0, dropout=5),
                                     **rates)
  forward = nnx.jit(lambda layer, x: layer(x))
  layer, twin = make(attn_drop=0.3, proj_drop=0.1), make(attn_drop=0.3, proj_drop=0.1)
  a = forward(layer, x)
  np.testing.assert_array_equal(a, forward(twin, x))  # same seeds, same masks
  assert np.abs(forward(layer, x) - a).max() > 1e-3  # the rng stream advances
  plain = forward(make(), x)
  np.testing.assert_allclose(nnx.jit(lambda m, x: m(x, deterministic=True))(twin, x), plain,
                             atol=1e-6)
  layer.eval()
  np.testing.assert_allclose(forward(layer, x), plain, atol=1e-6)
