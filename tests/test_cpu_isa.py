"""The CPU kernels on every instruction set this machine supports (jnat.cpu_info), and on Arm.

One build holds the kernels for several instruction sets; each test here selects them in
turn in process (the private _jnat_cpu.set_isa, the same switch as JNAT_CPU_ISA), reusing
one compiled executable per configuration: golden data, cpu == xla forward and gradients
on random configurations, and bitwise-deterministic backward passes. The same tests run on
the kernels of the aarch64 build (NEON) under qemu where the cross compiler and qemu-user
are installed (paths "arm-neon" and, built by clang, "arm-neon-clang"; tests/arm_kernels.py).
"""

import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

import arm_kernels
from jnat.cpu_info import cpu_info
from na_testing import (BUCKETS, COMPILED_BACKENDS, GOLDEN, WEIGHT_CASES, bucket_config,
                        check_both_backward_targets, check_fused_against_natten,
                        check_fused_against_reference, check_unfused_against_natten,
                        check_unfused_against_reference, random_inputs)
from na_testing import EXAMPLES, MASKS, SEEDS, SETTINGS

pytestmark = pytest.mark.skipif("cpu" not in COMPILED_BACKENDS, reason="no CPU kernels built")

ALL_ISAS = ("avx512", "avx2", "baseline")
# The aarch64 build's kernels (its baseline path, NEON) under emulation, by GCC and by clang.
ARM = {"arm-neon": "gcc", "arm-neon-clang": "clang"}


def _supported():
  try:
    return cpu_info()["supported"]
  except (RuntimeError, ValueError):
    return []


@pytest.fixture(scope="module", params=ALL_ISAS + tuple(ARM))
def isa(request):
  """Selects one instruction set's kernels for the module's tests that take it (pytest runs
  them grouped by path), restoring the previous one after."""
  if request.param in ARM:
    if arm_kernels.QEMU is None:
      pytest.skip("qemu-aarch64 is not installed (Debian: qemu-user)")
    with arm_kernels.emulating(request.getfixturevalue("arm_runner")(ARM[request.param])):
      yield request.param
    return
  if request.param not in _supported():
    pytest.skip(f"this CPU does not support {request.param}")
  from jnat import _jnat_cpu
  previous = _jnat_cpu.isa()
  _jnat_cpu.set_isa(request.param)
  assert cpu_info()["isa"] == request.param
  yield request.param
  _jnat_cpu.set_isa(previous)


def test_cpu_info_reports_the_machine():
  info = cpu_info()
  print(f"\nCPU: {info['model']}; kernels: {info['isa']} of {info['supported']}")
  if "JNAT_CPU_ISA" not in os.environ:
    assert info["isa"] == info["supported"][0]  # the best one unless JNAT_CPU_ISA says else
  assert info["supported"][-1] == "baseline"
  assert info["baseline"] in ("sse2", "neon")
  if "avx512f" in _cpuinfo_flags():
    assert "avx512" in info["supported"]
  fields = dict(line.split(":", 1) for line in reversed(_cpuinfo_flags().splitlines())
                if ":" in line)  # reversed: the first processor's values win
  fields = {key.strip(): value.strip() for key, value in fields.items()}
  if "cpu family" in fields:  # x86 Linux: the generation, not just the brand
    assert info["model"].endswith(f"(family {fields['cpu family']}, model {fields['model']})")
  # The L2 size the forward sizes its working set by: what the operating system reports.
  getconf = shutil.which("getconf")
  reported = subprocess.run([getconf, "LEVEL2_CACHE_SIZE"], capture_output=True,
                            text=True).stdout.strip() if getconf else ""
  if reported.isdigit():
    assert info["l2_cache_bytes"] == int(reported)
  assert info["l2_cache_bytes"] >= 0


def _cpuinfo_flags():
  try:
    with open("/proc/cpuinfo") as f:
      return f.read()
  except OSError:
    return ""


@pytest.mark.parametrize("case", GOLDEN)
def test_fused_matches_natten(case, isa):
  check_fused_against_natten(case, "cpu")


@pytest.mark.parametrize("case", WEIGHT_CASES)
def test_unfused_matches_natten_weights(case, isa):
  check_unfused_against_natten(case, "cpu")


# Per instruction set, one random configuration in each of a spread of buckets (the
# executables compiled by test_backends.py in the same process are reused).
ISA_BUCKETS = range(0, len(BUCKETS), max(len(BUCKETS) * 20 // max(EXAMPLES, 1), 1))


@pytest.mark.parametrize("bucket", ISA_BUCKETS)
@settings(SETTINGS, max_examples=1)
@given(seed=SEEDS, mask=MASKS)
def test_fused_matches_reference(isa, bucket, seed, mask):
  check_fused_against_reference(bucket_config(bucket, seed, mask), "cpu")


@pytest.mark.parametrize("bucket", ISA_BUCKETS[::2])
@settings(SETTINGS, max_examples=1)
@given(seed=SEEDS)
def test_unfused_matches_reference(isa, bucket, seed):
  check_unfused_against_reference(bucket_config(bucket, seed, mask=1), "cpu")


def test_both_backward_targets_match_the_reference(isa):
  check_both_backward_targets()


@jax.jit
def _fused_grads(q, k, v, rpb):
  import jnat
  loss = lambda q, k, v, rpb: jnp.sum(jnp.sin(jnat.na2d(q, k, v, (5, 3), dilation=(1, 2),
                                                        rpb=rpb, backend="cpu")))
  return jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, rpb)


@pytest.mark.parametrize("batch", [1, 3])
def test_backward_is_deterministic(isa, batch):
  """Bitwise equal gradients from repeated runs. One batch and kv head gives the backward
  fewer (batch, kv head) units than threads, so it splits them into bands (na_cpu_work.h)."""
  q, k, v, rpb, _, _ = random_inputs(batch, batch, (23, 30), 2, 1, 24, rpb_shape=(9, 5))
  first = jax.device_get(_fused_grads(q, k, v, rpb))
  for _ in range(3):
    for a, b in zip(first, jax.device_get(_fused_grads(q, k, v, rpb))):
      np.testing.assert_array_equal(a, b)


def test_set_isa_rejects_unknown_names():
  from jnat import _jnat_cpu
  with pytest.raises(ValueError, match="'sse9' is unknown: it must be one of avx512, avx2"):
    _jnat_cpu.set_isa("sse9")
  assert _jnat_cpu.isa() in _supported()


def test_environment_selects_and_rejects():
  """JNAT_CPU_ISA at import: a supported name is used; an unknown one fails every call."""
  script = ("import jax.numpy as jnp, jnat\n"
            "from jnat.cpu_info import cpu_info\n"
            "try:\n  print(cpu_info()['isa'])\nexcept ValueError as e:\n  print('ValueError', e)\n"
            "try:\n  jnat.na1d(*[jnp.ones((1, 8, 1, 4))] * 3, 3, backend='cpu').block_until_ready()\n"
            "  print('ran')\nexcept Exception as e:\n  print('failed', e)\n")
  outputs = {}
  for choice in ("baseline", "avx1024"):
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=dict(os.environ, JNAT_CPU_ISA=choice), timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    outputs[choice] = proc.stdout
  assert outputs["baseline"].splitlines() == ["baseline", "ran"]
  bad = outputs["avx1024"]
  assert bad.startswith("ValueError JNAT_CPU_ISA=avx1024: CPU instruction set 'avx1024' is unknown")
  assert "failed" in bad and "JNAT_CPU_ISA=avx1024" in bad.split("failed", 1)[1]
