"""DiNAT-Mini on ImageNet-1K with the paper's recipe.

  python train.py --config configs/dinat_mini.py --data_dir ~/tensorflow_datasets --workdir runs/dinat_mini
"""

from configs import common


def get_config():
  return common.get_config(model="dinat_mini")
