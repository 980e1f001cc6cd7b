"""The NAT/DiNAT zoo: paper sizes, FLOP counting, any resolution, training mode, init,
weight decay and checkpoints."""

import math
import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jnat import flops
from jnat import models
from jnat.models import checkpoint
from jnat.models.nat import DropPath
from jnat.nn import NeighborhoodAttention


@pytest.mark.parametrize("name", sorted(models.PAPER_STATS))
def test_params_and_flops_match_the_paper(name):
  paper_params, paper_gflops = models.PAPER_STATS[name]
  params, macs = flops.profile(models.get(name), (1, 224, 224, 3))
  assert params / 1e6 == pytest.approx(paper_params, rel=0.02)
  assert macs / 1e9 == pytest.approx(paper_gflops, rel=0.02)


class _Counted(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(6, (3, 3), strides=2, feature_group_count=2)(x)  # [1, 8, 5, 6]
    x = NeighborhoodAttention(num_heads=3, kernel_size=(7, 3), dilation=(1, 2))(x)  # pads to 8×6
    return nn.Dense(5)(x)


def test_flop_counter_by_hand():
  params, macs = flops.profile(_Counted(), (1, 16, 10, 4))
  conv = 8 * 5 * 6 * 3 * 3 * 2  # outputs × window × input channels per group
  qkv_proj = 8 * 6 * 6 * 18 + 8 * 5 * 6 * 6  # qkv on the padded 8×6 input, proj after crop
  attention = 2 * 8 * 6 * 3 * 2 * 21  # q·k and weights·v: tokens × heads × head_dim × window
  dense = 8 * 5 * 6 * 5
  assert macs == conv + qkv_proj + attention + dense
  assert params == (3 * 3 * 2 * 6 + 6) + (6 * 18 + 18) + (6 * 6 + 6) + (6 * 5 + 5)


def _random_params(model, seed=0):
  """Random parameters of the model's shapes, without compiling its initialisation."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda leaf: jnp.asarray(rng.normal(0, 0.2, leaf.shape), leaf.dtype),
                      models.abstract_params(model))


def _images(*shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


@pytest.mark.parametrize("name", ["nat_nano", "dinat_nano"])
def test_any_resolution_and_features(name):
  model = models.get(name, num_classes=7)
  images = _images(2, 52, 90, 3)
  params = _random_params(model)
  forward = jax.jit(lambda p, x: model.apply({"params": p}, x, return_features=True))
  logits, features = forward(params, images)
  assert logits.shape == (2, 7) and np.isfinite(logits).all()
  height, width, channels = 13, 23, model.embed_dim  # after the stride-4 tokenizer
  assert features["stem"].shape == (2, height, width, channels)
  for i in range(4):
    assert features[f"level_{i}"].shape == (2, height, width, channels)
    height, width, channels = -(-height // 2), -(-width // 2), 2 * channels
  assert features["pooled"].shape == (2, model.embed_dim * 8)
  head = params["head"]
  np.testing.assert_allclose(features["pooled"] @ head["kernel"] + head["bias"], logits,
                             atol=1e-5)


def test_train_mode_is_deterministic_given_the_rng():
  model = models.nat_nano(depths=(1, 1, 1, 1), drop_path_rate=0.5, drop_rate=0.1,
                          attn_drop_rate=0.1)
  images = _images(4, 32, 32, 3)
  params = _random_params(model)
  # An rbg key: threefry would dominate the compile time of the many dropout masks.
  train = jax.jit(lambda seed: model.apply(
      {"params": params}, images, train=True,
      rngs={"dropout": jax.random.key(seed, impl="rbg")}))
  a, b, c = train(1), train(1), train(2)
  np.testing.assert_array_equal(a, b)
  assert np.abs(a - c).max() > 1e-4
  evaluate = jax.jit(model.apply)({"params": params}, images)
  assert np.abs(a - evaluate).max() > 1e-4


def test_drop_path_drops_whole_samples():
  x = jnp.ones((4000, 3, 2))
  y = DropPath(0.25).apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(0)})
  per_sample = np.asarray(y).reshape(4000, -1)
  kept = per_sample[:, 0] > 0
  np.testing.assert_allclose(per_sample[kept], 1 / 0.75)
  np.testing.assert_array_equal(per_sample[~kept], 0)
  assert kept.mean() == pytest.approx(0.75, abs=0.03)


def test_bfloat16_model():
  model = models.nat_nano(depths=(1, 1, 1, 1), num_classes=5)
  images = _images(2, 32, 32, 3)
  params = _random_params(model)
  half = model.clone(dtype=jnp.bfloat16)
  logits = jax.jit(half.apply)({"params": params}, images)
  assert logits.dtype == jnp.bfloat16
  reference = jax.jit(model.apply)({"params": params}, images)
  np.testing.assert_allclose(np.asarray(logits, np.float32), reference, atol=0.1, rtol=0.1)


def _leaves(tree):
  return {"/".join(k.key for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_weight_decay_mask():
  params = _leaves(models.abstract_params(models.nat_small()))
  mask = _leaves(models.weight_decay_mask(models.abstract_params(models.nat_small())))
  assert mask.keys() == params.keys()
  for name, decays in mask.items():
    # Only Dense and Conv kernels decay: not norms, biases, layer scales or rpb.
    assert decays == name.endswith("/kernel"), name
  assert any(name.endswith("gamma1") for name in mask)


def test_initialisation():
  model, params = models.create("nat_nano", depths=(1, 1, 1, 1), layer_scale=0.3,
                                rng=jax.random.key(3, impl="rbg"))
  params = _leaves(params)
  assert model.layer_scale == 0.3
  head = params["head/kernel"]
  assert np.std(head) == pytest.approx(0.02, rel=0.05)
  assert np.abs(head).max() > 2 * 0.02  # trunc_normal(.02) with timm's ±2 absolute bounds
  rpb = np.concatenate([v.ravel() for k, v in params.items() if k.endswith("rpb")])
  assert np.std(rpb) == pytest.approx(0.02, rel=0.15)
  for name, value in params.items():
    if name.endswith(("gamma1", "gamma2")):
      np.testing.assert_array_equal(value, np.float32(0.3))
    elif "norm" in name:
      np.testing.assert_array_equal(value, 1.0 if name.endswith("scale") else 0.0)
    elif name.endswith("bias") and "patch_embed" not in name:
      np.testing.assert_array_equal(value, 0.0)
  # Convolutions keep PyTorch's default: weights and biases U(±1/√fan_in).
  conv = params["levels_0/downsample/reduction/kernel"]
  bound = 1 / math.sqrt(9 * conv.shape[2])
  assert np.abs(conv).max() <= bound and np.abs(conv).max() > 0.95 * bound
  assert np.std(conv) == pytest.approx(bound / math.sqrt(3), rel=0.05)


def test_checkpoint_round_trip_and_checks():
  params = _random_params(models.nat_nano(num_classes=3))
  with tempfile.TemporaryDirectory() as tmp:
    checkpoint.save(f"{tmp}/ckpt", params, model="nat_nano", config={"num_classes": 3})
    restored_model, restored = models.create("nat_nano", checkpoint=f"{tmp}/ckpt")
    assert restored_model.num_classes == 3
    jax.tree.map(np.testing.assert_array_equal, restored, params)
    bad = {**params, "head": {"kernel": params["head"]["kernel"][:, :2]}}
    checkpoint.save(f"{tmp}/bad", bad, model="nat_nano", config={"num_classes": 3})
    with pytest.raises(ValueError) as error:
      models.create("nat_nano", checkpoint=f"{tmp}/bad")
  assert "missing: head/bias" in str(error.value)
  assert "shape of head/kernel: (256, 2), expected (256, 3)" in str(error.value)


def test_unknown_variant():
  with pytest.raises(ValueError, match="nat_tiny"):
    models.get("nat_tinny")
