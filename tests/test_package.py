"""Packaging facts: one version, a light `import jnat`, CI running the README's command."""

import pathlib
import subprocess
import sys
import tomllib

import jnat

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_version_comes_from_the_package_metadata():
  project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
  assert jnat.__version__ == project["version"]


def test_import_jnat_does_not_load_flax():
  code = "import sys, jnat; print('flax' in sys.modules); jnat.NeighborhoodAttention; " \
         "print('flax' in sys.modules)"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       check=True).stdout.split()
  assert out == ["False", "True"]


def test_ci_installs_into_a_fresh_environment_without_pip_cache():
  ci = (ROOT / ".ci" / "run").read_text()
  assert "python3 -m venv" in ci and "PIP_NO_CACHE_DIR=1" in ci
  assert 'eval "$cmd"' in ci
