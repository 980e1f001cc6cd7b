"""Training: state and optimizer, jitted steps, schedule, checkpoints, metrics, the loop.

Entry points: `jnat.train.loop.train_and_evaluate(config, workdir)` and
`jnat.train.bench.run(config)`; `train.py` wraps both.
"""
