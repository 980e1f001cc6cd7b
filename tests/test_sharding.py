"""Sharded execution on a 4-device CPU mesh: same numbers as one device, no all-gather.

Without the right partitioning rule a custom call is still correct but all-gathers q/k/v
and runs the whole problem on every device; without the rpb reduction the rpb gradient of a
batch-sharded run is silently wrong; and head-sharded GQA/MQA with replicated kv needs
each device to pick its kv heads and the kv gradients summed over heads. All show here,
for every case of sharding_worker.CASES on Auto and Explicit meshes (the latter also without
jax.set_mesh, the mesh known only from the arrays' shardings), forward and gradients.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from na_testing import ALL_BACKENDS
from sharding_worker import CASES, MODES

WORKER = pathlib.Path(__file__).with_name("sharding_worker.py")


def _run_worker():
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [str(WORKER.parent.parent), os.environ.get("PYTHONPATH", "")]))
  proc = subprocess.run([sys.executable, str(WORKER), ",".join(ALL_BACKENDS)], capture_output=True,
                        text=True, env=env, timeout=900, check=False)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def results():
  """The worker's results, computed once for this module (pytest-xdist runs a module's tests
  on one worker: `--dist loadfile`)."""
  return _run_worker()


def test_every_case_ran(results):
  assert len(results) == len(ALL_BACKENDS) * len(MODES) * len(CASES)


def _cases(results, backend, explicit):
  return [r for r in results if r["backend"] == backend and ("Explicit" in r["axis_type"]) == explicit]


@pytest.mark.parametrize("explicit", [False, True], ids=["auto", "explicit"])
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_sharded_matches_single_device(results, backend, explicit):
  for r in _cases(results, backend, explicit):
    assert "error" not in r, r
    assert r["grad_err"] <= 2e-5 and r["loss_err"] <= 1e-3, r
    assert r["dq_keeps_sharding"], r


@pytest.mark.parametrize("explicit", [False, True], ids=["auto", "explicit"])
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_no_all_gather(results, backend, explicit):
  for r in _cases(results, backend, explicit):
    assert "all-gather" not in r["collectives"], r
    assert "all-to-all" not in r["collectives"], r
