"""Every CLI refuses, in one line and before any work, to write onto a read-only file system.

A real read-only file system: `unshare` gives one subprocess its own mount namespace (as an
unprivileged user through a user namespace), where a tmpfs is mounted, filled with an earlier
run's metrics.jsonl and remounted read-only; read_only_driver.py then runs each CLI in that one
process (~10 s of imports in all). Where the machine forbids namespaces the test is skipped and
says so.
"""

from __future__ import annotations

import json
import pathlib
import shlex
import shutil
import subprocess
import sys

import pytest

import model_dirs

ROOT = pathlib.Path(__file__).resolve().parents[2]
DRIVER = pathlib.Path(__file__).with_name("read_only_driver.py")
CLIS = ("main", "convert", "embed", "evaluate", "export", "data", "report")


@pytest.fixture(scope="module")
def results(tmp_path_factory, fashion_mnist_dir):
  if shutil.which("unshare") is None:
    pytest.skip("util-linux `unshare` is not installed: no private read-only mount possible")
  root = tmp_path_factory.mktemp("read_only")
  model = model_dirs.save_random(root / "model")
  source = root / "source.npy"
  source.write_bytes(b"exists; never read: the output is refused first")
  mount = root / "mount"
  mount.mkdir()
  ro = shlex.quote(str(mount))
  script = (f"mount -t tmpfs none {ro} && mkdir {ro}/run && "
            f"echo '{{\"step\": 1, \"loss\": 1.0}}' > {ro}/run/metrics.jsonl && "
            f"mount -o remount,ro {ro} && "
            f"exec {shlex.quote(sys.executable)} {shlex.quote(str(DRIVER))} {ro} "
            f"{shlex.quote(str(model))} {shlex.quote(str(source))} "
            f"{shlex.quote(str(fashion_mnist_dir))}")
  done = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
                        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
  if done.returncode and "unshare" in done.stderr and not done.stdout:
    pytest.skip(f"no private mount namespace here: {done.stderr.strip()}")
  assert done.returncode == 0, done.stderr[-3000:]
  assert not any(mount.iterdir())  # the tmpfs lived only in the namespace
  return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", CLIS)
def test_read_only_output_is_refused(results, name):
  status, err = results[name]
  assert status == 1, err
  assert "Traceback" not in err, err
  lines = [line for line in err.splitlines() if ": error: " in line]
  assert len(lines) == 1 and "is on a read-only file system" in lines[0], err
