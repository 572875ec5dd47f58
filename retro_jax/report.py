"""A run's report: WORKDIR/report.md and PNG plots: `python -m retro_jax.report`.

  python -m retro_jax.report --workdir runs/effb0 [--title TEXT]

Reads WORKDIR/metrics.jsonl (and WORKDIR/config.json when present) and writes
WORKDIR/report.md with the plots in WORKDIR/plots/: losses.png (every loss term, and the
gradient norm in its own panel), schedules.png (learning rate, weight decay, ...) and knn.png
(the online k-NN monitor's accuracies; left out when the run logged none). The report lists
the run's method, student, teacher, dataset, steps and batch, the final value of every
metric, the best k-NN accuracy and its step, and the median throughput. Training writes it
at the end of the run; this command (re)writes it for any run, finished or not.

A resumed run appends to metrics.jsonl: a record whose step is not after the previous one
starts the resumed run's history there, and the records it replaces are dropped.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import pathlib
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from retro_jax import output_paths
from retro_jax import storage
from retro_jax import user_errors

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"
REPORT_FILE = "report.md"
PLOTS_DIR = "plots"

# Keys of a metrics record that are bookkeeping, not metrics to plot.
BOOKKEEPING = ("step", "epoch", "skipped_examples", "images_per_second")
# Schedule values (retro_jax.train.optim.build_optimizer's schedules, and ones methods may
# add); they go to schedules.png, not to losses.png.
SCHEDULES = ("lr", "learning_rate", "weight_decay", "momentum", "teacher_momentum",
             "teacher_temperature", "teacher_temp")
KNN_PREFIX = "knn_"


class ReportError(user_errors.UserError):
  """A user-facing failure (no run there, nothing logged): one message, exit code 1."""


# ---------------------------------------------------------------------------------------------
# Reading a run.


@dataclasses.dataclass
class RunLog:
  """metrics.jsonl after resumes: one record per logged step, in step order."""

  path: pathlib.Path
  records: list[dict[str, Any]]
  superseded: int = 0   # records dropped because a resumed run logged their steps again
  unreadable: int = 0   # lines that were not a JSON object with an integer step

  @property
  def names(self) -> list[str]:
    """Every metric's name, in the order of first appearance."""
    seen: dict[str, None] = {}
    for record in self.records:
      seen.update(dict.fromkeys(record))
    return list(seen)

  def series(self, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of the records that hold `name`; values as float64."""
    pairs = [(r["step"], r[name]) for r in self.records if name in r]
    steps = np.array([p[0] for p in pairs], dtype=np.int64)
    values = np.array([p[1] for p in pairs], dtype=np.float64)
    return steps, values

  def last(self, name: str) -> tuple[int, float] | None:
    for record in reversed(self.records):
      if name in record:
        return record["step"], record[name]
    return None


def _number(value: Any) -> float | None:
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    return None
  return float(value)


def read_metrics(workdir: str | pathlib.Path) -> RunLog:
  """Reads WORKDIR/metrics.jsonl; raises ReportError when there is no usable record."""
  workdir = storage.path(workdir)
  if not workdir.is_dir():
    raise ReportError(f"workdir {workdir} does not exist (or is not a directory)")
  path = workdir / METRICS_FILE
  if not path.is_file():
    raise ReportError(f"{path} does not exist: no training run has logged a step in {workdir}")
  records: list[dict[str, Any]] = []
  superseded = unreadable = 0
  with path.open("rb") as lines:  # Bytes: a damaged line must not end the whole report.
    for line in lines:
      if not line.strip():
        continue
      try:
        # Python's json reads NaN and Infinity, as progress writes them.
        raw = json.loads(line.decode("utf-8"))
      except ValueError:  # not UTF-8 or not JSON: e.g. the last line of a killed run
        unreadable += 1
        continue
      step = raw.get("step") if isinstance(raw, dict) else None
      if isinstance(step, bool) or not isinstance(step, (int, float)) or step != int(step):
        unreadable += 1
        continue
      record = {"step": int(step)}
      for name, value in raw.items():
        if name != "step" and (number := _number(value)) is not None:
          record[name] = number
      # A resumed run logs again from its checkpoint's step: what it logs replaces the
      # abandoned run's records from there on (the later record for a step wins).
      while records and records[-1]["step"] >= record["step"]:
        records.pop()
        superseded += 1
      records.append(record)
  if not records:
    raise ReportError(f"{path} holds no metrics records"
                      + (f" ({unreadable} unreadable lines)" if unreadable else "")
                      + ": the run has not logged a step yet")
  return RunLog(path, records, superseded, unreadable)


def read_config(workdir: str | pathlib.Path) -> tuple[dict[str, Any] | None, str | None]:
  """(WORKDIR/config.json as a dict or None, a note when it exists but cannot be read)."""
  path = storage.path(workdir) / CONFIG_FILE
  if not path.is_file():
    return None, None
  try:
    config = json.loads(path.read_text(encoding="utf-8"))
  except (ValueError, OSError) as error:
    return None, f"{CONFIG_FILE} could not be read: {error}"
  if not isinstance(config, dict):
    return None, f"{CONFIG_FILE} is not a JSON object"
  return config, None


def classify(names: Sequence[str]) -> dict[str, list[str]]:
  """Splits metric names into losses, norms, schedules and knn (bookkeeping left out)."""
  groups: dict[str, list[str]] = {"losses": [], "norms": [], "schedules": [], "knn": []}
  for name in names:
    if name in BOOKKEEPING:
      continue
    if name.startswith(KNN_PREFIX):
      groups["knn"].append(name)
    elif name in SCHEDULES:
      groups["schedules"].append(name)
    elif name == "grad_norm" or name.endswith("_norm"):
      groups["norms"].append(name)
    else:
      groups["losses"].append(name)
  # The total first, the terms after it in the order the run logs them.
  groups["losses"].sort(key=lambda name: name != "loss")
  groups["schedules"].sort(key=lambda name: name not in ("lr", "learning_rate"))
  return groups


def best_knn(log: RunLog, name: str) -> tuple[float, int] | None:
  """(best finite value, its first step) of a k-NN metric, or None if it has none."""
  steps, values = log.series(name)
  finite = np.isfinite(values)
  if not finite.any():
    return None
  index = int(np.argmax(np.where(finite, values, -np.inf)))
  return float(values[index]), int(steps[index])


# ---------------------------------------------------------------------------------------------
# Plots (matplotlib's Agg canvas directly: no pyplot, no display, no global figure registry).


def _figure(panels: int, *, columns: int = 3, width: float = 4.2, height: float = 2.8):
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

  columns = max(1, min(columns, panels))
  rows = math.ceil(panels / columns)
  figure = Figure(figsize=(width * columns, height * rows + 0.4), layout="constrained")
  FigureCanvasAgg(figure)
  axes = figure.subplots(rows, columns, squeeze=False).ravel()
  for ax in axes[panels:]:
    ax.set_visible(False)
  return figure, axes[:panels]


SMOOTH_ABOVE = 100  # more points than this: plot a running mean over the raw values


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
  """Centred running mean over `window` points, skipping non-finite values."""
  finite = np.isfinite(values)
  kernel = np.ones(max(1, window))
  total = np.convolve(np.where(finite, values, 0.0), kernel, mode="same")
  count = np.convolve(finite.astype(np.float64), kernel, mode="same")
  return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _draw(ax, steps: np.ndarray, values: np.ndarray, *, label: str, color: str,
          markers: bool | None = None, smooth: bool = True) -> int:
  """Plots one series; non-finite values break the line and are marked red on the x axis."""
  bad = ~np.isfinite(values)
  shown = np.where(bad, np.nan, values)
  if markers is None:
    markers = len(steps) <= 30
  if smooth and len(steps) > SMOOTH_ABOVE:  # noisy: the raw values faint, a centred running mean on top
    ax.plot(steps, shown, color=color, linewidth=0.6, alpha=0.3)
    ax.plot(steps, _smooth(values, len(steps) // 50), color=color, label=label, linewidth=1.4)
  else:
    ax.plot(steps, shown, color=color, label=label, linewidth=1.4,
            marker="o" if markers else None, markersize=3.5)
  if bad.any():
    ax.plot(steps[bad], np.zeros(int(bad.sum())), linestyle="none", marker="|", color="red",
            markersize=12, markeredgewidth=1.5, transform=ax.get_xaxis_transform(),
            clip_on=False, label=f"{label}: NaN/inf")
  return int(bad.sum())


def _style(ax, xlabel: str) -> None:
  from matplotlib.ticker import MaxNLocator  # pylint: disable=g-import-not-at-top

  ax.set_xlabel(xlabel)
  ax.xaxis.set_major_locator(MaxNLocator(integer=True))
  ax.grid(alpha=0.3)


def save_figure(figure, path: str | pathlib.Path) -> None:
  """`figure` as a PNG at `path`, local or in the cloud (matplotlib opens local files only)."""
  with storage.path(path).open("wb") as file:
    figure.savefig(file, format="png", dpi=100)


def _panels(path: pathlib.Path, log: RunLog, names: Sequence[str], title: str,
            *, columns: int = 3, smooth: bool = True) -> None:
  figure, axes = _figure(len(names), columns=columns)
  for i, (ax, name) in enumerate(zip(axes, names)):
    steps, values = log.series(name)
    bad = _draw(ax, steps, values, label=name, color=f"C{i % 10}", smooth=smooth)
    ax.set_title(name + (f"  ({bad} non-finite)" if bad else ""), fontsize=10)
    _style(ax, "step")
    if name in ("lr", "learning_rate"):
      ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
  figure.suptitle(title)
  save_figure(figure, path)


def _knn_plot(path: pathlib.Path, log: RunLog, names: Sequence[str], title: str) -> None:
  figure, (ax,) = _figure(1, width=7.0, height=4.2)
  for i, name in enumerate(names):
    steps, values = log.series(name)
    _draw(ax, steps, values, label=name, color=f"C{i % 10}", markers=True, smooth=False)
    best = best_knn(log, name)
    if best is not None and "top1" in name:
      ax.annotate(f"best {best[0]:.2f}", (best[1], best[0]), textcoords="offset points",
                  xytext=(0, 6), ha="center", fontsize=8, color=f"C{i % 10}")
  _style(ax, "step")
  ax.set_ylabel("accuracy (%)")
  ax.legend(fontsize=8)
  figure.suptitle(title)
  save_figure(figure, path)


# ---------------------------------------------------------------------------------------------
# Markdown.


def _format(value: Any) -> str:
  if isinstance(value, bool) or value is None:
    return str(value)
  if isinstance(value, (int, np.integer)):
    return str(int(value))
  if isinstance(value, (float, np.floating)):
    value = float(value)
    if math.isnan(value):
      return "NaN"
    if math.isinf(value):
      return "inf" if value > 0 else "-inf"
    return f"{value:.4g}"
  if isinstance(value, (dict, list, tuple)):
    return json.dumps(value, default=str)
  return str(value)


def _cell(value: Any) -> str:
  return _format(value).replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
  lines = ["| " + " | ".join(_cell(h) for h in header) + " |",
           "|" + "|".join("---" for _ in header) + "|"]
  lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
  return lines


def _flatten(mapping: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
  rows = []
  for key, value in mapping.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping):
      rows += _flatten(value, prefix=f"{name} / ")
    else:
      rows.append((name, value))
  return rows


def _get(config: Mapping[str, Any] | None, *keys: str) -> Any:
  value: Any = config
  for key in keys:
    if not isinstance(value, Mapping) or key not in value:
      return None
    value = value[key]
  return value


def config_summary(config: Mapping[str, Any] | None) -> list[tuple[str, str]]:
  """(field, text) rows: method, student, teacher, dataset, steps and batch of a config."""
  if not config:
    return []
  rows = []
  if (method := _get(config, "method")):
    rows.append(("method", str(method)))
  if (student := _get(config, "student", "name")):
    rows.append(("student", str(student)))
  teacher = _get(config, "teacher", "checkpoint")
  random_spec = _get(config, "teacher", "random_spec")
  if teacher:
    rows.append(("teacher", str(teacher)))
  elif isinstance(random_spec, Mapping):
    rows.append(("teacher", f"random {random_spec.get('architecture', '?')} (smoke run)"))
  elif _get(config, "teacher") is not None:
    rows.append(("teacher", "none"))
  if (dataset := _get(config, "data", "dataset")):
    split = _get(config, "data", "split")
    rows.append(("dataset", f"{dataset}" + (f" (split {split})" if split else "")))
  total_steps, epochs = _get(config, "total_steps"), _get(config, "epochs")
  if total_steps:
    rows.append(("configured length", f"{total_steps} steps"))
  elif epochs:
    rows.append(("configured length", f"{epochs} epochs"))
  if (batch := _get(config, "global_batch_size")):
    rows.append(("global batch", str(batch)))
  return rows


def _header(title: str, workdir: pathlib.Path) -> list[str]:
  import retro_jax  # pylint: disable=g-import-not-at-top

  stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
  return [f"# {title}", "",
          f"Workdir `{workdir}`; written {stamp} by retro_jax {retro_jax.__version__}.", ""]


def _link(name: str, path: pathlib.Path, workdir: pathlib.Path) -> str:
  return f"![{name}]({path.relative_to(workdir).as_posix()})"


def write_report(workdir: str | pathlib.Path, *, title: str | None = None,
                 extra: Mapping[str, Any] | None = None) -> pathlib.Path:
  """Writes WORKDIR/report.md and WORKDIR/plots/*.png for a training run; returns report.md.

  Args:
    workdir: the run's workdir (metrics.jsonl, optionally config.json).
    title: the report's heading (default: "Run report: <workdir name>").
    extra: more results to show as a table (e.g. an evaluation's {"linear top-1": 83.1});
      nested dicts become "outer / inner" rows.

  Raises:
    ReportError: no workdir, no metrics.jsonl, or no readable record in it.
  """
  workdir = storage.path(workdir)
  log = read_metrics(workdir)
  config, config_note = read_config(workdir)
  groups = classify(log.names)
  plots = workdir / PLOTS_DIR
  plots.mkdir(exist_ok=True)
  notes = [config_note] if config_note else []

  last = log.records[-1]
  title = title or f"Run report: {workdir.name}"
  lines = _header(title, workdir)

  # The run.
  steps_text = f"{last['step']}"
  if "epoch" in last:
    steps_text += f" (epoch {_format(last['epoch'])})"
  rows = config_summary(config) + [("last logged step", steps_text),
                                   ("logged records", str(len(log.records)))]
  _, rates = log.series("images_per_second")
  rates = rates[np.isfinite(rates)]
  if len(rates):
    rows.append(("throughput", f"{np.median(rates):.1f} img/s (median of {len(rates)} "
                               f"logging intervals)"))
  else:
    rows.append(("throughput", "not measured (needs two logged steps in one run)"))
  skipped = log.last("skipped_examples")
  if skipped is not None and skipped[1]:
    rows.append(("skipped examples", f"{skipped[1]:.0f} (undecodable images)"))
  lines += ["## Run", ""] + _table(["", ""], rows) + [""]

  # Final values.
  ordered = groups["losses"] + groups["norms"] + groups["schedules"] + groups["knn"]
  if ordered:
    final_rows = [(name, *reversed(log.last(name))) for name in ordered]
    lines += ["## Final values", ""] + _table(["metric", "value", "step"], final_rows) + [""]

  # k-NN.
  lines += ["## k-NN accuracy", ""]
  if groups["knn"]:
    best_rows = []
    for name in groups["knn"]:
      best = best_knn(log, name)
      final = log.last(name)
      best_rows.append((name, *(best if best else ("no finite value", "")), final[1]))
    headline = next((row for row in best_rows if "top1" in row[0]), best_rows[0])
    if isinstance(headline[1], float):
      lines += [f"Best {headline[0]}: **{headline[1]:.2f} %** at step {headline[2]}.", ""]
    lines += _table(["metric", "best (%)", "at step", "final (%)"], best_rows) + [""]
  else:
    lines += ["No k-NN accuracies were logged (the monitor is off, or has not run yet).", ""]

  if extra:
    lines += ["## Results", ""] + _table(["result", "value"], _flatten(extra)) + [""]

  # Plots.
  lines += ["## Plots", ""]
  run_name = workdir.name
  for filename, names, what in (
      ("losses.png", groups["losses"] + groups["norms"], "loss terms"),
      ("schedules.png", groups["schedules"], "schedules"),
      ("knn.png", groups["knn"], "k-NN accuracies")):
    path = plots / filename
    if not names:
      path.unlink(missing_ok=True)  # a stale plot of an earlier report
      lines += [f"No {what} were logged: no {filename}.", ""]
      continue
    if filename == "knn.png":
      _knn_plot(path, log, names, f"{run_name}: {what}")
    elif filename == "schedules.png":
      _panels(path, log, names, f"{run_name}: {what}", columns=2, smooth=False)
    else:  # the terms and the diagnostics the objective logs (accuracy, similarities, ...)
      _panels(path, log, names, f"{run_name}: loss terms and diagnostics")
    lines += [_link(what, path, workdir), ""]

  # Notes.
  for name in ordered:
    _, values = log.series(name)
    if (bad := int((~np.isfinite(values)).sum())):
      steps, _ = log.series(name)
      first = int(steps[~np.isfinite(values)][0])
      notes.append(f"{name} is NaN or infinite at {bad} logged step(s), first at step {first}.")
  if log.superseded:
    notes.append(f"{log.superseded} record(s) replaced by a resumed run's (the later record "
                 "for a step wins).")
  if log.unreadable:
    notes.append(f"{log.unreadable} line(s) of {METRICS_FILE} could not be read and were "
                 "skipped.")
  if notes:
    lines += ["## Notes", ""] + [f"- {note}" for note in notes] + [""]

  report = workdir / REPORT_FILE
  report.write_text("\n".join(lines), encoding="utf-8")
  return report


# ---------------------------------------------------------------------------------------------
# Evaluation-only runs.


def _is_curve(value: Any) -> bool:
  return isinstance(value, (list, tuple, np.ndarray)) and len(value) > 0 and all(
      _number(v) is not None for v in np.asarray(value, dtype=object).ravel())


def write_results_report(workdir: str | pathlib.Path, title: str,
                         results: Mapping[str, Mapping[str, Any]] | Sequence[Mapping[str, Any]],
                         *, curve_x: str = "epoch") -> pathlib.Path:
  """Writes WORKDIR/report.md for an evaluation run: a results table, and curves if any.

  Args:
    workdir: where report.md (and plots/results.png) go; created if missing.
    title: the report's heading.
    results: {row name: {column: value}} (e.g. {"linear probe": {"top-1": 71.2, "top-5":
      90.1}}) or a list of row dicts (columns: the union of their keys). A value that is a
      list of numbers (e.g. "train_loss": [2.3, 1.9, ...], one per epoch) is a curve: it is
      plotted against `curve_x` (1, 2, ...) in plots/results.png instead of tabulated.
    curve_x: the curves' x-axis label.

  Raises:
    ReportError: no results.
  """
  workdir = storage.path(workdir)
  if isinstance(results, Mapping):
    rows = [{"name": name, **dict(row)} for name, row in results.items()]
  else:
    rows = [dict(row) for row in results]
  if not rows:
    raise ReportError("no results to report")
  curves: dict[str, np.ndarray] = {}
  table_rows = []
  for i, row in enumerate(rows):
    label = str(row.get("name", i + 1))
    kept = {}
    for key, value in row.items():
      if _is_curve(value):
        curves[f"{label}: {key}" if len(rows) > 1 else str(key)] = np.asarray(
            value, dtype=np.float64).ravel()
      else:
        kept[key] = value
    table_rows.append(kept)
  columns = list(dict.fromkeys(key for row in table_rows for key in row))

  workdir.mkdir(parents=True, exist_ok=True)
  lines = _header(title, workdir)
  config, config_note = read_config(workdir)
  if (summary := config_summary(config)):
    lines += ["## Run", ""] + _table(["", ""], summary) + [""]
  lines += ["## Results", ""]
  lines += _table(columns, [[row.get(c, "") for c in columns] for row in table_rows]) + [""]
  plot = workdir / PLOTS_DIR / "results.png"
  if curves:
    plot.parent.mkdir(exist_ok=True)
    figure, axes = _figure(len(curves), columns=2)
    for i, (ax, (name, values)) in enumerate(zip(axes, curves.items())):
      bad = _draw(ax, np.arange(1, len(values) + 1), values, label=name, color=f"C{i % 10}")
      ax.set_title(name + (f"  ({bad} non-finite)" if bad else ""), fontsize=10)
      _style(ax, curve_x)
    figure.suptitle(title)
    save_figure(figure, plot)
    lines += ["## Curves", "", _link("curves", plot, workdir), ""]
  else:
    plot.unlink(missing_ok=True)
  if config_note:
    lines += ["## Notes", "", f"- {config_note}", ""]
  report = workdir / REPORT_FILE
  report.write_text("\n".join(lines), encoding="utf-8")
  return report


# ---------------------------------------------------------------------------------------------
# Command line.


@user_errors.boundary
def main(argv: list[str] | None = None, prog: str = "python -m retro_jax.report") -> int:
  parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog="\n\n".join(__doc__.split("\n\n")[1:]))
  parser.add_argument("--workdir", required=True, type=storage.argument,
                      help="a training run's workdir (holds metrics.jsonl)")
  parser.add_argument("--title", default=None, help="the report's heading")
  user_errors.add_debug_flag(parser)
  args = parser.parse_args(argv)
  if args.workdir.exists():  # A missing one is named by read_metrics.
    output_paths.check_directory(args.workdir, "--workdir")
  report = write_report(args.workdir, title=args.title)
  print(f"wrote {report} (plots in {report.parent / PLOTS_DIR})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
