"""Saving and restoring model parameters with orbax, with the model's name and settings.

A checkpoint directory holds two items: ``params`` (the parameter tree) and ``metadata``
(JSON: ``{"model": name, "config": {attribute: value}}``), so that
``jnat.models.create(name, checkpoint=directory)`` rebuilds the same model.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp


@dataclasses.dataclass(frozen=True)
class Saved:
  """A restored checkpoint: model name, model attributes and parameters."""

  model: str
  config: dict[str, Any]
  params: Any


def save(directory: str, params, *, model: str, config: dict[str, Any] | None = None) -> None:
  """Writes ``params`` and the model description to ``directory`` (must not exist).

  Args:
    directory: target directory.
    params: the parameter tree.
    model: variant name, a key of ``jnat.models.VARIANTS``.
    config: JSON-serialisable attributes that differ from the variant's defaults.
  """
  items = ocp.args.Composite(
      params=ocp.args.StandardSave(params),
      metadata=ocp.args.JsonSave({"model": model, "config": config or {}}))
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
    checkpointer.save(os.path.abspath(directory), items)


def load(directory: str) -> Saved:
  """Reads a directory written by ``save``."""
  items = ocp.args.Composite(params=ocp.args.StandardRestore(),
                             metadata=ocp.args.JsonRestore())
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
    restored = checkpointer.restore(os.path.abspath(directory), items)
  metadata = restored["metadata"]
  return Saved(metadata["model"], dict(metadata["config"]), restored["params"])


def match(params, expected):
  """Checks ``params`` against the expected tree of shapes and casts it to its dtypes.

  Args:
    params: a parameter tree (numpy or jax arrays).
    expected: a tree of the same structure whose leaves have ``shape`` and ``dtype``.

  Returns:
    ``params`` as jax arrays of the expected dtypes.

  Raises:
    ValueError: listing missing, unexpected and mis-shaped parameters.
  """
  have, want = _flat(params), _flat(expected)
  problems = [f"missing: {k}" for k in sorted(want.keys() - have.keys())]
  problems += [f"unexpected: {k}" for k in sorted(have.keys() - want.keys())]
  problems += [f"shape of {k}: {np.shape(have[k])}, expected {want[k].shape}"
               for k in sorted(want.keys() & have.keys())
               if tuple(np.shape(have[k])) != tuple(want[k].shape)]
  if problems:
    raise ValueError("Parameters do not match the model:\n  " + "\n  ".join(problems))
  return jax.tree.map(lambda x, e: jnp.asarray(x, e.dtype), params, expected)


def _flat(tree) -> dict[str, Any]:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(str(getattr(p, "key", p)) for p in path): leaf for path, leaf in leaves}
