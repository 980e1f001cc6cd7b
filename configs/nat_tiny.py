"""NAT-Tiny on ImageNet-1K with the paper's recipe.

  python train.py --config configs/nat_tiny.py --data_dir ~/tensorflow_datasets --workdir runs/nat_tiny
"""

from configs import common


def get_config():
  return common.get_config(model="nat_tiny")
