"""jnat: neighborhood attention for JAX.

NATTEN-exact 1D/2D/3D neighborhood attention with a pure-JAX reference backend and C++/CUDA
kernels registered as XLA FFI custom calls.
"""

from jnat.nn import NeighborhoodAttention
from jnat.ops import available_backends
from jnat.ops import na1d
from jnat.ops import na1d_av
from jnat.ops import na1d_qk
from jnat.ops import na2d
from jnat.ops import na2d_av
from jnat.ops import na2d_qk
from jnat.ops import na3d
from jnat.ops import na3d_av
from jnat.ops import na3d_qk

__version__ = "0.1.0"

__all__ = [
    "NeighborhoodAttention",
    "available_backends",
    "na1d",
    "na1d_av",
    "na1d_qk",
    "na2d",
    "na2d_av",
    "na2d_qk",
    "na3d",
    "na3d_av",
    "na3d_qk",
]
