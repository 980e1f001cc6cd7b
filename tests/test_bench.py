"""The benchmark runs end to end (on tiny cases) and writes a consistent table."""

from jnat import bench


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


def test_bench_rounds_interleave_and_take_medians(monkeypatch):
  monkeypatch.setattr(bench, "CPU_CASES", (bench.Case("tiny 1D", (40,), 1, 2, 8, (5,)),))
  calls = []

  def fake_timings(forward, args, dout, repeats):
    calls.append(forward)
    return (len(calls), 2.0 * len(calls), 10.0)

  monkeypatch.setattr(bench, "_timings", fake_timings)
  result = bench.run("cpu", 1, log=lambda *_: None, only=["jnat xla", "dense xla"], rounds=3)
  assert len(calls) == 6
  xla, dense = result["rows"]
  assert (xla["impl"], xla["fwd_ms"], xla["bwd_ms"]) == ("jnat xla", 3, 6.0)  # calls 1, 3, 5
  assert (dense["impl"], dense["fwd_ms"], dense["bwd_ms"]) == ("dense xla", 4, 8.0)  # 2, 4, 6


def test_bench_times_only_the_named_implementations(monkeypatch, tmp_path):
  monkeypatch.setattr(bench, "CPU_CASES", (bench.Case("tiny 2D", (10, 12), 1, 2, 8, (3, 5)),))
  out = tmp_path / "results.json"
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
