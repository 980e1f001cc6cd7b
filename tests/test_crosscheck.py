"""jnat against NATTEN itself on fresh random inputs (runs when torch and natten are installed)."""

import io

import pytest

pytest.importorskip("torch")
pytest.importorskip("natten")

from jnat import crosscheck  # noqa: E402


def test_crosscheck_against_natten():
  table = io.StringIO()
  ok = crosscheck.run(seed=1, out=table)
  print(table.getvalue())
  assert ok, table.getvalue()
  rows = [line for line in table.getvalue().splitlines() if line.endswith(("yes", "NO"))]
  assert len(rows) >= len(crosscheck.CONFIGS)
