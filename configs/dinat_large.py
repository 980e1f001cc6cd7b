"""DiNAT-Large on ImageNet-1K with the NAT recipe.

The paper's DiNAT-L numbers come from ImageNet-22K pre-training followed by ImageNet-1K
fine-tuning; this config trains it on ImageNet-1K from scratch with the shared recipe.

  python train.py --config configs/dinat_large.py --data_dir ~/tensorflow_datasets \
      --workdir runs/dinat_large
"""

from configs import common


def get_config():
  return common.get_config(model="dinat_large")
