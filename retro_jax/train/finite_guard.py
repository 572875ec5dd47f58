"""Stops a run whose numbers stop being finite, before a checkpoint of them is written.

The training loop fetches a step's metrics from the device only at log steps and checkpoint
steps (fetching every step would make the host wait for the accelerator every step); the
guard checks them there. What it guarantees:

  * a non-finite loss, loss term, gradient norm or other step metric is detected at the
    latest at the next log step or checkpoint step after the step that produced it;
  * before every checkpoint, the final one included, the whole training state (parameters,
    optimiser moments, batch statistics, queues) is checked on the device (one reduction and
    one boolean fetched), so no checkpoint ever holds a NaN or inf, even when an update
    overflows while the loss that produced it was still finite.

The run then stops with `NonFiniteError`: the step it was detected at, the previous check,
every loss term, the learning rate and weight decay, and the last good checkpoint (exit 1).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from retro_jax.user_errors import UserError


class NonFiniteError(UserError, RuntimeError):
  """The run's loss, gradient norm or state became NaN or infinite."""


def all_finite(tree: Any) -> jax.Array:
  """Whether every floating-point value of `tree` is finite (a scalar bool array)."""
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else (
      jnp.bool_(True))


class FiniteGuard:
  """Checks a run's fetched metrics and, before each save, its state.

  Args:
    schedules: {name: f(update count)} of the optimiser (learning rate, weight decay).
    last_checkpoint: returns the newest saved step (None: none), for the message.
    start_step: the step the run starts (or resumes) from.
  """

  def __init__(self, schedules: dict[str, Callable[[int], Any]],
               last_checkpoint: Callable[[], int | None], *, start_step: int):
    self._schedules = schedules
    self._last_checkpoint = last_checkpoint
    self._checked = start_step
    self._all_finite = jax.jit(all_finite)

  def check_metrics(self, step: int, metrics: dict[str, Any]) -> None:
    """Raises NonFiniteError if a metric (host values) of finished step `step` is not finite."""
    bad = sorted(name for name, value in metrics.items() if not math.isfinite(float(value)))
    if bad:
      raise self._error(step, metrics, f"{', '.join(bad)} {'is' if len(bad) == 1 else 'are'} "
                        "not finite")
    self._checked = step

  def check_state(self, step: int, state: Any, metrics: dict[str, Any]) -> None:
    """Raises NonFiniteError if the state after step `step` holds a NaN or inf."""
    if not bool(self._all_finite(state)):
      raise self._error(step, metrics, "the training state (parameters or optimiser state) "
                        "holds NaN or inf")

  def _error(self, step: int, metrics: dict[str, Any], what: str) -> NonFiniteError:
    since = (f"steps {self._checked + 1}-{step}" if step > self._checked + 1
             else f"step {step}")
    terms = ", ".join(f"{name} {float(value):.4g}" for name, value in sorted(metrics.items()))
    rates = ", ".join(f"{name} {float(fn(step - 1)):.4g}"
                      for name, fn in sorted(self._schedules.items()))
    last = self._last_checkpoint()
    kept = ("no checkpoint was written" if last is None else
            f"the last good checkpoint is step {last}: rerun with the changed values and "
            "--allow_config_change to resume from it, or start over in a new --workdir")
    return NonFiniteError(
        f"training diverged at step {step}: {what} (it happened in {since}; metrics are "
        f"checked at log and checkpoint steps). Step {step}: {terms}; {rates}. This state was "
        f"not saved; {kept}. Usual causes: a learning rate too high for this model and batch "
        "(--config.optimizer.lr), or a teacher or data with non-finite values")
