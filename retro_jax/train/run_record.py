"""The record of a run's config: what each start ran with, and which changes a resume may make.

A run's workdir keeps

  config.json           the resolved config of the run's first start (the file `report` reads);
  config_changes.jsonl  one line per later start: the step it resumed from and every key whose
                        value differs from the config the resumed checkpoint was trained with
                        ({"key": {"from": old, "to": new}}, empty when nothing changed).

Both are written only after every check of the start passed (`write_first`, `append_changes`),
so a refused or failed start leaves the record as it was. Each checkpoint stores the config it
was trained with and the SHA-256 of its training-relevant part (`checkpoint_fields`); a resume
compares the new config against the checkpoint it resumes (`changes_on_resume`).

Training-relevant is every key except the exempt ones (EXEMPT_NAMES, EXEMPT_SUFFIXES): how
often the run logs, saves and monitors, how many checkpoints it keeps, where its data lives,
a study's title, and the teacher's directory (checked on its own, by path and content, in the
teacher identity). A resume may change exempt keys (the change is recorded); any other change
is refused, naming the keys, unless `--allow_config_change` is given, and then recorded. The
run's length (`total_steps`, `epochs`) is training-relevant on purpose: the learning-rate and
weight-decay schedules are laid out over it, so a longer run continues on the longer run's
curve (a cosine's learning rate jumps back up at the resume step). Extending a run is one
flag away, and the record says from which step the new length holds.
"""

from __future__ import annotations

import datetime
import hashlib
import json
from typing import Any

import ml_collections

from retro_jax import storage
from retro_jax.user_errors import UserError

CONFIG_JSON = "config.json"
CHANGES_JSONL = "config_changes.jsonl"

# Key names (any component of a dotted key) and dotted suffixes that do not change the numbers
# a run computes; see the module docstring.
EXEMPT_NAMES = frozenset({"log_every_steps", "checkpoint_every_steps",
                          "checkpoint_every_minutes", "keep_checkpoints", "monitor", "data_dir",
                          "title"})
# Keys added to the configs after runs recorded theirs, with the value that does what those
# runs did: a record without the key (dotted suffix) holds that value, not a change.
ADDED_DEFAULTS = {"student.dtype": "float32", "checkpoint_every_minutes": 0.0}
EXEMPT_SUFFIXES = ("teacher.checkpoint",)


class ConfigChangeError(UserError, ValueError):
  """A resume refused on the config: a training-relevant change, or a record that cannot be
  read to compare with."""


def config_text(config: ml_collections.ConfigDict) -> str:
  """The resolved config as config.json holds it (and as the CLI prints it)."""
  return config.to_json_best_effort(indent=2, sort_keys=True)


def flatten(config: ml_collections.ConfigDict | dict[str, Any]) -> dict[str, Any]:
  """{dotted key: JSON value} of a config; lists (views, means) are one value each."""
  tree = json.loads(config_text(config) if isinstance(config, ml_collections.ConfigDict)
                    else json.dumps(config))
  flat: dict[str, Any] = {}

  def walk(prefix: str, node: Any) -> None:
    if isinstance(node, dict) and node:
      for name, value in node.items():
        walk(f"{prefix}.{name}" if prefix else name, value)
    else:
      flat[prefix] = node

  walk("", tree)
  return flat


def is_exempt(key: str) -> bool:
  return (any(part in EXEMPT_NAMES for part in key.split("."))
          or any(key == s or key.endswith("." + s) for s in EXEMPT_SUFFIXES))


def config_hash(flat: dict[str, Any]) -> str:
  """SHA-256 of the training-relevant part of a flattened config."""
  relevant = {k: v for k, v in flat.items() if not is_exempt(k)}
  return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()


def checkpoint_fields(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """What every checkpoint record carries about the config it was trained with."""
  flat = flatten(config)
  return {"config_hash": config_hash(flat), "config": flat}


def _added_default(key: str) -> Any:
  for suffix, value in ADDED_DEFAULTS.items():
    if key == suffix or key.endswith("." + suffix):
      return value
  return None


def differences(old: dict[str, Any], new: dict[str, Any]) -> dict[str, dict[str, Any]]:
  """{key: {"from": old value, "to": new value}} for every key that differs (None: absent;
  an ADDED_DEFAULTS key absent on one side and at its default on the other does not)."""
  def value(flat: dict[str, Any], key: str) -> Any:
    return flat[key] if key in flat else _added_default(key)

  return {key: {"from": old.get(key), "to": new.get(key)} for key in sorted(set(old) | set(new))
          if value(old, key) != value(new, key)}


def check_changes(changes: dict[str, dict[str, Any]], *, allow: bool, against: str) -> None:
  """Refuses training-relevant `changes` unless `allow`; `against` names the recorded side."""
  relevant = [key for key in changes if not is_exempt(key)]
  if relevant and not allow:
    listed = "; ".join(f"{key}: {changes[key]['from']!r} -> {changes[key]['to']!r}"
                       for key in relevant)
    raise ConfigChangeError(
        f"this config differs from {against} in {len(relevant)} training-relevant "
        f"key{'s' if len(relevant) > 1 else ''}: {listed}. Rerun with the recorded values, use "
        "a new --workdir, or pass --allow_config_change to continue with the new values "
        f"(recorded in {CHANGES_JSONL})")


def changes_on_resume(config: ml_collections.ConfigDict, record: dict[str, Any], *,
                      allow: bool, step: int) -> dict[str, dict[str, Any]] | None:
  """The changes of `config` against a checkpoint record (`checkpoint_fields`), refused unless
  exempt or `allow`; None when the record predates config records (nothing to compare)."""
  if "config" not in record:
    print(f"config: checkpoint {step} records no config (written by an older retro_jax); "
          "the config of this resume is not checked against it", flush=True)
    return None
  changes = differences(record["config"], flatten(config))
  check_changes(changes, allow=allow, against=f"the one checkpoint {step} was trained with")
  return changes


class ResumeRecord:
  """The config side of a training run's resume, and the record of the start it leads to.

  `check(step, record)` is the per-checkpoint check `TrainCheckpoints.restore_newest` calls
  (refuses a changed config, remembers the changes); `write(workdir, start_step)`, once every
  other check has passed too, records the start (process 0 only, the caller's business).
  """

  def __init__(self, config: ml_collections.ConfigDict, *, allow_change: bool):
    self.config = config
    self.allow_change = allow_change
    self._changes: dict[int, dict[str, dict[str, Any]] | None] = {}

  def check(self, step: int, record: dict[str, Any]) -> None:
    self._changes[step] = changes_on_resume(self.config, record, allow=self.allow_change,
                                            step=step)

  def write(self, workdir: storage.Path, start_step: int) -> storage.Path:
    if start_step == 0:
      return write_first(workdir, self.config)
    return append_changes(workdir, self._changes.get(start_step), step=start_step)


def recorded_config(workdir: storage.Path) -> dict[str, Any] | None:
  """The flattened config of the last start recorded in `workdir` (config.json with every
  change of config_changes.jsonl applied), or None when there is no config.json."""
  path = storage.path(workdir) / CONFIG_JSON
  if not path.is_file():
    return None
  changes = storage.path(workdir) / CHANGES_JSONL
  try:
    flat = flatten(json.loads(path.read_text(encoding="utf-8")))
    for line in changes.read_text(encoding="utf-8").splitlines() if changes.is_file() else ():
      for key, change in json.loads(line)["changes"].items():
        flat[key] = change["to"]
  except (ValueError, KeyError, TypeError, AttributeError) as error:  # not the JSON we wrote
    raise ConfigChangeError(f"the run's record in {workdir} ({CONFIG_JSON}, {CHANGES_JSONL}) "
                            f"cannot be read ({type(error).__name__}: {error}); restore it "
                            "from a backup, or use a new --workdir") from None
  return flat


def write_first(workdir: storage.Path, config: ml_collections.ConfigDict) -> storage.Path:
  """Records a first start (nothing to resume) that passed every check: config.json, and no
  change log of an earlier start that never saved a checkpoint."""
  workdir = storage.path(workdir)
  (workdir / CHANGES_JSONL).unlink(missing_ok=True)
  (workdir / CONFIG_JSON).write_text(config_text(config) + "\n")
  return workdir / CONFIG_JSON


def append_changes(workdir: storage.Path, changes: dict[str, dict[str, Any]] | None, *,
                   step: int | None) -> storage.Path:
  """Records a later start that passed every check: its `changes` (None: unknown) and the
  `step` they take effect from (None: a study, which has no step of its own)."""
  entry: dict[str, Any] = {} if step is None else {"step": step}
  entry["time"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
  entry["changes"] = changes if changes is not None else {}
  if changes is None:
    entry["note"] = "the resumed checkpoint records no config: changes unknown"
  path = storage.path(workdir) / CHANGES_JSONL
  with path.open("a", encoding="utf-8") as log:
    log.write(json.dumps(entry) + "\n")
  return path
