"""The README's examples run as written."""

import pathlib
import re

README = pathlib.Path(__file__).parent.parent / "README.md"


def python_blocks():
  return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_examples():
  assert python_blocks()


def test_readme_examples_run():
  for block in python_blocks():
    exec(compile(block, str(README), "exec"), {"__name__": "readme"})


def test_readme_has_exactly_two_setup_commands():
  text = README.read_text()
  assert text.count("<!-- main-command -->") == 1 and text.count("<!-- test-command -->") == 1
