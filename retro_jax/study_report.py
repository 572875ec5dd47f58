"""The study's summary: accuracy over seeds with 95 % confidence intervals, diagnostics, plots.

`write(config, workdir, results, runs, timings)` turns the evaluation rows of every model of a
study (retro_jax/study.py) into WORKDIR/results.md, WORKDIR/results.json and two plots:
plots/knn_over_training.png (the online k-NN monitor of each arm, mean over seeds) and
plots/final_accuracy.png (each model group's mean with its 95 % interval).

Groups: the teacher, every student arm (its seeds), the untrained student network (its seeds)
and the untrained teacher network. An interval is the Student-t 95 % interval of the mean over
seeds, mean +- t(0.975, n - 1) * sd / sqrt(n) with the sample sd; a group of one run has none.
Paired differences: each arm against `config.baseline`, then every other pair of arms, at
the same seed (the same initialisation and data order), so the seed-to-seed spread of the
networks cancels.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np

from retro_jax import report

RESULTS_MD = "results.md"
RESULTS_JSON = "results.json"
PLOTS_DIR = "plots"
UNTRAINED_STUDENT = "untrained student"
UNTRAINED_TEACHER = "untrained teacher network"


@dataclasses.dataclass(frozen=True)
class Summary:
  table: str
  markdown: pathlib.Path
  plots: pathlib.Path


def interval(values: Sequence[float]) -> tuple[float, float | None]:
  """(mean, half-width of the Student-t 95 % interval of the mean); None below two values."""
  from scipy import stats  # pylint: disable=g-import-not-at-top
  values = np.asarray(values, dtype=np.float64)
  mean = float(values.mean())
  if len(values) < 2:
    return mean, None
  half = stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values))
  return mean, float(half)


def _cell(values: Sequence[float]) -> str:
  mean, half = interval(values)
  return f"{mean:.2f}" if half is None else f"{mean:.2f} ± {half:.2f}"


def groups(config: ml_collections.ConfigDict,
           results: Mapping[str, list[dict[str, Any]]]) -> dict[str, dict[str, list[dict]]]:
  """{group name: {seed label: rows}} in table order: teacher, arms, untrained networks."""
  out: dict[str, dict[str, list[dict]]] = {"teacher": {"teacher": results["teacher"]}}
  for arm in config.students:
    out[arm] = {f"seed_{s}": results[f"{arm}/seed_{s}"] for s in config.seeds}
  if config.students:
    out[UNTRAINED_STUDENT] = {f"seed_{s}": results[f"init/seed_{s}"] for s in config.seeds}
  if "init/teacher" in results:
    out[UNTRAINED_TEACHER] = {"seed": results["init/teacher"]}
  return out


def _columns(config: ml_collections.ConfigDict) -> list[str]:
  protocols = list(config.evaluation.protocols)
  columns = []
  if "knn" in protocols:
    columns += [f"knn_k{k}" for k in config.evaluation.knn_ks]
  if "linear" in protocols:
    columns.append("linear")
  return columns


def _values(runs: Mapping[str, list[dict]], protocol: str, features: str) -> list[float]:
  return [row["top1"] for rows in runs.values() for row in rows
          if row["protocol"] == protocol and row["features"] == features]


def accuracy_table(config, grouped) -> tuple[list[str], list[dict[str, Any]]]:
  """Markdown lines of the main table, and its rows as data (mean, half-width, values)."""
  columns = _columns(config)
  header = "| model | features | n | " + " | ".join(columns) + " |"
  lines = [header, "|" + " --- |" * 3 + " ---: |" * len(columns)]
  data = []
  for name, runs in grouped.items():
    for features in ("backbone", "embedding"):
      cells, record = [], {"model": name, "features": features, "n": len(runs)}
      for column in columns:
        values = _values(runs, column, features)
        if values:
          cells.append(_cell(values))
          mean, half = interval(values)
          record[column] = {"mean": mean, "ci95": half, "values": values}
        else:
          cells.append("-")
      if any(c != "-" for c in cells):
        lines.append(f"| {name} | {features} | {len(runs)} | " + " | ".join(cells) + " |")
        data.append(record)
  return lines, data


def _pairs(config) -> list[tuple[str, str]]:
  """(arm, other): every arm against config.baseline, then each remaining pair once."""
  baseline = config.get("baseline")
  arms = sorted(config.students)
  pairs = [(arm, baseline) for arm in arms if baseline in arms and arm != baseline]
  rest = [arm for arm in arms if arm != baseline]
  pairs += [(b, a) for i, a in enumerate(rest) for b in rest[i + 1:]]
  return pairs


def paired_table(config, grouped) -> tuple[list[str], list[dict[str, Any]]]:
  """Differences between arms at the same seed, on the backbone features: each arm minus
  config.baseline, then each other pair of arms."""
  if len(config.seeds) < 2:
    return [], []
  columns = _columns(config)
  lines = ["| arm - other arm (same seed) | " + " | ".join(columns) + " |",
           "| --- |" + " ---: |" * len(columns)]
  data = []
  for arm, other in _pairs(config):
    cells, record = [], {"arm": arm, "baseline": other}
    for column in columns:
      diffs = []
      for seed in grouped[arm]:
        a = _values({seed: grouped[arm][seed]}, column, "backbone")
        b = _values({seed: grouped[other][seed]}, column, "backbone")
        if a and b:
          diffs.append(a[0] - b[0])
      if diffs:
        mean, half = interval(diffs)
        cells.append(f"{mean:+.2f} ± {half:.2f}" if half is not None else f"{mean:+.2f}")
        record[column] = {"mean": mean, "ci95": half, "values": diffs}
      else:
        cells.append("-")
    lines.append(f"| {arm} - {other} | " + " | ".join(cells) + " |")
    data.append(record)
  return lines, data


def logs_by_arm(runs: Mapping[str, pathlib.Path]) -> dict[str, list[report.RunLog]]:
  """Each run's metrics.jsonl, read once, grouped by arm ('teacher', 'retro', ...); runs
  that logged nothing are left out."""
  by_arm: dict[str, list[report.RunLog]] = {}
  for label, run_dir in runs.items():
    try:
      log = report.read_metrics(run_dir)
    except report.ReportError:
      continue
    by_arm.setdefault(label.split("/")[0], []).append(log)
  return by_arm


def diagnostics_table(config, by_arm: Mapping[str, list[report.RunLog]]) -> list[str]:
  """First, minimum, maximum and last value of each diagnostic metric, per arm (mean over
  seeds); 'last' is the mean of the last tenth of the logged steps."""
  names = list(config.diagnostics)
  lines = ["| run | " + " | ".join(f"{n} (first / min / max / last)" for n in names) + " |",
           "| --- |" + " --- |" * len(names)]
  for arm, logs in by_arm.items():
    cells = []
    for name in names:
      summaries = []
      for log in logs:
        _, values = log.series(name)
        values = values[np.isfinite(values)]
        if len(values):
          summaries.append((values[0], values.min(), values.max(),
                          values[-max(1, len(values) // 10):].mean()))
      cells.append(" / ".join(f"{v:.3f}" for v in np.mean(summaries, axis=0)) if summaries
                   else "-")
    lines.append(f"| {arm} ({len(logs)} run{'s' if len(logs) > 1 else ''}) | "
                 + " | ".join(cells) + " |")
  return lines


def _knn_curves(by_arm: Mapping[str, list[report.RunLog]], path: pathlib.Path) -> None:
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  figure = Figure(figsize=(7.5, 4.5), layout="constrained")
  FigureCanvasAgg(figure)
  ax = figure.subplots()
  curves: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
  name = None
  for arm, logs in by_arm.items():
    for log in logs:
      knn = [n for n in log.names if n.startswith("knn_top1_")]
      if knn:
        name = knn[0]
        curves.setdefault(arm, []).append(log.series(name))
  for i, (arm, series) in enumerate(curves.items()):
    length = min(len(s[0]) for s in series)
    steps = series[0][0][:length]
    values = np.stack([s[1][:length] for s in series])
    ax.plot(steps, values.mean(0), marker="o", markersize=3, color=f"C{i}",
            label=f"{arm} (mean of {len(series)})" if len(series) > 1 else arm)
    if len(series) > 1:
      ax.fill_between(steps, values.min(0), values.max(0), color=f"C{i}", alpha=0.15)
  ax.set_xlabel("training step")
  ax.set_ylabel(f"online {name or 'k-NN'} (%)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  figure.suptitle("k-NN monitor over training (shaded: min-max over seeds)")
  report.save_figure(figure, path)


def _accuracy_bars(config, data: list[dict[str, Any]], path: pathlib.Path) -> None:
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  columns = _columns(config)
  rows = [r for r in data if r["features"] == "backbone"]
  figure = Figure(figsize=(max(6.0, 1.3 * len(rows) * len(columns) / 2), 4.5),
                  layout="constrained")
  FigureCanvasAgg(figure)
  ax = figure.subplots()
  width = 0.8 / len(columns)
  x = np.arange(len(rows))
  lows = []
  for j, column in enumerate(columns):
    means = [r[column]["mean"] if column in r else np.nan for r in rows]
    errors = [(r[column]["ci95"] or 0.0) if column in r else 0.0 for r in rows]
    lows += [m - e for m, e in zip(means, errors) if np.isfinite(m)]
    ax.bar(x + (j - (len(columns) - 1) / 2) * width, means, width, yerr=errors, capsize=3,
           label=column, color=f"C{j}")
  ax.set_xticks(x, [r["model"] for r in rows], rotation=20, ha="right")
  ax.set_ylim(max(0.0, min(lows) - 3.0) if lows else 0.0, None)
  ax.set_ylabel("top-1 on the test split (%), backbone features")
  ax.grid(alpha=0.3, axis="y")
  ax.legend(fontsize=8)
  figure.suptitle("final accuracy (error bars: 95 % interval over seeds)")
  report.save_figure(figure, path)


def _timings_lines(timings: Mapping[str, float]) -> list[str]:
  totals: dict[str, list[float]] = {}
  for name, seconds in timings.items():
    key = name.split("/")[0] if not name.startswith("evaluate") else "evaluations"
    totals.setdefault(key, []).append(seconds)
  lines = ["| stage | runs | wall time, total (s) | per run (s) |", "| --- | ---: | ---: | ---: |"]
  for key, values in totals.items():
    lines.append(f"| {key} | {len(values)} | {sum(values):.0f} | {np.mean(values):.0f} |")
  lines.append(f"| all | {len(timings)} | {sum(timings.values()):.0f} | |")
  return lines


def write(config: ml_collections.ConfigDict, workdir: pathlib.Path,
          results: Mapping[str, list[dict[str, Any]]], runs: Mapping[str, pathlib.Path],
          timings: Mapping[str, float]) -> Summary:
  """Writes results.md, results.json and the plots; returns the table printed on stdout."""
  grouped = groups(config, results)
  table_lines, data = accuracy_table(config, grouped)
  paired_lines, paired = paired_table(config, grouped)
  plots = workdir / PLOTS_DIR
  plots.mkdir(exist_ok=True)
  logs = logs_by_arm(runs)
  _knn_curves(logs, plots / "knn_over_training.png")
  _accuracy_bars(config, data, plots / "final_accuracy.png")
  lines = [f"# {config.title}", "",
           f"Top-1 (%) on `{config.evaluation.test_split}` of Fashion-MNIST; k-NN bank and "
           f"linear-probe training set `{config.evaluation.train_split}`. Mean ± 95 % "
           f"interval over {len(config.seeds)} seed(s) ({', '.join(map(str, config.seeds))}); "
           "`backbone`: pooled backbone features, `embedding`: the head's output (MoCo-v2/"
           "DisCo: own MLP head; Retro: the pooled adapter output; teacher: its MoCo-v2 head).",
           "", *table_lines, ""]
  if paired_lines:
    lines += ["Paired differences on the backbone features (same seed: same initialisation "
              "and data order), mean ± 95 % interval:", "", *paired_lines, ""]
  lines += ["Training diagnostics (logged metrics; 'last' is the mean of the last tenth of the "
            "logged steps):", "", *diagnostics_table(config, logs), "",
            "Wall time per stage on this machine (resumed stages add up their invocations):",
            "", *_timings_lines(timings), "",
            "![k-NN over training](plots/knn_over_training.png)", "",
            "![final accuracy](plots/final_accuracy.png)", ""]
  markdown = workdir / RESULTS_MD
  markdown.write_text("\n".join(lines))
  (workdir / RESULTS_JSON).write_text(json.dumps(
      {"table": data, "paired": paired, "timings": dict(timings),
       "seeds": list(config.seeds)}, indent=2) + "\n")
  return Summary(table="\n".join(table_lines + ([""] + paired_lines if paired_lines else [])),
                 markdown=markdown, plots=plots)
