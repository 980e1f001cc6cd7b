"""Mixup and CutMix on a device batch, in JAX (jit-friendly, one draw per batch).

Each example is mixed with its partner in the reversed batch, with one mixing
coefficient per batch, as in the NAT recipe (mixup 0.8, cutmix 1.0, switch prob 0.5).
Label smoothing is folded into the soft targets.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def smooth_one_hot(labels, num_classes, smoothing):
  """One-hot targets with `smoothing` spread uniformly over all classes."""
  off = smoothing / num_classes
  return jax.nn.one_hot(labels, num_classes) * (1.0 - smoothing) + off


def _cutmix_mask(rng, lam, height, width):
  """Box mask (1 inside the pasted box) covering about 1 - lam of the image.

  Returns the mask `[H, W]` and the area-corrected lambda (fraction left unmixed).
  """
  ry, rx = jax.random.uniform(rng, (2,))
  cut = jnp.sqrt(1.0 - lam)
  cut_h, cut_w = jnp.floor(height * cut), jnp.floor(width * cut)
  cy, cx = jnp.floor(ry * height), jnp.floor(rx * width)
  y0 = jnp.clip(cy - cut_h // 2, 0, height)
  y1 = jnp.clip(cy + cut_h // 2, 0, height)
  x0 = jnp.clip(cx - cut_w // 2, 0, width)
  x1 = jnp.clip(cx + cut_w // 2, 0, width)
  rows = jnp.arange(height)[:, None]
  cols = jnp.arange(width)[None, :]
  mask = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)
  lam = 1.0 - (y1 - y0) * (x1 - x0) / (height * width)
  return mask, lam


def mixup_cutmix(rng, images, labels, *, num_classes, mixup_alpha=0.8,
                 cutmix_alpha=1.0, prob=1.0, switch_prob=0.5, label_smoothing=0.1):
  """Mixes a batch with its reverse by Mixup or CutMix.

  Args:
    rng: PRNG key.
    images: `[B, H, W, C]` float images.
    labels: `[B]` integer labels.
    num_classes: number of classes of the soft targets.
    mixup_alpha: Beta(alpha, alpha) parameter of Mixup; 0 disables Mixup.
    cutmix_alpha: Beta(alpha, alpha) parameter of CutMix; 0 disables CutMix.
    prob: probability that the batch is mixed at all.
    switch_prob: probability of CutMix rather than Mixup when both are enabled.
    label_smoothing: smoothing folded into the targets.

  Returns:
    `(images, targets)` with targets `[B, num_classes]` float32 summing to one.
  """
  targets = smooth_one_hot(labels, num_classes, label_smoothing)
  if (mixup_alpha <= 0 and cutmix_alpha <= 0) or prob <= 0:
    return images, targets
  r_apply, r_switch, r_mix, r_cut, r_box = jax.random.split(rng, 5)
  apply = jax.random.uniform(r_apply) < prob
  if mixup_alpha > 0 and cutmix_alpha > 0:
    use_cutmix = jax.random.uniform(r_switch) < switch_prob
  else:
    use_cutmix = jnp.asarray(cutmix_alpha > 0)
  lam_mix = jax.random.beta(r_mix, max(mixup_alpha, 1e-3), max(mixup_alpha, 1e-3))
  lam_cut = jax.random.beta(r_cut, max(cutmix_alpha, 1e-3), max(cutmix_alpha, 1e-3))
  height, width = images.shape[1], images.shape[2]
  box, lam_box = _cutmix_mask(r_box, lam_cut, height, width)

  partner = images[::-1]
  mixed = lam_mix * images + (1.0 - lam_mix) * partner
  cut = jnp.where(box[None, :, :, None], partner, images)
  new_images = jnp.where(apply, jnp.where(use_cutmix, cut, mixed), images)
  lam = jnp.where(apply, jnp.where(use_cutmix, lam_box, lam_mix), 1.0)
  new_targets = lam * targets + (1.0 - lam) * targets[::-1]
  return new_images.astype(images.dtype), new_targets
