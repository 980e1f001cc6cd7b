"""train.py killed (SIGKILL) and stopped (SIGTERM), rerun: the same parameters as one run."""

import json
import os
import signal
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest

pytest.importorskip("tensorflow_datasets")
pytest.importorskip("ml_collections")

import jax  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from jnat.data import pipeline  # noqa: E402
from jnat.train import checkpoint, loop  # noqa: E402
from configs import smoke  # noqa: E402

STEPS, EVERY = 60, 20
OVERRIDES = {"attention_backend": "xla", "num_train_steps": STEPS,
             "checkpoint_every_steps": EVERY, "log_every_steps": 1}


def _logged_steps(workdir):
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  steps = []
  for line in open(path):
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      break
    if "train/loss" in record:
      steps.append(record["step"])
  return steps


def _start(workdir, data_dir, env):
  cmd = [sys.executable, os.path.join(ROOT, "train.py"),
         "--config", os.path.join(ROOT, "configs", "smoke.py"),
         "--workdir", str(workdir), "--data_dir", str(data_dir)]
  cmd += [f"--config.{k}={v}" for k, v in OVERRIDES.items()]
  return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _signal_after(proc, workdir, step, signum, after_checkpoint=0, timeout=240):
  """Sends `signum` once step `step` is logged and checkpoint `after_checkpoint` is on
  disk; returns the process output."""
  deadline = time.time() + timeout
  while time.time() < deadline and proc.poll() is None:
    if (max(_logged_steps(workdir), default=0) >= step
        and max(_checkpoint_steps(workdir), default=0) >= after_checkpoint):
      proc.send_signal(signum)
      break
    time.sleep(0.02)
  out, _ = proc.communicate(timeout=timeout)
  return out


def _checkpoint_steps(workdir):
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    return []
  return sorted(int(d) for d in os.listdir(directory) if d.isdigit())


def test_sigkill_and_sigterm_then_rerun_equals_one_run(tmp_path):
  data_dir = tmp_path / "tfds"
  pipeline.get_builder("sklearn_digits", str(data_dir))
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  workdir = tmp_path / "run"

  # 1. Killed without warning between checkpoints 20 and 40.
  proc = _start(workdir, data_dir, env)
  out = _signal_after(proc, workdir, EVERY + 5, signal.SIGKILL, after_checkpoint=EVERY)
  assert proc.returncode == -signal.SIGKILL, out[-3000:]
  killed_at = max(_logged_steps(workdir))
  saved = _checkpoint_steps(workdir)
  assert saved and max(saved) < killed_at < STEPS, (saved, killed_at)

  # 2. Same command: resumes, then SIGTERM saves the current step and exits cleanly.
  proc = _start(workdir, data_dir, env)
  target = max(saved) + EVERY + 3
  out = _signal_after(proc, workdir, target, signal.SIGTERM)
  assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
  assert "SIGTERM" in out and "Traceback" not in out
  stopped_at = max(_checkpoint_steps(workdir))
  assert target <= stopped_at < STEPS and stopped_at % EVERY != 0

  # 3. Resume once more (in this process, sharing the compiled steps with the reference
  #    below) and finish; then one uninterrupted run of the same config.
  config = smoke.get_config()
  config.update(dict(OVERRIDES, data_dir=str(data_dir)))
  saved_cache = jax.config.jax_compilation_cache_dir
  jax.config.update("jax_compilation_cache_dir", env["JAX_COMPILATION_CACHE_DIR"])
  try:
    loop.train_and_evaluate(config, str(workdir))
    loop.train_and_evaluate(config, str(tmp_path / "reference"))
  finally:
    jax.config.update("jax_compilation_cache_dir", saved_cache)
  assert os.path.exists(workdir / "curves.png")
  assert max(_checkpoint_steps(workdir)) == STEPS
  # The metrics file tells one story: each step logged once, in order.
  assert _logged_steps(workdir) == list(range(1, STEPS + 1))

  got_step, got = loop.load_checkpoint(config, str(workdir))
  want_step, want = loop.load_checkpoint(config, str(tmp_path / "reference"))
  assert got_step == want_step == STEPS
  got, want = checkpoint.host_copy(got), checkpoint.host_copy(want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
