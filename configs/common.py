"""The NAT/DiNAT ImageNet-1K training recipe; every variant config starts from here.

The recipe (NAT paper, Sec. 4.1, and its reference timm configs): AdamW (0.9, 0.999,
eps 1e-8), lr 1e-3 at global batch 1024, weight decay 0.05 (none on norms, biases and
relative positional bias), 300 epochs of per-step cosine decay to 5e-6 after 20 warmup
epochs from 1e-6, then 10 cooldown epochs; gradient clipping at 5.0; label smoothing 0.1;
Mixup 0.8 / CutMix 1.0 (switch prob 0.5); RandAugment m9-mstd0.5; random erasing 0.25;
stochastic depth per variant (set by the variant in jnat.models.zoo); crop_pct 0.875; EMA off.
bfloat16 compute, float32 params.

Command lines (any field can be overridden with --config.<field>=<value>):
  python train.py --config configs/nat_tiny.py --data_dir ~/tensorflow_datasets \
      --workdir runs/nat_tiny
  python train.py --config configs/nat_tiny.py --config.global_batch_size=256 \
      --config.learning_rate=2.5e-4 --workdir runs/nat_tiny_b256
  python train.py --config configs/nat_tiny.py --bench   # training throughput only
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from jnat import data


def get_config(model: str = "nat_tiny") -> ml_collections.ConfigDict:
  """The paper's ImageNet-1K recipe for `model` (a `jnat.models.VARIANTS` key)."""
  c = ml_collections.ConfigDict()

  # Model.
  c.model = model
  # Keyword arguments for the model class (any field of jnat.models.NAT); None keeps the
  # variant's value (e.g. its stochastic depth rate, from the paper).
  c.model_overrides = ml_collections.ConfigDict(
      {"drop_path_rate": config_dict.placeholder(float)})
  c.compute_dtype = "bfloat16"  # activations; parameters and optimizer stay float32
  # Neighborhood attention backend ("tiled", "xla", "cpu", "cuda"); None: the platform's default.
  c.attention_backend = config_dict.placeholder(str)

  # Data (TFDS). data_dir None means TFDS's default (~/tensorflow_datasets).
  c.dataset = "imagenet2012"
  c.data_dir = config_dict.placeholder(str)
  c.train_split = "train"
  c.eval_split = "validation"
  c.num_classes = 1000
  c.image_size = 224
  c.crop_pct = data.IMAGENET_CROP_PCT  # eval: centre crop of this fraction of the shorter side
  c.interpolation = "bicubic"
  c.mean_rgb = data.IMAGENET_MEAN_RGB
  c.std_rgb = data.IMAGENET_STD_RGB
  c.crop_scale = (0.08, 1.0)  # random-resized-crop area range
  c.crop_ratio = (3.0 / 4.0, 4.0 / 3.0)
  c.flip = True
  c.rand_augment = ml_collections.ConfigDict(
      {"num_layers": 2, "magnitude": 9.0, "magnitude_std": 0.5, "prob": 0.5})
  c.random_erase_prob = 0.25
  c.shuffle_buffer = 16 * 1024
  c.prefetch_batches = 2  # global batches in flight to the devices

  # Mixup / CutMix / label smoothing (applied on the device, one draw per batch).
  c.mixup_alpha = 0.8
  c.cutmix_alpha = 1.0
  c.mixup_prob = 1.0
  c.mixup_switch_prob = 0.5
  c.label_smoothing = 0.1

  # Optimization. Training lasts num_epochs + cooldown_epochs epochs.
  c.global_batch_size = 1024  # summed over all devices of all hosts
  c.eval_batch_size = 1024
  c.num_epochs = 300.0
  c.warmup_epochs = 20.0
  c.cooldown_epochs = 10.0
  c.num_train_steps = -1  # > 0 overrides the epoch count (short runs, tests)
  c.learning_rate = 1e-3
  c.warmup_learning_rate = 1e-6
  c.min_learning_rate = 5e-6
  c.weight_decay = 0.05
  c.adam_b1 = 0.9
  c.adam_b2 = 0.999
  c.adam_eps = 1e-8
  c.grad_clip_norm = 5.0  # 0 disables clipping
  c.ema_decay = 0.0  # > 0 keeps an EMA of the parameters and evaluates it too

  # Bookkeeping.
  c.seed = 0
  c.log_every_steps = 100
  c.eval_every_epochs = 1
  c.checkpoint_every_steps = 2000
  c.keep_checkpoints = 3

  # Benchmark mode (train.py --bench): synthetic batches, no input pipeline.
  c.bench_steps = 20
  c.bench_warmup_steps = 3
  return c
