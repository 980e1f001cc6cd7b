"""Training throughput of a config: jitted steps on synthetic, device-resident batches."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from jnat.train import state as state_lib
from jnat.train import step as step_lib


def run(config, *, model=None, weight_decay_mask=None, print_fn=print) -> dict[str, float]:
  """Times `config.bench_steps` training steps at `config.global_batch_size`.

  The input pipeline is left out (random images), so this measures the model, optimizer
  and sharding; compile time is reported separately.

  Returns:
    `images_per_s`, `step_time_s` (median), `step_time_mean_s`, `compile_s`.
  """
  mesh = step_lib.create_mesh()
  replicated = step_lib.replicated(mesh)
  batch_size = config.global_batch_size
  if batch_size % jax.device_count():
    raise ValueError(f"global_batch_size={batch_size} must be divisible by "
                     f"{jax.device_count()} devices")
  # No dataset, so no real epoch length; the schedule's values do not change the timing.
  setup = state_lib.create_setup(config, steps_per_epoch=1000, model=model,
                                 weight_decay_mask=weight_decay_mask)
  size = config.image_size
  state = jax.jit(setup.init_fn, out_shardings=replicated)(jax.random.PRNGKey(config.seed))

  def make_batch(rng):
    images = jax.random.normal(rng, (batch_size, size, size, 3), jnp.float32)
    labels = jax.random.randint(rng, (batch_size,), 0, config.num_classes)
    return {"image": images, "label": labels.astype(jnp.int32)}

  batch = jax.jit(make_batch, out_shardings=step_lib.batch_sharding(mesh))(
      jax.random.PRNGKey(1))
  train_step = step_lib.jit_train_step(mesh, model=setup.model, tx=setup.tx,
                                       learning_rate_fn=setup.learning_rate_fn, config=config)
  t0 = time.perf_counter()
  compiled = train_step.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0

  times = []
  for i in range(config.bench_warmup_steps + config.bench_steps):
    t0 = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    if i >= config.bench_warmup_steps:
      times.append(time.perf_counter() - t0)
  times = np.array(times)
  result = {
      "images_per_s": batch_size / float(np.median(times)),
      "step_time_s": float(np.median(times)),
      "step_time_mean_s": float(times.mean()),
      "compile_s": compile_s,
  }
  print_fn(f"{config.model} {size}x{size} global batch {batch_size} on "
           f"{jax.device_count()}x {jax.devices()[0].device_kind} ({config.compute_dtype}): "
           f"{result['images_per_s']:.1f} images/s, step {1e3 * result['step_time_s']:.1f} ms "
           f"median ({1e3 * result['step_time_mean_s']:.1f} ms mean over "
           f"{config.bench_steps} steps), compile {compile_s:.1f} s")
  return result
