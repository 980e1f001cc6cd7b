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


def test_bench_times_only_the_named_implementations(monkeypatch, tmp_path):
  monkeypatch.setattr(bench, "CPU_CASES", (bench.Case("tiny 2D", (10, 12), 1, 2, 8, (3, 5)),))
  out = tmp_path / "results.json"
  bench.main(["--repeats", "2", "--out", str(out), "--only", "jnat xla"])
  rows = [line for line in out.with_suffix(".md").read_text().splitlines()
          if line.startswith("| tiny")]
  assert [line.split(" | ")[1] for line in rows] == ["jnat xla"]
