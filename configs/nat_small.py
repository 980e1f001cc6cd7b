"""NAT-Small on ImageNet-1K with the paper's recipe.

  python train.py --config configs/nat_small.py --data_dir ~/tensorflow_datasets --workdir runs/nat_small
"""

from configs import common


def get_config():
  return common.get_config(model="nat_small")
