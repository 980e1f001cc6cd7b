"""The ImageNet path offline: the real `imagenet2012` TFDS builder prepared from a small
ILSVRC2012-style manual-download folder of real photos, the full training preprocessing,
and a few training and eval steps of a NAT with the paper recipe's config."""

import functools
import io
import os
import sys
import tarfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")
pytest.importorskip("sklearn")
from PIL import Image  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from configs import nat_tiny  # noqa: E402
from jnat.data import imagenet, pipeline  # noqa: E402
from jnat.train import loop  # noqa: E402

SYNSETS = ("n01440764", "n01443537", "n01484850")  # the first three ImageNet classes


def _jpegs(n, seed):
  """n JPEG crops of different sizes from scikit-learn's two sample photos."""
  from sklearn.datasets import load_sample_images
  photos = load_sample_images().images
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    photo = photos[i % len(photos)]
    h, w = rng.integers(80, 200), rng.integers(80, 200)
    y, x = rng.integers(0, photo.shape[0] - h), rng.integers(0, photo.shape[1] - w)
    buf = io.BytesIO()
    Image.fromarray(photo[y:y + h, x:x + w]).save(buf, format="JPEG", quality=85)
    out.append(buf.getvalue())
  return out


def _add(tar, name, data):
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def make_manual_dir(manual):
  """ILSVRC2012_img_train.tar (a tar of per-synset tars) and ILSVRC2012_img_val.tar."""
  os.makedirs(manual)
  with tarfile.open(os.path.join(manual, "ILSVRC2012_img_train.tar"), "w") as train:
    for k, synset in enumerate(SYNSETS):
      inner = io.BytesIO()
      with tarfile.open(fileobj=inner, mode="w") as t:
        for i, jpeg in enumerate(_jpegs(4, seed=k)):
          _add(t, f"{synset}_{i}.JPEG", jpeg)
      _add(train, f"{synset}.tar", inner.getvalue())
  with tarfile.open(os.path.join(manual, "ILSVRC2012_img_val.tar"), "w") as val:
    for i, jpeg in enumerate(_jpegs(6, seed=10)):
      _add(val, f"ILSVRC2012_val_{i + 1:08d}.JPEG", jpeg)


@pytest.fixture(scope="module")
def imagenet_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  with pytest.raises(FileNotFoundError, match="ILSVRC2012_img_val.tar"):
    pipeline.get_builder("imagenet2012", data_dir)
  manual = os.path.join(data_dir, "downloads", "manual")
  make_manual_dir(manual)
  builder = tfds.builder("imagenet2012", data_dir=data_dir)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual))
  return data_dir


def tiny_config(data_dir):
  c = nat_tiny.get_config()  # the paper recipe: RandAugment, erasing, mixup, bfloat16 ...
  c.model_overrides.update({"embed_dim": 16, "depths": (1, 1), "num_heads": (1, 2),
                            "kernel_size": 3})
  c.update(dict(data_dir=data_dir, attention_backend="xla", image_size=32,
                global_batch_size=4, eval_batch_size=4, num_train_steps=3,
                shuffle_buffer=16, log_every_steps=1, warmup_epochs=1.0))
  return c


def test_real_builder_and_preprocessing(imagenet_dir):
  c = tiny_config(imagenet_dir)
  builder = pipeline.get_builder("imagenet2012", imagenet_dir)
  assert builder.info.splits["train"].num_examples == 12
  assert builder.info.splits["validation"].num_examples == 6
  prep = imagenet.Preprocessing.from_config(c)
  assert prep.rand_augment_layers == 2 and prep.random_erase_prob == 0.25 and prep.flip
  plan = pipeline.plan_split(builder, "train", 4, train=True)
  batches = pipeline.train_batches(builder, plan,
                                   functools.partial(imagenet.preprocess_train, p=prep),
                                   seed=0, shuffle_buffer=16)
  labels = []
  for _, batch in zip(range(plan.steps), batches):
    assert batch["image"].shape == (4, 32, 32, 3) and np.all(np.isfinite(batch["image"]))
    labels.extend(batch["label"])
  # One epoch: every training image once, with the synsets' class indices.
  assert sorted(labels) == [0] * 4 + [1] * 4 + [2] * 4
  eval_plan = pipeline.plan_split(builder, "validation", 4, train=False)
  evals = list(pipeline.eval_batches(builder, eval_plan,
                                     functools.partial(imagenet.preprocess_eval, p=prep)))
  assert sum(b["mask"].sum() for b in evals) == 6
  # Normalised with the ImageNet statistics: roughly zero mean, unit spread.
  pixels = np.concatenate([b["image"][b["mask"] > 0] for b in evals])
  assert abs(pixels.mean()) < 1.0 and 0.3 < pixels.std() < 2.0


def test_nat_trains_and_evaluates_on_imagenet_layout(imagenet_dir, tmp_path):
  c = tiny_config(imagenet_dir)
  results = loop.train_and_evaluate(c, str(tmp_path))
  assert set(results) == {"eval/top1", "eval/top5", "eval/loss"}
  assert 0.0 <= results["eval/top1"] <= results["eval/top5"] <= 1.0
  assert np.isfinite(results["eval/loss"])
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["3"]
  step, state = loop.load_checkpoint(c, str(tmp_path))
  assert step == 3
  import jax
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(state.params))
  # Loading a checkpoint needs no dataset: the same checkpoint, no ImageNet in data_dir.
  c.data_dir = str(tmp_path / "no_data")
  step, without_data = loop.load_checkpoint(c, str(tmp_path))
  assert step == 3
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(without_data),
               jax.device_get(state))
