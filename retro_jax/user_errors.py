"""A user's mistake is one line on stderr; a bug is a traceback: the boundary of every CLI.

Every command's `main(argv, prog)` is wrapped in `boundary`. What it does with an exception:

  UserError (the base of the project's own error types: a missing file, a bad config value,
  a model directory that is not one, ...) and OSError (a file that is missing, a directory,
  unreadable or on a read-only file system):
      `PROG: error: MESSAGE` on stderr, exit status 1 (2 for a `UsageError`).
  KeyboardInterrupt (Ctrl-C where no training loop handles it):
      `PROG: interrupted`, exit status 130.
  SystemExit (argparse's usage errors, exit 2):
      passed on unchanged.
  Anything else is a bug, not the user's input: one line says so and asks for a report, then
      the exception propagates with its traceback (exit status 1).

`--debug` on any command line (or RETRO_JAX_DEBUG=1 in the environment) re-raises user errors
too, so their traceback shows where they were raised.

No JAX here: `--help` and argument errors of every CLI stay instant.
"""

from __future__ import annotations

import functools
import inspect
import os
import sys
from collections.abc import Callable, Sequence

DEBUG_FLAG = "--debug"
INTERRUPTED = 130  # a shell's status for a process ended by Ctrl-C (128 + SIGINT)
DEBUG_ENV = "RETRO_JAX_DEBUG"
DEBUG_HELP = (f"show the Python traceback of an error instead of one line (also: {DEBUG_ENV}=1 "
              "in the environment)")
BUG_REPORT = ("this is a bug in retro_jax, not a mistake in your input: please report it with "
              "the traceback below and the output of `python -m retro_jax info`")


class UserError(Exception):
  """An error the user's input or environment causes, with a message that says what to do.

  The CLIs print it as one line (`PROG: error: MESSAGE`) and exit with `exit_code`.
  """

  exit_code = 1


class UsageError(UserError):
  """The command line itself is wrong (exit status 2, as argparse's usage errors)."""

  exit_code = 2


def debug_requested(argv: Sequence[str]) -> bool:
  """Whether `--debug` is among the options (before any `--`) or RETRO_JAX_DEBUG is set."""
  options = list(argv)[:list(argv).index("--")] if "--" in argv else list(argv)
  return DEBUG_FLAG in options or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def add_debug_flag(parser) -> None:
  """Declares `--debug` on an argparse parser (the boundary reads it from argv itself)."""
  parser.add_argument(DEBUG_FLAG, action="store_true", help=DEBUG_HELP)


def describe_os_error(error: OSError) -> str:
  """'No such file or directory: /x' rather than '[Errno 2] No such file or directory: ...'."""
  if error.strerror is None:
    return str(error)
  if error.filename is None:
    return error.strerror
  where = os.fspath(error.filename)
  if error.filename2 is not None:
    where += f" -> {os.fspath(error.filename2)}"
  return f"{error.strerror}: {where}"


def report(prog: str, error: BaseException) -> int:
  """Prints `error` as one user-facing message; returns the exit status."""
  message = describe_os_error(error) if isinstance(error, OSError) else str(error)
  print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
  return getattr(error, "exit_code", 1)


def run(prog: str, argv: Sequence[str], body: Callable[[], int]) -> int:
  """Runs `body()` (a CLI's work) inside the boundary described in the module docstring."""
  try:
    return body()
  except (UserError, OSError) as error:
    if debug_requested(argv):
      raise
    return report(prog, error)
  except KeyboardInterrupt:
    # Ctrl-C outside a training loop (which saves and stops by itself: train/stop_request.py).
    if debug_requested(argv):
      raise
    print(f"{prog}: interrupted", file=sys.stderr, flush=True)
    return INTERRUPTED
  except SystemExit:
    raise
  except Exception:
    print(f"{prog}: internal error: {BUG_REPORT}", file=sys.stderr, flush=True)
    raise


def boundary(main: Callable[..., int]) -> Callable[..., int]:
  """Decorates a CLI's `main(argv=None, prog=DEFAULT)` with `run`.

  `argv` None means `sys.argv[1:]`; the wrapped function always receives a list.
  """
  default_prog = inspect.signature(main).parameters["prog"].default

  @functools.wraps(main)
  def wrapped(argv: Sequence[str] | None = None, prog: str = default_prog) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    return run(prog, argv, lambda: main(argv, prog))

  return wrapped
