"""`train_and_evaluate`: the training loop, from config to checkpoints, metrics and plot.

Resuming: (1) the newest checkpoint that verifies gives the state and the step; (2) the
data pipeline restarts at that step (its order is a function of seed and step); (3) each
step's randomness is `fold_in(seed key, step)`. Rerunning the same command therefore
continues the run exactly as if it had not stopped.
"""

from __future__ import annotations

import collections
import functools
import logging
import math
import os
import signal
import threading
import time
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import numpy as np

from jnat import models
from jnat.data import imagenet
from jnat.data import pipeline
from jnat.train import checkpoint as checkpoint_lib
from jnat.train import metrics as metrics_lib
from jnat.train import schedule as schedule_lib
from jnat.train import state as state_lib
from jnat.train import step as step_lib

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
  """Training produced a non-finite loss, gradient or parameter; the run stopped."""


class TrainingInterrupted(Exception):
  """SIGTERM or SIGINT arrived; a checkpoint was saved and the run stopped cleanly."""

  def __init__(self, signum: int, step: int):
    super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; "
                     "a checkpoint was saved; rerun the same command to resume")
    self.signum = signum
    self.step = step


class _StopOnSignal:
  """Records SIGTERM/SIGINT instead of dying, so the loop can save and stop cleanly.

  A second signal of the same kind falls through to the previous handler (e.g. a second
  Ctrl-C raises KeyboardInterrupt at once).
  """

  def __init__(self):
    self.signum: Optional[int] = None
    self._previous = {}

  def _handle(self, signum, frame):
    del frame
    if self.signum is None:
      self.signum = signum
      log.warning("received %s: saving a checkpoint after the current step",
                  signal.Signals(signum).name)
    previous = self._previous.get(signum)
    signal.signal(signum, previous if previous is not None else signal.SIG_DFL)

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for signum in (signal.SIGTERM, signal.SIGINT):
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc):
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    return False

  def requested(self, check_all_hosts: bool) -> bool:
    if jax.process_count() == 1 or not check_all_hosts:
      return self.signum is not None
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    flags = multihost_utils.process_allgather(np.int32(self.signum is not None))
    if np.any(flags) and self.signum is None:
      self.signum = signal.SIGTERM
    return bool(np.any(flags))


def _evaluate(eval_step, params, builder, plan, preprocess, sharding) -> dict[str, float]:
  totals = collections.defaultdict(float)
  host = pipeline.eval_batches(builder, plan, preprocess)
  for batch in pipeline.device_batches(host, sharding):
    for k, v in jax.device_get(eval_step(params, batch)).items():
      totals[k] += float(v)
  count = max(totals.pop("count"), 1.0)
  return {k: v / count for k, v in totals.items()}


def _checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def _write_config(workdir: str, config) -> None:
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))


def train_and_evaluate(config, workdir: str, *, model: Optional[nn.Module] = None,
                       weight_decay_mask: Optional[Callable[[Any], Any]] = None
                       ) -> dict[str, float]:
  """Trains and evaluates a classifier as `config` says, resuming from `workdir`.

  Args:
    config: training config (see `configs/common.py`).
    workdir: run directory: checkpoints/, tensorboard/, metrics.jsonl, curves.png.
    model: a Flax module `(images, *, train) -> logits`; default `config.model` from
      `jnat.models`.
    weight_decay_mask: `params -> bool tree` of parameters that get weight decay; default
      the jnat models' rule (no decay on norms, biases and relative positional bias).

  Returns:
    The final eval metrics (`eval/top1`, `eval/top5`, `eval/loss`, ...).

  Raises:
    NonFiniteLossError: a step produced a non-finite value; the newest checkpoint
      predates it and is intact.
    TrainingInterrupted: SIGTERM/SIGINT arrived; a checkpoint of the last step was saved.
    FileNotFoundError: the dataset is not prepared (with the steps to prepare it).
  """
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)

  # --- Mesh: one data axis over all devices of all hosts. ---------------------------
  mesh = step_lib.create_mesh()
  data_sharding = step_lib.batch_sharding(mesh)
  replicated = step_lib.replicated(mesh)
  # Multi-device CPU collectives deadlock unless each step is waited for.
  block_each_step = jax.devices()[0].platform == "cpu" and jax.device_count() > 1

  # --- Input. ------------------------------------------------------------------------
  builder = pipeline.get_builder(config.dataset, config.data_dir)
  train_plan = pipeline.plan_split(builder, config.train_split, config.global_batch_size,
                                   train=True)
  eval_plan = pipeline.plan_split(builder, config.eval_split, config.eval_batch_size,
                                  train=False)
  steps_per_epoch = train_plan.steps
  num_steps = schedule_lib.total_steps(config, steps_per_epoch)
  prep = imagenet.Preprocessing.from_config(config)
  preprocess_train = functools.partial(imagenet.preprocess_train, p=prep)
  preprocess_eval = functools.partial(imagenet.preprocess_eval, p=prep)

  # --- Model, optimizer and the state's shape. ---------------------------------------
  setup = state_lib.create_setup(config, steps_per_epoch, model=model,
                                 weight_decay_mask=weight_decay_mask)
  rng = jax.random.PRNGKey(config.seed)

  # --- Checkpoint: resume from the newest good one, else initialise. -----------------
  checkpoints = checkpoint_lib.Checkpoints(_checkpoint_dir(workdir),
                                           keep=config.keep_checkpoints)
  restored = checkpoints.restore_latest(setup.abstract_state(rng, replicated))
  if restored is not None:
    start_step, state, _ = restored
    log.info("resuming from checkpoint %d in %s", start_step, checkpoints.directory)
  else:
    start_step = 0
    state = jax.jit(setup.init_fn, out_shardings=replicated)(rng)
  _write_config(workdir, config)
  log.info("%s: %d parameters; %d devices on %d hosts; %d steps (%d per epoch), "
           "global batch %d", config.model, models.count_params(state.params),
           jax.device_count(), jax.process_count(), num_steps, steps_per_epoch,
           config.global_batch_size)

  # --- Compiled steps. ---------------------------------------------------------------
  train_step = step_lib.jit_train_step(mesh, model=setup.model, tx=setup.tx,
                                       learning_rate_fn=setup.learning_rate_fn, config=config)
  eval_step = step_lib.jit_eval_step(mesh, model=setup.model)

  def evaluate(state) -> dict[str, float]:
    results = {}
    variants = [("eval", state.params)]
    if state.ema_params is not None:
      variants.append(("eval_ema", state.ema_params))
    for prefix, params in variants:
      out = _evaluate(eval_step, params, builder, eval_plan, preprocess_eval, data_sharding)
      results.update({f"{prefix}/{k}": v for k, v in out.items()})
    return results

  # --- Loop. -------------------------------------------------------------------------
  writer = metrics_lib.MetricWriter(workdir, resume_step=start_step if restored else None)
  train_iter = pipeline.device_batches(
      pipeline.train_batches(builder, train_plan, preprocess_train, seed=config.seed,
                             start_step=start_step, shuffle_buffer=config.shuffle_buffer),
      data_sharding, size=config.prefetch_batches)
  pending: list[tuple[int, Any]] = []
  sums: dict[str, float] = collections.defaultdict(float)
  summed_steps = 0
  last_log_time, last_log_step = time.perf_counter(), start_step
  excluded_time = 0.0  # eval and checkpoint time between logs, left out of throughput
  eval_results: dict[str, float] = {}
  last_saved = start_step if restored else None
  progress = metrics_lib.progress_bar(num_steps, start_step)

  def absorb(done, device_metrics):
    nonlocal summed_steps
    values = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
    if not all(math.isfinite(v) for v in values.values()):
      raise NonFiniteLossError(
          f"non-finite training metrics at step {done}: "
          + ", ".join(f"{k}={v:.4g}" for k, v in values.items())
          + f". Stopped; the newest checkpoint (step {checkpoints.latest_step()}) predates "
          "this step and is intact. Lower learning_rate (or check the data) and rerun to "
          "resume from it.")
    for k, v in values.items():
      sums[k] += v
    summed_steps += 1

  def save(done):
    nonlocal last_saved, excluded_time
    if last_saved == done:
      return
    t0 = time.perf_counter()
    checkpoints.save(done, state, {"epoch": done / steps_per_epoch})
    last_saved = done
    excluded_time += time.perf_counter() - t0

  try:
    with _StopOnSignal() as stop:
      for step in range(start_step, num_steps):
        batch = next(train_iter)
        state, device_metrics = train_step(state, batch)
        done = step + 1
        if block_each_step:
          jax.block_until_ready(device_metrics)
        pending.append((done, device_metrics))

        is_log = done % config.log_every_steps == 0 or done == num_steps
        is_eval = (done % (steps_per_epoch * config.eval_every_epochs) == 0
                   or done == num_steps)
        is_save = done % config.checkpoint_every_steps == 0 or done == num_steps
        stopping = stop.requested(check_all_hosts=is_log)
        # Keep one step in flight between boundaries; at a boundary everything done so
        # far must be known finite before it is logged or saved.
        in_flight = 0 if (is_log or is_eval or is_save or stopping) else 1
        while len(pending) > in_flight:
          absorb(*pending.pop(0))
        progress.update(1)
        if step == start_step:
          # Throughput counts from the end of the first (compiling) step.
          jax.block_until_ready(device_metrics)
          last_log_time, last_log_step = time.perf_counter(), done

        if is_log and summed_steps:
          now = time.perf_counter()
          scalars = {f"train/{k}": v / summed_steps for k, v in sums.items()}
          scalars["train/epoch"] = done / steps_per_epoch
          if done > last_log_step:  # else only the compiling first step ran since
            elapsed = max(now - last_log_time - excluded_time, 1e-9)
            scalars["train/step_time_s"] = elapsed / (done - last_log_step)
            scalars["train/images_per_s"] = (
                (done - last_log_step) * config.global_batch_size / elapsed)
          progress.set_postfix(loss=f"{scalars['train/loss']:.4f}",
                               lr=f"{scalars['train/learning_rate']:.2e}", refresh=False,
                               **({"img_s": f"{scalars['train/images_per_s']:.0f}"}
                                  if "train/images_per_s" in scalars else {}))
          writer.write_scalars(done, scalars)
          sums.clear()
          summed_steps = 0
          last_log_time, last_log_step, excluded_time = now, done, 0.0

        if is_eval:
          t0 = time.perf_counter()
          eval_results = evaluate(state)
          writer.write_scalars(done, dict(eval_results, **{"eval/epoch": done / steps_per_epoch}))
          if jax.process_index() == 0:
            progress.write(f"step {done} (epoch {done / steps_per_epoch:.2f}): " + ", ".join(
                f"{k}={v:.4f}" for k, v in eval_results.items()))
          excluded_time += time.perf_counter() - t0

        if is_save or stopping:
          save(done)
        if stopping:
          raise TrainingInterrupted(stop.signum, done)
  finally:
    progress.close()
    checkpoints.close()
    writer.close()

  plot = metrics_lib.plot_curves(workdir)
  log.info("done: %s; curves in %s", eval_results, plot)
  return eval_results


def load_checkpoint(config, workdir: str, *, model: Optional[nn.Module] = None,
                    weight_decay_mask: Optional[Callable[[Any], Any]] = None
                    ) -> Optional[tuple[int, state_lib.TrainState]]:
  """The newest good checkpoint of the run of `config` in `workdir`, as `(step, state)`.

  Returns None when the run has no usable checkpoint. The state is replicated over all
  devices; `state.params` (or `state.ema_params`) is what inference needs. The dataset is
  not read: the schedule's length, which depends on it, does not shape the state.
  """
  setup = state_lib.create_setup(config, steps_per_epoch=1, model=model,
                                 weight_decay_mask=weight_decay_mask)
  replicated = step_lib.replicated(step_lib.create_mesh())
  checkpoints = checkpoint_lib.Checkpoints(_checkpoint_dir(workdir))
  try:
    restored = checkpoints.restore_latest(
        setup.abstract_state(jax.random.PRNGKey(config.seed), replicated))
  finally:
    checkpoints.close()
  return None if restored is None else restored[:2]
