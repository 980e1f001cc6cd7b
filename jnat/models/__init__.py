"""NAT and DiNAT image classifiers: the model class, the paper variants and ``create``."""

from jnat.models.nat import NAT
from jnat.models.nat import weight_decay_mask
from jnat.models.zoo import PAPER_STATS
from jnat.models.zoo import VARIANTS
from jnat.models.zoo import abstract_params
from jnat.models.zoo import count_params
from jnat.models.zoo import create
from jnat.models.zoo import dinat_base
from jnat.models.zoo import dinat_large
from jnat.models.zoo import dinat_mini
from jnat.models.zoo import dinat_nano
from jnat.models.zoo import dinat_small
from jnat.models.zoo import dinat_tiny
from jnat.models.zoo import get
from jnat.models.zoo import nat_base
from jnat.models.zoo import nat_mini
from jnat.models.zoo import nat_nano
from jnat.models.zoo import nat_small
from jnat.models.zoo import nat_tiny

__all__ = [
    "NAT",
    "PAPER_STATS",
    "VARIANTS",
    "abstract_params",
    "count_params",
    "create",
    "dinat_base",
    "dinat_large",
    "dinat_mini",
    "dinat_nano",
    "dinat_small",
    "dinat_tiny",
    "get",
    "nat_base",
    "nat_mini",
    "nat_nano",
    "nat_small",
    "nat_tiny",
    "weight_decay_mask",
]
