"""Orbax checkpoints that are verified when restored.

Orbax writes each step to a temporary directory and renames it when complete, so a run
killed mid-save leaves no half checkpoint behind. On top of that every checkpoint stores a
fingerprint of each array of the state; a restored checkpoint whose files are truncated
or whose contents differ is set aside (moved to `<workdir>/corrupt_checkpoints/`) and the
next older one is tried.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


def _leaf_fingerprint(x):
  """Position-sensitive 32-bit hash of an array's bits (integer sums: order independent)."""
  x = jnp.ravel(x)
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  bits = jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * x.dtype.itemsize}"))
  bits = bits.astype(jnp.uint32)
  index = jnp.arange(x.size, dtype=jnp.uint32)
  mixed = (bits ^ (index * jnp.uint32(0x9E3779B1))) * jnp.uint32(0x85EBCA77)
  mixed = mixed ^ (mixed >> 13)
  return jnp.sum(mixed, dtype=jnp.uint32) ^ jnp.uint32(x.size)


@jax.jit
def _fingerprints(tree):
  return [_leaf_fingerprint(x) for x in jax.tree.leaves(tree)]


def fingerprint(tree) -> list[int]:
  """One 32-bit fingerprint per array of `tree`, in leaf order."""
  return [int(v) for v in jax.device_get(_fingerprints(tree))]


class CorruptCheckpointError(RuntimeError):
  """A checkpoint could not be read or did not match its recorded fingerprint."""


class Checkpoints:
  """Saves and restores `TrainState`s under `directory`, keeping the last `keep`.

  Args:
    directory: where checkpoints go (one sub-directory per step).
    keep: how many recent checkpoints to keep.
    async_save: write in a background thread once the arrays are copied to the host.
  """

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self._keep = keep
    self._async = async_save
    self._manager = self._new_manager()

  def _new_manager(self) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=self._keep, create=True,
                                           enable_async_checkpointing=self._async)
    return ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def save(self, step: int, state, meta: dict[str, Any]) -> None:
    """Starts saving `state` (and JSON-able `meta`) as checkpoint `step`."""
    if step in self._manager.all_steps():
      return
    meta = dict(meta, step=int(step), fingerprints=fingerprint(state))
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

  def _restore_step(self, step: int, abstract_state):
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    except Exception as e:  # orbax/tensorstore raise many types for unreadable files
      first_line = (str(e).splitlines() or [""])[0][:200]
      raise CorruptCheckpointError(
          f"checkpoint {step} is unreadable ({type(e).__name__}: {first_line})") from e
    state, meta = restored["state"], restored["meta"]
    if not isinstance(meta, dict) or "fingerprints" not in meta:
      raise CorruptCheckpointError(f"checkpoint {step} has no valid metadata")
    if fingerprint(state) != list(meta["fingerprints"]):
      raise CorruptCheckpointError(
          f"checkpoint {step} does not match the fingerprint recorded when it was saved")
    return state, meta

  def restore_latest(self, abstract_state) -> Optional[tuple[int, Any, dict]]:
    """The newest checkpoint that restores and verifies, as `(step, state, meta)`.

    Checkpoints that fail are logged and moved aside, so the run continues from the
    previous good one and later saves of the same step numbers do not collide.

    Args:
      abstract_state: `jax.ShapeDtypeStruct` tree (with shardings) of the state.

    Returns:
      None when there is no usable checkpoint.
    """
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        state, meta = self._restore_step(step, abstract_state)
        return step, state, meta
      except CorruptCheckpointError as e:
        log.warning("%s; falling back to the previous checkpoint", e)
        self._set_aside(step)
    return None

  def _set_aside(self, step: int) -> None:
    if jax.process_index() == 0:
      source = os.path.join(self.directory, str(step))
      target = os.path.join(os.path.dirname(self.directory), "corrupt_checkpoints",
                            f"{step}-{int(time.time())}")
      os.makedirs(os.path.dirname(target), exist_ok=True)
      if os.path.exists(source):
        shutil.move(source, target)
        log.warning("moved unusable checkpoint %s to %s", source, target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      multihost_utils.sync_global_devices(f"set aside checkpoint {step}")
    self._manager.close()
    self._manager = self._new_manager()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
