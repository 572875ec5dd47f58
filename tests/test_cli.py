"""The `python -m retro_jax` front door and its subcommands, run as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib import metadata

import pytest

from retro_jax import cli


def run(*args: str) -> subprocess.CompletedProcess[str]:
  return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True,
                        timeout=300, check=False)


def test_help_lists_every_subcommand():
  result = run("retro_jax", "--help")
  assert result.returncode == 0, result.stderr
  assert result.stdout.startswith("usage: python -m retro_jax COMMAND")
  for name, summary in cli.SUBCOMMANDS.items():
    assert f"  {name}" in result.stdout
    assert summary in result.stdout


def test_no_command_is_a_usage_error():
  result = run("retro_jax")
  assert result.returncode == 2
  assert result.stdout == ""
  assert "usage: python -m retro_jax COMMAND" in result.stderr


def test_unknown_command_names_the_known_ones_without_traceback():
  result = run("retro_jax", "trian")
  assert result.returncode == 2
  assert "unknown command 'trian'" in result.stderr
  assert ", ".join(cli.SUBCOMMANDS) in result.stderr
  assert "Traceback" not in result.stderr


def test_version_is_the_installed_distribution_version():
  result = run("retro_jax", "--version")
  assert result.returncode == 0
  assert result.stdout.strip() == f"retro_jax {metadata.version('retro_jax')}"


@pytest.mark.parametrize("name", sorted(cli.SUBCOMMANDS))
def test_subcommand_runs_both_ways(name):
  via_front_door = run("retro_jax", name, "--help")
  direct = run(f"retro_jax.{name}", "--help")
  assert via_front_door.returncode == 0, via_front_door.stderr
  assert direct.returncode == 0, direct.stderr
  assert f"usage: python -m retro_jax {name}" in via_front_door.stdout
  assert f"usage: python -m retro_jax.{name}" in direct.stdout
  # Same program: the help differs only in the program name.
  def normalise(text):
    return text.replace(f"retro_jax {name}", "PROG").replace(f"retro_jax.{name}", "PROG")
  assert normalise(via_front_door.stdout) == normalise(direct.stdout)


def test_info_reports_the_simulated_devices_and_installed_versions():
  result = run("retro_jax", "info", "--json")
  assert result.returncode == 0, result.stderr
  report = json.loads(result.stdout)
  # The harness gives subprocesses 8 simulated CPU devices (tests/conftest.py).
  assert report["jax"]["backend"] == "cpu"
  assert report["jax"]["device_count"] == 8
  assert report["jax"]["process_count"] == 1
  assert report["packages"]["jax"] == metadata.version("jax")
  assert report["packages"]["flax"] == metadata.version("flax")
  assert report["packages"]["retro_jax"] == metadata.version("retro_jax")
  assert "--xla_force_host_platform_device_count=8" in report["environment"]["XLA_FLAGS"]


def test_info_text_lists_packages():
  result = run("retro_jax", "info")
  assert result.returncode == 0, result.stderr
  assert f"jax                   {metadata.version('jax')}" in result.stdout
  assert "device_count          8" in result.stdout


def test_info_models_lists_every_backbone_with_its_size(capsys):
  import torchvision  # pylint: disable=g-import-not-at-top

  from retro_jax import info  # pylint: disable=g-import-not-at-top
  from retro_jax.models import registry  # pylint: disable=g-import-not-at-top

  assert info.main(["--json", "--models"]) == 0
  rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)["backbones"]}
  assert sorted(rows) == registry.backbone_names()
  reference = torchvision.models.resnet50()
  assert rows["resnet50"]["parameters"] == sum(
      p.numel() for name, p in reference.named_parameters() if not name.startswith("fc."))
  assert rows["resnet50"]["feature_width"] == reference.fc.in_features
