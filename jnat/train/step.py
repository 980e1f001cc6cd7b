"""The jitted train and eval steps, with explicit shardings over a one-axis data mesh."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from jnat.data import mixup
from jnat.train.state import TrainState

DATA_AXIS = "data"


def create_mesh(devices=None) -> jax.sharding.Mesh:
  """One mesh axis, `data`, over every device of every host."""
  devices = jax.devices() if devices is None else devices
  return jax.make_mesh((len(devices),), (DATA_AXIS,), devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,))


def batch_sharding(mesh) -> NamedSharding:
  """Leading (batch) axis split over the mesh."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def _ema(ema_params, params, decay):
  return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema_params, params)


def train_step(state: TrainState, batch: dict, *, model: nn.Module,
               tx: optax.GradientTransformation, learning_rate_fn, config):
  """One optimizer step on a global batch `{'image', 'label'}`.

  Returns:
    `(new_state, metrics)`; metrics are scalars: loss, grad_norm (before clipping),
    param_norm (after the update, so a non-finite update is caught) and learning_rate.
  """
  rng = jax.random.fold_in(state.rng, state.step)
  mix_rng, dropout_rng = jax.random.split(rng)
  images, targets = mixup.mixup_cutmix(
      mix_rng, batch["image"], batch["label"], num_classes=config.num_classes,
      mixup_alpha=config.mixup_alpha, cutmix_alpha=config.cutmix_alpha,
      prob=config.mixup_prob, switch_prob=config.mixup_switch_prob,
      label_smoothing=config.label_smoothing)

  def loss_fn(params):
    logits = model.apply({"params": params}, images, train=True, rngs={"dropout": dropout_rng})
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets).mean()

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema_params = state.ema_params
  if ema_params is not None:
    ema_params = _ema(ema_params, params, config.ema_decay)
  metrics = {
      "loss": loss,
      "grad_norm": optax.tree.norm(grads),
      "param_norm": optax.tree.norm(params),
      "learning_rate": learning_rate_fn(state.step),
  }
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                            ema_params=ema_params)
  return new_state, metrics


def eval_step(params, batch: dict, *, model: nn.Module):
  """Sums over a padded eval batch: top-1 and top-5 hits, cross-entropy, example count."""
  logits = model.apply({"params": params}, batch["image"], train=False).astype(jnp.float32)
  labels, mask = batch["label"], batch["mask"]
  k = min(5, logits.shape[-1])
  _, top = jax.lax.top_k(logits, k)
  hit1 = top[:, 0] == labels
  hit5 = jnp.any(top == labels[:, None], axis=-1)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  return {
      "top1": jnp.sum(hit1 * mask),
      "top5": jnp.sum(hit5 * mask),
      "loss": jnp.sum(loss * mask),
      "count": jnp.sum(mask),
  }


def jit_train_step(mesh, *, model, tx, learning_rate_fn, config):
  """`train_step` compiled with replicated state and a batch-sharded batch; state donated."""
  fn = functools.partial(train_step, model=model, tx=tx, learning_rate_fn=learning_rate_fn,
                         config=config)
  return jax.jit(fn, in_shardings=(replicated(mesh), batch_sharding(mesh)),
                 out_shardings=(replicated(mesh), replicated(mesh)), donate_argnums=(0,))


def jit_eval_step(mesh, *, model):
  fn = functools.partial(eval_step, model=model)
  return jax.jit(fn, in_shardings=(replicated(mesh), batch_sharding(mesh)),
                 out_shardings=replicated(mesh))
