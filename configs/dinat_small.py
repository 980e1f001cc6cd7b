"""DiNAT-Small on ImageNet-1K with the paper's recipe.

  python train.py --config configs/dinat_small.py --data_dir ~/tensorflow_datasets --workdir runs/dinat_small
"""

from configs import common


def get_config():
  return common.get_config(model="dinat_small")
