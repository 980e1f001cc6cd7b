"""Metric writing (TensorBoard event files + JSON lines), progress bar and the final plot."""

from __future__ import annotations

import json
import math
import os
from typing import Mapping, Optional

import jax

JSONL_NAME = "metrics.jsonl"
PLOT_NAME = "curves.png"


def _scalar_metadata():
  """SummaryMetadata that makes TensorBoard show a tensor summary as a scalar."""
  from tensorflow.core.framework import summary_pb2  # pylint: disable=import-outside-toplevel

  return summary_pb2.SummaryMetadata(
      plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"),
      data_class=summary_pb2.DATA_CLASS_SCALAR)


class MetricWriter:
  """Writes scalars to `<workdir>/tensorboard/` event files and `<workdir>/metrics.jsonl`.

  Only process 0 writes; on other processes every method is a no-op. Each JSON line is
  `{"step": int, "<name>": float, ...}`.

  Args:
    workdir: run directory.
    resume_step: when resuming, JSON lines of steps after it (written by the interrupted
      run after its last checkpoint) are dropped, so the file tells one consistent story.
  """

  def __init__(self, workdir: str, resume_step: Optional[int] = None):
    self._active = jax.process_index() == 0
    if not self._active:
      return
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    os.makedirs(workdir, exist_ok=True)
    self.jsonl_path = os.path.join(workdir, JSONL_NAME)
    if resume_step is not None and os.path.exists(self.jsonl_path):
      kept = [r for r in read_jsonl(self.jsonl_path) if r["step"] <= resume_step]
      with open(self.jsonl_path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
    self._jsonl = open(self.jsonl_path, "a")
    self._tf = tf
    self._tb = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))
    self._metadata = _scalar_metadata()

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self._active:
      return
    record = {"step": int(step)}
    record.update({k: float(v) for k, v in scalars.items()})
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    with self._tb.as_default():
      for name, value in scalars.items():
        self._tf.summary.write(name, self._tf.constant(float(value), self._tf.float32),
                               step=int(step), metadata=self._metadata)
    self._tb.flush()

  def close(self) -> None:
    if self._active:
      self._jsonl.close()
      self._tb.close()


def read_jsonl(path: str) -> list[dict]:
  """Records of a metrics file; a torn last line (killed run) is ignored."""
  records = []
  with open(path) as f:
    for line in f:
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:
        break
  return records


def progress_bar(total: int, initial: int):
  """tqdm bar over optimizer steps on process 0 (disabled elsewhere)."""
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel

  return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
              disable=jax.process_index() != 0, mininterval=1.0, smoothing=0.1)


def plot_curves(workdir: str) -> Optional[str]:
  """Plots training loss, learning rate and eval accuracy from metrics.jsonl to a PNG."""
  if jax.process_index() != 0:
    return None
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  records = read_jsonl(os.path.join(workdir, JSONL_NAME))

  def series(key):
    pts = [(r["step"], r[key]) for r in records if key in r and math.isfinite(r[key])]
    return [p[0] for p in pts], [p[1] for p in pts]

  fig, axes = plt.subplots(1, 3, figsize=(15, 4))
  steps, loss = series("train/loss")
  axes[0].plot(steps, loss, label="train")
  steps, loss = series("eval/loss")
  axes[0].plot(steps, loss, "o-", label="eval")
  axes[0].set(title="loss", xlabel="step")
  axes[0].legend()
  for key in ("eval/top1", "eval/top5", "eval_ema/top1"):
    steps, acc = series(key)
    if steps:
      axes[1].plot(steps, acc, "o-", label=key)
  axes[1].set(title="eval accuracy", xlabel="step", ylim=(0, 1))
  axes[1].legend()
  axes[1].grid(alpha=0.3)
  steps, lr = series("train/learning_rate")
  axes[2].plot(steps, lr)
  axes[2].set(title="learning rate", xlabel="step")
  fig.tight_layout()
  path = os.path.join(workdir, PLOT_NAME)
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path
