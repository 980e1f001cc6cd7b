"""A seconds-long smoke run: a two-level NAT on 16x16 digits (tests and quick checks).

  python train.py --config configs/smoke.py --workdir runs/smoke
"""

from configs import digits


def get_config():
  c = digits.get_config()
  c.model_overrides.update({"embed_dim": 16, "depths": (1, 1), "num_heads": (1, 2),
                            "mlp_ratio": 2.0, "drop_path_rate": 0.1})
  c.image_size = 16
  c.global_batch_size = 32
  c.eval_batch_size = 64
  c.num_epochs = 2.0
  c.warmup_epochs = 0.5
  c.log_every_steps = 2
  c.checkpoint_every_steps = 10
  c.bench_steps = 5
  c.bench_warmup_steps = 1
  return c
