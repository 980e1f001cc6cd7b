"""Per-image augmentations in TensorFlow: RandAugment and random erasing.

Every random choice comes from a stateless seed (a `[2]` int32/int64 tensor), so an
example's augmentation depends only on its seed and not on what the pipeline did before;
that is what lets a resumed run see exactly the images an uninterrupted one would.

Images are float32 in [0, 255] with shape `[H, W, 3]` unless a function says otherwise.
"""

from __future__ import annotations

import math

import tensorflow as tf

_MAX_LEVEL = 10.0
# Grey fill for pixels that geometric ops bring in from outside the image.
_FILL = 128.0


def _seeds(seed, n):
  """n independent stateless seeds derived from one."""
  return tf.unstack(tf.random.experimental.stateless_split(seed, num=n))


def _uniform(seed, minval=0.0, maxval=1.0, shape=()):
  return tf.random.stateless_uniform(shape, seed, minval=minval, maxval=maxval)


def _random_sign(seed, value):
  return tf.where(_uniform(seed) < 0.5, -value, value)


def _blend(degenerate, image, factor):
  """PIL ImageEnhance: factor 0 gives `degenerate`, 1 the image, >1 extrapolates."""
  return tf.clip_by_value(degenerate + factor * (image - degenerate), 0.0, 255.0)


def _grayscale(image):
  return tf.image.rgb_to_grayscale(image)  # [H, W, 1], ITU-R 601 weights like PIL


def _affine(image, transform, interpolation="BILINEAR"):
  """Applies a projective transform (output pixel -> input pixel), grey outside."""
  shape = tf.shape(image)
  out = tf.raw_ops.ImageProjectiveTransformV3(
      images=image[None],
      transforms=tf.cast(transform, tf.float32)[None],
      output_shape=shape[:2],
      fill_value=_FILL,
      interpolation=interpolation,
      fill_mode="CONSTANT",
  )
  return out[0]


# ----------------------------------------------------------------------------- ops
# Each op takes (image, level, seed) with level in [0, 10] and returns the new image.
# Magnitude ranges are the usual RandAugment ones ("increasing" variants, where a
# larger level always means a stronger change).


def identity(image, level, seed):
  del level, seed
  return image


def auto_contrast(image, level, seed):
  del level, seed
  lo = tf.reduce_min(image, axis=[0, 1], keepdims=True)
  hi = tf.reduce_max(image, axis=[0, 1], keepdims=True)
  scale = tf.where(hi > lo, 255.0 / tf.maximum(hi - lo, 1e-6), 1.0)
  offset = tf.where(hi > lo, lo, 0.0)
  return tf.clip_by_value((image - offset) * scale, 0.0, 255.0)


def _equalize_channel(channel):
  """Histogram equalisation of one [H, W] channel holding integers 0..255."""
  values = tf.cast(channel, tf.int32)
  hist = tf.math.bincount(tf.reshape(values, [-1]), minlength=256, maxlength=256)
  nonzero = tf.boolean_mask(hist, hist > 0)
  # PIL: the step ignores the count of the brightest level present.
  step = (tf.reduce_sum(nonzero) - nonzero[-1]) // 255
  lut = (tf.cumsum(hist) - hist + step // 2) // tf.maximum(step, 1)
  lut = tf.clip_by_value(lut, 0, 255)
  equalised = tf.cast(tf.gather(lut, values), tf.float32)
  return tf.where(step > 0, equalised, channel)


def equalize(image, level, seed):
  del level, seed
  rounded = tf.round(image)
  return tf.stack([_equalize_channel(rounded[..., c]) for c in range(3)], axis=-1)


def invert(image, level, seed):
  del level, seed
  return 255.0 - image


def rotate(image, level, seed):
  degrees = _random_sign(seed, level / _MAX_LEVEL * 30.0)
  angle = degrees * math.pi / 180.0
  h = tf.cast(tf.shape(image)[0], tf.float32)
  w = tf.cast(tf.shape(image)[1], tf.float32)
  cy, cx = (h - 1.0) / 2.0, (w - 1.0) / 2.0
  cos, sin = tf.cos(angle), tf.sin(angle)
  # Rotation about the centre, written as output -> input coordinates.
  transform = [cos, -sin, cx - cos * cx + sin * cy,
               sin, cos, cy - sin * cx - cos * cy, 0.0, 0.0]
  return _affine(image, tf.stack(transform))


def posterize(image, level, seed):
  del seed
  bits = 4 - tf.cast(level / _MAX_LEVEL * 4.0, tf.int32)  # level 0: keep 4 bits
  shift = tf.cast(8 - tf.clip_by_value(bits, 0, 8), tf.int32)
  pixels = tf.cast(tf.round(image), tf.int32)
  return tf.cast(tf.bitwise.left_shift(tf.bitwise.right_shift(pixels, shift), shift),
                 tf.float32)


def solarize(image, level, seed):
  del seed
  threshold = 256.0 - level / _MAX_LEVEL * 256.0
  return tf.where(image >= threshold, 255.0 - image, image)


def solarize_add(image, level, seed):
  del seed
  added = tf.clip_by_value(image + level / _MAX_LEVEL * 110.0, 0.0, 255.0)
  return tf.where(image < 128.0, added, image)


def _enhance_factor(level, seed):
  return 1.0 + _random_sign(seed, level / _MAX_LEVEL * 0.9)


def color(image, level, seed):
  gray = tf.broadcast_to(_grayscale(image), tf.shape(image))
  return _blend(gray, image, _enhance_factor(level, seed))


def contrast(image, level, seed):
  mean = tf.reduce_mean(_grayscale(image))
  return _blend(tf.fill(tf.shape(image), mean), image, _enhance_factor(level, seed))


def brightness(image, level, seed):
  return _blend(tf.zeros_like(image), image, _enhance_factor(level, seed))


def sharpness(image, level, seed):
  # PIL's SMOOTH filter; the one-pixel border keeps its original values.
  kernel = tf.constant([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13.0
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
  smooth = tf.nn.depthwise_conv2d(image[None], kernel, [1, 1, 1, 1], "VALID")[0]
  smooth = tf.pad(smooth, [[1, 1], [1, 1], [0, 0]])
  h, w = tf.shape(image)[0], tf.shape(image)[1]
  interior = tf.pad(tf.ones([h - 2, w - 2, 3]), [[1, 1], [1, 1], [0, 0]])
  degenerate = tf.where(interior > 0, smooth, image)
  return _blend(degenerate, image, _enhance_factor(level, seed))


def shear_x(image, level, seed):
  s = _random_sign(seed, level / _MAX_LEVEL * 0.3)
  return _affine(image, tf.stack([1.0, s, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0]))


def shear_y(image, level, seed):
  s = _random_sign(seed, level / _MAX_LEVEL * 0.3)
  return _affine(image, tf.stack([1.0, 0.0, 0.0, s, 1.0, 0.0, 0.0, 0.0]))


def translate_x(image, level, seed):
  width = tf.cast(tf.shape(image)[1], tf.float32)
  dx = _random_sign(seed, level / _MAX_LEVEL * 0.45 * width)
  return _affine(image, tf.stack([1.0, 0.0, dx, 0.0, 1.0, 0.0, 0.0, 0.0]))


def translate_y(image, level, seed):
  height = tf.cast(tf.shape(image)[0], tf.float32)
  dy = _random_sign(seed, level / _MAX_LEVEL * 0.45 * height)
  return _affine(image, tf.stack([1.0, 0.0, 0.0, 0.0, 1.0, dy, 0.0, 0.0]))


RAND_AUGMENT_OPS = (
    auto_contrast, equalize, invert, rotate, posterize, solarize, solarize_add,
    color, contrast, brightness, sharpness, shear_x, shear_y, translate_x, translate_y,
)


def rand_augment(image, seed, *, num_layers=2, magnitude=9.0, magnitude_std=0.5,
                 prob=0.5, ops=RAND_AUGMENT_OPS):
  """RandAugment (Cubuk et al., 2020) as used by the NAT recipe (`rand-m9-mstd0.5`).

  Args:
    image: float32 `[H, W, 3]` in [0, 255].
    seed: stateless seed, shape `[2]`.
    num_layers: ops applied in sequence, each drawn uniformly from `ops`.
    magnitude: level in [0, 10].
    magnitude_std: std of Gaussian noise added to the level for each op (clipped to
      [0, 10]); 0 keeps it fixed.
    prob: probability that each drawn op is applied at all.
    ops: the candidate ops, each `(image, level, seed) -> image`.

  Returns:
    The augmented float32 image in [0, 255].
  """
  for layer_seed in _seeds(seed, num_layers):
    s_op, s_apply, s_level, s_arg = _seeds(layer_seed, 4)
    index = tf.random.stateless_uniform((), s_op, 0, len(ops), dtype=tf.int32)
    level = magnitude + magnitude_std * tf.random.stateless_normal((), s_level)
    level = tf.clip_by_value(level, 0.0, _MAX_LEVEL)
    branches = [lambda op=op: op(image, level, s_arg) for op in ops]
    augmented = tf.switch_case(index, branches)
    image = tf.where(_uniform(s_apply) < prob, augmented, image)
    image = tf.ensure_shape(image, [None, None, 3])
  return image


def random_erase(image, seed, *, prob=0.25, min_area=0.02, max_area=1.0 / 3.0,
                 log_aspect=(math.log(0.3), math.log(1.0 / 0.3)), attempts=10):
  """Random erasing (Zhong et al., 2020), "pixel" mode, on a normalised image.

  With probability `prob`, one rectangle covering `min_area`..`max_area` of the image
  with a log-uniform aspect ratio is replaced by standard-normal noise; like the
  usual implementation, up to `attempts` boxes are drawn and the first that fits is used.
  """
  s_apply, s_area, s_aspect, s_top, s_left, s_noise = _seeds(seed, 6)
  shape = tf.shape(image)
  h, w = shape[0], shape[1]
  area = tf.cast(h * w, tf.float32) * _uniform(s_area, min_area, max_area, [attempts])
  aspect = tf.exp(_uniform(s_aspect, log_aspect[0], log_aspect[1], [attempts]))
  box_h = tf.cast(tf.round(tf.sqrt(area * aspect)), tf.int32)
  box_w = tf.cast(tf.round(tf.sqrt(area / aspect)), tf.int32)
  fits = (box_h < h) & (box_w < w)
  first = tf.argmax(tf.cast(fits, tf.int32))
  box_h, box_w = box_h[first], box_w[first]
  top = tf.random.stateless_uniform((), s_top, 0, tf.maximum(h - box_h + 1, 1), tf.int32)
  left = tf.random.stateless_uniform((), s_left, 0, tf.maximum(w - box_w + 1, 1), tf.int32)
  rows = tf.range(h)[:, None, None]
  cols = tf.range(w)[None, :, None]
  inside = (rows >= top) & (rows < top + box_h) & (cols >= left) & (cols < left + box_w)
  erase = tf.reduce_any(fits) & (_uniform(s_apply) < prob)
  noise = tf.random.stateless_normal(shape, s_noise, dtype=image.dtype)
  return tf.where(inside & erase, noise, image)
