"""The CPU kernels build for Arm (aarch64, NEON) from the same sources (tests/arm_kernels.py).

Needs Debian's aarch64 cross compiler (g++-aarch64-linux-gnu; .ci/run installs it where it
can), and clang for the clang build; arm_runner skips without them. The kernel tests of
test_cpu_isa.py run on these builds under qemu as the paths "arm-neon" and "arm-neon-clang";
here, the builds themselves and the runner that carries those runs.
"""

import os
import subprocess

import jax.ffi
import numpy as np
import pytest

import arm_kernels


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


def _run_forward(runner, directory, kernel=5, v_floats=16 * 8, isa=None):
  """The runner's jnat_na_fwd on zeros: B1 H2 Hkv1 D8, 16 tokens along the last axis, kernel
  `kernel`, no rpb, one thread, scale 0.5; v of `v_floats` floats; JNAT_CPU_ISA=`isa`."""
  if arm_kernels.QEMU is None:
    pytest.skip("qemu-aarch64 is not installed (Debian: qemu-user)")
  geometry = f"1 2 1 8  1 1 16  1 1 {kernel}  1 1 1  1 1 1  0 0 0  0 1 0.5"
  (directory / "geometry.txt").write_text(geometry)
  for i, n in enumerate((2 * 16 * 8, 16 * 8, v_floats, 0)):  # q, k, v, rpb
    np.zeros(n, np.float32).tofile(directory / f"in{i}.bin")
  env = {k: v for k, v in os.environ.items() if k != "JNAT_CPU_ISA"}
  if isa is not None:
    env["JNAT_CPU_ISA"] = isa
  return subprocess.run([arm_kernels.QEMU, str(runner), "jnat_na_fwd", str(directory)],
                        capture_output=True, text=True, check=False, env=env)


@pytest.mark.parametrize("change, error", [
    (dict(v_floats=16 * 8 - 1), "in2.bin holds 508 bytes; the geometry needs 512"),
    (dict(kernel=17), "invalid geometry"),  # a window longer than the axis
])
def test_the_runner_rejects_what_does_not_fit(arm_runner, tmp_path, change, error):
  """An error, not a read past an operand's end."""
  proc = _run_forward(arm_runner("gcc"), tmp_path, **change)
  assert proc.returncode == 2
  assert error in proc.stderr
  assert not (tmp_path / "out0.bin").exists()


@pytest.mark.parametrize("isa, outcome", [
    (None, "baseline"),
    ("baseline", "baseline"),
    ("avx2", "JNAT_CPU_ISA=avx2: CPU instruction set 'avx2' is not supported by this CPU; it "
             "supports: baseline"),
])
def test_arm_selects_its_one_instruction_set(arm_runner, tmp_path, isa, outcome):
  """On Arm the baseline (NEON) is the only path: picked by default and by name, and the
  x86 names are a clear error."""
  proc = _run_forward(arm_runner("gcc"), tmp_path, isa=isa)
  if outcome == "baseline":
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["baseline"]
    np.testing.assert_array_equal(np.fromfile(tmp_path / "out0.bin", np.float32), 0.0)
  else:
    assert proc.returncode == 2
    assert outcome in proc.stderr
