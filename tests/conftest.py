"""GPU-marked tests skip without a CUDA GPU, unless JNAT_REQUIRE_GPU=1 (set by .ci/gpu-run):
there, a gpu-marked test or any test of test_cuda.py that would skip, for any reason, fails
instead, so a GPU run cannot pass by checking nothing. Also the session's Arm build of the
CPU kernels (arm_runner)."""

import functools
import os

import pytest

REQUIRE_GPU = os.environ.get("JNAT_REQUIRE_GPU") == "1"


@functools.cache
def has_gpu() -> bool:
  import jax
  import jnat
  try:
    return bool(jax.devices("gpu")) and "cuda" in jnat.available_backends("gpu")
  except RuntimeError:
    return False


def pytest_report_header(config):
  import jnat
  try:
    info = jnat.cpu_info()
  except (ImportError, RuntimeError, ValueError) as e:  # no CPU module, or a bad JNAT_CPU_ISA
    return f"jnat cpu kernels: unavailable ({e})"
  return (f"jnat cpu kernels: {info['isa']} path on {info['model']} "
          f"(supported: {', '.join(info['supported'])}; JNAT_CPU_ISA selects one)")


def pytest_configure(config):
  config.addinivalue_line("markers", "gpu: needs a CUDA GPU and the jnat CUDA module")


def pytest_runtest_setup(item):
  if "gpu" in item.keywords and not has_gpu():
    message = "needs a CUDA GPU and the jnat CUDA module"
    if REQUIRE_GPU:
      pytest.fail(f"JNAT_REQUIRE_GPU=1: {message}, and this machine has none")
    pytest.skip(message)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
  outcome = yield
  report = outcome.get_result()
  needs_gpu = "gpu" in item.keywords or item.path.name == "test_cuda.py"
  if REQUIRE_GPU and report.skipped and needs_gpu:
    report.outcome = "failed"
    report.longrepr = f"JNAT_REQUIRE_GPU=1 but the test skipped: {report.longrepr}"


@pytest.fixture(scope="session")
def arm_runner(tmp_path_factory):
  """arm_runner(compiler): the CPU kernels built for aarch64 by "gcc" or "clang" and linked
  into the runner (tests/arm_kernels.py), once per test process and compiler; skips without
  the tools."""
  import arm_kernels
  return functools.cache(
      lambda compiler: arm_kernels.build(tmp_path_factory.mktemp(f"arm-{compiler}"), compiler))
