"""Two hosts on loopback: `train.py --multihost` as two processes of two CPU devices each."""

import json
import os
import socket
import subprocess
import sys

import pytest

pytest.importorskip("tensorflow_datasets")
pytest.importorskip("ml_collections")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_train_one_model(tmp_path):
  from jnat.data import pipeline
  data_dir = str(tmp_path / "tfds")
  pipeline.get_builder("sklearn_digits", data_dir)
  workdir = tmp_path / "run"
  port = _free_port()
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", JAX_NUM_CPU_DEVICES="2",
             JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo")
  env.pop("XLA_FLAGS", None)
  procs = [subprocess.Popen(
      [sys.executable, os.path.join(ROOT, "train.py"),
       "--config", os.path.join(ROOT, "configs", "smoke.py"),
       "--workdir", str(workdir), "--data_dir", data_dir, "--multihost",
       f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}",
       "--config.attention_backend=xla", "--config.num_train_steps=4",
       "--config.checkpoint_every_steps=4", "--config.log_every_steps=2"],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)]
  outs = [p.communicate(timeout=500)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-4000:]
  records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  assert [r["step"] for r in records if "train/loss" in r] == [2, 4]
  final = [r for r in records if "eval/top1" in r][-1]
  assert 0.0 <= final["eval/top1"] <= 1.0
  assert "4" in os.listdir(workdir / "checkpoints")
  # Each host logs its own view: 4 global devices over 2 processes.
  assert "4 devices on 2 hosts" in outs[0]
