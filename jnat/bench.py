"""Benchmark of the op: jnat's backends against dense attention, with peaks from the same run.

Usage::

    python -m jnat.bench                      # CPU suite
    python -m jnat.bench --suite gpu          # GPU suite (NAT-Tiny stages, DiNAT, large cases)

Each row times one implementation on one case: forward, backward alone (from saved residuals)
and forward+backward, as medians, and the backward's time over the forward's paired within each
round (the median of those ratios: a shared machine's speed drifts between rounds more than
between the two timings of one). Compared on the same tokens: jnat's compiled backend, its
pure-JAX ``tiled`` backend (dense matmuls over query tiles), its ``xla`` reference backend,
dense ``jax.nn.dot_product_attention`` (cuDNN on GPU) and, on GPU when torch and natten are
installed, NATTEN itself. Rates count in-window FLOPs only: 4·B·N·H·|window|·D for the forward
and 2.5× that for the backward (five of the seven window matmuls). Peaks measured in the same
run: a float32 2048² matmul on CPU; a bfloat16 8192² matmul and a copy's bandwidth on GPU. The
matmul (and the path-width matmul below) is timed again in every round of every case, and each
row's shares are of its own case's rounds. They give the compute floor (in-window FLOPs at the
matmul rate) and the memory floor (q, k, v read and out written once at the copy bandwidth).

XLA's CPU matmul uses the widest vectors the CPU has, whichever instruction set the jnat
kernels were told to use (``JNAT_CPU_ISA``). So when the cpu backend is benchmarked on x86-64,
a second reference rate is measured: the float32 matmul at the kernels' vector width, from
numpy's OpenBLAS pinned to the core type whose kernels use those vectors (AVX-512, AVX2 + FMA
or 128-bit SSE). For a path narrower than the CPU's widest it is what this CPU reaches at
that width, an emulation of a narrower CPU rather than a measurement on one; "–" where no such
pin applies (other architectures, a numpy without OpenBLAS, a pin OpenBLAS does not take).
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
import subprocess
import sys
import time

import jax
import jax.numpy as jnp

import jnat
from jnat.cpu_info import cpu_info, usable_cores


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  spatial: tuple[int, ...]
  batch: int
  heads: int
  head_dim: int
  kernel_size: tuple[int, ...]
  dilation: int = 1
  rpb: bool = False
  dtype: str = "float32"

  @property
  def tokens(self) -> int:
    return math.prod(self.spatial)

  @property
  def forward_flops(self) -> float:
    return 4.0 * self.batch * self.tokens * self.heads * math.prod(self.kernel_size) * \
        self.head_dim

  @property
  def io_bytes(self) -> int:
    """q, k, v read once and out written once."""
    return 4 * self.batch * self.tokens * self.heads * self.head_dim * \
        jnp.dtype(self.dtype).itemsize

  @property
  def dense_logits_bytes(self) -> int:
    return 4 * self.batch * self.heads * self.tokens**2

  @property
  def gathered_bytes(self) -> float:
    """What the xla reference materialises in total (keys and values of every window)."""
    return self.forward_flops / 2 * jnp.dtype(self.dtype).itemsize


CPU_CASES = (
    Case("(a) 2D 56x56 B2 H4 D32 K7", (56, 56), 2, 4, 32, (7, 7)),
    Case("(b) 2D 56x56 B2 H4 D32 K7 +rpb", (56, 56), 2, 4, 32, (7, 7), rpb=True),
    Case("(c) 1D L4096 B2 H4 D64 K63", (4096,), 2, 4, 64, (63,)),
    Case("(d) 3D 16x16x16 B1 H4 D32 K5", (16, 16, 16), 1, 4, 32, (5, 5, 5)),
    Case("(e) 2D 128x128 B2 H4 D32 K13", (128, 128), 2, 4, 32, (13, 13)),
)

GPU_CASES = tuple(
    Case(f"NAT-Tiny stage {i + 1} {56 >> i}² B128 H{2 << i} D32 K7 +rpb", (56 >> i, 56 >> i),
         128, 2 << i, 32, (7, 7), rpb=True, dtype="bfloat16") for i in range(4)) + (
    Case("DiNAT stage 2 28² B128 H4 D32 K7 dil4 +rpb", (28, 28), 128, 4, 32, (7, 7), dilation=4,
         rpb=True, dtype="bfloat16"),
    Case("1D L32768 B1 H8 D128 K2048", (32768,), 1, 8, 128, (2048,), dtype="bfloat16"),
    Case("2D 256² B1 H24 D128 K80x80", (256, 256), 1, 24, 128, (80, 80), dtype="bfloat16"),
    Case("3D 30x48x80 B1 H24 D128 K18x24x24", (30, 48, 80), 1, 24, 128, (18, 24, 24),
         dtype="bfloat16"),
)

# The pure-JAX backends gather windows (xla every query's, tiled every tile's halo): beyond
# this they would take minutes per call or exhaust the device.
PURE_JAX_BACKENDS = ("tiled", "xla")
PURE_JAX_MAX_GATHERED_BYTES = 64 << 30
# Dense attention on CPU materialises B·H·N² logits: beyond this it would exhaust the host.
CPU_DENSE_MAX_LOGITS_BYTES = 4 << 30


# Calls before timing start, for at least this long, by platform: on a shared CPU the first
# calls after other work (another implementation, the matmul peak) ran up to 1.8x slower than
# the steady state that a training loop sees (2D 56² K7 forward: 5.1-6.8 ms over the first 10
# calls, 3.6-3.7 ms from the 100th), which with 5-10 timed calls moved the medians of the fast
# cases most. Elsewhere one call: borrowed GPU time is scarce and the GPU suite already runs
# close to its stage's limit.
WARMUP_S = {"cpu": 0.5}


def median_ms(fn, *args, repeats: int, budget_s: float = 10.0) -> float:
  """Median wall time of `fn(*args)` over `repeats` calls after the default backend's
  `WARMUP_S` seconds of calls (at least one), fewer where they would exceed `budget_s` (a slow
  implementation on a large case should not take minutes)."""
  jax.block_until_ready(fn(*args))  # compile
  warm_until = time.perf_counter() + WARMUP_S.get(jax.default_backend(), 0.0)
  while True:
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    last = time.perf_counter() - start
    if start + last >= warm_until:
      break
  repeats = max(1, min(repeats, int(budget_s / last)))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times)


def matmul_tflops(n: int, dtype, repeats: int) -> float:
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
  return 2 * n**3 / (median_ms(jax.jit(jnp.matmul), a, a, repeats=repeats) * 1e9)


# The OpenBLAS core type (OPENBLAS_CORETYPE) whose float32 matmul kernels use the vectors of
# each jnat CPU kernel path on x86-64: AVX-512, AVX2 + FMA, and 128-bit SSE without FMA.
OPENBLAS_CORETYPES = {"avx512": "SkylakeX", "avx2": "Haswell", "baseline": "Nehalem"}

# Run in a subprocess, as OpenBLAS reads OPENBLAS_CORETYPE when it loads: prints the core type
# it runs with and the median rate of an n x n float32 matmul in TFLOP/s.
_OPENBLAS_MATMUL = """
import ctypes, json, statistics, sys, time
import numpy as np
n, repeats = int(sys.argv[1]), int(sys.argv[2])
core = None
with open("/proc/self/maps") as maps:
  paths = {line.split()[-1] for line in maps if "openblas" in line.lower()}
for path in paths:
  lib = ctypes.CDLL(path)
  for name in ("scipy_openblas_get_corename64_", "scipy_openblas_get_corename",
               "openblas_get_corename64_", "openblas_get_corename"):
    if hasattr(lib, name):
      getter = getattr(lib, name)
      getter.restype = ctypes.c_char_p
      core = getter().decode()
a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
a @ a
times = []
for _ in range(repeats):
  start = time.perf_counter()
  a @ a
  times.append(time.perf_counter() - start)
print(json.dumps(dict(core=core, tflops=2 * n**3 / statistics.median(times) / 1e12)))
"""


def path_width_matmul(isa: str, n: int, repeats: int):
  """The float32 n x n matmul rate at the vector width of jnat's `isa` kernel path: numpy's
  OpenBLAS pinned to the matching core type, in a subprocess. Returns dict(core, tflops), or
  None where that cannot be measured (not x86-64, no such core type, no OpenBLAS, or one that
  did not take the pin)."""
  core = OPENBLAS_CORETYPES.get(isa)
  if core is None or platform_module.machine().lower() not in ("x86_64", "amd64"):
    return None
  env = dict(os.environ, OPENBLAS_CORETYPE=core)
  try:
    done = subprocess.run([sys.executable, "-c", _OPENBLAS_MATMUL, str(n), str(repeats)],
                          env=env, capture_output=True, text=True, timeout=600, check=True)
    measured = json.loads(done.stdout.strip().splitlines()[-1])
  except (OSError, subprocess.SubprocessError, ValueError, IndexError):
    return None
  if (measured["core"] or "").lower() != core.lower():
    return None  # not OpenBLAS, or it fell back to another core type
  return dict(core=core, tflops=measured["tflops"])


def copy_bandwidth_gbs(repeats: int, gib: int = 2) -> float:
  x = jnp.ones((gib << 29,), jnp.float16)
  return 2 * x.nbytes / (median_ms(jax.jit(lambda x: x * 2), x, repeats=repeats) * 1e6)


def _inputs(case: Case):
  keys = jax.random.split(jax.random.key(1), 5)
  shape = (case.batch, *case.spatial, case.heads, case.head_dim)
  q, k, v, dout = (jax.random.normal(key, shape, jnp.float32).astype(case.dtype)
                   for key in keys[:4])
  rpb = None
  if case.rpb:
    rpb = jax.random.normal(keys[4], (case.heads,) + tuple(2 * k - 1 for k in case.kernel_size))
  return q, k, v, rpb, dout


def _timings(forward, args, dout, repeats):
  """Forward, backward alone (from saved residuals) and forward+backward, in ms."""
  fwd = jax.jit(forward)
  _, vjp = jax.jit(lambda *a: jax.vjp(forward, *a))(*args)
  bwd = jax.jit(lambda vjp, g: vjp(g))
  both = jax.jit(lambda *a: jax.vjp(forward, *a[:-1])[1](a[-1]))
  return (median_ms(fwd, *args, repeats=repeats), median_ms(bwd, vjp, dout, repeats=repeats),
          median_ms(both, *args, dout, repeats=repeats))


def _jnat_forward(case: Case, backend: str):
  op = getattr(jnat, f"na{len(case.spatial)}d")
  if case.rpb:
    return lambda q, k, v, rpb: op(q, k, v, case.kernel_size, dilation=case.dilation, rpb=rpb,
                                   backend=backend)
  return lambda q, k, v: op(q, k, v, case.kernel_size, dilation=case.dilation, backend=backend)


def _dense_forward(platform: str):
  implementation = "cudnn" if platform == "gpu" else None
  flat = lambda x: x.reshape(x.shape[0], -1, *x.shape[-2:])
  return lambda q, k, v: jax.nn.dot_product_attention(
      flat(q), flat(k), flat(v), implementation=implementation).reshape(q.shape)


def _natten_timings(case: Case, repeats: int):
  """NATTEN's own GPU path on the same shapes, or None where it cannot run here."""
  try:
    import natten
    import torch
  except ImportError:
    return None
  if not torch.cuda.is_available() or case.rpb:
    return None  # NATTEN >= 0.20 has no rpb
  shape = (case.batch, *case.spatial, case.heads, case.head_dim)
  dtype = getattr(torch, case.dtype)
  q, k, v, dout = (torch.randn(shape, device="cuda", dtype=dtype, requires_grad=True)
                   for _ in range(4))
  op = getattr(natten, f"na{len(case.spatial)}d")
  fwd = lambda: op(q, k, v, kernel_size=case.kernel_size, dilation=case.dilation)

  def timed(fn):
    fn()
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      fn()
      torch.cuda.synchronize()
      times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)

  out = fwd()
  bwd = lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
  both = lambda: torch.autograd.grad(fwd(), (q, k, v), dout)
  return timed(fwd), timed(bwd), timed(both)


def run(suite: str, repeats: int, log=print, only=None, save=None, rounds=1):
  """Times every implementation on every case of `suite` (or just the `only` named ones),
  `rounds` times each, interleaved; each time is the median over the rounds.

  `save`, when given, receives the results so far after every row: a run stopped early
  (a time limit on a borrowed GPU, say) still leaves what it measured.
  """
  platform = "gpu" if suite == "gpu" else "cpu"
  cases = GPU_CASES if suite == "gpu" else CPU_CASES
  # The reference matmuls are timed again in every round of every case: each row's share of
  # them is taken against the rates of its own case's rounds, as a shared machine's speed
  # drifts over a run.
  references = {"matmul_tflops": (lambda: matmul_tflops(8192, jnp.bfloat16, repeats))
                if platform == "gpu" else (lambda: matmul_tflops(2048, jnp.float32, repeats))}
  rates = {"matmul_tflops": [references["matmul_tflops"]()]}
  peaks = {}
  if platform == "gpu":
    peaks["copy_gbs"] = copy_bandwidth_gbs(repeats)
  cpu = cpu_info() if "cpu" in jnat.available_backends("cpu") else None
  if cpu:
    l2 = f"{cpu['l2_cache_bytes'] >> 10} KiB" if cpu["l2_cache_bytes"] else "unknown"
    log(f"cpu: {cpu['model']}, L2 {l2} per core, jnat cpu kernels: {cpu['isa']} "
        f"(supported: {cpu['supported']})")
  path_width = None
  if platform == "cpu" and cpu and (not only or "jnat cpu" in only):
    path_width = path_width_matmul(cpu["isa"], 2048, repeats)  # None: no pin applies here
    rates["path_width_matmul_tflops"] = [_rate(path_width)]
    if path_width:
      references["path_width_matmul_tflops"] = lambda: _rate(
          path_width_matmul(cpu["isa"], 2048, repeats))
  _summarise_rates(rates, peaks)
  log(f"peaks: {peaks}")
  kernels = [b for b in jnat.available_backends(platform) if b not in PURE_JAX_BACKENDS]
  rows = []
  result = dict(date=datetime.date.today().isoformat(), suite=suite,
                device=jax.devices(platform)[0].device_kind, machine=platform_module.machine(),
                cores=usable_cores(), jax=jax.__version__, cpu_model=cpu and cpu["model"],
                cpu_isa=cpu and cpu["isa"], cpu_widest_isa=cpu and cpu["supported"][0],
                path_width_core=path_width and path_width["core"],
                repeats=repeats, rounds=rounds, peaks=peaks, rows=rows)
  for case in cases:
    q, k, v, rpb, dout = _inputs(case)
    args = (q, k, v, rpb) if case.rpb else (q, k, v)
    backends = kernels + [b for b in PURE_JAX_BACKENDS
                          if case.gathered_bytes <= PURE_JAX_MAX_GATHERED_BYTES]
    impls = [(f"jnat {b}", lambda b=b: _timings(_jnat_forward(case, b), args, dout, repeats))
             for b in backends]
    if platform == "gpu" or case.dense_logits_bytes <= CPU_DENSE_MAX_LOGITS_BYTES:
      impls.append(("dense " + ("cudnn" if platform == "gpu" else "xla"),
                    lambda: _timings(_dense_forward(platform), (q, k, v), dout, repeats)))
    if platform == "gpu":
      impls.append(("natten", lambda: _natten_timings(case, repeats)))
    impls = [(name, measure) for name, measure in impls if not only or name in only]
    timings = {name: [] for name, _ in impls}
    case_rates = {name: [] for name in references}
    for _ in range(rounds):  # interleaved, so that drifts of a shared machine hit all alike
      for name, measure in references.items():
        case_rates[name].append(measure())
      for name, measure in impls:
        if timings[name] is None:
          continue
        try:
          times = measure()
        except Exception as e:  # e.g. out of memory: record it, keep benchmarking
          log(f"{case.name:<44} {name:<14} failed: {type(e).__name__}: {str(e)[:200]}")
          times = None
        if times is None:
          timings[name] = None
        else:
          timings[name].append(times)
    for name, measured in case_rates.items():
      rates[name] += measured
    _summarise_rates(rates, peaks)
    case_peaks = {name: _median_rate(measured) for name, measured in case_rates.items()}
    case_peak = case_peaks["matmul_tflops"]
    for name, runs in timings.items():
      if not runs:
        continue
      fwd_ms, bwd_ms, both_ms = (statistics.median(t) for t in zip(*runs))
      row = dict(case=case.name, impl=name, fwd_ms=fwd_ms, bwd_ms=bwd_ms, fwd_bwd_ms=both_ms,
                 bwd_per_fwd=statistics.median(b / f for f, b, _ in runs),
                 rounds_ms=[list(t) for t in runs],
                 fwd_tflops=case.forward_flops / (fwd_ms * 1e9),
                 bwd_tflops=2.5 * case.forward_flops / (bwd_ms * 1e9),
                 **case_peaks, compute_floor_ms=case.forward_flops / (case_peak * 1e9))
      if "copy_gbs" in peaks:
        row["memory_floor_ms"] = case.io_bytes / (peaks["copy_gbs"] * 1e6)
      rows.append(row)
      log(f"{case.name:<44} {name:<14} fwd {fwd_ms:9.3f} ms  bwd {bwd_ms:9.3f} ms  "
          f"fwd+bwd {both_ms:9.3f} ms  fwd {row['fwd_tflops']:8.3f} TFLOP/s  "
          f"bwd/fwd {row['bwd_per_fwd']:.2f}")
      if save:
        save(result)
  return result


def _rate(measured):
  return measured and measured["tflops"]


def _median_rate(measured):
  """The median of the rates measured (None where none was)."""
  rates = [r for r in measured if r]
  return statistics.median(rates) if rates else None


def _summarise_rates(rates, peaks):
  """peaks[name]: the median of each reference rate over the run, with its range."""
  for name, measured in rates.items():
    peaks[name] = _median_rate(measured)
    if peaks[name]:
      valid = [r for r in measured if r]
      peaks[name + "_range"] = (min(valid), max(valid))


def markdown(result) -> str:
  """The results as a Markdown table, with speed-ups against dense attention."""
  peaks = result["peaks"]
  gpu = "copy_gbs" in peaks
  unit, scale = ("TFLOP/s", 1.0) if gpu else ("GFLOP/s", 1e3)
  dense = {r["case"]: r for r in result["rows"] if r["impl"].startswith("dense")}

  def rate_text(name):
    text = f"{scale * peaks[name]:.0f} {unit}"
    if name + "_range" in peaks:
      low, high = (scale * x for x in peaks[name + "_range"])
      text += (f" (median of its timings in every round, {low:.0f}–{high:.0f}; each row's "
               "share is of its own case's rounds)")
    return text

  matmul_text = rate_text("matmul_tflops")
  peak_text = (f"bf16 matmul {matmul_text}, copy {peaks['copy_gbs']:.0f} GB/s" if gpu else
               f"float32 2048² XLA matmul {matmul_text}")
  cpu_text = (f", jnat cpu kernels: {result['cpu_isa']} on {result['cpu_model']}"
              if result.get("cpu_isa") else "")
  # The second CPU reference: the matmul at the kernel path's vector width (module docstring).
  path_width = "path_width_matmul_tflops" in peaks
  path_peak = peaks.get("path_width_matmul_tflops")
  if path_width:
    peak_text += ("; float32 2048² matmul at the {} path's vector width: {}".format(
        result.get("cpu_isa"),
        f"{rate_text('path_width_matmul_tflops')}, OpenBLAS pinned to "
        f"{result['path_width_core']} kernels on this CPU: "
        + ("the widest vectors it has" if result.get("cpu_widest_isa") == result.get("cpu_isa")
           else "an emulation of a narrower CPU, not a measurement on one")
        if path_peak else "– (no OpenBLAS here that takes a core type for this path)"))
  rounds = result.get("rounds", 1)
  rounds_text = f", then the median of {rounds} interleaved rounds" if rounds > 1 else ""
  cores = f"{result['cores']} core" + ("s" if result["cores"] != 1 else "")
  lines = [f"{result['date']}, {result['device']} ({result['machine']}, {cores}"
           f"{cpu_text}), jax {result['jax']}; peaks from the same run: {peak_text}; medians of "
           f"{result['repeats']} calls (fewer where they would take over 10 s)"
           f"{rounds_text}.", ""]
  header = ["case", "implementation", "fwd ms", "bwd ms", "fwd+bwd ms", "bwd / fwd (paired)",
            f"fwd {unit}", "fwd % of matmul", f"bwd {unit}", "fwd+bwd × vs dense"]
  if path_width:
    header.insert(8, "fwd % of path-width matmul")
  if gpu:
    header += ["fwd memory floor ms", "fwd compute floor ms"]
  lines += ["| " + " | ".join(header) + " |", "|" + " --- |" * 2 + " ---: |" * (len(header) - 2)]
  for r in result["rows"]:
    base = dense.get(r["case"])
    cells = [r["case"], r["impl"], f"{r['fwd_ms']:.3f}", f"{r['bwd_ms']:.3f}",
             f"{r['fwd_bwd_ms']:.3f}",
             f"{r['bwd_per_fwd']:.2f}" if "bwd_per_fwd" in r else "–",
             f"{scale * r['fwd_tflops']:.1f}",
             f"{100 * r['fwd_tflops'] / r['matmul_tflops']:.1f}",
             f"{scale * r['bwd_tflops']:.1f}",
             f"{base['fwd_bwd_ms'] / r['fwd_bwd_ms']:.1f}" if base else "–"]
    if path_width:  # only the kernels run at their path's width; XLA's code runs at its own
      row_peak = r.get("path_width_matmul_tflops")  # absent where no pin applies
      cells.insert(8, f"{100 * r['fwd_tflops'] / row_peak:.1f}"
                   if row_peak and r["impl"] == "jnat cpu" else "–")
    if gpu:
      cells += [f"{r['memory_floor_ms']:.3f}", f"{r['compute_floor_ms']:.3f}"]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--suite", choices=("cpu", "gpu"), default="cpu")
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--out", default="bench_results.json",
                      help="JSON results file; a Markdown table is written beside it")
  parser.add_argument("--rounds", type=int, default=1,
                      help="measure every implementation this many times, interleaved, and "
                           "report medians (steadier on a shared machine)")
  parser.add_argument("--only", action="append", metavar="IMPL",
                      help='time only this implementation (repeatable), e.g. "jnat cpu"')
  args = parser.parse_args(argv)
  # Results are saved after every case: a missing folder must fail now, not after the first.
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)

  def save(result):
    with open(args.out, "w") as f:
      json.dump(result, f, indent=1)
    with open(args.out.rsplit(".", 1)[0] + ".md", "w") as f:
      f.write(markdown(result) + "\n")

  result = run(args.suite, args.repeats, only=args.only, save=save, rounds=args.rounds)
  save(result)
  print()
  print(markdown(result))


if __name__ == "__main__":
  main()
