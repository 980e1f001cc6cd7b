"""jnat: neighborhood attention for JAX.

NATTEN-exact 1D/2D/3D neighborhood attention on four backends: C++ (CPU) and CUDA kernels
registered as XLA FFI custom calls, a tiled pure-JAX backend for any XLA device, and the
pure-JAX reference.
"""

import importlib
import importlib.metadata

from jnat.cpu_info import cpu_info
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

__version__ = importlib.metadata.version("jnat")

# Imported on first use, so that `import jnat` for the ops alone does not load Flax.
_LAZY = {"NeighborhoodAttention": "jnat.nn"}


def __getattr__(name):
  if name in _LAZY:
    return getattr(importlib.import_module(_LAZY[name]), name)
  raise AttributeError(f"module 'jnat' has no attribute {name!r}")


__all__ = [
    "NeighborhoodAttention",
    "available_backends",
    "cpu_info",
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
