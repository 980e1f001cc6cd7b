"""The embedded default: a small NAT on scikit-learn's handwritten digits, offline, on CPU.

1797 real 8x8 digit images ship with scikit-learn; the first run writes them once as the
TFDS dataset `sklearn_digits` (train 1438 / held-out test 359) and reads them through the
same input code as ImageNet. Images are upsampled to 32x32 by the crop-and-resize of the
ImageNet preprocessing. Flips are off (digits are not mirror symmetric) and the heavy
ImageNet regularisation is scaled down for 1.4k training images. A few minutes on 2 CPU
cores; reaches about 96-97% top-1 on the held-out test split.

  python train.py --config configs/digits.py
  python train.py --config configs/digits.py --config.num_epochs=10 --workdir runs/digits
"""

from configs import common


def get_config():
  c = common.get_config(model="nat_nano")
  c.model_overrides.drop_path_rate = 0.05  # lighter than nat_nano's own for 1.4k images
  c.compute_dtype = "float32"  # bfloat16 brings nothing on CPU

  c.dataset = "sklearn_digits"
  c.train_split = "train"
  c.eval_split = "test"
  c.num_classes = 10
  c.image_size = 32
  c.crop_pct = 1.0
  c.interpolation = "bilinear"
  c.mean_rgb = (127.5, 127.5, 127.5)
  c.std_rgb = (127.5, 127.5, 127.5)
  c.crop_scale = (0.85, 1.0)
  c.crop_ratio = (0.9, 1.1)
  c.flip = False
  c.rand_augment.num_layers = 0
  c.random_erase_prob = 0.0
  c.shuffle_buffer = 2048

  c.mixup_alpha = 0.0
  c.cutmix_alpha = 0.0
  c.label_smoothing = 0.1

  c.global_batch_size = 64
  c.eval_batch_size = 128
  c.num_epochs = 20.0
  c.warmup_epochs = 1.0
  c.cooldown_epochs = 0.0
  c.learning_rate = 2e-3
  c.min_learning_rate = 1e-5
  c.weight_decay = 0.05

  c.log_every_steps = 10
  c.checkpoint_every_steps = 200
  return c
