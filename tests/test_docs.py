"""Docstring examples of the public API run as written."""

import doctest
import importlib

import jax.numpy as jnp
import pytest

import jnat

MODULES = ["jnat.ops", "jnat.nn", "jnat.nnx", "jnat.models.zoo", "jnat.models.nat",
           "jnat.convert", "jnat.flops"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
  module = importlib.import_module(name)
  result = doctest.testmod(module, extraglobs={"jnat": jnat, "jnp": jnp},
                           optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
  assert result.attempted > 0 and result.failed == 0
