"""The Colab notebooks (colab/*.ipynb): their form, and each executed end to end on CPU.

The notebooks run in a Jupyter kernel (nbclient) with tiny settings injected after their
`parameters` cell, papermill's way; their commands go through the notebooks' `run`, which
stops the notebook when a command fails, so a wrong command anywhere fails these tests.
Fashion-MNIST (the `fashion_mnist_tfds` fixture) stands in for the downloads.
"""

from __future__ import annotations

import json
import pathlib
import re
import subprocess

from IPython.core.inputtransformer2 import TransformerManager
import nbclient
import nbformat
import pytest

from retro_jax import cli

ROOT = pathlib.Path(__file__).parents[1]
NOTEBOOKS = sorted((ROOT / "colab").glob("*.ipynb"))
EXPECTED = ["01_quickstart.ipynb", "02_distill_on_tpu.ipynb", "03_finetune_downstream.ipynb"]
PLACEHOLDER = "OWNER/REPO"
# configs/resnet18.py:smoke at 1/8 width (the fault drills' run): notebook 02's CI stand-in for
# EfficientNet-B0, whose first training step alone compiles for minutes on the 2-core CPU.
TINY_RETRO = ROOT / "tests" / "reliability" / "tiny_retro.py"


def read(path: pathlib.Path) -> nbformat.NotebookNode:
  return nbformat.read(path, as_version=4)


def cell(notebook: nbformat.NotebookNode, cell_id: str) -> nbformat.NotebookNode:
  return next(c for c in notebook.cells if c.get("id") == cell_id)


def with_parameters(notebook: nbformat.NotebookNode, **values) -> nbformat.NotebookNode:
  """The notebook with `values` assigned right after its parameters cell (papermill's way)."""
  index = next(i for i, c in enumerate(notebook.cells)
               if "parameters" in c.metadata.get("tags", []))
  source = "\n".join(f"{name} = {value!r}" for name, value in values.items())
  injected = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
  injected.id = "injected-parameters"
  notebook.cells.insert(index + 1, injected)
  return notebook


def execute(notebook: nbformat.NotebookNode, cwd: pathlib.Path) -> nbformat.NotebookNode:
  # The kernel inherits this process's environment: 8 simulated CPU devices and the shared
  # XLA compilation cache of tests/conftest.py.
  nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                          resources={"metadata": {"path": str(cwd)}}).execute()
  return notebook


def outputs(notebook: nbformat.NotebookNode, cell_id: str) -> tuple[str, list[dict]]:
  """A cell's printed text and its rich (display_data) outputs."""
  text, rich = "", []
  for output in cell(notebook, cell_id).outputs:
    if output.output_type == "stream":
      text += output.text
    elif output.output_type in ("display_data", "execute_result"):
      rich.append(output.data)
  return text, rich


def test_the_three_notebooks_are_there():
  assert [path.name for path in NOTEBOOKS] == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_form(path):
  notebook = read(path)
  nbformat.validate(notebook)
  code = [c for c in notebook.cells if c.cell_type == "code"]
  # Stripped: no outputs or execution counts in the repository.
  assert all(not c.outputs and c.execution_count is None for c in code)
  # Opens with what you get and the runtime it needs, then one parameters cell with the
  # repository placeholder.
  intro = notebook.cells[0].source
  assert notebook.cells[0].cell_type == "markdown"
  assert "**What you get:**" in intro and "**Runtime:**" in intro
  parameters = [c for c in code if "parameters" in c.metadata.get("tags", [])]
  assert len(parameters) == 1
  assert f'REPO = "{PLACEHOLDER}"' in parameters[0].source
  assert code.index(parameters[0]) == 0  # injected values come before anything uses them
  for c in code:  # Valid IPython: magics become the calls IPython makes of them.
    compile(TransformerManager().transform_cell(c.source), f"{path}:{c.id}", "exec")
  commands = re.findall(r"python -m retro_jax(?:\.| )([a-z_]+)", "\n".join(c.source for c in code))
  assert commands
  for command in commands:
    assert command in cli.SUBCOMMANDS or command == "main", command


def test_every_notebook_has_the_same_setup_cell():
  # The install/`run` cell is copied into each notebook (Colab opens them one by one); the
  # copies must not drift apart.
  setups = {cell(read(path), "setup").source for path in NOTEBOOKS}
  assert len(setups) == 1
  # Its check for an unset REPO must survive a fork's sed of the placeholder.
  assert PLACEHOLDER not in setups.pop()


def test_the_placeholder_is_only_where_the_fork_command_replaces_it():
  tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
  holders = {name for name in tracked if (ROOT / name).is_file()
             and PLACEHOLDER in (ROOT / name).read_text(errors="replace")}
  # The README's sed line: README.md colab/*.ipynb (and this test, which names it).
  assert holders == {"README.md", "tests/test_colab.py",
                     *(f"colab/{name}" for name in EXPECTED)}


def test_readme_links_every_notebook_through_colab_with_the_placeholder():
  readme = (ROOT / "README.md").read_text()
  for name in EXPECTED:
    assert (f"https://colab.research.google.com/github/{PLACEHOLDER}/blob/main/colab/{name}"
            in readme), name


def test_a_failing_command_stops_the_notebook(tmp_path):
  notebook = read(NOTEBOOKS[0])
  notebook.cells = [cell(notebook, "parameters"), cell(notebook, "setup"),
                    nbformat.v4.new_code_cell('run("python -m retro_jax export --format nope")')]
  with pytest.raises(nbclient.exceptions.CellExecutionError, match="exit status 2"):
    execute(notebook, tmp_path)


# ~3 min on the 2-core CPU: the quickstart's :test variant trains three tiny runs and
# evaluates four models, each with its own compiles.
@pytest.mark.slow
def test_quickstart_notebook_runs_and_shows_the_table_and_plots(fashion_mnist_tfds, tmp_path):
  workdir = tmp_path / "quickstart"
  notebook = execute(with_parameters(read(ROOT / "colab" / EXPECTED[0]),
                                     CONFIG="quickstart:test", WORKDIR=str(workdir),
                                     DATA_DIR=str(fashion_mnist_tfds), TENSORBOARD=False),
                     tmp_path)
  _, table = outputs(notebook, "table")
  assert any("| retro | backbone |" in data.get("text/markdown", "") for data in table)
  assert sum("image/png" in data for data in table) == 2  # k-NN over training, final accuracy
  _, report = outputs(notebook, "report")
  assert sum("image/png" in data for data in report) == 3  # losses, schedules, k-NN
  text, _ = outputs(notebook, "export")
  assert json.loads(text)["exported_from"]["method"] == "retro"


@pytest.fixture(scope="module")
def distilled(fashion_mnist_tfds, tmp_path_factory):
  """Notebook 02 executed at tiny settings: a random MoCo-format ResNet-18 teacher converted,
  a 1/8-width ResNet-18 Retro student trained 4 steps on Fashion-MNIST and exported."""
  root = tmp_path_factory.mktemp("distill")
  notebook = execute(with_parameters(
      read(ROOT / "colab" / EXPECTED[1]), RUN_ROOT=str(root / "drive"), RANDOM_TEACHER=True,
      TEACHER_ARCH="resnet18", CONFIG=str(TINY_RETRO), DATASET="fashion_mnist",
      DATA_DIR=str(fashion_mnist_tfds), TRAIN_SPLIT="train[:256]",
      MONITOR_BANK_SPLIT="train[:256]", MONITOR_TEST_SPLIT="test[:128]", TENSORBOARD=False),
      root)
  return notebook, root / "drive"


# ~1 min: a conversion, 4 training steps and an export, each its own process.
@pytest.mark.slow
def test_distill_notebook_converts_trains_and_exports(distilled):
  notebook, run_root = distilled
  teacher = json.loads((run_root / "teacher" / "model.json").read_text())
  assert teacher["source"]["format"] == "moco" and teacher["encoder"]["architecture"] == "resnet18"
  text, _ = outputs(notebook, "train")
  assert "step 4/4" in text
  _, report = outputs(notebook, "report")
  assert sum("image/png" in data for data in report) == 3
  exported = json.loads((run_root / "export" / "model.json").read_text())
  assert exported["exported_from"]["method"] == "retro"
  assert exported["exported_from"]["workdir"] == str(run_root / "run")


# ~1 min: feature extraction, k-NN and a 2-epoch probe, 4 fine-tuning steps, the 3-line load.
@pytest.mark.slow
def test_finetune_notebook_probes_finetunes_and_loads_in_three_lines(distilled,
                                                                     fashion_mnist_tfds,
                                                                     tmp_path):
  _, run_root = distilled
  workdir = tmp_path / "downstream"
  notebook = execute(with_parameters(
      read(ROOT / "colab" / EXPECTED[2]), STUDENT_DIR=str(run_root / "export"),
      WORKDIR=str(workdir), DATASET="fashion_mnist", DATA_DIR=str(fashion_mnist_tfds),
      TRAIN_SPLIT="train[:256]", TEST_SPLIT="test[:100]",
      EVAL_FLAGS="--image-size 32 --linear-epochs 2", FINETUNE_CONFIG="finetune:smoke",
      FINETUNE_FLAGS="", IMAGE_SIZE=32), tmp_path)
  assert (workdir / "probe" / "results.json").is_file()
  assert "top1" in json.dumps(json.loads((workdir / "finetune" / "results.json").read_text()))
  text, _ = outputs(notebook, "flax")
  width = json.loads((run_root / "export" / "model.json").read_text())["feature_width"]
  assert f"features: (8, {width})" in text
  text, _ = outputs(notebook, "module")
  assert "logits: (8, 10)" in text
