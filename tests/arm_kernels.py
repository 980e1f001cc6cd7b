"""jnat's CPU kernels built for Arm (aarch64, whose baseline path is NEON) and run under
emulation, for the tests: test_cpu_arm.py checks the builds, test_cpu_isa.py runs its kernel
tests on them as two more instruction-set paths ("arm-neon", "arm-neon-clang").

The kernels' translation units are cross-compiled by Debian's aarch64 GNU toolchain
(g++-aarch64-linux-gnu) or by clang, and linked with tests/cpu_kernel_runner.cc into a
static aarch64 program; qemu-user runs it. While `emulating` is active, every kernel call of
jnat's "cpu" backend goes to that program (operands as raw float32 files, through jax.pure_callback)
instead of the x86 module, so the op-level checks hold the Arm kernels' results to NATTEN's
golden data and to the xla reference. qemu translates the instructions; it does not time
them, so nothing here says how fast the Arm kernels are.
"""

import contextlib
import pathlib
import shutil
import subprocess
import tempfile

import jax
import numpy as np
import pytest

import na_testing
from jnat import _ffi

ROOT = pathlib.Path(__file__).resolve().parent.parent
CXX, OBJDUMP = "aarch64-linux-gnu-g++", "aarch64-linux-gnu-objdump"
# The compilers the kernels are built with: GCC, and clang (macOS's compiler) targeting the
# same Linux system; GCC links both.
COMPILERS = {"gcc": [CXX], "clang": ["clang++", "--target=aarch64-linux-gnu"]}
QEMU = shutil.which("qemu-aarch64") or shutil.which("qemu-aarch64-static")
# CMakeLists.txt's JNAT_CPU_FLAGS; with no target flags, aarch64's baseline is NEON.
FLAGS = ["-std=gnu++17", "-O3", "-fno-math-errno", "-ffp-contract=fast", "-fPIC", "-w",
         f"-I{ROOT / 'xla_ffi'}"]
KERNEL_UNITS = ("na_cpu_isa_kernels", "na_cpu_isa")
THREADS = 3  # the runner's threads: an odd count, so that the backward splits work into bands


def build(out: pathlib.Path, compiler: str = "gcc") -> pathlib.Path:
  """Compiles the kernels with `compiler` (objects `<unit>.o` in `out`) and links the runner;
  returns it. Skips the test when a tool is missing."""
  command = COMPILERS[compiler]
  for tool in {CXX, command[0]}:
    if shutil.which(tool) is None:
      pytest.skip(f"{tool} is not installed (Debian: g++-aarch64-linux-gnu, clang)")
  sources = [ROOT / "xla_ffi" / "cpu" / f"{u}.cc" for u in KERNEL_UNITS]
  objects = []
  for source in sources + [ROOT / "tests" / "cpu_kernel_runner.cc"]:
    objects.append(out / f"{source.stem}.o")
    subprocess.run([*command, *FLAGS, "-c", str(source), "-o", str(objects[-1])], check=True)
  # Static: qemu then needs no aarch64 libraries.
  subprocess.run([CXX, "-static", "-pthread", *map(str, objects), "-o", str(out / "runner")],
                 check=True)
  return out / "runner"


def run(runner, target, static, *args):
  """``target``'s kernel call (the operands and results of jnat/_ffi.py) by the Arm runner."""
  nbhd, scale = static
  in_roles = _ffi._TARGETS[target][0]
  result_types = _ffi._result_types(target, static, args)
  q, kv = args[0], args[in_roles.index("KV")]  # q: [B,X,Y,Z,H,...], kv: [B,X,Y,Z,Hkv,D]
  has_rpb = "R" in in_roles and args[in_roles.index("R")].ndim > 1
  geometry = [q.shape[0], q.shape[4], kv.shape[4], kv.shape[5], *q.shape[1:4],
              *nbhd.kernel_size, *nbhd.stride, *nbhd.dilation, *map(int, nbhd.is_causal),
              int(has_rpb), THREADS, scale or 0.0]

  def host(*arrays):
    with tempfile.TemporaryDirectory() as d:
      pathlib.Path(d, "geometry.txt").write_text(" ".join(map(str, geometry)))
      for i, a in enumerate(arrays):
        np.asarray(a, np.float32).tofile(f"{d}/in{i}.bin")
      proc = subprocess.run([QEMU, str(runner), target, d], capture_output=True, text=True,
                            check=False)
      assert proc.returncode == 0, proc.stderr
      assert proc.stdout.split() == ["baseline"]  # NEON: Arm's one path
      return [np.fromfile(f"{d}/out{i}.bin", np.float32).reshape(t.shape).astype(t.dtype)
              for i, t in enumerate(result_types)]

  return tuple(jax.pure_callback(host, result_types, *args))


def _clear_compiled():
  """Drops the jitted functions, which hold kernel calls of one kind or the other."""
  for fn in (na_testing._fused_grad_fn, na_testing._unfused_grad_fn, na_testing.natten_vjp_fn,
             na_testing._natten_unfused_fn):
    fn.cache_clear()
  jax.clear_caches()


@contextlib.contextmanager
def emulating(runner):
  """Within it, jnat's "cpu" backend runs its kernels on Arm (the x86 module only decides
  that the backend exists)."""
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(_ffi, "_sharded",
                  lambda target, static, has_rpb, *args: run(runner, target, static, *args))
    _clear_compiled()
    try:
      yield
    finally:
      _clear_compiled()
