"""Tensors that wait: torch's `p.grad = None` for the first steps of a run, in optax.

DINO's `utils.cancel_gradients_last_layer` sets `p.grad = None` on the head's last layer
during the first `freeze_last_layer` epochs. A torch optimiser skips such a tensor entirely:
no weight decay, no moment (or momentum) update, and its per-parameter `state['step']` does
not advance, so when it starts training its Adam bias correction starts at step 1 while the
other tensors are at step N. A zeroed gradient is not the same in optax: AdamW would still
decay the tensor, shrink its moments and bias-correct with the shared count.

`freeze_early(make_tx, freeze)` reproduces torch. The tensors `freeze.mask` selects get their
own copy of the optimiser (`optax.partition`), which stands still for the first `freeze.steps`
updates (zero updates, state exactly as initialised: torch's not-yet-created per-parameter
state) and then runs with its own count from 0. The learning-rate and weight-decay schedules
must still follow the global step (torch sets every group's lr each iteration), so that copy
is built by `make_tx(freeze.steps)`: a transformation whose schedules are read
`freeze.steps` steps past its own count. Gradient clipping goes before `freeze_early`, as DINO
clips before it cancels: a waiting tensor's gradient still counts in a global norm.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


@dataclasses.dataclass(frozen=True)
class EarlyFreeze:
  """Tensors that get no update during the first `steps` optimiser updates.

  Attributes:
    mask: params (or updates) -> a pytree of bools of the same structure; True selects a
      tensor that waits. It must select at least one tensor.
    steps: the number of updates it waits (DINO: freeze_last_layer * steps per epoch), >= 1.
  """
  mask: Callable[[Any], Any]
  steps: int

  def __post_init__(self):
    if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
      raise ValueError(f"EarlyFreeze.steps must be a positive int, got {self.steps!r}")


class WaitState(NamedTuple):
  count: jax.Array  # updates seen, saturating at the number of steps to wait
  inner: optax.OptState


def wait(inner: optax.GradientTransformation, steps: int) -> optax.GradientTransformation:
  """`inner`, except that its first `steps` updates are zeros and leave its state untouched."""

  def init(params):
    return WaitState(jnp.zeros([], jnp.int32), inner.init(params))

  def update(updates, state, params=None):
    waiting = state.count < steps
    new_updates, new_inner = inner.update(updates, state.inner, params)
    new_updates = jax.tree.map(lambda u: jnp.where(waiting, jnp.zeros_like(u), u), new_updates)
    new_inner = jax.tree.map(lambda old, new: jnp.where(waiting, old, new), state.inner,
                             new_inner)
    return new_updates, WaitState(jnp.minimum(state.count + 1, steps), new_inner)

  return optax.GradientTransformation(init, update)


def freeze_early(make_tx: Callable[[int], optax.GradientTransformation],
                 freeze: EarlyFreeze) -> optax.GradientTransformation:
  """The optimiser `make_tx(0)` with the tensors of `freeze` waiting (module docstring).

  Args:
    make_tx: offset -> the optimiser with its schedules read at (its update count + offset).
    freeze: which tensors wait, and for how many updates.

  Raises:
    ValueError: (at init) if the mask selects no tensor: a freeze that does nothing is a
      wrong mask, not a choice.
  """

  def labels(params):
    mask = freeze.mask(params)
    if not any(jax.tree.leaves(mask)):
      raise ValueError("EarlyFreeze.mask selects no parameter")
    return jax.tree.map(lambda waits: "waiting" if waits else "training", mask)

  return optax.partition({"training": make_tx(0),
                          "waiting": wait(make_tx(freeze.steps), freeze.steps)}, labels)
