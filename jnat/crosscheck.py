"""Cross-framework check: the same random inputs through NATTEN (PyTorch) and jnat.

Usage::

    python -m jnat.crosscheck [--seed 0] [--tol 2e-5]

Prints the maximum absolute error of the output and lse per config and jnat backend, and
exits non-zero if any exceeds the tolerance. Needs ``torch`` and ``natten`` (NATTEN 0.21's
forward runs on CPU: ``pip install torch==2.13.0`` then
``pip install --no-build-isolation natten==0.21.7``).
"""

from __future__ import annotations

import argparse
import sys
import warnings

import numpy as np

# (name, spatial, kernel, stride, dilation, causal, heads, kv_heads, head_dim, extra tokens)
CONFIGS = [
    ("1d", (96,), (9,), (1,), (1,), (False,), 4, 4, 32, 0),
    ("1d-even-dilated", (64,), (8,), (1,), (3,), (False,), 2, 2, 16, 0),
    ("1d-causal-strided", (70,), (7,), (3,), (2,), (True,), 2, 2, 16, 0),
    ("2d-nat", (14, 14), (7, 7), (1, 1), (1, 1), (False, False), 4, 4, 32, 0),
    ("2d-dinat", (20, 18), (5, 5), (1, 1), (3, 2), (False, False), 2, 2, 32, 0),
    ("2d-blocked", (12, 16), (4, 4), (4, 4), (1, 1), (False, False), 2, 2, 16, 0),
    ("2d-mixed", (13, 15), (4, 6), (2, 3), (1, 2), (False, True), 2, 2, 16, 0),
    ("2d-additional-kv", (10, 12), (3, 5), (1, 1), (1, 1), (False, False), 2, 2, 16, 5),
    ("2d-gqa", (10, 12), (3, 5), (1, 1), (1, 1), (False, True), 4, 2, 16, 0),
    ("1d-mqa-additional-kv", (40,), (6,), (2,), (2,), (False,), 4, 1, 16, 3),
    ("3d", (6, 7, 8), (3, 3, 3), (1, 1, 1), (1, 1, 1), (False, False, False), 2, 2, 16, 0),
    ("3d-causal-strided", (6, 8, 7), (3, 4, 3), (2, 2, 1), (2, 1, 1), (True, False, True), 2, 2,
     8, 0),
]


def _natten(natten, torch, rank, q, k, v, cfg, extra):
  _, _, kernel, stride, dilation, causal, *_ = cfg
  t = lambda x: None if x is None else torch.from_numpy(np.ascontiguousarray(x))
  fn = getattr(natten, f"na{rank}d")
  out, lse = fn(t(q), t(k), t(v), kernel_size=kernel, stride=stride, dilation=dilation,
                is_causal=causal, additional_keys=t(extra[0]), additional_values=t(extra[1]),
                backend="flex-fna", return_lse=True)
  return out.numpy(), lse.numpy()


def run(seed: int = 0, tol: float = 2e-5, out=sys.stdout) -> bool:
  """Runs every config; prints the table to `out`; returns True when all are within `tol`."""
  import natten
  import torch

  import jnat

  # NATTEN's CPU path runs flex attention eagerly, which warns on every call.
  warnings.filterwarnings("ignore", module=r"torch\.nn\.attention\..*")

  rng = np.random.default_rng(seed)
  backends = jnat.available_backends("cpu")
  header = f"{'config':<20} {'backend':<8} {'max|Δout|':>11} {'max|Δlse|':>11}  ok"
  print(f"NATTEN {natten.__version__} (torch {torch.__version__}) vs jnat {jnat.__version__}",
        file=out)
  print(header, file=out)
  print("-" * len(header), file=out)
  all_ok = True
  for cfg in CONFIGS:
    name, spatial, kernel, stride, dilation, causal, heads, kv_heads, dim, n_extra = cfg
    rank = len(spatial)
    shape = lambda h: (2, *spatial, h, dim)
    q, k, v = (rng.standard_normal(s).astype(np.float32)
               for s in (shape(heads), shape(kv_heads), shape(kv_heads)))
    extra = (None, None)
    if n_extra:
      extra = tuple(rng.standard_normal((2, n_extra, kv_heads, dim)).astype(np.float32)
                    for _ in range(2))
    ref_out, ref_lse = _natten(natten, torch, rank, q, k, v, cfg, extra)
    for backend in backends:
      got_out, got_lse = getattr(jnat, f"na{rank}d")(
          q, k, v, kernel, stride, dilation, causal, additional_keys=extra[0],
          additional_values=extra[1], return_lse=True, backend=backend)
      err_out = float(np.abs(np.asarray(got_out) - ref_out).max())
      err_lse = float(np.abs(np.asarray(got_lse) - ref_lse).max())
      ok = max(err_out, err_lse) <= tol
      all_ok &= ok
      print(f"{name:<20} {backend:<8} {err_out:>11.2e} {err_lse:>11.2e}  {'yes' if ok else 'NO'}",
            file=out)
  return all_ok


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--tol", type=float, default=2e-5)
  args = parser.parse_args(argv)
  try:
    import natten  # noqa: F401
  except ImportError:
    sys.exit("NATTEN is not installed: pip install torch==2.13.0 && "
             "pip install --no-build-isolation natten==0.21.7")
  sys.exit(0 if run(args.seed, args.tol) else 1)


if __name__ == "__main__":
  main()
