"""Sharded execution on a 4-device CPU mesh: same numbers as one device, no all-gather.

Without the right partitioning rule a custom call is still correct but all-gathers q/k/v
and runs the whole problem on every device; and without the rpb reduction the rpb gradient
of a batch-sharded run is silently wrong. Both show here.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from na_testing import ALL_BACKENDS

WORKER = pathlib.Path(__file__).with_name("sharding_worker.py")


@pytest.fixture(scope="module")
def results():
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [str(WORKER.parent.parent), os.environ.get("PYTHONPATH", "")]))
  proc = subprocess.run([sys.executable, str(WORKER), *ALL_BACKENDS], capture_output=True,
                        text=True, env=env, timeout=900, check=False)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def test_every_case_ran(results):
  # backends x (Auto, Explicit) x (batch, heads, both) x (MHA, GQA)
  assert len(results) == len(ALL_BACKENDS) * 2 * 3 * 2


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_sharded_matches_single_device(results, backend):
  for r in (r for r in results if r["backend"] == backend):
    assert r["grad_err"] <= 2e-5 and r["loss_err"] <= 1e-3, r
    assert r["dq_keeps_sharding"], r


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_no_all_gather(results, backend):
  for r in (r for r in results if r["backend"] == backend):
    assert "all-gather" not in r["collectives"], r
    assert "all-to-all" not in r["collectives"], r
