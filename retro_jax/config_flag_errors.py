"""Why `--config` (and its `--config.KEY=VALUE` overrides) failed, said in one line.

ml_collections' config flags report a user's mistakes in ways meant for a debugger: a config
file that does not exist only fails when the config is first read (an OSError with the list
of paths tried), an unknown variant arrives as a ValueError whose text is a whole traceback,
and a misspelt key as a KeyError whose message is printed with its quotes and `\\n` escaped.
`check_config_file` and `explain` turn these into messages that name the flag, the file or
the key, and what to do. No JAX here: main's usage errors stay instant.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Sequence

_OVERRIDE = "--config."


def config_argument(argv: Sequence[str]) -> str | None:
  """The value of `--config` in argv (`--config X` or `--config=X`), or None."""
  for i, arg in enumerate(argv):
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1]
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
  return None


def check_config_file(argv: Sequence[str]) -> str | None:
  """Why the `--config` file cannot be loaded (missing, a directory), or None."""
  value = config_argument(argv)
  if value is None:
    return None
  path = pathlib.Path(value.split(":", 1)[0])
  if path.is_file():
    return None
  where = "" if path.is_absolute() else f" (relative to {os.getcwd()})"
  what = "is a directory, not a config file" if path.is_dir() else "no such file"
  subject = "" if str(path) == value and not where else f" {path}{where}:"
  return (f"--config {value}:{subject} {what}; name a config file, or one of the configs "
          "the package ships by name (e.g. --config quickstart)")


def _chain(error: BaseException) -> list[BaseException]:
  """`error` and its causes, outermost first."""
  chain, seen = [], set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    chain.append(error)
    error = error.__cause__ or error.__context__
  return chain


def _unknown_key(chain: list[BaseException], argv: Sequence[str]) -> str | None:
  """'--config.optimzer.lr=1: the config has no key 'optimzer' (did you mean ...)', if so."""
  key_errors = [e for e in chain if isinstance(e, KeyError) and e.args
                and isinstance(e.args[0], str)]
  if not key_errors:
    return None
  key = key_errors[-1].args[0]  # The innermost: the bare key.
  hint = next((line.strip() for e in key_errors for line in e.args[0].splitlines()
               if line.startswith("Did you mean")), None)
  overrides = [arg for arg in argv if arg.startswith(_OVERRIDE)
               and key in arg.split("=", 1)[0][len("--"):].split(".")]
  flag = overrides[0] if overrides else "--config.KEY"
  suggestion = f" ({hint[0].lower()}{hint[1:]})" if hint else ""
  return (f"{flag}: the config has no key {key!r}{suggestion}; "
          "`--config.KEY=VALUE` can only set keys the config file defines")


def _config_file_error(chain: list[BaseException], argv: Sequence[str]) -> str | None:
  """The config file's own error (e.g. an unknown variant) without the traceback text."""
  if not any("Error whilst parsing config file" in str(e) for e in chain):
    return None
  original = chain[-1]  # What get_config raised, under the two wrappers.
  return f"--config {config_argument(argv)}: {original}"


def explain(error: BaseException, argv: Sequence[str]) -> str:
  """One message for an exception raised while the flags of `argv` were parsed."""
  chain = _chain(error)
  return (_config_file_error(chain, argv) or _unknown_key(chain, argv)
          or (str(error).strip().splitlines() or [type(error).__name__])[0])
