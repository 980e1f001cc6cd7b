"""Input pipeline: TFDS datasets, ImageNet-style preprocessing, augmentations, mixup."""
