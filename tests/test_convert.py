"""PyTorch → jnat: the reference model, checkpoint conversion, parity and the commands.

The PyTorch side is ``tests/torch_nat.py`` (original key names, attention checked here
against NATTEN's outputs); its random weights — non-zero rpb and layer scales included —
are converted and both frameworks classify the same images.
"""

import argparse
import json
import pathlib

import jax
import numpy as np
import pytest

import jnat
from jnat import convert
from jnat import models

torch = pytest.importorskip("torch")
import torch_nat  # noqa: E402  (needs torch)

DATA = pathlib.Path(__file__).parent / "data"
BACKENDS = jnat.available_backends()


def _golden_cases():
  data = np.load(DATA / "natten_attention_small.npz")
  for cfg in json.loads(str(data["meta_json"]))["configs"]:
    arrays = {k.split("__")[1]: data[k] for k in data.files if k.startswith(cfg["name"] + "__")}
    yield pytest.param(cfg, arrays, id=cfg["name"])


@pytest.mark.parametrize("cfg, arrays", list(_golden_cases()))
def test_torch_reference_matches_natten(cfg, arrays):
  t = {k: torch.from_numpy(v) for k, v in arrays.items()}
  out = torch_nat.neighbourhood_attention(
      t["q"], t["k"], t["v"], cfg["kernel_size"], cfg["stride"], cfg["dilation"],
      cfg["is_causal"], rpb=t.get("rpb"))
  np.testing.assert_allclose(out.numpy(), arrays["out"], atol=2e-6, rtol=0)


def _torch_model(variant, layer_scale=None, seed=0):
  """A PyTorch model shaped like ``variant`` with random weights, every parameter perturbed."""
  torch.manual_seed(seed)
  net = torch_nat.NAT(variant.embed_dim, variant.mlp_ratio, list(variant.depths),
                      list(variant.num_heads), variant.kernel_size,
                      [list(d) for d in variant.dilations] if variant.dilations else None,
                      num_classes=variant.num_classes, layer_scale=layer_scale)
  with torch.no_grad():
    for name, p in net.named_parameters():
      if name.endswith(("rpb", "gamma1", "gamma2")) or "norm" in name:
        # Default rpb (0.02), scales (1e-5 or 1) and norms (1, 0) would hide wrong wiring.
        p.copy_(torch.randn_like(p) * 0.5 + (1.0 if name.endswith("norm.weight") else 0.0))
  return net.eval()


def _nchw(images):
  return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))


# Mini widths and kernel 7 as the paper models, fewer blocks to keep the test fast; every
# level of the DiNAT has a dilated block (dilation 8, 4, 2 at 224²).
PARITY_MODELS = {
    "nat": models.nat_mini(depths=(1, 1, 2, 2)),
    "dinat": models.dinat_mini(depths=(2, 2, 2, 2), dilations=((1, 8), (1, 4), (1, 2), (1, 1))),
}
# 200×152 gives odd level sizes (50×38 ... 7×5) and forces padding where a level is
# smaller than kernel × dilation.
RESOLUTIONS = {"224x224": (224, 224), "200x152": (200, 152)}


@pytest.fixture(scope="module", params=sorted(PARITY_MODELS))
def converted(request):
  """(model, params, {resolution: (images, PyTorch logits)}) for one parity model."""
  model = PARITY_MODELS[request.param].clone(layer_scale=1e-5)
  net = _torch_model(model, layer_scale=1e-5)
  cases = {}
  for name, (height, width) in RESOLUTIONS.items():
    images = np.random.default_rng(0).normal(size=(1, height, width, 3)).astype(np.float32)
    with torch.no_grad():
      cases[name] = images, net(_nchw(images)).numpy()
  return model, convert.convert(net.state_dict(), model), cases


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("resolution", sorted(RESOLUTIONS))
def test_logits_match_pytorch(converted, resolution, backend):
  model, params, cases = converted
  images, expected = cases[resolution]
  with jax.default_matmul_precision("highest"):  # no TF32 on GPUs
    logits = jax.jit(model.clone(backend=backend).apply)({"params": params}, images)
  # The requirement is 1e-4; errors measure ~1.5e-6, and the tanh approximation of GELU
  # in place of the exact one would already give ~3e-5.
  np.testing.assert_allclose(np.asarray(logits), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("key, rank, path", [
    ("patch_embed.proj.0.weight", 4, ("patch_embed", "proj_0", "kernel")),
    ("patch_embed.norm.weight", 1, ("patch_embed", "norm", "scale")),
    ("levels.2.blocks.11.attn.qkv.weight", 2, ("levels_2", "blocks_11", "attn", "qkv", "kernel")),
    ("levels.0.blocks.0.attn.rpb", 3, ("levels_0", "blocks_0", "attn", "rpb")),
    ("levels.1.blocks.3.gamma2", 1, ("levels_1", "blocks_3", "gamma2")),
    ("levels.0.downsample.reduction.weight", 4, ("levels_0", "downsample", "reduction", "kernel")),
    ("head.bias", 1, ("head", "bias")),
])
def test_flax_path(key, rank, path):
  assert convert.flax_path(key, rank)[0] == path


def test_layouts():
  conv = np.arange(2 * 3 * 3 * 3).reshape(2, 3, 3, 3)  # OIHW
  linear = np.arange(6).reshape(2, 3)  # [out, in]
  tree = convert.convert_state_dict({"c.weight": conv, "l.weight": linear})
  # Flax conv kernels are HWIO, Dense kernels [in, out].
  assert tree["c"]["kernel"][1, 2, 0, 1] == conv[1, 0, 1, 2]
  assert tree["l"]["kernel"][2, 1] == linear[1, 2]


def test_unknown_leaf_raises():
  with pytest.raises(ValueError, match="running_mean"):
    convert.convert_state_dict({"bn.running_mean": np.zeros(3)})


def test_mismatch_names_the_parameter():
  model = models.nat_nano()
  state = _torch_model(model).state_dict()
  del state["levels.1.blocks.0.attn.rpb"]
  state["levels.0.blocks.0.attn.qkv.bias"] = torch.zeros(5)
  with pytest.raises(ValueError) as error:
    convert.convert(state, model)
  assert "missing: levels_1/blocks_0/attn/rpb" in str(error.value)
  assert "shape of levels_0/blocks_0/attn/qkv/bias: (5,)" in str(error.value)


def test_pickled_objects_need_trust(tmp_path):
  path = str(tmp_path / "checkpoint.pth")
  torch.save({"state_dict": {"head.bias": torch.zeros(3)}, "args": argparse.Namespace(lr=1.0)},
             path)
  with pytest.raises(ValueError, match="trust"):
    convert.load_torch_state_dict(path)
  assert list(convert.load_torch_state_dict(path, trust=True)) == ["head.bias"]


@pytest.fixture(scope="module")
def converted_nano(tmp_path_factory):
  """A DiNAT-nano PyTorch checkpoint (layer scale, 7 classes) converted by the command."""
  tmp = tmp_path_factory.mktemp("convert")
  net = _torch_model(models.dinat_nano(num_classes=7), layer_scale=1e-5, seed=1)
  # Wrapped as training scripts save it, with DataParallel's prefix.
  torch.save({"model": {f"module.{k}": v for k, v in net.state_dict().items()}, "epoch": 3},
             tmp / "dinat_nano.pth")
  convert.main(["dinat_nano", str(tmp / "dinat_nano.pth"), str(tmp / "converted")])
  return net, str(tmp / "converted")


def test_convert_command_and_create(converted_nano):
  net, directory = converted_nano
  model, params = models.create("dinat_nano", checkpoint=directory)
  assert (model.num_classes, model.layer_scale) == (7, 1e-5)
  images = np.random.default_rng(1).normal(size=(2, 48, 80, 3)).astype(np.float32)
  with torch.no_grad():
    expected = net(_nchw(images)).numpy()
  with jax.default_matmul_precision("highest"):
    logits = jax.jit(model.apply)({"params": params}, images)
  np.testing.assert_allclose(np.asarray(logits), expected, atol=1e-5, rtol=0)
  with pytest.raises(ValueError, match="holds 'dinat_nano'"):
    models.create("nat_nano", checkpoint=directory)


def test_classify_command(converted_nano, tmp_path, capsys):
  from PIL import Image

  from jnat import classify

  net, directory = converted_nano
  pixels = np.random.default_rng(2).integers(0, 256, size=(40, 60, 3), dtype=np.uint8)
  Image.fromarray(pixels).save(tmp_path / "image.png")
  (tmp_path / "labels.txt").write_text("".join(f"label{i}\n" for i in range(7)))
  classify.main([str(tmp_path / "image.png"), "--model", "dinat_nano", "--checkpoint", directory,
                 "--labels", str(tmp_path / "labels.txt"), "--top", "3", "--resolution", "64"])
  lines = capsys.readouterr().out.splitlines()
  # The reference transform: shorter side to 64/0.875 = 73 (bicubic), centre 64×64 crop.
  image = Image.fromarray(pixels).resize((109, 73), Image.Resampling.BICUBIC)
  crop = np.asarray(image, np.float32)[4:68, 22:86] / 255
  crop = (crop - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
  with torch.no_grad():
    probs = net(_nchw(crop[None].astype(np.float32))).softmax(-1)[0].numpy()
  best = np.argsort(-probs)[:3]
  assert lines[0].endswith("image.png") and len(lines) == 4
  for line, i in zip(lines[1:], best):
    assert line.split()[-1] == f"label{i}"
    assert float(line.split()[0].rstrip("%")) == pytest.approx(100 * probs[i], abs=0.01)
