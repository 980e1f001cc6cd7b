"""The benchmark runs end to end (on tiny cases) and writes a consistent table."""

import os
import subprocess
import sys
import time

import jax.numpy as jnp
import pytest

from jnat import bench
from jnat.cpu_info import usable_cores


def test_bench_runs_and_tabulates(monkeypatch, tmp_path):
  monkeypatch.setattr(bench, "CPU_CASES", (
      bench.Case("tiny 2D", (10, 12), 1, 2, 8, (3, 5), rpb=True),
      bench.Case("tiny 1D dilated", (40,), 2, 2, 16, (7,), dilation=2)))
  out = tmp_path / "results.json"
  bench.main(["--repeats", "2", "--out", str(out)])
  table = out.with_suffix(".md").read_text().splitlines()
  rows = [line for line in table if line.startswith("| tiny")]
  impls = {line.split(" | ")[1] for line in rows}
  assert {"jnat xla", "dense xla"} <= impls
  assert len(rows) == 2 * len(impls)
  for line in rows:
    assert all(float(c) > 0 for c in line.strip("| ").split(" | ")[2:5])  # the times


def test_median_ms_times_after_the_warm_up(monkeypatch):
  """Calls slow at first (a cold machine) must not reach the median."""
  monkeypatch.setattr(bench, "WARMUP_S", {"cpu": 0.2})
  result = jnp.zeros(())
  calls = []

  def fn():
    calls.append(None)
    time.sleep(0.02 if len(calls) <= 6 else 0.001)
    return result

  assert bench.median_ms(fn, repeats=5) < 0.01 * 1e3
  assert len(calls) > 6 + 5


def test_bench_times_the_matmul_in_every_round(monkeypatch):
  """Each row's share of the matmul is of the rate timed in its own case's rounds."""
  monkeypatch.setattr(bench, "CPU_CASES", (bench.Case("tiny 1D", (40,), 1, 2, 8, (5,)),
                                           bench.Case("tiny 1D again", (40,), 1, 2, 8, (5,))))
  monkeypatch.setattr(bench, "_timings", lambda forward, args, dout, repeats: (2.0, 4.0, 6.0))
  rates = iter([0.9, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6])  # the first: before any case
  monkeypatch.setattr(bench, "matmul_tflops", lambda n, dtype, repeats: next(rates))
  result = bench.run("cpu", 1, log=lambda *_: None, only=["jnat xla"], rounds=3)
  first, second = result["rows"]
  assert first["matmul_tflops"] == 0.2 and second["matmul_tflops"] == 0.5
  assert result["peaks"]["matmul_tflops"] == 0.4
  assert tuple(result["peaks"]["matmul_tflops_range"]) == (0.1, 0.9)
  table = bench.markdown(result).splitlines()
  header = [c.strip() for c in table[2].strip("|").split("|")]
  shares = [line.strip("|").split("|")[header.index("fwd % of matmul")].strip()
            for line in table[4:6]]
  assert shares == [f"{100 * r['fwd_tflops'] / r['matmul_tflops']:.1f}" for r in (first, second)]
  assert "median of its timings in every round, 100–900" in table[0]


def test_bench_rounds_interleave_and_take_medians(monkeypatch):
  monkeypatch.setattr(bench, "CPU_CASES", (bench.Case("tiny 1D", (40,), 1, 2, 8, (5,)),))
  calls = []

  def fake_timings(forward, args, dout, repeats):
    calls.append(forward)
    return (len(calls), 2.0 * len(calls), 10.0)

  monkeypatch.setattr(bench, "_timings", fake_timings)
  monkeypatch.setattr(bench, "matmul_tflops", lambda n, dtype, repeats: 0.4)
  result = bench.run("cpu", 1, log=lambda *_: None, only=["jnat xla", "dense xla"], rounds=3)
  assert len(calls) == 6
  xla, dense = result["rows"]
  assert (xla["impl"], xla["fwd_ms"], xla["bwd_ms"]) == ("jnat xla", 3, 6.0)  # calls 1, 3, 5
  assert (dense["impl"], dense["fwd_ms"], dense["bwd_ms"]) == ("dense xla", 4, 8.0)  # 2, 4, 6


def test_bench_pairs_each_backward_with_its_rounds_forward(monkeypatch):
  """bwd / fwd is the median of each round's own ratio, not the ratio of the medians."""
  monkeypatch.setattr(bench, "CPU_CASES", (bench.Case("tiny 1D", (40,), 1, 2, 8, (5,)),))
  rounds = iter([(1.0, 3.0, 5.0), (4.0, 8.0, 5.0), (2.0, 2.0, 5.0)])  # ratios 3, 2, 1
  monkeypatch.setattr(bench, "_timings", lambda forward, args, dout, repeats: next(rounds))
  monkeypatch.setattr(bench, "matmul_tflops", lambda n, dtype, repeats: 0.4)
  result = bench.run("cpu", 1, log=lambda *_: None, only=["jnat xla"], rounds=3)
  row, = result["rows"]
  assert (row["fwd_ms"], row["bwd_ms"], row["bwd_per_fwd"]) == (2.0, 3.0, 2.0)
  assert row["rounds_ms"] == [[1.0, 3.0, 5.0], [4.0, 8.0, 5.0], [2.0, 2.0, 5.0]]
  table = bench.markdown(result).splitlines()
  header = [c.strip() for c in table[2].strip("|").split("|")]
  assert table[4].strip("|").split("|")[header.index("bwd / fwd (paired)")].strip() == "2.00"


def test_bench_times_only_the_named_implementations(monkeypatch, tmp_path):
  monkeypatch.setattr(bench, "CPU_CASES", (bench.Case("tiny 2D", (10, 12), 1, 2, 8, (3, 5)),))
  out = tmp_path / "not yet made" / "results.json"  # the folder is made for the results
  bench.main(["--repeats", "2", "--out", str(out), "--only", "jnat xla"])
  rows = [line for line in out.with_suffix(".md").read_text().splitlines()
          if line.startswith("| tiny")]
  assert [line.split(" | ")[1] for line in rows] == ["jnat xla"]


def test_bench_saves_after_every_row_and_skips_pure_jax_beyond_their_limit(monkeypatch):
  monkeypatch.setattr(bench, "CPU_CASES", (bench.Case("tiny 1D", (40,), 1, 2, 8, (5,)),
                                           bench.Case("huge 1D", (40,), 1, 2, 8, (5,))))
  monkeypatch.setattr(bench.Case, "gathered_bytes",
                      property(lambda c: 0 if c.name == "tiny 1D" else 1 << 40))
  saved = []
  result = bench.run("cpu", 1, log=lambda *_: None, save=lambda r: saved.append(len(r["rows"])))
  impls = [(r["case"], r["impl"]) for r in result["rows"]]
  assert ("tiny 1D", "jnat xla") in impls and ("tiny 1D", "jnat tiled") in impls
  assert not any(case == "huge 1D" and impl in ("jnat xla", "jnat tiled") for case, impl in impls)
  assert saved == list(range(1, len(impls) + 1))


def _openblas_numpy() -> bool:
  import numpy as np
  blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
  return "openblas" in blas["name"].lower()


def test_path_width_matmul_pins_openblas_to_the_paths_core_type():
  import platform
  if platform.machine().lower() not in ("x86_64", "amd64") or not _openblas_numpy():
    pytest.skip("needs x86-64 and a numpy built with OpenBLAS")
  for isa, core in (("avx2", "Haswell"), ("baseline", "Nehalem")):
    measured = bench.path_width_matmul(isa, 128, 2)
    assert measured is not None and measured["core"] == core
    assert 0 < measured["tflops"] < 100


def test_path_width_matmul_is_none_where_it_cannot_pin(monkeypatch):
  assert bench.path_width_matmul("sve", 64, 1) is None  # no core type for the path
  monkeypatch.setattr(bench.platform_module, "machine", lambda: "aarch64")
  assert bench.path_width_matmul("avx2", 64, 1) is None  # not x86-64
  monkeypatch.undo()
  if _openblas_numpy():  # OpenBLAS falls back to its own choice for an unknown core type
    monkeypatch.setattr(bench, "OPENBLAS_CORETYPES", {"avx2": "NoSuchCore"})
    assert bench.path_width_matmul("avx2", 64, 1) is None


def test_bench_tabulates_the_path_width_matmul_for_the_cpu_kernels(monkeypatch):
  if "cpu" not in bench.jnat.available_backends("cpu"):
    pytest.skip("no compiled CPU kernels")
  monkeypatch.setattr(bench, "CPU_CASES", (bench.Case("tiny 1D", (40,), 1, 2, 8, (5,)),))
  monkeypatch.setattr(bench, "_timings", lambda forward, args, dout, repeats: (2.0, 4.0, 6.0))
  monkeypatch.setattr(bench, "matmul_tflops", lambda n, dtype, repeats: 0.4)
  asked = []
  path_width_rates = iter([0.2, 0.25])  # before any case, then in the case's one round

  def fake_path_width(isa, n, repeats):
    asked.append(isa)
    return dict(core="Haswell", tflops=next(path_width_rates))

  monkeypatch.setattr(bench, "path_width_matmul", fake_path_width)
  result = bench.run("cpu", 1, log=lambda *_: None, only=["jnat cpu", "jnat xla"])
  assert asked == [bench.cpu_info()["isa"]] * 2
  assert result["peaks"]["path_width_matmul_tflops"] == pytest.approx(0.225)
  assert result["rows"][0]["path_width_matmul_tflops"] == 0.25  # its own case's round
  assert result["path_width_core"] == "Haswell"
  table = bench.markdown(result).splitlines()
  header = [c.strip() for c in table[2].strip("|").split("|")]
  row = [c.strip() for c in table[4].strip("|").split("|")]
  fwd_tflops = result["rows"][0]["fwd_tflops"]
  assert row[header.index("fwd % of matmul")] == f"{100 * fwd_tflops / 0.4:.1f}"
  assert row[header.index("fwd % of path-width matmul")] == f"{100 * fwd_tflops / 0.25:.1f}"
  xla_row = [c.strip() for c in table[5].strip("|").split("|")]
  assert xla_row[1] == "jnat xla" and xla_row[header.index("fwd % of path-width matmul")] == "–"
  assert "OpenBLAS pinned to Haswell" in table[0]
  # The pin is an emulation only for a path narrower than the CPU's widest.
  widest = result["cpu_widest_isa"] == result["cpu_isa"]
  assert ("the widest vectors it has" in table[0]) == widest
  assert ("an emulation of a narrower CPU" in table[0]) == (not widest)
  narrower = dict(result, cpu_widest_isa="avx512", cpu_isa="avx2")
  assert "an emulation of a narrower CPU" in bench.markdown(narrower).splitlines()[0]

  # Not measured unless the cpu backend is timed; "–" where it could not be.
  assert "path_width_matmul_tflops" not in bench.run(
      "cpu", 1, log=lambda *_: None, only=["jnat xla"])["peaks"]
  monkeypatch.setattr(bench, "path_width_matmul", lambda isa, n, repeats: None)
  result = bench.run("cpu", 1, log=lambda *_: None, only=["jnat cpu"])
  table = bench.markdown(result).splitlines()
  header = [c.strip() for c in table[2].strip("|").split("|")]
  assert table[4].strip("|").split("|")[header.index("fwd % of path-width matmul")].strip() == "–"


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity masks here")
def test_cores_are_the_ones_the_process_may_use():
  """A run pinned to one core (``taskset -c 0``) says one core, not the machine's count."""
  code = ("import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
          "from jnat.cpu_info import usable_cores; print(usable_cores())")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.split() == ["1"]
  assert usable_cores() == len(os.sched_getaffinity(0))
