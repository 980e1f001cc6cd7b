"""The CPU kernels build for Arm (aarch64, NEON) from the same sources (tests/arm_kernels.py).

Needs Debian's aarch64 cross compiler (g++-aarch64-linux-gnu; .ci/run installs it where it
can), and clang for the clang build. The kernel tests of test_cpu_isa.py run on these builds
under qemu as the paths "arm-neon" and "arm-neon-clang"; here, the builds themselves and the
runner that carries those runs.
"""

import subprocess

import jax.ffi
import numpy as np
import pytest

import arm_kernels

pytestmark = arm_kernels.needs_cross_compiler


@pytest.mark.parametrize("compiler", arm_kernels.COMPILERS)
def test_cpu_kernels_cross_compile_for_aarch64_with_neon(arm_runner, compiler, tmp_path):
  kernels = arm_runner(compiler).parent / "na_cpu_isa_kernels.o"
  disassembly = subprocess.run([arm_kernels.OBJDUMP, "-d", str(kernels)], capture_output=True,
                               text=True, check=True).stdout
  assert disassembly.count("fmla\tv") > 10  # vector FMAs on 128-bit NEON registers
  assert disassembly.count("tbl\tv") > 10  # lane permutes in registers (Permute)
  # The handlers too: they include XLA's FFI headers, which must build for Arm as well.
  subprocess.run([*arm_kernels.COMPILERS[compiler], *arm_kernels.FLAGS,
                  f"-I{jax.ffi.include_dir()}", "-c",
                  str(arm_kernels.ROOT / "xla_ffi" / "cpu" / "na_cpu.cc"), "-o",
                  str(tmp_path / "na_cpu.o")], check=True)


# B1 H2 Hkv1 D8, 16 tokens along the last axis, kernel 5 (or 17: longer than the axis), no
# rpb, one thread, scale 0.5; q, k, v (short by one float) and rpb.
GEOMETRY = "1 2 1 8  1 1 16  1 1 {kernel}  1 1 1  1 1 1  0 0 0  0 1 0.5"
OPERANDS = (2 * 16 * 8, 16 * 8, 16 * 8 - 1, 0)


@pytest.mark.parametrize("kernel, error", [
    (5, "in2.bin holds 508 bytes; the geometry needs 512"),
    (17, "invalid geometry"),
])
def test_the_runner_rejects_what_does_not_fit(arm_runner, tmp_path, kernel, error):
  """An error, not a read past an operand's end."""
  if arm_kernels.QEMU is None:
    pytest.skip("qemu-aarch64 is not installed (Debian: qemu-user)")
  (tmp_path / "geometry.txt").write_text(GEOMETRY.format(kernel=kernel))
  for i, n in enumerate(OPERANDS):
    np.zeros(n, np.float32).tofile(tmp_path / f"in{i}.bin")
  proc = subprocess.run([arm_kernels.QEMU, str(arm_runner("gcc")), "jnat_na_fwd", str(tmp_path)],
                        capture_output=True, text=True, check=False)
  assert proc.returncode == 2
  assert error in proc.stderr
  assert not (tmp_path / "out0.bin").exists()
