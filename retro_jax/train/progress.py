"""What a run tells its user: progress lines, a JSONL log and TensorBoard scalars.

Every `every` steps (and at the last step): one line on stdout with the step, epoch,
images per second, time left and the loss terms; the same numbers, plus the learning rate
and weight decay, appended to WORKDIR/metrics.jsonl and written to WORKDIR/tensorboard.
Metrics are fetched from the device only on those steps, so the host never waits on the
accelerator in between.
"""

from __future__ import annotations

import datetime
import json
import time
from collections.abc import Callable
from typing import Any

import jax

from retro_jax import storage
from retro_jax.data.tf_runtime import import_tensorflow


class Progress:
  """Logs a run's metrics; `update` after every step, `close` at the end."""

  def __init__(self, workdir: storage.Path, *, total_steps: int, steps_per_epoch: int,
               global_batch: int, every: int, schedules: dict[str, Callable[[int], Any]]):
    self.total_steps = total_steps
    self.steps_per_epoch = steps_per_epoch
    self.global_batch = global_batch
    self.every = max(1, every)
    self.schedules = schedules
    # One voice per run: process 0 logs; the others compute the same numbers silently.
    self.active = jax.process_index() == 0
    if not self.active:
      return
    workdir = storage.path(workdir)
    self._jsonl = (workdir / "metrics.jsonl").open("a", encoding="utf-8")
    tf = import_tensorflow()
    # Written locally and uploaded on each flush when the workdir is not local: TensorFlow's
    # writer knows gs:// but not s3://, az:// or hf://.
    self._tensorboard = storage.LocalMirror(workdir / "tensorboard")
    self._writer = tf.summary.create_file_writer(str(self._tensorboard.local))
    self._tf = tf
    self._last_time = None
    self._last_step = None

  def due(self, step: int) -> bool:
    """Whether finished step `step` is logged (every `every` steps and the last one)."""
    return not step % self.every or step == self.total_steps

  def update(self, step: int, metrics: dict[str, jax.Array], *, skipped: int = 0) -> None:
    """Records the metrics of the step that just finished (`step` counts finished steps)."""
    if not self.active or not self.due(step):
      return
    values = {name: float(value) for name, value in jax.device_get(metrics).items()}
    now = time.perf_counter()
    rate = None
    if self._last_time is not None and step > self._last_step:
      rate = (step - self._last_step) * self.global_batch / (now - self._last_time)
    self._last_time, self._last_step = now, step
    # The optimiser's count is the number of updates before this one.
    values.update({name: float(fn(step - 1)) for name, fn in self.schedules.items()})
    epoch = step / self.steps_per_epoch
    record = {"step": step, "epoch": round(epoch, 4), "skipped_examples": skipped, **values}
    if rate is not None:
      record["images_per_second"] = rate
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    with self._writer.as_default(step=step):
      for name, value in record.items():
        if name != "step":
          self._tf.summary.scalar(name, value)
    self._writer.flush()
    self._tensorboard.sync()
    print(self._line(step, epoch, rate, values, skipped), flush=True)

  def _line(self, step, epoch, rate, values, skipped) -> str:
    parts = [f"step {step}/{self.total_steps}", f"epoch {epoch:.2f}"]
    if rate is not None:
      eta = datetime.timedelta(seconds=round((self.total_steps - step) * self.global_batch
                                             / rate))
      parts += [f"{rate:.1f} img/s", f"ETA {eta}"]
    parts += [f"{name} {value:.4g}" for name, value in sorted(values.items())]
    if skipped:
      parts.append(f"skipped {skipped} bad examples")
    return " | ".join(parts)

  def close(self) -> None:
    if not self.active:
      return
    self._jsonl.close()
    self._writer.close()
    self._tensorboard.close()
