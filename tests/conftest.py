import pytest


def pytest_collection_modifyitems(config, items):
  for item in items:
    if "gpu" in item.keywords:
      item.add_marker(pytest.mark.skipif(
          not _has_gpu(), reason="needs a CUDA GPU and the jnat CUDA module"))


def _has_gpu():
  import jax
  import jnat
  try:
    return bool(jax.devices("gpu")) and "cuda" in jnat.available_backends("gpu")
  except RuntimeError:
    return False


def pytest_configure(config):
  config.addinivalue_line("markers", "gpu: needs a CUDA GPU")
