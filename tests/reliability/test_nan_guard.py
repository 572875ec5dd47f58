"""The NaN/inf guard: which values stop a run, and what the message says. A real diverging
run through the CLI is in tests/reliability/test_resume_drills.py."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from retro_jax.train.finite_guard import FiniteGuard
from retro_jax.train.finite_guard import NonFiniteError
from retro_jax.train.finite_guard import all_finite

SCHEDULES = {"lr": lambda count: 0.1 * (count + 1), "weight_decay": lambda count: 1e-4}


def metrics(**values):
  base = {"loss": 2.5, "info_nce": 2.0, "grad_norm": 10.0}
  return {name: np.float32(value) for name, value in dict(base, **values).items()}


def test_finite_metrics_pass_and_the_first_non_finite_one_stops_the_run():
  guard = FiniteGuard(SCHEDULES, lambda: 4, start_step=0)
  guard.check_metrics(2, metrics())
  with pytest.raises(NonFiniteError) as stopped:
    guard.check_metrics(5, metrics(loss=np.nan, grad_norm=np.inf))
  message = str(stopped.value)
  assert message.startswith("training diverged at step 5: grad_norm, loss are not finite "
                            "(it happened in steps 3-5; ")
  assert "Step 5: grad_norm inf, info_nce 2, loss nan; lr 0.5, weight_decay 0.0001." in message
  assert "the last good checkpoint is step 4: rerun with the changed values and " in message
  assert "--allow_config_change" in message and "\n" not in message


def test_a_run_without_checkpoints_says_so():
  guard = FiniteGuard(SCHEDULES, lambda: None, start_step=6)
  with pytest.raises(NonFiniteError, match=r"at step 7: info_nce is not finite \(it happened "
                     r"in step 7; .*This state was not saved; no checkpoint was written\."):
    guard.check_metrics(7, metrics(info_nce=-np.inf))


def test_the_state_is_checked_before_a_save():
  guard = FiniteGuard(SCHEDULES, lambda: 2, start_step=2)
  state = {"step": jnp.int32(3), "rng": jnp.zeros(2, jnp.uint32),
           "params": {"w": jnp.ones((4, 3)), "b": jnp.zeros(3, jnp.bfloat16)}}
  guard.check_state(3, state, metrics())
  state["params"]["w"] = state["params"]["w"].at[2, 1].set(jnp.inf)
  with pytest.raises(NonFiniteError, match=r"at step 3: the training state \(parameters or "
                     r"optimiser state\) holds NaN or inf .*last good checkpoint is step 2"):
    guard.check_state(3, state, metrics())


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_all_finite_reads_every_floating_leaf(dtype):
  tree = {"a": jnp.ones(3, dtype), "n": jnp.arange(3), "b": [jnp.zeros((2, 2), dtype)]}
  assert bool(all_finite(tree))
  tree["b"][0] = tree["b"][0].at[1, 1].set(jnp.nan)
  assert not bool(all_finite(tree))
  assert bool(all_finite({"n": jnp.arange(3)}))  # nothing to check
