"""Which CPU the ``cpu`` backend runs on and which of its kernels' instruction sets it uses.

The CPU kernels are compiled for several instruction sets (x86-64: ``avx512``, ``avx2``
with FMA, ``baseline`` SSE2; Arm: ``baseline`` NEON) and pick the best one the CPU supports
when jnat loads. The environment variable ``JNAT_CPU_ISA`` picks one explicitly; an
unknown or unsupported name makes every cpu-backend call fail, and :func:`cpu_info` raise,
with a message naming the rule.
"""

from __future__ import annotations

import os
import platform


def _cpu_model() -> str:
  """The CPU's name; on x86 with its family and model numbers, which tell generations apart
  where a virtual machine shows only a brand ("AMD EPYC": Zen 3 is family 25, Zen 5 26)."""
  fields = {}
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
  except OSError:
    pass
  name = fields.get("model name") or fields.get("Model")
  if not name:
    return platform.processor() or platform.machine()
  if "cpu family" in fields and "model" in fields:
    return f"{name} (family {fields['cpu family']}, model {fields['model']})"
  return name


def usable_cores() -> int:
  """The cores this process may run on (its affinity mask, as ``taskset`` sets it), which is
  also what XLA sizes its CPU thread pool by; the machine's count where there is no mask."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # no affinity masks (macOS, Windows)
    return os.cpu_count() or 1


def cpu_info() -> dict:
  """The CPU and the cpu backend's kernels on it.

  Returns a dict: ``model`` (the CPU's name), ``isa`` (the instruction set the kernels run
  with), ``supported`` (this build's instruction sets that the CPU supports, best first),
  ``baseline`` (what the baseline's vectors are here: ``sse2`` or ``neon``), ``cores`` (the
  cores this process may run on), ``l2_cache_bytes`` (the per-core L2 cache as the operating
  system reports it, 0 if it does not; the forward kernel sizes its working set by it) and
  ``pool_threads`` (the threads of XLA's intra-op pool that the kernels share, as the last
  kernel call saw them; 0 before the first call).

  Raises RuntimeError without the compiled CPU module, and ValueError when ``JNAT_CPU_ISA``
  names no instruction set this CPU supports.
  """
  try:
    from jnat import _jnat_cpu
  except ImportError as e:
    raise RuntimeError("this jnat installation has no compiled CPU kernels") from e
  return dict(model=_cpu_model(), isa=_jnat_cpu.isa(), supported=list(_jnat_cpu.supported_isas()),
              baseline=_jnat_cpu.baseline_vectors(), cores=usable_cores(),
              l2_cache_bytes=_jnat_cpu.l2_cache_bytes(), pool_threads=_jnat_cpu.pool_threads())
