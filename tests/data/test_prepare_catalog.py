"""`python -m retro_jax data prepare NAME` for TFDS names without an offline recipe: TFDS's own
download_and_prepare, after checks that need no network. The harness (tests/conftest.py) refuses
every connection but loopback, so a test that let TFDS try a download would fail, not hang; the
one dataset built here is a builder defined below that reads its --manual-dir."""

from __future__ import annotations

import time

import numpy as np
import pytest
import tensorflow_datasets as tfds

from retro_jax.data import cli


class RetroJaxManualNumbers(tfds.core.GeneratorBasedBuilder):
  """A local builder (registered by TFDS as retro_jax_manual_numbers): one example per line of
  MANUAL_DIR/numbers.txt."""

  VERSION = tfds.core.Version("1.0.0")
  MANUAL_DOWNLOAD_INSTRUCTIONS = "Write numbers.txt, one integer per line."

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
        {"value": tfds.features.Scalar(np.int64)}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(dl_manager.manual_dir / "numbers.txt")}

  def _generate_examples(self, path):
    for i, line in enumerate(path.read_text().split()):
      yield i, {"value": int(line)}


def refusal(capsys, *args: str, code: int) -> str:
  start = time.perf_counter()
  assert cli.main(["prepare", *args]) == code
  assert time.perf_counter() - start < 20  # No download attempt, no retries.
  error = capsys.readouterr().err
  assert "Traceback" not in error
  return error


def test_a_misspelt_tfds_name_is_a_usage_error_with_close_matches(capsys, tfds_data_dir):
  error = refusal(capsys, "imagenete", "--data-dir", str(tfds_data_dir), code=2)
  assert "unknown TFDS dataset 'imagenete': not in TFDS's catalog; did you mean " in error
  assert "imagenette" in error
  assert not any(tfds_data_dir.iterdir())


def test_a_manual_download_dataset_needs_manual_dir(capsys, tfds_data_dir, tmp_path):
  error = refusal(capsys, "imagenet2012", "--data-dir", str(tfds_data_dir), code=1)
  assert "TFDS cannot download imagenet2012: put the files it needs in a folder and pass it as " \
         "--manual-dir. TFDS says: " in error
  error = refusal(capsys, "imagenet2012", "--data-dir", str(tfds_data_dir), "--manual-dir",
                  str(tmp_path / "nowhere"), code=1)
  assert f"--manual-dir {tmp_path / 'nowhere'}: no such directory" in error
  assert not any(tfds_data_dir.iterdir())


@pytest.mark.parametrize("extra, says", [
    ((), "cannot prepare mnist: its download is impossible: storage.googleapis.com:443 is "
         "unreachable"),
    (("--try-gcs",), "cannot prepare mnist: TFDS's copy on GCS (--try-gcs) is impossible: "
                     "storage.googleapis.com:443 is unreachable"),
])
def test_an_unreachable_source_is_refused_before_tfds_starts(capsys, tfds_data_dir, extra, says):
  error = refusal(capsys, "mnist", "--data-dir", str(tfds_data_dir), *extra, code=1)
  assert says in error
  assert not any(tfds_data_dir.iterdir())


@pytest.mark.parametrize("args", [
    ("fashion_mnist", "--try-gcs"), ("fashion_mnist", "--manual-dir", "."),
    ("mnist", "--download"),
])
def test_recipe_and_catalog_options_do_not_mix(capsys, args):
  with pytest.raises(SystemExit) as exit_:
    cli.main(["prepare", *args])
  assert exit_.value.code == 2
  assert "error: --" in capsys.readouterr().err


def test_a_local_builder_is_built_from_its_manual_dir(capsys, tfds_data_dir, tmp_path):
  manual = tmp_path / "manual"
  manual.mkdir()
  (manual / "numbers.txt").write_text("3\n1\n4\n1\n5\n")
  args = ["prepare", "retro_jax_manual_numbers", "--data-dir", str(tfds_data_dir),
          "--manual-dir", str(manual)]
  assert cli.main(args) == 0
  assert "retro_jax_manual_numbers: done" in capsys.readouterr().out
  dataset = tfds.load("retro_jax_manual_numbers", split="train", data_dir=str(tfds_data_dir),
                      download=False)
  assert sorted(int(x["value"]) for x in tfds.as_numpy(dataset)) == [1, 1, 3, 4, 5]
  assert cli.main(args) == 0
  assert "is already prepared" in capsys.readouterr().out
