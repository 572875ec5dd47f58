"""The run's record: which config changes a resume may make, what is written, and the
teacher's content fingerprint. No training here (tests/reliability/test_resume_drills.py
drives the same checks through the CLI)."""

from __future__ import annotations

import json
import pathlib
import shutil

import pytest

from retro_jax import checkpoint
from retro_jax import main as main_lib
from retro_jax import study
from retro_jax.train import run_record

import tiny_retro

QUICKSTART = pathlib.Path(__file__).parents[2] / "configs" / "quickstart.py"


def changed(config, **values):
  """A copy of `config` with dotted keys set (`optimizer__lr=3.0` sets optimizer.lr)."""
  config = config.copy_and_resolve_references()
  for key, value in values.items():
    *parents, name = key.split("__")
    node = config
    for parent in parents:
      node = node[parent]
    node[name] = value
  return config


@pytest.fixture(scope="module")
def config():
  return tiny_retro.get_config()


def test_exempt_keys_change_freely_and_are_reported(config):
  record = run_record.checkpoint_fields(config)
  new = changed(config, log_every_steps=7, checkpoint_every_steps=9, keep_checkpoints=5,
                checkpoint_every_minutes=30.0, monitor__every_steps=0,
                data__data_dir="/elsewhere", teacher__checkpoint="/teachers/t")
  changes = run_record.changes_on_resume(new, record, allow=False, step=3)
  assert changes["log_every_steps"] == {"from": 1, "to": 7}
  assert changes["monitor.every_steps"] == {"from": 2, "to": 0}
  assert changes["teacher.checkpoint"] == {"from": "", "to": "/teachers/t"}
  assert changes["checkpoint_every_minutes"] == {"from": 0.0, "to": 30.0}
  assert len(changes) == 7
  assert run_record.config_hash(run_record.flatten(new)) == record["config_hash"]


def test_training_keys_are_refused_by_name_unless_allowed(config):
  record = run_record.checkpoint_fields(config)
  new = changed(config, optimizer__lr=3.0, total_steps=8, log_every_steps=7)
  with pytest.raises(run_record.ConfigChangeError) as refused:
    run_record.changes_on_resume(new, record, allow=False, step=3)
  message = str(refused.value)
  assert ("differs from the one checkpoint 3 was trained with in 2 training-relevant keys: "
          "optimizer.lr: 0.03 -> 3.0; total_steps: 4 -> 8.") in message
  assert "log_every_steps" not in message and "--allow_config_change" in message
  changes = run_record.changes_on_resume(new, record, allow=True, step=3)
  assert set(changes) == {"optimizer.lr", "total_steps", "log_every_steps"}
  assert run_record.config_hash(run_record.flatten(new)) != record["config_hash"]


def test_a_key_only_one_side_has_is_a_change(config):
  old = run_record.flatten(config)
  new = dict(old, **{"student.kwargs.drop_path_rate": 0.1})
  del new["seed"]
  assert run_record.differences(old, new) == {
      "seed": {"from": 0, "to": None},
      "student.kwargs.drop_path_rate": {"from": None, "to": 0.1}}


def test_keys_added_later_hold_their_default_in_older_records(config):
  # A checkpoint written before student.dtype and checkpoint_every_minutes existed.
  old = {k: v for k, v in run_record.flatten(config).items()
         if k not in ("student.dtype", "checkpoint_every_minutes")}
  assert run_record.changes_on_resume(config, {"config": old}, allow=False, step=3) == {}
  half = changed(config, student__dtype="bfloat16")
  with pytest.raises(run_record.ConfigChangeError, match="student.dtype: None -> 'bfloat16'"):
    run_record.changes_on_resume(half, {"config": old}, allow=False, step=3)


def test_first_start_then_resumes_make_one_record(config, workdir):
  assert run_record.recorded_config(workdir) is None
  path = run_record.write_first(workdir, config)
  assert path.read_text() == config.to_json_best_effort(indent=2, sort_keys=True) + "\n"
  run_record.append_changes(workdir, {}, step=4)
  run_record.append_changes(workdir, {"optimizer.lr": {"from": 0.03, "to": 0.01}}, step=6)
  lines = [json.loads(line) for line in (workdir / run_record.CHANGES_JSONL).open()]
  assert [(line["step"], line["changes"]) for line in lines] == [
      (4, {}), (6, {"optimizer.lr": {"from": 0.03, "to": 0.01}})]
  recorded = run_record.recorded_config(workdir)
  assert recorded == dict(run_record.flatten(config), **{"optimizer.lr": 0.01})
  # A start from step 0 again (no checkpoint was saved) is a new record.
  run_record.write_first(workdir, changed(config, seed=3))
  assert not (workdir / run_record.CHANGES_JSONL).exists()
  assert run_record.recorded_config(workdir)["seed"] == 3


def test_an_unreadable_record_is_one_clear_error(config, workdir):
  run_record.write_first(workdir, config)
  (workdir / run_record.CHANGES_JSONL).write_text('{"step": 4, "changes": {"a": {"from"\n')
  with pytest.raises(run_record.ConfigChangeError, match=rf"the run's record in {workdir} "
                     r"\(config.json, config_changes.jsonl\) cannot be read \(JSONDecodeError"):
    run_record.recorded_config(workdir)


def test_a_checkpoint_without_a_config_record_is_not_checked(config, workdir, capsys):
  assert run_record.changes_on_resume(config, {"step": 5}, allow=False, step=5) is None
  assert "checkpoint 5 records no config" in capsys.readouterr().out
  resume = run_record.ResumeRecord(config, allow_change=False)
  resume.check(5, {"step": 5})
  resume.write(workdir, 5)
  (entry,) = [json.loads(line) for line in (workdir / run_record.CHANGES_JSONL).open()]
  assert entry["step"] == 5 and entry["changes"] == {} and "changes unknown" in entry["note"]


def test_study_rerun_refuses_a_changed_arm_and_records_an_allowed_one(workdir):
  argv = ["prog", "--config", str(QUICKSTART), "--workdir", str(workdir)]
  values = main_lib._flag_values(argv)  # pylint: disable=protected-access
  values(argv)
  config = values.config
  assert study._check_rerun(config, workdir, allow_config_change=False) is None  # pylint: disable=protected-access
  run_record.write_first(workdir, config)
  arm = next(iter(config.students))
  other = config.copy_and_resolve_references()
  other.students[arm].optimizer.lr = 1.0
  other.students[arm].log_every_steps = 3
  with pytest.raises(run_record.ConfigChangeError,
                     match=rf"1 training-relevant key: students\.{arm}\.optimizer\.lr: "):
    study._check_rerun(other, workdir, allow_config_change=False)  # pylint: disable=protected-access
  changes = study._check_rerun(other, workdir, allow_config_change=True)  # pylint: disable=protected-access
  assert set(changes) == {f"students.{arm}.optimizer.lr", f"students.{arm}.log_every_steps"}


def test_allow_config_change_is_a_flag_in_both_spellings():
  for spelling in ("--allow_config_change", "--allow-config-change"):
    argv = ["prog", "--config", str(QUICKSTART), "--workdir", "/tmp/unused", spelling]
    values = main_lib._flag_values(argv)  # pylint: disable=protected-access
    values(argv)
    assert values.allow_config_change


def test_content_digest_sees_other_bytes_at_the_same_path(tmp_path):
  model = tmp_path / "teacher"
  (model / "state" / "d").mkdir(parents=True)
  (model / "model.json").write_text('{"format": "retro_jax.model"}')
  weights = model / "state" / "d" / "0"
  weights.write_bytes(bytes(range(256)) * 64)
  digest = checkpoint.content_digest(model)
  assert checkpoint.content_digest(shutil.copytree(model, tmp_path / "copy")) == digest
  weights.write_bytes(bytes(reversed(range(256))) * 64)  # same size, same name
  assert checkpoint.content_digest(model) != digest
  weights.write_bytes(bytes(range(256)) * 64)
  assert checkpoint.content_digest(model) == digest
  weights.rename(weights.with_name("1"))
  assert checkpoint.content_digest(model) != digest
