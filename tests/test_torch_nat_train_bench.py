"""The PyTorch NAT training benchmark: its attentions against the gather reference, and a
tiny training run on CPU.

flex_attention has no CPU backward, so here it runs forward and eagerly; the benchmark
repeats the check on the GPU, compiled and with gradients, before it times anything.
"""

import json
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch_nat  # noqa: E402  (needs torch)
import torch_nat_train_bench as tnb  # noqa: E402

needs_flex = pytest.mark.skipif(tnb.flex is None, reason="this torch has no flex_attention")
# Eager flex_attention (the unfused path, and NATTEN's CPU path through it) is intended here.
pytestmark = pytest.mark.filterwarnings(
    "ignore:flex_attention called without torch.compile", "ignore:return_lse is deprecated")

# (shape, kernel_size, stride, dilation, is_causal): every axis rule (borders, dilation
# groups of unequal length, stride blocks, causal) in 1D, 2D and 3D.
GEOMETRIES = {
    "1d_dilated": ((9,), (3,), (1,), (2,), (False,)),
    "2d_strided_causal": ((11, 7), (3, 5), (2, 1), (1, 1), (True, False)),
    "2d_dilated_strided": ((13, 10), (5, 3), (1, 3), (2, 3), (False, True)),
    "3d": ((5, 6, 7), (3, 3, 3), (1, 2, 1), (1, 2, 2), (False, False, True)),
}


def _inputs(shape, kernel_size, heads=2, dim=8, seed=0):
  gen = torch.Generator().manual_seed(seed)
  q, k, v = (torch.randn((2, *shape, heads, dim), generator=gen) for _ in range(3))
  rpb = torch.randn((heads, *[2 * k - 1 for k in kernel_size]), generator=gen)
  return q, k, v, rpb


@needs_flex
@pytest.mark.parametrize("geometry", GEOMETRIES.values(), ids=GEOMETRIES.keys())
def test_mask_mod_selects_the_reference_neighbours(geometry):
  shape = geometry[0]
  tokens = math.prod(shape)
  mask = tnb.flex.create_mask(tnb.neighbourhood_mask_mod(*geometry), None, None, tokens,
                              tokens, device="cpu")[0, 0].numpy()
  keys, valid, _ = torch_nat.neighbourhood_tables(*geometry)
  expected = np.zeros((tokens, tokens), bool)
  for query, (row, ok) in enumerate(zip(keys, valid)):
    expected[query, row[ok]] = True
  np.testing.assert_array_equal(mask, expected)


@needs_flex
@pytest.mark.parametrize("name", ["2d_dilated_strided", "3d"])
def test_flex_attention_matches_reference(name):
  geometry = GEOMETRIES[name]
  q, k, v, rpb = _inputs(*geometry[:2])
  out = tnb.flex_neighbourhood_attention(q, k, v, *geometry[1:], 0.4, rpb)
  expected = torch_nat.neighbourhood_attention(q, k, v, *geometry[1:], 0.4, rpb)
  np.testing.assert_allclose(out.numpy(), expected.numpy(), atol=2e-6, rtol=0)


@pytest.mark.skipif(tnb.natten is None, reason="natten is not installed")
def test_natten_attention_matches_reference():
  geometry = GEOMETRIES["2d_strided_causal"]
  q, k, v, _ = _inputs(*geometry[:2])
  out = tnb.natten_neighbourhood_attention(q, k, v, *geometry[1:], 0.4, None)
  expected = torch_nat.neighbourhood_attention(q, k, v, *geometry[1:], 0.4)
  np.testing.assert_allclose(out.numpy(), expected.numpy(), atol=2e-6, rtol=0)


TINY_RUN = ["--model", "nat_nano", "--batch", "1", "--image-size", "96", "--dtype", "float32",
            "--warmup", "0", "--steps", "2"]


def test_bench_trains_on_cpu(tmp_path, capsys):
  out = tmp_path / "result.json"
  assert tnb.main(TINY_RUN + ["--device", "cpu", "--out", str(out)]) == 0
  result = json.loads(out.read_text())
  assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result
  assert (result["attention"], result["compile"], result["device"]) == ("gather", "none", "cpu")
  assert result["images_per_s"] == pytest.approx(1 / result["step_time_s"])
  assert result["loss_last"] < result["loss_first"]  # the steps train: same batch twice


@pytest.mark.parametrize("extra, match", [
    (["--attention", "flex"], "attention='flex' cannot train on cpu"),
    (["--steps", "0"], "--steps=0 must be >= 1"),
    (["--image-size", "64"], "spatial axis 0 has 2 tokens"),
    (["--model", "nat_huge"], "model='nat_huge' must be one of"),
])
def test_bench_rejects_bad_arguments(extra, match):
  with pytest.raises(ValueError, match=match):
    tnb.main(TINY_RUN + ["--device", "cpu"] + extra)


@needs_flex
def test_auto_passes_over_an_attention_that_fails_its_device_check(monkeypatch):
  # On CPU, flex_attention's missing backward makes the flex check raise.
  monkeypatch.setattr(tnb, "available_attentions", lambda device: ["flex", "gather"])
  device = torch.device("cpu")
  attention, check, passed_over = tnb.choose_attention("auto", device, "none", True)
  assert (attention, check) == ("gather", None)
  assert "backward on CPU" in passed_over["flex"]
  with pytest.raises(NotImplementedError, match="backward on CPU"):
    tnb.choose_attention("flex", device, "none", True)
