"""scikit-learn's handwritten digits as a TFDS dataset (`sklearn_digits`), for offline runs.

1797 real 8x8 grey images of the digits 0-9 (UCI optical recognition data) ship inside
scikit-learn. Writing them once as a TFDS dataset lets the trainer read them through
exactly the input code it uses for ImageNet. The `test` split (20% of each class, fixed
seed) is held out: no training example comes from it.

Example:
  >>> import tensorflow_datasets as tfds
  >>> from jnat.data import digits  # registers the builder
  >>> builder = tfds.builder("sklearn_digits", data_dir="tfds_data")
  >>> builder.download_and_prepare()  # seconds; nothing is downloaded
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

TEST_FRACTION = 0.2
_SPLIT_SEED = 0


def split_indices():
  """(train, test) index arrays into `sklearn.datasets.load_digits()`, stratified."""
  from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel

  labels = load_digits().target
  rng = np.random.default_rng(_SPLIT_SEED)
  train, test = [], []
  for c in range(10):
    members = rng.permutation(np.flatnonzero(labels == c))
    n_test = int(round(TEST_FRACTION * len(members)))
    test.extend(members[:n_test])
    train.extend(members[n_test:])
  return np.sort(np.array(train)), np.sort(np.array(test))


class SklearnDigits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's 8x8 handwritten digits, stratified 80/20 into train and test."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(8, 8, 1), encoding_format="png"),
            "label": tfds.features.ClassLabel(num_classes=10),
        }),
        supervised_keys=("image", "label"),
        homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # the data ships with scikit-learn
    train, test = split_indices()
    return {"train": self._generate_examples(train), "test": self._generate_examples(test)}

  def _generate_examples(self, indices):
    from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel

    data = load_digits()
    # Pixel values are counts 0..16; scale to the usual 0..255 range.
    images = np.round(data.images * (255.0 / 16.0)).astype(np.uint8)
    for i in indices:
      yield int(i), {"image": images[i][..., None], "label": int(data.target[i])}
