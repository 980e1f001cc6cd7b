"""Trainer: configs, schedule, optimizer, a real run on digits, corrupted-checkpoint
fallback, NaN stop, train.py killed and stopped then resumed, and train.py's command line.

One reference run of the smoke config serves every check of a finished run; the compiled
steps are cached once for this module's runs and train.py processes. The trainer tests pin
the pure-JAX attention backend ("xla") so that they test the trainer; the kernels have
their own tests.
"""

import glob
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest

pytest.importorskip("tensorflow_datasets")
pytest.importorskip("ml_collections")
pytest.importorskip("orbax.checkpoint")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)  # configs/ imports `configs.common`

from jnat import models  # noqa: E402
from jnat.train import loop, schedule, state as state_lib  # noqa: E402

VARIANT_CONFIGS = ["nat_mini", "nat_tiny", "nat_small", "nat_base", "dinat_mini",
                   "dinat_tiny", "dinat_small", "dinat_base", "dinat_large"]


def load_config(name):
  spec = importlib.util.spec_from_file_location(f"_config_{name}",
                                                os.path.join(ROOT, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


# The reference run: long enough to be killed between checkpoints, with an EMA.
STEPS, EVERY = 60, 20
RUN = {"attention_backend": "xla", "num_train_steps": STEPS, "checkpoint_every_steps": EVERY,
       "log_every_steps": 1, "ema_decay": 0.9}


def smoke_config(data_dir, **overrides):
  c = load_config("smoke")
  c.data_dir = str(data_dir)
  c.attention_backend = "xla"
  c.update(overrides)
  return c


@pytest.mark.parametrize("name", VARIANT_CONFIGS)
def test_variant_configs_follow_the_paper_recipe(name):
  c = load_config(name)
  assert c.model == name and name in models.VARIANTS
  assert (c.learning_rate, c.weight_decay, c.global_batch_size) == (1e-3, 0.05, 1024)
  assert (c.num_epochs, c.warmup_epochs, c.cooldown_epochs) == (300, 20, 10)
  assert (c.mixup_alpha, c.cutmix_alpha, c.label_smoothing) == (0.8, 1.0, 0.1)
  assert c.rand_augment.magnitude == 9 and c.random_erase_prob == 0.25
  assert c.grad_clip_norm == 5.0 and c.crop_pct == 0.875 and c.compute_dtype == "bfloat16"
  # Stochastic depth as in the papers, set by the variant itself.
  size = name.split("_")[1]
  expected_drop = {"mini": 0.2, "tiny": 0.2, "small": 0.3, "base": 0.5, "large": 0.35}[size]
  assert state_lib.create_model(c).drop_path_rate == expected_drop


def test_schedule_warmup_cosine_cooldown():
  c = load_config("nat_tiny")
  spe = 10
  lr = schedule.create_learning_rate_fn(c, spe)
  np.testing.assert_allclose(lr(0), 1e-6, rtol=1e-5)
  np.testing.assert_allclose(lr(20 * spe), 1e-3, rtol=1e-5)
  # Half-way through the cosine: the mean of peak and floor.
  np.testing.assert_allclose(lr(160 * spe), (1e-3 + 5e-6) / 2, rtol=1e-4)
  np.testing.assert_allclose(lr(300 * spe), 5e-6, rtol=1e-4)
  np.testing.assert_allclose(lr(305 * spe), 5e-6, rtol=1e-6)
  values = np.array([lr(s) for s in range(20 * spe, 300 * spe, 97)])
  assert np.all(np.diff(values) < 0)
  assert schedule.total_steps(c, spe) == 310 * spe


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
  """Runs in this module compile the same steps: compile them once (train.py too)."""
  names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
           "jax_persistent_cache_min_entry_size_bytes")
  saved = {n: getattr(jax.config, n) for n in names}
  directory = str(tmp_path_factory.mktemp("jax_cache"))
  jax.config.update(names[0], directory)
  jax.config.update(names[1], 0.0)
  jax.config.update(names[2], 0)
  yield directory
  for n, v in saved.items():
    jax.config.update(n, v)


def test_weight_decay_skips_norms_biases_and_rpb():
  c = smoke_config("unused")
  model = state_lib.create_model(c)
  params = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), models.abstract_params(model))
  tx = state_lib.create_optimizer(c, lambda step: 1.0, state_lib.default_weight_decay_mask)
  zero = jax.tree.map(jnp.zeros_like, params)
  updates, _ = jax.jit(tx.update)(zero, tx.init(params), params)
  flat = jax.tree_util.tree_flatten_with_path(updates)[0]
  decayed = {jax.tree_util.keystr(p) for p, u in flat if np.any(np.asarray(u) != 0)}
  assert any("rpb" in p for p, _ in ((jax.tree_util.keystr(p), u) for p, u in flat))
  assert decayed and all("kernel" in p for p in decayed)
  assert not any("rpb" in p or "bias" in p or "scale" in p for p in decayed)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="module")
def reference_run(data_dir, tmp_path_factory):
  """The smoke config run uninterrupted for STEPS steps, checkpoints every EVERY."""
  workdir = tmp_path_factory.mktemp("ref")
  c = smoke_config(data_dir, **RUN)
  results = loop.train_and_evaluate(c, str(workdir))
  return c, workdir, results


def restore_latest(config, workdir):
  """(step, NumPy state) of the newest good checkpoint of a run of `config`."""
  step, state = loop.load_checkpoint(config, str(workdir))
  return step, jax.device_get(state)


def assert_same_state(got, want):
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def logged_steps(workdir):
  """Steps of the training records in metrics.jsonl, up to a line cut short by a kill."""
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


def checkpoint_steps(workdir):
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    return []
  return sorted(int(d) for d in os.listdir(directory) if d.isdigit())


def test_run_writes_metrics_checkpoints_and_plot(reference_run):
  c, workdir, results = reference_run
  assert 0.0 <= results["eval/top1"] <= results["eval/top5"] <= 1.0
  assert 0.0 <= results["eval_ema/top1"] <= 1.0
  records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  train = [r for r in records if "train/loss" in r]
  assert [r["step"] for r in train] == list(range(1, STEPS + 1))
  assert all(np.isfinite(r["train/loss"]) for r in train)
  # Throughput from the second step on (the first one compiles).
  assert all(r["train/images_per_s"] > 0 for r in train[1:])
  assert any("eval/top5" in r and r["step"] == STEPS for r in records)
  assert checkpoint_steps(workdir) == [EVERY, 2 * EVERY, STEPS]
  assert os.path.getsize(workdir / "curves.png") > 10_000
  # TensorBoard event file with scalar summaries.
  import tensorflow as tf
  events = glob.glob(str(workdir / "tensorboard" / "events.out.tfevents.*"))
  tags = set()
  for event in tf.compat.v1.train.summary_iterator(events[0]):
    for value in event.summary.value:
      assert value.metadata.plugin_data.plugin_name == "scalars"
      tags.add(value.tag)
  assert {"train/loss", "train/learning_rate", "eval/top1", "eval/top5"} <= tags
  # Parameters stay float32 and EMA differs from the parameters.
  step, state = restore_latest(c, workdir)
  assert step == STEPS and int(state.step) == STEPS
  leaves = jax.tree.leaves(state.params)
  assert all(x.dtype == np.float32 for x in leaves)
  assert any(not np.array_equal(a, b) for a, b in zip(leaves, jax.tree.leaves(state.ema_params)))


def test_truncated_newest_checkpoint_falls_back_and_resumes_exactly(reference_run, tmp_path):
  c, ref_dir, _ = reference_run
  workdir = tmp_path / "run"
  shutil.copytree(ref_dir / "checkpoints", workdir / "checkpoints")
  files = [f for f in glob.glob(str(workdir / "checkpoints" / str(STEPS) / "**"),
                                recursive=True)
           if os.path.isfile(f) and "/d/" in f]
  biggest = max(files, key=os.path.getsize)
  with open(biggest, "r+b") as f:
    f.truncate(os.path.getsize(biggest) // 2)
  loop.train_and_evaluate(c, str(workdir))  # resumes at 2 * EVERY, redoes the rest
  assert os.listdir(workdir / "corrupt_checkpoints")
  assert_same_state(restore_latest(c, workdir)[1], restore_latest(c, ref_dir)[1])


def test_flipped_bits_in_checkpoint_are_detected(reference_run, tmp_path):
  c, ref_dir, _ = reference_run
  workdir = tmp_path / "run"
  shutil.copytree(ref_dir / "checkpoints", workdir / "checkpoints")
  meta = workdir / "checkpoints" / str(STEPS) / "meta" / "metadata"
  record = json.loads(meta.read_text())
  record["fingerprints"][0] ^= 1  # as if the data had changed after saving
  meta.write_text(json.dumps(record))
  step, _ = restore_latest(c, workdir)
  assert step == 2 * EVERY


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(reference_run, tmp_path):
  c, ref_dir, _ = reference_run
  workdir = tmp_path / "run"
  shutil.copytree(ref_dir / "checkpoints", workdir / "checkpoints")
  diverging = smoke_config(c.data_dir, **dict(
      RUN, num_train_steps=STEPS + 8, checkpoint_every_steps=2, learning_rate=1e30,
      warmup_epochs=0.0, min_learning_rate=1e30))
  with pytest.raises(loop.NonFiniteLossError,
                     match=f"non-finite .* step {STEPS + 1}.*step {STEPS}"):
    loop.train_and_evaluate(diverging, str(workdir))
  assert checkpoint_steps(workdir) == [EVERY, 2 * EVERY, STEPS]
  step, state = restore_latest(c, workdir)
  assert step == STEPS
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state.params))


def _start_train_py(workdir, data_dir, cache_dir):
  cmd = [sys.executable, os.path.join(ROOT, "train.py"),
         "--config", os.path.join(ROOT, "configs", "smoke.py"),
         "--workdir", str(workdir), "--data_dir", str(data_dir)]
  cmd += [f"--config.{k}={v}" for k, v in RUN.items()]
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache_dir,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _signal_after(proc, workdir, step, signum, after_checkpoint=0, timeout=240):
  """Sends `signum` once step `step` is logged and checkpoint `after_checkpoint` is on
  disk; returns the process output."""
  deadline = time.time() + timeout
  while time.time() < deadline and proc.poll() is None:
    if (max(logged_steps(workdir), default=0) >= step
        and max(checkpoint_steps(workdir), default=0) >= after_checkpoint):
      proc.send_signal(signum)
      break
    time.sleep(0.02)
  out, _ = proc.communicate(timeout=timeout)
  return out


def test_train_py_killed_and_stopped_then_rerun_equals_one_run(reference_run,
                                                                compilation_cache, tmp_path):
  c, ref_dir, _ = reference_run
  workdir = tmp_path / "run"

  # 1. Killed without warning between two checkpoints.
  proc = _start_train_py(workdir, c.data_dir, compilation_cache)
  out = _signal_after(proc, workdir, EVERY + 5, signal.SIGKILL, after_checkpoint=EVERY)
  assert proc.returncode == -signal.SIGKILL, out[-3000:]
  killed_at = max(logged_steps(workdir))
  saved = checkpoint_steps(workdir)
  assert saved and max(saved) < killed_at < STEPS, (saved, killed_at)

  # 2. Same command: resumes, then SIGTERM saves the current step and exits cleanly.
  proc = _start_train_py(workdir, c.data_dir, compilation_cache)
  target = max(saved) + EVERY + 3
  out = _signal_after(proc, workdir, target, signal.SIGTERM)
  assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
  assert "SIGTERM" in out and "Traceback" not in out
  stopped_at = max(checkpoint_steps(workdir))
  assert target <= stopped_at < STEPS and stopped_at % EVERY != 0

  # 3. Resume once more (in this process) and finish: the same state as the reference
  #    run, which was never interrupted.
  loop.train_and_evaluate(c, str(workdir))
  assert os.path.exists(workdir / "curves.png")
  assert max(checkpoint_steps(workdir)) == STEPS
  # The metrics file tells one story: each step logged once, in order.
  assert logged_steps(workdir) == list(range(1, STEPS + 1))
  got_step, got = restore_latest(c, workdir)
  want_step, want = restore_latest(c, ref_dir)
  assert got_step == want_step == STEPS
  assert_same_state(got, want)


def test_bench_times_training_steps(data_dir):
  c = smoke_config(data_dir, bench_steps=2, bench_warmup_steps=1)
  from jnat.train import bench
  lines = []
  result = bench.run(c, print_fn=lines.append)
  assert result["images_per_s"] > 0 and result["compile_s"] > 0
  assert result["step_time_s"] == pytest.approx(c.global_batch_size / result["images_per_s"])
  assert lines[0].startswith(f"{c.model} 16x16 global batch 32 on")

@pytest.fixture
def train_script():
  """train.py as a module, its flags parsed from a command line without arguments."""
  from absl import flags
  import train  # defines its flags once per process

  flags.FLAGS.unparse_flags()
  flags.FLAGS(["train.py"])
  yield train
  flags.FLAGS.unparse_flags()


def test_no_arguments_trains_the_digits_default(train_script, monkeypatch, capsys):
  runs = []
  monkeypatch.setattr(loop, "train_and_evaluate",
                      lambda config, workdir: runs.append((config, workdir)))
  train_script.main(["train.py"])
  assert "embedded default, configs/digits.py" in capsys.readouterr().out
  [(config, workdir)] = runs
  assert config.to_dict() == load_config("digits").to_dict()
  assert workdir == os.path.join("workdir", "digits")


def test_help_lists_the_configs(train_script):
  from absl import flags
  text = " ".join(flags.FLAGS.module_help(train_script).split())
  names = sorted(n for n in os.listdir(os.path.join(ROOT, "configs"))
                 if n.endswith(".py") and n != "common.py")
  assert len(names) >= 11 and "default: configs/digits.py" in text
  for name in names:
    assert f"configs/{name}" in text
