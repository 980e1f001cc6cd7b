"""Learning-rate schedule: linear warmup, cosine decay, constant cooldown, per step."""

from __future__ import annotations

import optax


def create_learning_rate_fn(config, steps_per_epoch: int) -> optax.Schedule:
  """The NAT recipe's schedule, evaluated at every optimizer step.

  Warmup rises linearly from `warmup_learning_rate` to `learning_rate` over
  `warmup_epochs`; a half-cosine then falls to `min_learning_rate` at the end of
  `num_epochs`; the `cooldown_epochs` that follow stay at `min_learning_rate`. Training
  lasts `num_epochs + cooldown_epochs` epochs (300 + 10 in the paper's recipe).

  Args:
    config: training config (`learning_rate`, `warmup_learning_rate`,
      `min_learning_rate`, `warmup_epochs`, `num_epochs`).
    steps_per_epoch: optimizer steps per epoch.

  Returns:
    An optax schedule `step -> learning rate`.
  """
  warmup_steps = int(round(config.warmup_epochs * steps_per_epoch))
  decay_steps = max(int(round(config.num_epochs * steps_per_epoch)) - warmup_steps, 1)
  warmup = optax.linear_schedule(config.warmup_learning_rate, config.learning_rate,
                                 max(warmup_steps, 1))
  cosine = optax.cosine_decay_schedule(
      config.learning_rate, decay_steps, alpha=config.min_learning_rate / config.learning_rate)
  cooldown = optax.constant_schedule(config.min_learning_rate)
  return optax.join_schedules([warmup, cosine, cooldown],
                              [warmup_steps, warmup_steps + decay_steps])


def total_steps(config, steps_per_epoch: int) -> int:
  """Optimizer steps of the whole run: `num_train_steps` if set, else from the epochs."""
  if config.num_train_steps > 0:
    return config.num_train_steps
  return int(round((config.num_epochs + config.cooldown_epochs) * steps_per_epoch))
