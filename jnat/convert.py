"""Converts PyTorch NAT / DiNAT checkpoints (and NATTEN module weights) to jnat parameters.

The reference implementation's state-dict keys become Flax paths by one rule: dots become
path separators and a numeric part joins the name before it (``levels.0.blocks.1.attn.qkv``
→ ``levels_0/blocks_1/attn/qkv``). The leaf is then renamed and re-laid-out by the table
``LEAF_RULES``. Works for any model whose Flax modules carry the PyTorch names, including a
lone ``NeighborhoodAttention`` layer (``qkv``, ``proj``, ``rpb``).

Command line::

  python -m jnat.convert nat_tiny nat_tiny.pth converted/nat_tiny
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from jnat import models
from jnat.models import checkpoint as ckpt

# (PyTorch leaf name, tensor rank) → (Flax leaf name, layout change).
LEAF_RULES: dict[tuple[str, int], tuple[str, Callable[[np.ndarray], np.ndarray]]] = {
    ("weight", 4): ("kernel", lambda w: w.transpose(2, 3, 1, 0)),  # Conv2d OIHW → HWIO
    ("weight", 2): ("kernel", lambda w: w.T),  # Linear [out, in] → Dense [in, out]
    ("weight", 1): ("scale", lambda w: w),  # LayerNorm
    ("bias", 1): ("bias", lambda b: b),
}
# Leaves whose name and layout are the same in both frameworks (any rank).
KEPT_LEAVES = ("rpb", "gamma1", "gamma2")


def flax_path(torch_key: str, rank: int) -> tuple[tuple[str, ...], Callable]:
  """The Flax path of a PyTorch state-dict key and the layout change of its tensor.

  Raises:
    ValueError: for a leaf no rule covers.
  """
  parts: list[str] = []
  for part in torch_key.split("."):
    if part.isdigit() and parts:
      parts[-1] = f"{parts[-1]}_{part}"
    else:
      parts.append(part)
  *modules, leaf = parts
  if leaf in KEPT_LEAVES:
    return tuple(parts), lambda x: x
  if (leaf, rank) not in LEAF_RULES:
    raise ValueError(f"No conversion rule for {torch_key!r} (rank {rank}).")
  name, layout = LEAF_RULES[leaf, rank]
  return (*modules, name), layout


def convert_state_dict(state_dict: Mapping[str, Any]) -> dict:
  """Maps a PyTorch state dict (tensors or arrays) to a nested dict of Flax parameters.

  Args:
    state_dict: key → tensor, with the reference implementation's key names.

  Returns:
    The parameter tree (numpy float32 arrays), to be used as ``{"params": tree}``.

  Example:
    >>> import numpy as np
    >>> from jnat.convert import convert_state_dict
    >>> tree = convert_state_dict({"attn.qkv.weight": np.zeros((12, 4)),
    ...                            "attn.rpb": np.zeros((2, 5, 5))})
    >>> tree["attn"]["qkv"]["kernel"].shape, tree["attn"]["rpb"].shape
    ((4, 12), (2, 5, 5))
  """
  params: dict = {}
  for key, tensor in state_dict.items():
    array = _to_numpy(tensor)
    path, layout = flax_path(key, array.ndim)
    node = params
    for part in path[:-1]:
      node = node.setdefault(part, {})
    node[path[-1]] = np.ascontiguousarray(layout(array))
  return params


def load_torch_state_dict(path: str, trust: bool = False) -> dict[str, Any]:
  """Reads a ``.pth`` file: a bare state dict or one under ``"model"`` / ``"state_dict"``.

  Buffers that are not parameters and a ``module.`` prefix (DataParallel) are dropped.
  Needs PyTorch.

  Args:
    path: the checkpoint file.
    trust: also accept files holding arbitrary Python objects (e.g. training scripts'
      ``args``), which unpickling may execute: only for files from a trusted source.
      By default only tensors and plain containers are read.

  Raises:
    ValueError: if the file holds other objects and ``trust`` is False.
  """
  import pickle  # Only this function reads pickles, and only it needs PyTorch.

  import torch

  try:
    state = torch.load(path, map_location="cpu", weights_only=not trust)
  except pickle.UnpicklingError as error:
    raise ValueError(f"{path} holds objects other than tensors; if it comes from a trusted "
                     f"source, load it with trust=True (--trust): {error}") from error
  for wrapper in ("model", "state_dict"):
    if isinstance(state, Mapping) and isinstance(state.get(wrapper), Mapping):
      state = state[wrapper]
  return {k.removeprefix("module."): v for k, v in state.items()
          if not k.endswith("num_batches_tracked")}


def settings_from(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """Model attributes a checkpoint fixes that a variant may not: classes, layer scale."""
  head = state_dict.get("head.weight")
  # A layer-scale value only initialises the scales, which the checkpoint overwrites.
  has_gamma = any(key.endswith(".gamma1") for key in state_dict)
  return {"num_classes": 0 if head is None else int(head.shape[0]),
          "layer_scale": 1e-5 if has_gamma else None}


def convert(state_dict: Mapping[str, Any], model) -> dict:
  """Converts a state dict and checks it against a model's parameters.

  Args:
    state_dict: the PyTorch state dict, with the reference implementation's key names.
    model: the jnat model it is for, e.g. ``jnat.models.get("dinat_base")``.

  Returns:
    Parameters for ``model.apply({"params": params}, images)``.

  Raises:
    ValueError: listing names or shapes that do not match the model.
  """
  return ckpt.match(convert_state_dict(state_dict), models.abstract_params(model))


def convert_checkpoint(model: str, source: str, destination: str,
                       trust: bool = False) -> dict:
  """Converts a ``.pth`` file of a variant and saves it with orbax for ``models.create``.

  The number of classes and the presence of layer scales are read from the checkpoint.

  Args:
    model: variant name, e.g. ``"nat_tiny"``.
    source: the PyTorch checkpoint file.
    destination: output directory (must not exist).
    trust: see ``load_torch_state_dict``.

  Returns:
    The converted parameters.

  Example:
    ``convert_checkpoint("nat_tiny", "nat_tiny.pth", "converted/nat_tiny")``, then
    ``jnat.models.create("nat_tiny", checkpoint="converted/nat_tiny")``.
  """
  state_dict = load_torch_state_dict(source, trust)
  config = settings_from(state_dict)
  params = convert(state_dict, models.get(model, **config))
  ckpt.save(destination, params, model=model, config=config)
  return params


def _to_numpy(tensor) -> np.ndarray:
  if hasattr(tensor, "detach"):  # A torch tensor; bfloat16 has no numpy twin, hence float.
    tensor = tensor.detach().cpu().float().numpy()
  return np.asarray(tensor, np.float32)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(
      description="Convert a PyTorch NAT/DiNAT checkpoint to a jnat (orbax) checkpoint.")
  parser.add_argument("model", choices=list(models.VARIANTS), help="variant name")
  parser.add_argument("source", help="PyTorch .pth file")
  parser.add_argument("destination", help="output directory (must not exist)")
  parser.add_argument("--trust", action="store_true",
                      help="accept pickled Python objects besides tensors (trusted files only)")
  args = parser.parse_args(argv)
  params = convert_checkpoint(args.model, args.source, args.destination, args.trust)
  print(f"{args.model}: {models.count_params(params):,} parameters → {args.destination}")


if __name__ == "__main__":
  main()
