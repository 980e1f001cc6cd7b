"""Trains and evaluates a NAT/DiNAT classifier (see configs/ for the variants).

  python train.py                                                  # the digits default
  python train.py --config configs/nat_tiny.py --data_dir DIR --workdir runs/nat_tiny
  python train.py --config configs/nat_tiny.py --config.global_batch_size=256 --bench

Without --config it trains the embedded default, configs/digits.py: offline, on CPU, in
minutes. `python train.py --help` lists the configs. Rerunning the same command resumes
from the newest checkpoint in --workdir. On several hosts, start the same command on each
with --multihost (coordinator from the usual environment, or
--coordinator_address/--num_processes/--process_id).
"""

import os

# TensorFlow only feeds data: keep its C++ logging quiet (set before it is imported).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import logging as pylogging  # pylint: disable=wrong-import-position
import sys  # pylint: disable=wrong-import-position

from absl import app  # pylint: disable=wrong-import-position
from absl import flags  # pylint: disable=wrong-import-position
from absl import logging  # pylint: disable=wrong-import-position
from ml_collections import config_flags  # pylint: disable=wrong-import-position

ROOT = os.path.dirname(os.path.abspath(__file__))
CONFIGS = sorted(f"configs/{name}" for name in os.listdir(os.path.join(ROOT, "configs"))
                 if name.endswith(".py") and name != "common.py")
DEFAULT_CONFIG = "configs/digits.py"

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(ROOT, DEFAULT_CONFIG),
    f"Training config file (default: {DEFAULT_CONFIG}); one of: {', '.join(CONFIGS)}.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None,
                               "Run directory (default: workdir/<config file name>).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data directory (overrides config).")
_BENCH = flags.DEFINE_bool("bench", False,
                           "Only measure training throughput on synthetic batches.")
_MULTIHOST = flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize().")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["config"].present:
    print(f"No --config given: training the embedded default, {DEFAULT_CONFIG} "
          "(python train.py --help lists the configs).", flush=True)
  # Our progress messages at INFO; the libraries' (orbax, TFDS) only from WARNING up.
  logging.set_verbosity(logging.WARNING)
  pylogging.getLogger("jnat").setLevel(pylogging.INFO)
  if not _BENCH.value:  # --bench makes its batches on the device: no TensorFlow there
    # Hide accelerators from TensorFlow before anything initialises it.
    from jnat.data import pipeline  # pylint: disable=import-outside-toplevel
    pipeline.hide_gpus_from_tensorflow()

  import jax  # pylint: disable=import-outside-toplevel
  if _MULTIHOST.value:
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value,
                               process_id=_PROCESS_ID.value)

  config = _CONFIG.value
  if _DATA_DIR.value is not None:
    with config.unlocked():
      config.data_dir = _DATA_DIR.value

  if _BENCH.value:
    from jnat.train import bench  # pylint: disable=import-outside-toplevel
    bench.run(config)
    return

  from jnat.train import loop  # pylint: disable=import-outside-toplevel
  config_name = os.path.splitext(os.path.basename(config_flags.get_config_filename(
      flags.FLAGS["config"])))[0]
  workdir = _WORKDIR.value or os.path.join("workdir", config_name)
  logging.info("workdir: %s", os.path.abspath(workdir))
  try:
    loop.train_and_evaluate(config, workdir)
  except loop.TrainingInterrupted as e:
    logging.warning("%s", e)
    print(f"\n{e}", file=sys.stderr)
    sys.exit(128 + e.signum)
  except (loop.NonFiniteLossError, FileNotFoundError) as e:
    print(f"\nerror: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
