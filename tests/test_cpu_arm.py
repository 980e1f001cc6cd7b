"""The CPU kernels compile for Arm (aarch64, NEON) from the same sources.

Cross-compiles the kernel translation units with the aarch64 GNU toolchain when it is
installed (Debian: g++-aarch64-linux-gnu; .ci/run installs it where it can) and checks that
the kernels use NEON vector FMAs. Nothing runs on Arm here: this proves the path builds.
"""

import pathlib
import shutil
import subprocess

import jax.ffi
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
CXX, OBJDUMP = "aarch64-linux-gnu-g++", "aarch64-linux-gnu-objdump"
UNITS = ("na_cpu_isa_kernels", "na_cpu_isa", "na_cpu")


@pytest.mark.skipif(shutil.which(CXX) is None, reason=f"{CXX} is not installed")
def test_cpu_kernels_cross_compile_for_aarch64_with_neon(tmp_path):
  for unit in UNITS:
    obj = tmp_path / f"{unit}.o"
    subprocess.run([CXX, "-std=gnu++17", "-O3", "-ffp-contract=fast", "-fPIC", "-w",
                    f"-I{jax.ffi.include_dir()}", f"-I{ROOT / 'xla_ffi'}", "-c",
                    str(ROOT / "xla_ffi" / "cpu" / f"{unit}.cc"), "-o", str(obj)], check=True)
  disassembly = subprocess.run([OBJDUMP, "-d", str(tmp_path / "na_cpu_isa_kernels.o")],
                               capture_output=True, text=True, check=True).stdout
  assert disassembly.count("fmla\tv") > 10  # vector FMAs on 128-bit NEON registers
