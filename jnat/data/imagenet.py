"""ImageNet-style preprocessing of one TFDS example, and how to prepare ImageNet.

The same functions serve every TFDS image-classification dataset with `image` (encoded
bytes) and `label` features: ImageNet 2012 and the small embedded digits dataset.

Train: random-resized-crop (fused with JPEG decoding), optional horizontal flip,
RandAugment, normalisation, random erasing. Eval: centre crop of `crop_pct` of the
shorter side, resized to the model resolution, normalised.
"""

from __future__ import annotations

import dataclasses
import os

import tensorflow as tf

from jnat.data import augment


@dataclasses.dataclass(frozen=True)
class Preprocessing:
  """What the per-example functions do: the training config's fields (see `from_config`)."""
  image_size: int
  crop_pct: float
  interpolation: str
  mean: tuple
  std: tuple
  crop_scale: tuple
  crop_ratio: tuple
  flip: bool
  rand_augment_layers: int  # 0 disables RandAugment
  rand_augment_magnitude: float
  rand_augment_magnitude_std: float
  rand_augment_prob: float
  random_erase_prob: float

  @classmethod
  def from_config(cls, config) -> "Preprocessing":
    return cls(
        image_size=config.image_size,
        crop_pct=config.crop_pct,
        interpolation=config.interpolation,
        mean=tuple(config.mean_rgb),
        std=tuple(config.std_rgb),
        crop_scale=tuple(config.crop_scale),
        crop_ratio=tuple(config.crop_ratio),
        flip=config.flip,
        rand_augment_layers=config.rand_augment.num_layers,
        rand_augment_magnitude=config.rand_augment.magnitude,
        rand_augment_magnitude_std=config.rand_augment.magnitude_std,
        rand_augment_prob=config.rand_augment.prob,
        random_erase_prob=config.random_erase_prob,
    )


def _image_shape(image_bytes):
  """[height, width, channels] of an encoded image, without decoding a JPEG."""
  return tf.cond(
      tf.io.is_jpeg(image_bytes),
      lambda: tf.image.extract_jpeg_shape(image_bytes),
      lambda: tf.shape(tf.io.decode_image(image_bytes, channels=3,
                                          expand_animations=False), out_type=tf.int32),
  )


def _decode_and_crop(image_bytes, window):
  """Decodes only the crop window [y, x, h, w] of a JPEG; other formats fully."""

  def jpeg():
    return tf.image.decode_and_crop_jpeg(image_bytes, window, channels=3)

  def other():
    image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
    return tf.image.crop_to_bounding_box(image, window[0], window[1], window[2], window[3])

  image = tf.cond(tf.io.is_jpeg(image_bytes), jpeg, other)
  return tf.ensure_shape(image, [None, None, 3])


def _resize(image, size, interpolation):
  image = tf.image.resize(image, [size, size], method=interpolation, antialias=True)
  return tf.clip_by_value(image, 0.0, 255.0)


def _normalize(image, p: Preprocessing):
  return (image - tf.constant(p.mean, tf.float32)) / tf.constant(p.std, tf.float32)


def random_resized_crop_window(image_bytes, seed, p: Preprocessing):
  shape = _image_shape(image_bytes)
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      shape,
      bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], tf.float32, [1, 1, 4]),
      seed=seed,
      min_object_covered=0.0,
      aspect_ratio_range=p.crop_ratio,
      area_range=p.crop_scale,
      max_attempts=10,
      use_image_if_no_bounding_boxes=True,
  )
  return tf.stack([begin[0], begin[1], size[0], size[1]])


def center_crop_window(image_bytes, p: Preprocessing):
  shape = _image_shape(image_bytes)
  h, w = shape[0], shape[1]
  side = tf.cast(p.crop_pct * tf.cast(tf.minimum(h, w), tf.float32), tf.int32)
  side = tf.maximum(side, 1)
  return tf.stack([(h - side + 1) // 2, (w - side + 1) // 2, side, side])


def preprocess_train(example, seed, p: Preprocessing):
  """One training example -> {'image': float32 [S, S, 3] normalised, 'label': int32}."""
  s_crop, s_flip, s_ra, s_erase = tf.unstack(tf.random.experimental.stateless_split(seed, 4))
  window = random_resized_crop_window(example["image"], s_crop, p)
  image = tf.cast(_decode_and_crop(example["image"], window), tf.float32)
  image = _resize(image, p.image_size, p.interpolation)
  if p.flip:
    image = tf.image.stateless_random_flip_left_right(image, s_flip)
  if p.rand_augment_layers > 0:
    image = augment.rand_augment(
        image, s_ra, num_layers=p.rand_augment_layers, magnitude=p.rand_augment_magnitude,
        magnitude_std=p.rand_augment_magnitude_std, prob=p.rand_augment_prob)
  image = _normalize(image, p)
  if p.random_erase_prob > 0:
    image = augment.random_erase(image, s_erase, prob=p.random_erase_prob)
  image = tf.ensure_shape(image, [p.image_size, p.image_size, 3])
  return {"image": image, "label": tf.cast(example["label"], tf.int32)}


def preprocess_eval(example, p: Preprocessing):
  """One eval example -> {'image': float32 [S, S, 3] normalised, 'label': int32}."""
  window = center_crop_window(example["image"], p)
  image = tf.cast(_decode_and_crop(example["image"], window), tf.float32)
  image = _normalize(_resize(image, p.image_size, p.interpolation), p)
  image = tf.ensure_shape(image, [p.image_size, p.image_size, 3])
  return {"image": image, "label": tf.cast(example["label"], tf.int32)}


def preparation_steps(data_dir: str) -> str:
  """How to prepare ImageNet 2012 for TFDS in `data_dir` (it cannot be downloaded for you)."""
  manual = os.path.join(data_dir, "downloads", "manual")
  return (
      "ImageNet cannot be downloaded automatically. To prepare it (once, hours of CPU):\n"
      "  1. Register at https://image-net.org/download-images and download\n"
      "     ILSVRC2012_img_train.tar (~138 GB) and ILSVRC2012_img_val.tar (~6.3 GB).\n"
      f"  2. Put both files in {manual}/\n"
      "  3. Build the TFDS dataset:\n"
      f"       tfds build imagenet2012 --data_dir={data_dir} --manual_dir={manual}\n"
      "     (or in Python: tfds.builder('imagenet2012', data_dir=...).download_and_prepare(\n"
      "      download_config=tfds.download.DownloadConfig(manual_dir=...)))"
  )
