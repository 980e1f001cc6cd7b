"""The CPU kernels on every instruction set this machine supports (jnat.cpu_info).

One build holds the kernels for several instruction sets; each test here selects them in
turn in process (the private _jnat_cpu.set_isa, the same switch as JNAT_CPU_ISA), reusing
one compiled executable per configuration: golden data, cpu == xla forward and gradients
on random configurations, and bitwise-deterministic backward passes.
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

from jnat import _ffi, reference
from jnat._checks import Neighborhood
from jnat.cpu_info import cpu_info
from na_testing import (BUCKETS, COMPILED_BACKENDS, GOLDEN, WEIGHT_CASES, assert_close,
                        bucket_config, check_fused_against_natten,
                        check_fused_against_reference, check_unfused_against_natten,
                        check_unfused_against_reference, random_inputs)
from na_testing import EXAMPLES, MASKS, SEEDS, SETTINGS

pytestmark = pytest.mark.skipif("cpu" not in COMPILED_BACKENDS, reason="no CPU kernels built")

ALL_ISAS = ("avx512", "avx2", "baseline")


def _supported():
  try:
    return cpu_info()["supported"]
  except (RuntimeError, ValueError):
    return []


@pytest.fixture(params=ALL_ISAS)
def isa(request):
  """Selects one instruction set's kernels for the test, restoring the previous one after."""
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
  """The CPU serves the backward twice: jnat_na_bwd takes the softmax row term delta (the
  contract every backend shares), jnat_na_bwd_dlse (what jnat's CPU lowering calls) sums
  rowsum(dout * out) itself and takes only dlse. Both against the reference's vjp, with a
  non-zero dlse, rpb, GQA, strides, dilation and a causal axis."""
  nbhd = Neighborhood((5, 3, 3), (1, 2, 1), (1, 1, 2), (False, False, True))
  q, k, v, rpb, _, _ = random_inputs(5, 2, (9, 7, 8), 4, 2, 16, rpb_shape=(9, 5, 5))
  static, scale = (nbhd, 0.25), 0.25
  out, lse = _ffi._call("jnat_na_fwd", static, q, k, v, rpb)
  rng = np.random.default_rng(6)
  dout = jnp.asarray(rng.standard_normal(out.shape, np.float32))
  dlse = jnp.asarray(rng.standard_normal(lse.shape, np.float32))
  forward = lambda q, k, v, rpb: reference.na_forward(q, k, v, nbhd, scale, rpb)
  want = jax.vjp(forward, q, k, v, rpb)[1]((dout, dlse))
  delta = reference.softmax_delta(dout, out, dlse)
  for target, row_term in (("jnat_na_bwd", delta), ("jnat_na_bwd_dlse", dlse)):
    got = _ffi._call(target, static, q, k, v, rpb, dout, lse, row_term)
    for name, g, w in zip(("dq", "dk", "dv", "drpb"), got, want, strict=True):
      assert_close(g, w, "float32", name)


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
