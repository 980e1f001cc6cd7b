"""Training state, optimizer and model construction."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

from jnat.train import schedule as schedule_lib


class TrainState(struct.PyTreeNode):
  """Everything a run needs to continue exactly where it stopped.

  Attributes:
    step: optimizer steps done (int32 scalar).
    params: float32 model parameters.
    opt_state: optimizer state.
    ema_params: exponential moving average of `params`, or None when EMA is off.
    rng: base PRNG key (raw uint32[2]); step `t` uses `fold_in(rng, t)`, so the
      randomness of a step depends only on the seed and the step number.
  """
  step: jax.Array
  params: Any
  opt_state: Any
  ema_params: Any
  rng: jax.Array


def create_model(config) -> nn.Module:
  """The model named by `config.model`, computing in `config.compute_dtype`.

  `config.model_overrides` set attributes of the variant; a None there keeps the
  variant's own value.
  """
  from jnat import models  # pylint: disable=import-outside-toplevel

  overrides = {k: v for k, v in config.model_overrides.items() if v is not None}
  return models.get(config.model, num_classes=config.num_classes,
                    dtype=jnp.dtype(config.compute_dtype), backend=config.attention_backend,
                    **overrides)


def default_weight_decay_mask(params) -> Any:
  """Model's decay mask: no weight decay on norms, biases and relative positional bias."""
  from jnat import models  # pylint: disable=import-outside-toplevel

  return models.weight_decay_mask(params)


def create_optimizer(config, learning_rate_fn: optax.Schedule,
                     weight_decay_mask: Callable[[Any], Any]) -> optax.GradientTransformation:
  """Gradient clipping by global norm, then AdamW with decoupled, masked weight decay."""
  parts = []
  if config.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
  parts.append(optax.adamw(learning_rate_fn, b1=config.adam_b1, b2=config.adam_b2,
                           eps=config.adam_eps, weight_decay=config.weight_decay,
                           mask=weight_decay_mask))
  return optax.chain(*parts)


def make_init_fn(model: nn.Module, tx: optax.GradientTransformation, image_shape,
                 use_ema: bool) -> Callable[[jax.Array], TrainState]:
  """`rng -> TrainState` with freshly initialised parameters (jit it with out_shardings)."""

  def init(rng):
    params_rng, dropout_rng, state_rng = jax.random.split(rng, 3)
    dummy = jnp.zeros((1, *image_shape), jnp.float32)
    variables = model.init({"params": params_rng, "dropout": dropout_rng}, dummy, train=False)
    params = variables["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        ema_params=jax.tree.map(jnp.copy, params) if use_ema else None,
        rng=state_rng,
    )

  return init


def abstract_with_sharding(tree, sharding) -> Any:
  """`jax.ShapeDtypeStruct`s of `tree` (e.g. from `jax.eval_shape`) carrying `sharding`."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


class Setup(NamedTuple):
  """What a run of a config builds before it reads data or state."""
  model: nn.Module
  learning_rate_fn: optax.Schedule
  tx: optax.GradientTransformation
  init_fn: Callable[[jax.Array], TrainState]  # see `make_init_fn`

  def abstract_state(self, rng: jax.Array, sharding) -> Any:
    """The state's shapes and dtypes, placed on `sharding`, without computing anything."""
    return abstract_with_sharding(jax.eval_shape(self.init_fn, rng), sharding)


def create_setup(config, steps_per_epoch: int, *, model: Optional[nn.Module] = None,
                 weight_decay_mask: Optional[Callable[[Any], Any]] = None) -> Setup:
  """Model, learning-rate schedule, optimizer and state initialiser of a run of `config`.

  Args:
    config: training config (see `configs/common.py`).
    steps_per_epoch: optimizer steps per epoch, which the schedule is laid out in.
    model: a Flax module `(images, *, train) -> logits`; default `create_model(config)`.
    weight_decay_mask: `params -> bool tree` of parameters that get weight decay; default
      `default_weight_decay_mask`.
  """
  model = model if model is not None else create_model(config)
  learning_rate_fn = schedule_lib.create_learning_rate_fn(config, steps_per_epoch)
  tx = create_optimizer(config, learning_rate_fn,
                        weight_decay_mask or default_weight_decay_mask)
  init_fn = make_init_fn(model, tx, (config.image_size, config.image_size, 3),
                         use_ema=config.ema_decay > 0)
  return Setup(model, learning_rate_fn, tx, init_fn)

