"""TFDS input pipeline: per-host splits, a resumable training order, padded eval batches.

Training order is a pure function of (seed, step): epoch `e` reads the host's slice of
the split in an order fixed by `seed` and `e`, and each example's augmentation draws from
a stateless seed derived from (seed, e, position). Resuming at step `s` rebuilds epoch
`s // steps_per_epoch` and skips the records already consumed, before decoding them, so a
resumed run sees the same batches as an uninterrupted one.

Host batches are NumPy dicts; `device_batches` turns them into global `jax.Array`s sharded
over the mesh and keeps a few in flight.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import os
from typing import Iterator, Optional

import jax
import numpy as np


def hide_gpus_from_tensorflow() -> None:
  """Keeps TensorFlow (used only for input) off the accelerators JAX needs."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  try:
    tf.config.set_visible_devices([], "GPU")
    tf.config.set_visible_devices([], "TPU")
  except (RuntimeError, ValueError):
    pass  # already initialised (then it was hidden earlier) or no such device type


def get_builder(name: str, data_dir: Optional[str]):
  """The TFDS builder of `name`, prepared. Prepares the embedded digits dataset if needed.

  Raises:
    FileNotFoundError: dataset `name` is not prepared in `data_dir`; the message says how
      to prepare it (for `imagenet2012`, step by step from the manual download).
  """
  hide_gpus_from_tensorflow()
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  from jnat.data import digits  # pylint: disable=import-outside-toplevel,unused-import

  builder = tfds.builder(name, data_dir=data_dir)
  if name == "sklearn_digits":
    # Offline and seconds long; the first host writes it, the others wait.
    if jax.process_index() == 0:
      builder.download_and_prepare()
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      multihost_utils.sync_global_devices("sklearn_digits prepared")
    builder = tfds.builder(name, data_dir=data_dir)
  _check_prepared(builder, data_dir)
  return builder


def _check_prepared(builder, data_dir: Optional[str]) -> None:
  """Raises FileNotFoundError, saying how to prepare the dataset, if `builder` has no data."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from jnat.data import imagenet  # pylint: disable=import-outside-toplevel

  if tf.io.gfile.exists(os.path.join(builder.data_dir, "dataset_info.json")):
    return
  data_dir = data_dir or os.path.expanduser("~/tensorflow_datasets")
  if builder.name == "imagenet2012":
    steps = imagenet.preparation_steps(data_dir)
  else:
    steps = ("Prepare it once (a dataset that cannot be downloaded automatically says "
             f"where to put its files):\n  tfds build {builder.name} --data_dir={data_dir}")
  raise FileNotFoundError(
      f"{builder.name} is not prepared in data_dir={data_dir!r}.\n{steps}\n"
      "Then run the trainer again with --data_dir pointing at the same directory. "
      "On several hosts, every host needs read access to the prepared data_dir.")


@dataclasses.dataclass(frozen=True)
class SplitPlan:
  """How one host reads its share of a split."""
  host_split: str  # TFDS split string for this host
  num_examples: int  # examples in the whole split
  host_examples: int  # examples in this host's slice
  local_batch: int  # per-host batch size
  steps: int  # batches per pass (training: per epoch), the same on every host


def plan_split(builder, split: str, global_batch: int, *, train: bool) -> SplitPlan:
  """Slices `split` across hosts and counts the batches every host will produce."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  processes = jax.process_count()
  if global_batch % processes:
    raise ValueError(f"{global_batch=} must be divisible by {processes=} hosts")
  local_batch = global_batch // processes
  num_examples = builder.info.splits[split].num_examples
  # Training drops the remainder so that every host has the same number of examples.
  host_split = tfds.split_for_jax_process(split, drop_remainder=train)
  host_examples = builder.info.splits[host_split].num_examples
  if train:
    steps = (num_examples // processes) // local_batch
    if steps == 0:
      raise ValueError(
          f"split {split!r} has {num_examples} examples: fewer than one global batch of "
          f"{global_batch}; lower global_batch_size")
  else:
    # Every host runs the same number of eval steps; short hosts pad with masked rows.
    steps = -(-((num_examples + processes - 1) // processes) // local_batch)
  return SplitPlan(host_split, num_examples, host_examples, local_batch, steps)


def _epoch_seed(seed: int, epoch: int):
  return np.array([seed, epoch], np.int64)


def train_batches(builder, plan: SplitPlan, preprocess, *, seed: int, start_step: int = 0,
                  shuffle_buffer: int = 16384) -> Iterator[dict]:
  """Endless NumPy training batches of this host, starting at global step `start_step`.

  Args:
    builder: prepared TFDS builder.
    plan: this host's training split plan (`plan_split(..., train=True)`).
    preprocess: `(example, seed) -> example`, e.g. `imagenet.preprocess_train` bound to
      its options.
    seed: data seed; the order and the augmentations follow from it and the step.
    start_step: first step to produce (resuming).
    shuffle_buffer: examples in the shuffle buffer.

  Yields:
    `{'image': float32 [local_batch, S, S, 3], 'label': int32 [local_batch]}`.
  """
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  epoch, offset = divmod(start_step, plan.steps)
  while True:
    epoch_seed = _epoch_seed(seed, epoch)
    file_seed = int(np.random.default_rng(epoch_seed).integers(2**31 - 1))
    options = tf.data.Options()
    options.deterministic = True
    read_config = tfds.ReadConfig(shuffle_seed=file_seed, try_autocache=False,
                                  options=options)
    ds = builder.as_dataset(split=plan.host_split, shuffle_files=True,
                            read_config=read_config,
                            decoders={"image": tfds.decode.SkipDecoding()})
    ds = ds.shuffle(shuffle_buffer, seed=file_seed, reshuffle_each_iteration=False)
    ds = ds.take(plan.steps * plan.local_batch).enumerate()
    ds = ds.skip(offset * plan.local_batch)  # cheap: records are still encoded here
    seed_t = tf.constant(epoch_seed)

    def _map(index, example, seed_t=seed_t):
      example_seed = tf.random.experimental.stateless_fold_in(seed_t, index)
      return preprocess(example, example_seed)

    ds = ds.map(_map, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(plan.local_batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    yield from ds.as_numpy_iterator()
    epoch, offset = epoch + 1, 0


def eval_batches(builder, plan: SplitPlan, preprocess) -> Iterator[dict]:
  """One pass over this host's eval slice in `plan.steps` batches, padded at the end.

  Yields:
    `{'image', 'label', 'mask'}`; `mask` is 1.0 for real examples and 0.0 for padding,
    so metrics summed with it count every example of the split exactly once.
  """
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  read_config = tfds.ReadConfig(try_autocache=False)
  ds = builder.as_dataset(split=plan.host_split, shuffle_files=False,
                          read_config=read_config,
                          decoders={"image": tfds.decode.SkipDecoding()})

  def _map(example):
    out = preprocess(example)
    out["mask"] = tf.constant(1.0, tf.float32)
    return out

  ds = ds.map(_map, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  pad = tf.data.Dataset.from_tensors(
      tf.nest.map_structure(lambda s: tf.zeros(s.shape, s.dtype), ds.element_spec)).repeat()
  ds = ds.concatenate(pad).take(plan.steps * plan.local_batch)
  ds = ds.batch(plan.local_batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
  return ds.as_numpy_iterator()


def to_global(batch: dict, sharding) -> dict:
  """Assembles the host batches of all processes into global arrays sharded on `sharding`."""
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


def device_batches(batches: Iterator[dict], sharding, size: int = 2) -> Iterator[dict]:
  """Moves host batches to the devices, keeping `size` transfers in flight."""
  queue = collections.deque()
  put = functools.partial(to_global, sharding=sharding)
  for batch in itertools.islice(batches, size):
    queue.append(put(batch))
  while queue:
    yield queue.popleft()
    batch = next(batches, None)
    if batch is not None:
      queue.append(put(batch))
