"""The run report: report.md and its PNG plots from a run's metrics.jsonl, and its CLI."""

from __future__ import annotations

import json
import math
import pathlib
import re
import subprocess
import sys
import tomllib

import numpy as np
import pytest

from retro_jax import cli, report

ROOT = pathlib.Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def record(step: int, **values) -> dict:
  base = {"step": step, "epoch": round(step / 10, 4), "skipped_examples": 0,
          "loss": 10.0 - 0.1 * step, "contrastive": 7.0 - 0.05 * step,
          "consistency": 3.0 / step, "grad_norm": 2.0 + math.sin(step),
          "lr": 0.03 * min(1.0, step / 5), "weight_decay": 1e-4}
  if step > 1:
    base["images_per_second"] = 100.0 + step
  base.update(values)
  return base


def write_jsonl(workdir: pathlib.Path, records: list[dict], tail: str = "") -> None:
  workdir.mkdir(parents=True, exist_ok=True)
  text = "".join(json.dumps(r) + "\n" for r in records)  # json writes NaN as NaN, like progress
  (workdir / "metrics.jsonl").write_text(text + tail, encoding="utf-8")


@pytest.fixture
def resumed_run(tmp_path) -> pathlib.Path:
  """Steps 1-12, checkpointed at 8, killed after 12; the resume logs 9-20 again."""
  workdir = tmp_path / "run"
  first = [record(s) for s in range(1, 13)]
  first[7]["knn_top1_k200"], first[7]["knn_top5_k200"] = 31.0, 70.0       # step 8
  first[11]["knn_top1_k200"], first[11]["knn_top5_k200"] = 99.0, 99.5     # step 12: abandoned
  first[10]["loss"] = 123.0                                                 # step 11: abandoned
  second = [record(s, loss=5.0 - 0.1 * s) for s in range(9, 21)]            # the resumed run
  second[0].pop("images_per_second")                                        # first line of a run
  knn = {12: (42.5, 80.0), 16: (47.25, 85.0), 20: (45.0, 86.0)}
  for r in second:
    if r["step"] in knn:
      r["knn_top1_k200"], r["knn_top5_k200"] = knn[r["step"]]
    if r["step"] == 14:
      r["loss"] = float("nan")
  write_jsonl(workdir, first + second, tail='{"step": 21, "loss": 3.')      # killed mid-write
  config = {"method": "retro", "seed": 0, "global_batch_size": 16, "total_steps": 20,
            "epochs": 200, "student": {"name": "efficientnet_b0", "kwargs": {}},
            "teacher": {"checkpoint": "teachers/mocov2_r50", "random_spec": None},
            "data": {"dataset": "tfds:fashion_mnist", "split": "train[:256]"}}
  (workdir / "config.json").write_text(json.dumps(config, indent=2))
  return workdir


def table_rows(markdown: str) -> dict[str, list[str]]:
  rows = {}
  for line in markdown.splitlines():
    if line.startswith("| ") and not line.startswith("|---"):
      cells = [c.strip() for c in line.strip("|").split("|")]
      rows.setdefault(cells[0], cells[1:])
  return rows


def section(markdown: str, heading: str) -> str:
  """The text of the `## heading` section."""
  return markdown.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]


def check_png(path: pathlib.Path) -> None:
  """A real PNG, of a plausible size, with more than a blank canvas in it."""
  import matplotlib.image  # pylint: disable=g-import-not-at-top

  assert path.read_bytes()[:8] == PNG_SIGNATURE, path
  pixels = matplotlib.image.imread(path)
  height, width = pixels.shape[:2]
  assert height >= 200 and width >= 300, (path, pixels.shape)
  colours = np.unique(pixels[..., :3].reshape(-1, 3), axis=0)
  assert len(colours) > 20, (path, len(colours))
  # Not (almost) all background: lines, text and ticks cover a visible share of the pixels.
  background = np.all(pixels[..., :3] > 0.98, axis=-1).mean()
  assert background < 0.99, (path, background)


def test_read_metrics_resume_drops_the_abandoned_records(resumed_run):
  log = report.read_metrics(resumed_run)
  assert [r["step"] for r in log.records] == list(range(1, 21))
  assert log.superseded == 4      # steps 9-12 of the first run
  assert log.unreadable == 1      # the truncated last line
  assert log.last("loss") == (20, pytest.approx(5.0 - 2.0))
  # The abandoned step 12's 99 % is gone; step 12 of the resumed run holds 42.5.
  steps, values = log.series("knn_top1_k200")
  assert steps.tolist() == [8, 12, 16, 20]
  assert values.tolist() == [31.0, 42.5, 47.25, 45.0]
  assert report.best_knn(log, "knn_top1_k200") == (47.25, 16)
  groups = report.classify(log.names)
  assert groups == {"losses": ["loss", "contrastive", "consistency"], "norms": ["grad_norm"],
                    "schedules": ["lr", "weight_decay"],
                    "knn": ["knn_top1_k200", "knn_top5_k200"]}


def test_write_report(resumed_run):
  path = report.write_report(resumed_run, extra={"linear top-1": 0.83,
                                                 "knn": {"top-1": 47.0}})
  assert path == resumed_run / "report.md"
  text = path.read_text()
  assert text.startswith("# Run report: run\n")
  rows = table_rows(text)
  # The run, from config.json and the log.
  assert rows["method"] == ["retro"]
  assert rows["student"] == ["efficientnet_b0"]
  assert rows["teacher"] == ["teachers/mocov2_r50"]
  assert rows["dataset"] == ["tfds:fashion_mnist (split train[:256])"]
  assert rows["configured length"] == ["20 steps"]
  assert rows["global batch"] == ["16"]
  assert rows["last logged step"] == ["20 (epoch 2)"]
  # Median of the resumed run's rates (steps 10-20) and the first run's kept ones (2-8).
  rates = [100.0 + s for s in [*range(2, 9), *range(10, 21)]]
  assert rows["throughput"][0].startswith(f"{np.median(rates):.1f} img/s")
  # Final values: the resumed run's, at the step they were last logged.
  assert rows["loss"] == [f"{5.0 - 2.0:.4g}", "20"]
  assert rows["consistency"] == [f"{3.0 / 20:.4g}", "20"]
  assert rows["grad_norm"] == [f"{2.0 + math.sin(20):.4g}", "20"]
  assert rows["lr"] == ["0.03", "20"]
  assert rows["weight_decay"] == ["0.0001", "20"]
  assert rows["knn_top1_k200"] == ["45", "20"]
  assert rows["knn_top5_k200"] == ["86", "20"]
  knn = section(text, "k-NN accuracy")
  assert "Best knn_top1_k200: **47.25 %** at step 16." in knn
  assert table_rows(knn)["knn_top1_k200"] == ["47.25", "16", "45"]   # best, at step, final
  assert table_rows(knn)["knn_top5_k200"] == ["86", "20", "86"]
  # extra, flattened.
  assert rows["linear top-1"] == ["0.83"]
  assert rows["knn / top-1"] == ["47"]
  # Plots, linked relatively, and real.
  for name in ("losses", "schedules", "knn"):
    assert re.search(rf"!\[[^\]]+\]\(plots/{name}\.png\)", text), name
    check_png(resumed_run / "plots" / f"{name}.png")
  # Notes: the NaN, the resume, the truncated line.
  assert "loss is NaN or infinite at 1 logged step(s), first at step 14." in text
  assert "4 record(s) replaced by a resumed run" in text
  assert "1 line(s) of metrics.jsonl could not be read" in text


def test_a_single_step_without_knn_or_config(tmp_path):
  workdir = tmp_path / "smoke"
  write_jsonl(workdir, [record(1, loss=float("nan"))])
  (workdir / "plots").mkdir()
  (workdir / "plots" / "knn.png").write_bytes(b"stale")
  text = report.write_report(workdir, title="Smoke").read_text()
  assert text.startswith("# Smoke\n")
  rows = table_rows(text)
  assert "method" not in rows
  assert rows["loss"] == ["NaN", "1"]
  assert rows["throughput"][0].startswith("not measured")
  assert "No k-NN accuracies were logged" in text
  assert "plots/knn.png" not in text
  assert not (workdir / "plots" / "knn.png").exists()
  check_png(workdir / "plots" / "losses.png")
  check_png(workdir / "plots" / "schedules.png")


def test_errors_are_report_errors(tmp_path):
  with pytest.raises(report.ReportError, match="does not exist"):
    report.write_report(tmp_path / "nowhere")
  with pytest.raises(report.ReportError, match="metrics.jsonl does not exist"):
    report.write_report(tmp_path)
  write_jsonl(tmp_path, [], tail="\n")
  with pytest.raises(report.ReportError, match="holds no metrics records"):
    report.write_report(tmp_path)
  write_jsonl(tmp_path, [], tail="not json\n[1, 2]\n")
  with pytest.raises(report.ReportError, match=r"2 unreadable lines"):
    report.write_report(tmp_path)
  with pytest.raises(report.ReportError, match="no results"):
    report.write_results_report(tmp_path, "Empty", {})


def test_write_results_report(tmp_path):
  workdir = tmp_path / "eval"
  path = report.write_results_report(
      workdir, "Linear probe",
      {"linear": {"top-1": 71.25, "top-5": 90.5, "train_loss": [2.3, 1.9, float("nan"), 1.2]},
       "knn k=200": {"top-1": 60.0}})
  text = path.read_text()
  assert text.startswith("# Linear probe\n")
  rows = table_rows(text)
  assert rows["name"] == ["top-1", "top-5"]
  assert rows["linear"] == ["71.25", "90.5"]
  assert rows["knn k=200"] == ["60", ""]
  assert "train_loss" not in rows["name"]
  assert "(plots/results.png)" in text
  check_png(workdir / "plots" / "results.png")
  # Rows as a list, without curves: a table and no plot.
  text = report.write_results_report(workdir, "k-NN", [{"k": 20, "top-1": 58.0},
                                                       {"k": 200, "top-1": 60.5}]).read_text()
  assert table_rows(text)["k"] == ["top-1"]
  assert table_rows(text)["200"] == ["60.5"]
  assert "results.png" not in text
  assert not (workdir / "plots" / "results.png").exists()


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
  return subprocess.run([sys.executable, "-m", "retro_jax.report", *args], capture_output=True,
                        text=True, timeout=300, check=False)


def test_cli_writes_the_report(resumed_run):
  result = run_cli("--workdir", str(resumed_run), "--title", "From the CLI")
  assert result.returncode == 0, result.stderr
  assert f"wrote {resumed_run / 'report.md'}" in result.stdout
  assert (resumed_run / "report.md").read_text().startswith("# From the CLI\n")
  assert "report" in cli.SUBCOMMANDS


@pytest.mark.parametrize("case", ["missing_workdir", "no_metrics", "empty_metrics"])
def test_cli_user_errors_exit_1_with_one_line(tmp_path, case):
  workdir = tmp_path / "run"
  if case != "missing_workdir":
    workdir.mkdir()
  if case == "empty_metrics":
    (workdir / "metrics.jsonl").write_text("")
  result = run_cli("--workdir", str(workdir))
  assert result.returncode == 1
  assert result.stdout == ""
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("python -m retro_jax.report: error: "), result.stderr
  assert str(workdir) in lines[0]


def test_matplotlib_is_a_declared_dependency():
  project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
  assert any(re.match(r"matplotlib\s*>=", d) for d in project["dependencies"])


def test_a_long_noisy_run_is_plotted_smoothed(tmp_path):
  rng = np.random.default_rng(0)
  records = [record(s, loss=float(1 / s + rng.normal(0, 0.1)),
                    **({"knn_top1_k200": s / 10} if s % 100 == 0 else {}))
             for s in range(1, 501)]
  records[250]["grad_norm"] = float("inf")
  write_jsonl(tmp_path, records)
  text = report.write_report(tmp_path).read_text()
  assert "grad_norm is NaN or infinite at 1 logged step(s), first at step 251." in text
  assert "Best knn_top1_k200: **50.00 %** at step 500." in text
  for name in ("losses", "schedules", "knn"):
    check_png(tmp_path / "plots" / f"{name}.png")
