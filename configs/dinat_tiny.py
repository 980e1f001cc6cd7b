"""DiNAT-Tiny on ImageNet-1K with the paper's recipe.

  python train.py --config configs/dinat_tiny.py --data_dir ~/tensorflow_datasets --workdir runs/dinat_tiny
"""

from configs import common


def get_config():
  return common.get_config(model="dinat_tiny")
