"""Input data: the TFDS pipeline, ImageNet-style preprocessing, augmentations, digits.

The ImageNet statistics below are the one home of these facts: the training configs and
the inference transform (``jnat.classify``) both read them from here.
"""

# Per-channel mean and standard deviation of ImageNet's RGB pixels, on the 0-255 scale.
IMAGENET_MEAN_RGB = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD_RGB = (0.229 * 255, 0.224 * 255, 0.225 * 255)
# Evaluation centre crop: this fraction of the shorter side (the reference's crop_pct).
IMAGENET_CROP_PCT = 0.875
