"""Input pipeline: augmentations against PIL, mixup, the digits dataset, resumable order."""

import functools
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
tfds = pytest.importorskip("tensorflow_datasets")
pytest.importorskip("sklearn")
from PIL import Image, ImageEnhance, ImageOps  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)  # configs/ imports `configs.common`

from configs import common  # noqa: E402
from jnat.data import augment, digits, imagenet, mixup, pipeline  # noqa: E402


@pytest.fixture(scope="module")
def photo():
  """A real 96x128 RGB photo (scikit-learn's sample image), uint8."""
  from sklearn.datasets import load_sample_image
  image = Image.fromarray(load_sample_image("china.jpg")).resize((128, 96), Image.BILINEAR)
  return np.asarray(image)


def _run(op, image, level=5.0, seed=(1, 2)):
  out = op(tf.constant(image, tf.float32), tf.constant(level), tf.constant(seed, tf.int64))
  return out.numpy()


# PIL is the reference the usual RandAugment implementations are built on.
@pytest.mark.parametrize("op,reference", [
    (augment.auto_contrast, ImageOps.autocontrast),
    (augment.equalize, ImageOps.equalize),
    (augment.invert, ImageOps.invert),
])
def test_pixel_ops_match_pil(photo, op, reference):
  expected = np.asarray(reference(Image.fromarray(photo))).astype(np.float32)
  got = _run(op, photo)
  np.testing.assert_allclose(got, expected, atol=1.0)


def test_solarize_and_posterize_match_pil(photo):
  # level 5 -> threshold 128; posterize level 5 -> 4 - 2 = 2 bits kept.
  np.testing.assert_array_equal(
      _run(augment.solarize, photo), np.asarray(ImageOps.solarize(Image.fromarray(photo), 128)))
  np.testing.assert_array_equal(
      _run(augment.posterize, photo), np.asarray(ImageOps.posterize(Image.fromarray(photo), 2)))


@pytest.mark.parametrize("op,enhancer", [
    (augment.color, ImageEnhance.Color),
    (augment.contrast, ImageEnhance.Contrast),
    (augment.brightness, ImageEnhance.Brightness),
    (augment.sharpness, ImageEnhance.Sharpness),
])
def test_enhance_ops_match_pil(photo, op, enhancer):
  seed = (3, 4)
  # Recover the factor the op drew (1 +/- 0.45 at level 5) from its sign draw.
  sign = -1.0 if tf.random.stateless_uniform((), seed) < 0.5 else 1.0
  factor = 1.0 + sign * 0.45
  expected = np.asarray(enhancer(Image.fromarray(photo)).enhance(factor)).astype(np.float32)
  got = _run(op, photo, seed=seed)
  # PIL rounds each step to uint8; allow a couple of levels of rounding differences.
  assert np.mean(np.abs(got - expected)) < 1.5
  assert np.percentile(np.abs(got - expected), 99) <= 3.0


def test_geometric_ops_move_pixels_and_fill_grey(photo):
  for op in (augment.rotate, augment.shear_x, augment.shear_y, augment.translate_x,
             augment.translate_y):
    out = _run(op, photo, level=10.0)
    assert out.shape == photo.shape
    assert not np.allclose(out, photo), op.__name__
    # Some pixels come from outside the image and take the grey fill.
    assert np.any(np.all(out == 128.0, axis=-1)), op.__name__
  np.testing.assert_allclose(_run(augment.rotate, photo, level=0.0), photo, atol=1e-3)


def test_rand_augment_is_a_function_of_its_seed(photo):
  image = tf.constant(photo, tf.float32)
  ra = functools.partial(augment.rand_augment, num_layers=2, magnitude=9.0,
                         magnitude_std=0.5, prob=1.0)
  a = ra(image, tf.constant([5, 6], tf.int64)).numpy()
  b = ra(image, tf.constant([5, 6], tf.int64)).numpy()
  graph = tf.function(ra)(image, tf.constant([5, 6], tf.int64)).numpy()
  np.testing.assert_array_equal(a, b)
  np.testing.assert_allclose(a, graph, atol=1e-3)
  outs = [ra(image, tf.constant([5, s], tf.int64)).numpy() for s in range(8)]
  assert len({o.tobytes() for o in outs}) > 4
  for o in outs:
    assert o.shape == photo.shape and o.min() >= 0.0 and o.max() <= 255.0


def test_random_erase_replaces_one_box():
  image = tf.zeros([64, 48, 3])
  for s in range(5):
    out = augment.random_erase(image, tf.constant([s, 0], tf.int64), prob=1.0).numpy()
    erased = np.any(out != 0.0, axis=-1)
    rows, cols = np.flatnonzero(erased.any(1)), np.flatnonzero(erased.any(0))
    area = erased.sum() / erased.size
    assert 0.015 < area < 0.34
    # A filled rectangle: its bounding box is fully erased.
    assert erased[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].all()
  kept = augment.random_erase(image, tf.constant([0, 0], tf.int64), prob=0.0)
  np.testing.assert_array_equal(kept.numpy(), 0.0)


def test_mixup_cutmix_targets_match_pixels():
  rng = jax.random.PRNGKey(0)
  images = jnp.stack([jnp.full((8, 8, 1), float(i)) for i in range(4)])
  labels = jnp.arange(4)
  for seed in range(20):
    key = jax.random.fold_in(rng, seed)
    out, targets = mixup.mixup_cutmix(key, images, labels, num_classes=4, mixup_alpha=0.8,
                                      cutmix_alpha=1.0, label_smoothing=0.0)
    np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-6)
    # Example 0 is mixed with example 3: the mean pixel is 3 * (1 - lam).
    lam = float(targets[0, 0])
    np.testing.assert_allclose(float(out[0].mean()), 3.0 * (1.0 - lam), atol=1e-5)
  smooth = mixup.mixup_cutmix(rng, images, labels, num_classes=4, mixup_alpha=0.0,
                              cutmix_alpha=0.0, label_smoothing=0.1)[1]
  np.testing.assert_allclose(smooth[1], [0.025, 0.925, 0.025, 0.025], rtol=1e-6)


def test_digits_splits_are_disjoint_and_stratified():
  train, test = digits.split_indices()
  assert len(train) == 1438 and len(test) == 359
  assert not set(train) & set(test)
  from sklearn.datasets import load_digits
  labels = load_digits().target
  counts = np.bincount(labels[test], minlength=10)
  assert counts.min() >= 34 and counts.max() <= 38


@pytest.fixture(scope="module")
def digits_builder(tmp_path_factory):
  return pipeline.get_builder("sklearn_digits", str(tmp_path_factory.mktemp("tfds")))


def _recipe_preprocessing():
  """The ImageNet recipe's augmentations (flip, RandAugment, erasing) on 16x16 digits."""
  config = common.get_config()
  config.update(dict(image_size=16, crop_pct=1.0, mean_rgb=(127.5,) * 3,
                     std_rgb=(127.5,) * 3, crop_scale=(0.5, 1.0)))
  prep = imagenet.Preprocessing.from_config(config)
  assert prep.flip and prep.rand_augment_layers == 2 and prep.random_erase_prob == 0.25
  return prep


_PREP = _recipe_preprocessing()


def test_digits_dataset_holds_the_sklearn_images(digits_builder):
  from sklearn.datasets import load_digits
  data = load_digits()
  _, test = digits.split_indices()
  ds = digits_builder.as_dataset(split="test", shuffle_files=False)
  images = {ex["image"].numpy().tobytes(): int(ex["label"]) for ex in ds}
  assert len(images) > 300
  for i in test[:20]:
    expected = np.round(data.images[i] * 255 / 16).astype(np.uint8)[..., None]
    assert images[expected.tobytes()] == data.target[i]


def test_train_order_resumes_exactly(digits_builder):
  plan = pipeline.plan_split(digits_builder, "train", 128, train=True)
  assert plan.steps == 1438 // 128
  pre = functools.partial(imagenet.preprocess_train, p=_PREP)
  run = lambda start: pipeline.train_batches(digits_builder, plan, pre, seed=3,
                                             start_step=start, shuffle_buffer=512)
  full = [b for _, b in zip(range(plan.steps + 3), run(0))]
  # Resume inside the second epoch: same batches as the uninterrupted stream.
  for got, want in zip(run(plan.steps + 1), full[plan.steps + 1:]):
    np.testing.assert_array_equal(got["image"], want["image"])
    np.testing.assert_array_equal(got["label"], want["label"])
  assert full[0]["image"].shape == (128, 16, 16, 3) and full[0]["image"].dtype == np.float32
  # Each epoch is a new permutation of the split.
  assert not np.array_equal(full[0]["label"], full[plan.steps]["label"])
  epoch = np.concatenate([b["label"] for b in full[:plan.steps]])
  assert len(epoch) == plan.steps * 128


def test_eval_batches_cover_the_split_once(digits_builder):
  plan = pipeline.plan_split(digits_builder, "test", 100, train=False)
  pre = functools.partial(imagenet.preprocess_eval, p=_PREP)
  batches = list(pipeline.eval_batches(digits_builder, plan, pre))
  assert len(batches) == plan.steps == 4
  mask = np.concatenate([b["mask"] for b in batches])
  labels = np.concatenate([b["label"] for b in batches])
  assert mask.sum() == 359 and np.all(mask[:359] == 1) and np.all(mask[359:] == 0)
  from sklearn.datasets import load_digits
  _, test = digits.split_indices()
  np.testing.assert_array_equal(np.bincount(labels[:359], minlength=10),
                                np.bincount(load_digits().target[test], minlength=10))


def test_missing_imagenet_explains_how_to_prepare(tmp_path):
  with pytest.raises(FileNotFoundError) as e:
    pipeline.get_builder("imagenet2012", str(tmp_path))
  message = str(e.value)
  assert "ILSVRC2012_img_train.tar" in message and "tfds build imagenet2012" in message
  assert str(tmp_path) in message


def test_missing_dataset_is_named(tmp_path):
  with pytest.raises(FileNotFoundError) as e:
    pipeline.get_builder("mnist", str(tmp_path))
  message = str(e.value)
  assert message.startswith(f"mnist is not prepared in data_dir={str(tmp_path)!r}")
  assert f"tfds build mnist --data_dir={tmp_path}" in message
  assert "imagenet" not in message.lower()
