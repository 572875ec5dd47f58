"""The CLIs' error boundary (`retro_jax.user_errors`): one line for a user's mistake, the
traceback with --debug or RETRO_JAX_DEBUG=1, and a bug still a traceback with a request to
report it."""

from __future__ import annotations

import importlib

import pytest

from retro_jax import cli
from retro_jax import embed
from retro_jax import user_errors
from retro_jax.checkpoint import ModelDirectoryError


def _embed_argv(tmp_path, *extra):
  return ["--checkpoint", str(tmp_path / "no_model"), "--images", str(tmp_path / "x.npy"),
          "--out", str(tmp_path / "f.npy"), *extra]


@pytest.fixture
def images(tmp_path):
  import numpy as np  # pylint: disable=import-outside-toplevel
  np.save(tmp_path / "x.npy", np.zeros((1, 8, 8, 3), np.uint8))
  return tmp_path


def test_a_user_error_is_one_line(images, capsys):
  assert embed.main(_embed_argv(images)) == 1
  err = capsys.readouterr().err
  assert err == f"python -m retro_jax.embed: error: no model directory at {images / 'no_model'}\n"


def test_debug_flag_shows_the_traceback(images, capsys):
  with pytest.raises(ModelDirectoryError, match="no model directory at"):
    embed.main(_embed_argv(images, "--debug"))
  assert capsys.readouterr().err == ""


def test_debug_environment_variable_shows_the_traceback(images, monkeypatch):
  monkeypatch.setenv(user_errors.DEBUG_ENV, "1")
  with pytest.raises(ModelDirectoryError):
    embed.main(_embed_argv(images))


def test_a_bug_is_a_traceback_with_a_request_to_report_it(images, monkeypatch, capsys):
  def broken(path):
    raise ZeroDivisionError("a bug")

  monkeypatch.setattr(embed, "read_images", broken)
  with pytest.raises(ZeroDivisionError):
    embed.main(_embed_argv(images))
  err = capsys.readouterr().err
  assert "python -m retro_jax.embed: internal error: this is a bug in retro_jax" in err
  assert "python -m retro_jax info" in err


def test_ctrl_c_outside_training_is_one_line_and_status_130(images, monkeypatch, capsys):
  def interrupted(path):
    raise KeyboardInterrupt

  monkeypatch.setattr(embed, "read_images", interrupted)
  assert embed.main(_embed_argv(images)) == 130
  assert capsys.readouterr().err == "python -m retro_jax.embed: interrupted\n"
  with pytest.raises(KeyboardInterrupt):
    embed.main(_embed_argv(images, "--debug"))


def test_os_errors_name_the_file_without_errno():
  def body():
    raise PermissionError(13, "Permission denied", "/data/run/metrics.jsonl")

  with pytest.raises(PermissionError):  # --debug: raised as it is
    user_errors.run("prog", ["--debug"], body)
  assert user_errors.describe_os_error(PermissionError(13, "Permission denied", "/x")) == (
      "Permission denied: /x")


def test_os_error_exit_status_and_message(capsys):
  def body():
    raise IsADirectoryError(21, "Is a directory", "/data/run")

  assert user_errors.run("prog", [], body) == 1
  assert capsys.readouterr().err == "prog: error: Is a directory: /data/run\n"


@pytest.mark.parametrize("name", [*cli.SUBCOMMANDS, "main"])
def test_every_cli_documents_debug(name, capsys):
  module = importlib.import_module(f"retro_jax.{name}")
  try:
    module.main(["--help"])
  except SystemExit:
    pass
  assert "--debug" in capsys.readouterr().out
