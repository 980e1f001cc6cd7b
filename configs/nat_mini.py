"""NAT-Mini on ImageNet-1K with the paper's recipe.

  python train.py --config configs/nat_mini.py --data_dir ~/tensorflow_datasets --workdir runs/nat_mini
"""

from configs import common


def get_config():
  return common.get_config(model="nat_mini")
