"""Builds of the CPU module made here with CMake, checked for what the installed one cannot show.

- Each instruction set's instructions stay inside the kernels compiled for it. The build's
  object files, disassembled with their symbols (the module itself is stripped), show
  AVX-512 instructions only in functions of namespace jnat::cpu::avx512, AVX (VEX-encoded)
  ones only there and in jnat::cpu::avx2, and only SSE elsewhere, nanobind and the FFI
  handlers included: a CPU without AVX-512 (or AVX2) never meets them outside the kernels it
  is never dispatched to. Checking every object, not just the linked module, also covers
  inline functions that several instruction sets' files compile: the linker keeps any one of
  their copies. For the default compiler and for clang.
- The module builds with clang, the compiler of macOS, whose kernels take the instruction
  sets through `#pragma clang attribute` (na_cpu_isa_kernels.cc), and passes
  tests/test_cpu_isa.py (NATTEN golden data, cpu == reference forward and gradients on every
  instruction set the CPU has, both backward targets, the unfused ops) in a fresh process.
- The avx512 path's code runs on CPUs without AVX-512. It differs from the avx2 path in more
  than its vector width: 16-query tiles, aligned loads shifted in registers, the scatter tiled
  for 32 vector registers (xla_ffi/cpu/na_cpu_lanes.h), code an AVX2 CPU never runs, so
  there a change to the shared kernel source could break it unseen. CMake's test build
  JNAT_CPU_AVX512_ON_AVX2 compiles that path for AVX2 + FMA (each 16-float vector a pair of
  AVX2 registers, the lane permute in plain code) and offers it as "avx512" on any AVX2 CPU;
  test_cpu_isa.py's avx512 tests then run against it. Where the CPU has AVX-512, they run on
  the real path in test_cpu_isa.py and this one skips.
"""

import collections
import os
import pathlib
import platform
import re
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
X86 = platform.machine() in ("x86_64", "AMD64")
MISSING = [tool for tool in ("cmake", "ninja") if shutil.which(tool) is None]
pytestmark = pytest.mark.skipif(
    not X86 or bool(MISSING),
    reason=f"needs x86-64 and {', '.join(MISSING)} (both come with the README's test command)")


def _build(build: pathlib.Path, *options: str, cxx: str = "") -> pathlib.Path:
  """Configures and builds the CPU module (no CUDA) in `build` with the C++ compiler `cxx`
  (CMake's default if empty); returns the module's path."""
  env = dict(os.environ, CXX=cxx) if cxx else None
  for command in (["cmake", "-S", str(ROOT), "-B", str(build), "-G", "Ninja",
                   "-DCMAKE_BUILD_TYPE=Release", "-DJNAT_CUDA=OFF",
                   f"-DPython_EXECUTABLE={sys.executable}", *options],
                  ["ninja", "-C", str(build), "_jnat_cpu"]):
    step = subprocess.run(command, capture_output=True, text=True, env=env)
    assert step.returncode == 0, (
        f"{' '.join(command)} failed:\n{step.stdout[-4000:]}{step.stderr[-4000:]}")
  (module,) = build.glob("_jnat_cpu*.so")
  return module


@pytest.fixture(scope="module")
def default_build(tmp_path_factory):
  build = tmp_path_factory.mktemp("default")
  return build, _build(build)


@pytest.fixture(scope="module")
def clang_build(tmp_path_factory):
  if shutil.which("clang++") is None:
    pytest.skip("clang++ is not installed (Debian: clang; .ci/run installs it where it can)")
  build = tmp_path_factory.mktemp("clang")
  return build, _build(build, cxx="clang++")


LEGACY_PREFIXES = {"f0", "f2", "f3", "2e", "36", "3e", "26", "64", "65", "66", "67"}


def _instruction_kind(encoding: list, text: str):
  """"avx512" (EVEX-encoded, or on zmm / mask registers), "vex" (AVX, AVX2, FMA), "sse" (other
  vector instructions) or None."""
  i = 0
  while i < len(encoding) and encoding[i] in LEGACY_PREFIXES:
    i += 1
  opcode = encoding[i] if i < len(encoding) else ""
  if opcode == "62" or "%zmm" in text or re.search(r"%k[0-7]\b", text):
    return "avx512"  # 0x62 opens an EVEX prefix in 64-bit mode (BOUND does not exist there)
  if opcode in ("c4", "c5"):
    return "vex"
  return "sse" if "%xmm" in text else None


def _owner(function: str) -> str:
  """The instruction-set namespace a (demangled) function belongs to, or "other": its own
  qualified name, not its template arguments (std::vector<avx512::LaneTile>::... is "other")."""
  name = None
  while name != function:
    name, function = function, re.sub(r"<[^<>]*>|\([^()]*\)", "", function)
  found = re.search(r"(?:^|[\s*&])jnat::cpu::(avx512|avx2|baseline)::", function)
  return found.group(1) if found else "other"


def _vector_instructions(obj: pathlib.Path) -> collections.Counter:
  """(owner, kind, function) -> count of the object's vector instructions."""
  listing = subprocess.run(["objdump", "-d", "-C", "--insn-width=16", str(obj)],
                           capture_output=True, text=True, check=True).stdout
  counts = collections.Counter()
  function = None
  for line in listing.splitlines():
    header = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
    if header:
      function = header.group(1)
      continue
    insn = re.match(r"^\s+[0-9a-f]+:\t((?:[0-9a-f]{2} )+)\s*\t(.*)$", line)
    if insn and function is not None:
      kind = _instruction_kind(insn.group(1).split(), insn.group(2))
      if kind is not None:
        counts[(_owner(function), kind, function)] += 1
  return counts


@pytest.mark.skipif(shutil.which("objdump") is None, reason="needs objdump (binutils)")
@pytest.mark.parametrize("compiler", ["default", "clang"])
def test_each_instruction_set_stays_inside_its_kernels(compiler, request):
  build, _ = request.getfixturevalue(f"{compiler}_build")
  objects = sorted(build.glob("CMakeFiles/**/*.o"))
  assert any("jnat_cpu_avx512" in str(o) for o in objects) and any(
      "module.cc" in o.name for o in objects)
  per_function = collections.Counter()
  for obj in objects:
    per_function.update(_vector_instructions(obj))
  allowed = {"avx512": {"avx512", "vex", "sse"}, "avx2": {"vex", "sse"},
             "baseline": {"sse"}, "other": {"sse"}}
  stray = [f"{n:6d} {kind} in {function[:200]}"
           for (owner, kind, function), n in per_function.items() if kind not in allowed[owner]]
  assert not stray, "instructions outside their instruction set's kernels:\n" + "\n".join(stray)
  # Each path has its own instructions (the check above is not vacuous).
  totals = collections.Counter()
  for (owner, kind, _), n in per_function.items():
    totals[(owner, kind)] += n
  assert totals[("avx512", "avx512")] > 1000
  assert totals[("avx2", "vex")] > 1000
  assert totals[("baseline", "sse")] > 1000


# Loads a module as jnat's CPU module, checks which build it is, then runs pytest (in this
# process: no xdist workers, which would import the installed module).
BOOTSTRAP = """
import importlib.util, sys
path, avx512_on_avx2, *args = sys.argv[1:]
spec = importlib.util.spec_from_file_location("jnat._jnat_cpu", path)
module = importlib.util.module_from_spec(spec)
sys.modules["jnat._jnat_cpu"] = module
spec.loader.exec_module(module)
assert module.avx512_on_avx2 == (avx512_on_avx2 == "1"), "not the build asked for"
import pytest
sys.exit(pytest.main(["-q", "-n", "0", "-p", "no:cacheprovider", *args]))
"""


def _isa_tests(module: pathlib.Path, avx512_on_avx2: bool, *args: str) -> str:
  """Runs tests/test_cpu_isa.py (pytest arguments `args`) against `module`; returns pytest's
  summary line, after asserting that they passed."""
  env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "JNAT_CPU_ISA"))}
  run = subprocess.run([sys.executable, "-c", BOOTSTRAP, str(module),
                        "1" if avx512_on_avx2 else "0", "tests/test_cpu_isa.py", *args],
                       cwd=ROOT, env=env, capture_output=True, text=True)
  assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
  summary = run.stdout.strip().splitlines()[-1]
  assert re.search(r"\d+ passed", summary), summary
  return summary


def test_clang_build_passes_the_isa_tests(clang_build):
  _, module = clang_build
  _isa_tests(module, False, "-k", "not arm")  # the Arm runs do not use the module


def test_avx512_path_passes_the_isa_tests_on_avx2_instructions(tmp_path):
  from jnat.cpu_info import cpu_info
  supported = cpu_info()["supported"]
  if "avx512" in supported:
    pytest.skip("this CPU runs the real avx512 path (tests/test_cpu_isa.py)")
  if "avx2" not in supported:
    pytest.skip("needs a CPU with AVX2 + FMA")
  module = _build(tmp_path, "-DJNAT_CPU_AVX512_ON_AVX2=ON")
  summary = _isa_tests(module, True, "-k", "avx512")
  # Every selected test ran on the avx512 path: none skipped, as they would without it.
  assert "skipped" not in summary, summary
