"""A seconds-long smoke run: a two-level NAT on 16x16 digits (tests and quick checks).

  python train.py --config configs/smoke.py --workdir runs/smoke
"""

from configs import digits


def get_config():
  c = digits.get_config()
  c.model_overrides.update({"embed_dim": 16, "depths": (1, 1), "num_heads": (1, 2),
                            "mlp_ratio": 2.0, "drop_path_rate": 0.1})
  c.update(dict(image_size=16, global_batch_size=32, eval_batch_size=64, num_epochs=2.0,
                warmup_epochs=0.5, log_every_steps=2, checkpoint_every_steps=10,
                bench_steps=5, bench_warmup_steps=1))
  return c
