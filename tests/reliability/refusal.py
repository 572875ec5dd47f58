"""What every bad-input case asserts: the exit status, a message that names the problem, no
traceback, and nothing on disk changed (a checksum of the trees involved, before and after)."""

from __future__ import annotations

import hashlib
import os
import pathlib
from collections.abc import Callable, Iterable, Sequence


def tree_checksum(roots: Iterable[str | os.PathLike]) -> str:
  """One SHA-256 over every path under `roots` (the roots included): names, kinds, contents.

  A file or directory that appears, disappears, is renamed or changes by one byte changes it.
  """
  digest = hashlib.sha256()
  for root in roots:
    root = pathlib.Path(root)
    paths = [root, *sorted(root.rglob("*"))] if root.is_dir() else [root]
    for path in paths:
      digest.update(str(path).encode() + b"\0")
      if path.is_symlink():
        digest.update(b"link:" + os.readlink(path).encode())
      elif path.is_file():
        digest.update(b"file:" + path.read_bytes())
      elif path.is_dir():
        digest.update(b"dir")
      else:
        digest.update(b"missing")
      digest.update(b"\0")
  return digest.hexdigest()


def expect_refusal(main: Callable[[list[str]], int], argv: Sequence[object], capsys, *,
                   code: int, says: Sequence[str], unchanged: Iterable[str | os.PathLike],
                   ) -> str:
  """Runs `main(argv)` in-process and checks the refusal; returns its stderr.

  Args:
    main: a CLI's `main(argv)`.
    argv: its arguments (each passed through `str`).
    capsys: pytest's capsys fixture.
    code: the expected exit status (1 failure, 2 usage error).
    says: substrings the message must contain (the file, the key, what to do).
    unchanged: paths whose trees must be identical before and after (missing ones included:
      they must still be missing).
  """
  roots = list(unchanged)
  before = tree_checksum(roots)
  capsys.readouterr()
  try:
    status = main([str(arg) for arg in argv])
  except SystemExit as exit_:  # argparse's usage errors
    status = exit_.code
  err = capsys.readouterr().err
  assert status == code, f"exit status {status}, expected {code}; stderr:\n{err}"
  assert "Traceback" not in err, err
  for fragment in says:
    assert fragment in err, f"{fragment!r} not in stderr:\n{err}"
  assert tree_checksum(roots) == before, f"{roots} changed on disk"
  return err
