"""Classifies image files with a converted NAT / DiNAT checkpoint.

Preprocessing is the reference evaluation transform (timm's): resize the shorter side to
``resolution / crop_pct`` (bicubic), centre-crop ``resolution`` and normalise with the
ImageNet mean and standard deviation (crop_pct and the statistics: ``jnat.data``).

Command line::

  python -m jnat.classify --model nat_tiny --checkpoint converted/nat_tiny cat.jpg
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from jnat import data
from jnat import models


def preprocess(image: Image.Image, resolution: int = 224) -> np.ndarray:
  """An image as the network's input: ``[resolution, resolution, 3]`` float32, normalised."""
  image = image.convert("RGB")
  short = int(resolution / data.IMAGENET_CROP_PCT)
  size = tuple(short * s // min(image.size) for s in image.size)  # torchvision's rounding
  image = image.resize(size, Image.Resampling.BICUBIC)
  left, top = ((s - resolution) // 2 for s in size)
  image = image.crop((left, top, left + resolution, top + resolution))
  pixels = np.asarray(image, np.float32)
  return (pixels - np.float32(data.IMAGENET_MEAN_RGB)) / np.float32(data.IMAGENET_STD_RGB)


def top_k(model, params, images: np.ndarray, k: int = 5) -> tuple[np.ndarray, np.ndarray]:
  """The ``k`` most probable classes per image: ``(probabilities, indices)``, each ``[B, k]``."""
  logits = jax.jit(model.apply)({"params": params}, jnp.asarray(images))
  probs, indices = jax.lax.top_k(jax.nn.softmax(logits.astype(jnp.float32)), k)
  return np.asarray(probs), np.asarray(indices)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description="Classify images with a NAT/DiNAT checkpoint.")
  parser.add_argument("images", nargs="+", help="image files")
  parser.add_argument("--model", required=True, choices=list(models.VARIANTS))
  parser.add_argument("--checkpoint", required=True, help="directory from jnat.convert")
  parser.add_argument("--labels", help="text file with one class name per line")
  parser.add_argument("--top", type=int, default=5)
  parser.add_argument("--resolution", type=int, default=224)
  args = parser.parse_args(argv)

  model, params = models.create(args.model, checkpoint=args.checkpoint)
  labels = None
  if args.labels:
    with open(args.labels) as f:
      labels = [line.strip() for line in f]
  batch = np.stack([preprocess(Image.open(path), args.resolution) for path in args.images])
  probs, indices = top_k(model, params, batch, min(args.top, model.num_classes))
  for path, p, idx in zip(args.images, probs, indices):
    print(path)
    for prob, i in zip(p, idx):
      name = f"  {labels[i]}" if labels else ""
      print(f"  {prob:7.2%}  class {i:>4}{name}")


if __name__ == "__main__":
  main()
