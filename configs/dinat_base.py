"""DiNAT-Base on ImageNet-1K with the paper's recipe.

  python train.py --config configs/dinat_base.py --data_dir ~/tensorflow_datasets --workdir runs/dinat_base
"""

from configs import common


def get_config():
  return common.get_config(model="dinat_base")
