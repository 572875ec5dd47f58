"""The Colab notebooks stay valid and only call commands that exist."""

from __future__ import annotations

import json
import pathlib
import re

import pytest

from retro_jax import cli

NOTEBOOKS = sorted((pathlib.Path(__file__).parents[1] / "colab").glob("*.ipynb"))


def test_there_is_a_notebook():
  assert NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_valid_and_calls_known_commands(path):
  notebook = json.loads(path.read_text())
  assert notebook["nbformat"] == 4
  code = ["".join(c["source"]) for c in notebook["cells"] if c["cell_type"] == "code"]
  assert code
  for source in code:
    compile(re.sub(r"^\s*[!%].*$", "", source, flags=re.M), str(path), "exec")
  commands = re.findall(r"python -m retro_jax(?:\.| )([a-z_]+)", "\n".join(code))
  assert commands
  for command in commands:
    assert command in cli.SUBCOMMANDS, command
