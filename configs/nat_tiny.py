"""NAT-Tiny on ImageNet-1K with the paper's recipe (drop path 0.2).

  python train.py --config configs/nat_tiny.py --data_dir ~/tensorflow_datasets --workdir runs/nat_tiny
"""

from configs import common


def get_config():
  return common.get_config(model="nat_tiny", drop_path_rate=0.2)
