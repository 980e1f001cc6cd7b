"""Benchmark of the op: jnat backends against dense attention, with a matmul peak.

Usage::

    python -m jnat.bench [--platform cpu] [--repeats 20] [--out results.json]

Every number comes from one run: a jitted float32 2048² matmul gives the machine's peak,
then each case times jnat's compiled backend, the xla reference backend and
``jax.nn.dot_product_attention`` on the same tokens (dense), forward and forward+backward.
Times are medians. GFLOP/s count in-window FLOPs only: 4·B·N·H·|window|·D for the forward
and 3.5× that for forward+backward (the backward does five of the seven window matmuls).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform as platform_module
import statistics
import time

import jax
import jax.numpy as jnp

import jnat


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  spatial: tuple[int, ...]
  batch: int
  heads: int
  head_dim: int
  kernel_size: int
  rpb: bool = False

  @property
  def forward_flops(self) -> float:
    window = self.kernel_size ** len(self.spatial)
    return 4.0 * self.batch * math.prod(self.spatial) * self.heads * window * self.head_dim


CPU_CASES = (
    Case("(a) 2D 56x56 B2 H4 D32 K7", (56, 56), 2, 4, 32, 7),
    Case("(b) 2D 56x56 B2 H4 D32 K7 +rpb", (56, 56), 2, 4, 32, 7, rpb=True),
    Case("(c) 1D L4096 B2 H4 D64 K63", (4096,), 2, 4, 64, 63),
    Case("(d) 3D 16x16x16 B1 H4 D32 K5", (16, 16, 16), 1, 4, 32, 5),
)


def median_ms(fn, *args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))  # compile
  jax.block_until_ready(fn(*args))  # warm caches
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times)


def matmul_peak_gflops(repeats: int) -> float:
  n = 2048
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  ms = median_ms(jax.jit(jnp.matmul), a, a, repeats=repeats)
  return 2 * n**3 / (ms * 1e6)


def _inputs(case: Case):
  keys = jax.random.split(jax.random.key(1), 4)
  shape = (case.batch, *case.spatial, case.heads, case.head_dim)
  q, k, v = (jax.random.normal(key, shape, jnp.float32) for key in keys[:3])
  rpb = None
  if case.rpb:
    rpb = jax.random.normal(keys[3], (case.heads,) + (2 * case.kernel_size - 1,) * len(case.spatial))
  return q, k, v, rpb


def _jnat_fns(case: Case, backend: str):
  op = getattr(jnat, f"na{len(case.spatial)}d")
  fwd = lambda q, k, v, rpb: op(q, k, v, case.kernel_size, rpb=rpb, backend=backend)
  loss = lambda q, k, v, rpb: jnp.sum(fwd(q, k, v, rpb))
  argnums = (0, 1, 2, 3) if case.rpb else (0, 1, 2)
  return jax.jit(fwd), jax.jit(jax.grad(loss, argnums=argnums))


def _dense_fns(case: Case):
  flat = lambda x: x.reshape(x.shape[0], -1, *x.shape[-2:])
  fwd = lambda q, k, v, rpb: jax.nn.dot_product_attention(flat(q), flat(k), flat(v))
  loss = lambda q, k, v, rpb: jnp.sum(fwd(q, k, v, rpb))
  return jax.jit(fwd), jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def run(platform: str, repeats: int, cases=CPU_CASES, log=print):
  peak = matmul_peak_gflops(repeats)
  log(f"float32 2048² matmul peak: {peak:.0f} GFLOP/s")
  compiled = [b for b in jnat.available_backends(platform) if b != "xla"]
  rows = []
  for case in cases:
    args = _inputs(case)
    impls = [(f"jnat {b}", *_jnat_fns(case, b)) for b in compiled + ["xla"]]
    impls.append(("dense dot_product_attention", *_dense_fns(case)))
    for name, fwd, fwd_bwd in impls:
      for mode, fn, flops in (("fwd", fwd, case.forward_flops),
                              ("fwd+bwd", fwd_bwd, 3.5 * case.forward_flops)):
        ms = median_ms(fn, *args, repeats=repeats)
        gflops = flops / (ms * 1e6)
        rows.append(dict(case=case.name, impl=name, mode=mode, ms=ms, gflops=gflops,
                         pct_peak=100 * gflops / peak))
        log(f"{case.name:<34} {name:<28} {mode:<8} {ms:9.2f} ms {gflops:8.1f} GFLOP/s "
            f"{100 * gflops / peak:5.1f}%")
  return dict(date=datetime.date.today().isoformat(), machine=platform_module.machine(),
              cores=os.cpu_count(), device=jax.devices(platform)[0].device_kind,
              jax=jax.__version__, peak_gflops=peak, repeats=repeats, rows=rows)


def markdown(result) -> str:
  """The results as a Markdown table with speedups against dense attention."""
  dense = {(r["case"], r["mode"]): r["ms"] for r in result["rows"]
           if r["impl"].startswith("dense")}
  lines = [f"Measured {result['date']} on {result['device']} ({result['machine']}, "
           f"{result['cores']} cores) with jax {result['jax']}; matmul peak "
           f"{result['peak_gflops']:.0f} GFLOP/s (float32 2048², same run); medians of "
           f"{result['repeats']}.", "",
           "| case | implementation | pass | ms | GFLOP/s | % of peak | × vs dense |",
           "| --- | --- | --- | ---: | ---: | ---: | ---: |"]
  for r in result["rows"]:
    speedup = dense[(r["case"], r["mode"])] / r["ms"]
    lines.append(f"| {r['case']} | {r['impl']} | {r['mode']} | {r['ms']:.2f} | "
                 f"{r['gflops']:.1f} | {r['pct_peak']:.1f} | {speedup:.1f} |")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--platform", default="cpu")
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--out", default="bench_results.json",
                      help="JSON results file; a Markdown table is written beside it")
  args = parser.parse_args(argv)
  result = run(args.platform, args.repeats)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=1)
  table = markdown(result)
  with open(args.out.rsplit(".", 1)[0] + ".md", "w") as f:
    f.write(table + "\n")
  print()
  print(table)


if __name__ == "__main__":
  main()
