"""Data parallelism on 4 CPU devices: same steps as on 1 device, only a gradient all-reduce.

Runs in a subprocess: the CPU device count must be set before JAX initialises. The whole
loop on 4 devices (sharded input, eval reduced over devices) runs in the multihost test.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("ml_collections")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = textwrap.dedent("""
    import json, os, re, sys
    import jax
    jax.config.update("jax_num_cpu_devices", 4)
    # Lowering for the HLO below compiles the same step again: reuse the first compilation.
    jax.config.update("jax_compilation_cache_dir", CACHE_DIR)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    import jax.numpy as jnp
    import numpy as np
    sys.path.insert(0, ROOT)
    from configs import smoke
    from jnat.train import state as state_lib, step as step_lib

    config = smoke.get_config()
    config.update(dict(attention_backend="xla", mixup_alpha=0.8, cutmix_alpha=1.0))
    setup = state_lib.create_setup(config, steps_per_epoch=44)
    rng = np.random.default_rng(0)
    batches = [{"image": rng.normal(size=(32, 16, 16, 3)).astype(np.float32),
                "label": rng.integers(0, 10, 32).astype(np.int32)} for _ in range(3)]

    def run(mesh):
      state = jax.jit(setup.init_fn, out_shardings=step_lib.replicated(mesh))(
          jax.random.PRNGKey(0))
      train_step = step_lib.jit_train_step(mesh, model=setup.model, tx=setup.tx,
                                           learning_rate_fn=setup.learning_rate_fn,
                                           config=config)
      losses = []
      for batch in batches:
        batch = jax.device_put(batch, step_lib.batch_sharding(mesh))
        state, metrics = train_step(state, batch)
        jax.block_until_ready(metrics)  # multi-device CPU: wait for each step
        losses.append(float(metrics["loss"]))
      hlo = train_step.lower(state, batch).compile().as_text()
      return state, losses, hlo

    one, losses1, _ = run(step_lib.create_mesh(jax.devices()[:1]))
    four, losses4, hlo = run(step_lib.create_mesh())
    def comparable(path, x):
      # The key third of a qkv bias adds the same amount to every logit of a query, which
      # softmax ignores: its gradient is zero but for rounding, and Adam's normalisation
      # turns that rounding into its whole update. Nothing of data parallelism shows there.
      x = np.asarray(x)
      if jax.tree_util.keystr(path).endswith("['qkv']['bias']"):
        c = x.shape[-1] // 3
        return np.concatenate([x[..., :c], x[..., 2 * c:]], -1)
      return x
    diffs = [float(np.max(np.abs(comparable(p, a) - comparable(p, b))) /
                   (float(np.max(np.abs(comparable(p, a)))) + 1e-12))
             for (p, a), b in zip(jax.tree_util.tree_leaves_with_path(one.params),
                                  jax.tree.leaves(four.params))]
    ops = {op: len(re.findall(rf"\\b{op}(?:-start)?\\(", hlo))
           for op in ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
                      "collective-permute")}
    gathered = [l.strip()[:200] for l in hlo.splitlines() if "all-gather" in l]
    print("RESULT" + json.dumps(dict(
        devices=jax.device_count(), losses1=losses1, losses4=losses4,
        max_rel_param_diff=max(diffs), ops=ops, gathered=gathered,
        params_fully_replicated=all(x.sharding.is_fully_replicated
                                    for x in jax.tree.leaves(four.params)))))
""")


def test_four_devices_match_one_device(tmp_path):
  code = f"ROOT = {ROOT!r}\nCACHE_DIR = {str(tmp_path / 'jax_cache')!r}\n" + CHILD
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, text=True,
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=600)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT")]
  assert proc.returncode == 0 and lines, proc.stdout[-4000:]
  r = json.loads(lines[-1][len("RESULT"):])
  assert r["devices"] == 4
  # Same global batch on 1 and 4 devices: same losses and parameters to float32 rounding.
  for a, b in zip(r["losses1"], r["losses4"]):
    assert abs(a - b) <= 1e-5 * max(1.0, abs(a)), (r["losses1"], r["losses4"])
  assert r["max_rel_param_diff"] < 1e-5, r["max_rel_param_diff"]
  assert r["params_fully_replicated"]
  # The step reduces gradients across devices and never gathers parameters; the only
  # other collective moves Mixup partners (the reversed batch) between devices.
  assert r["ops"]["all-reduce"] >= 1, r["ops"]
  assert r["ops"]["all-gather"] == 0, r["gathered"]
  assert r["ops"]["reduce-scatter"] == 0 and r["ops"]["all-to-all"] == 0, r["ops"]
