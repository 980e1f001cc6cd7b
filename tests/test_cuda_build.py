"""The CUDA build's ptxas resource report: the tensor-core kernels never spill registers.

The CUDA module's build keeps ptxas's report (registers, stack, spill stores and loads per
kernel and architecture) beside the module (xla_ffi/cuda/ptxas_log.py). Reading it costs
nothing, so CI checks every build without a GPU and without compiling anything; the test
skips where the module was built without CUDA.
"""

import importlib.util
import pathlib
import re

import pytest

_ENTRY = re.compile(r"Compiling entry function '(\S+)' for '(sm_\w+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
# Tensor-core kernels are named *Mma*Kernel (mangled names keep the identifier whole).
_TENSOR_CORE = re.compile(r"\d+(\w*Mma\w*Kernel)")


def parse_report(text):
  """{(mangled kernel name, arch): {"registers", "stack", "spill_stores", "spill_loads"}}."""
  kernels, current = {}, None
  for line in text.splitlines():
    if m := _ENTRY.search(line):
      current = kernels.setdefault((m.group(1), m.group(2)), {})
    elif current is not None and (m := _FRAME.search(line)):
      current.update(stack=int(m.group(1)), spill_stores=int(m.group(2)),
                     spill_loads=int(m.group(3)))
    elif current is not None and (m := _USED.search(line)):
      current["registers"] = int(m.group(1))
  return kernels


def _report_path():
  spec = importlib.util.find_spec("jnat._jnat_cuda")
  if spec is None:
    return None
  return pathlib.Path(spec.origin).parent / "_jnat_cuda_ptxas.txt"


_SAMPLE = """\
ptxas info    : Compiling entry function '_ZN4jnat4cuda12FwdMmaKernelI13__nv_bfloat16Li64EEEvNS0_11FwdTileArgsE' for 'sm_80'
ptxas info    : Function properties for _ZN4jnat4cuda12FwdMmaKernelI13__nv_bfloat16Li64EEEvNS0_11FwdTileArgsE
    16 bytes stack frame, 12 bytes spill stores, 20 bytes spill loads
ptxas info    : Used 168 registers, used 1 barriers, 392 bytes cmem[0]
ptxas info    : Compiling entry function '_ZN4jnat4cuda8QKKernelENS0_6NaDimsE' for 'sm_90a'
ptxas info    : Function properties for _ZN4jnat4cuda8QKKernelENS0_6NaDimsE
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 98 registers, used 0 barriers, 592 bytes cmem[0]
"""


def test_parse_report_reads_every_field():
  kernels = parse_report(_SAMPLE)
  fwd = kernels[("_ZN4jnat4cuda12FwdMmaKernelI13__nv_bfloat16Li64EEEvNS0_11FwdTileArgsE", "sm_80")]
  assert fwd == {"stack": 16, "spill_stores": 12, "spill_loads": 20, "registers": 168}
  assert kernels[("_ZN4jnat4cuda8QKKernelENS0_6NaDimsE", "sm_90a")]["registers"] == 98
  assert [bool(_TENSOR_CORE.search(name)) for name, _ in kernels] == [True, False]


def test_tensor_core_kernels_do_not_spill():
  path = _report_path()
  if path is None:
    pytest.skip("built without the CUDA module")
  if not path.exists():
    pytest.skip(f"the CUDA module has no ptxas report ({path.name}); rebuild it")
  kernels = parse_report(path.read_text())
  tensor_core = {key: k for key, k in kernels.items() if _TENSOR_CORE.search(key[0])}
  assert tensor_core, f"{path} lists no tensor-core kernel"
  for (name, arch), k in tensor_core.items():
    assert set(k) == {"stack", "spill_stores", "spill_loads", "registers"}, (name, arch, k)
    assert k["spill_stores"] == 0 and k["spill_loads"] == 0, (name, arch, k)
