"""The training state and the one jitted step every method runs through.

    state, metrics = train_step(state, teacher_state, batch)

`TrainState` is a pytree of arrays only (it is donated to the step and checkpointed as is):
the student container split into what the optimiser updates (`trainable`) and everything
else (`rest`: batch statistics, momentum copies, RNG counters), the optax state, the
objective's buffers (queue, centre) and the run's random key as raw key data. The module
structure (graphdef) and the method are static: they are closed over, not traced.

Inside the step, in this order: the photometric half of the augmentation on the device (each
example's draw from (seed, step, example index)); the method's momentum update; the loss and
its gradient with respect to `trainable` only (the teacher's state is an argument that is
never differentiated, so its head, reused by Retro, gets no gradient and is never updated);
the optax update (DINO's early freezing of the head's last layer lives in the optimiser:
`method.early_freeze`, retro_jax/train/freeze.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from flax import struct


# fold_in index of the model's random stream (the augmentation uses the view indices 0, 1, ...).
_MODEL_STREAM = 1_000_003


class TrainState(struct.PyTreeNode):
  """Everything that changes during training; arrays only."""
  step: jax.Array
  trainable: nnx.State
  rest: nnx.State
  opt_state: Any
  objective: Any
  rng: jax.Array  # jax.random.key_data of the run key


def init_state(model: nnx.Module, trainable_filter, tx: optax.GradientTransformation,
               objective_state: Any, seed: int) -> tuple[nnx.GraphDef, TrainState]:
  """Splits a freshly built student container into the static graph and the state."""
  graphdef, trainable, rest = nnx.split(model, trainable_filter, ...)
  state = TrainState(step=jnp.zeros((), jnp.int32), trainable=trainable, rest=rest,
                     opt_state=tx.init(trainable), objective=objective_state,
                     rng=jax.random.key_data(jax.random.key(seed)))
  return graphdef, state


def count_parameters(state: nnx.State) -> int:
  return int(sum(x.size for x in jax.tree.leaves(state)))


def make_train_step(method, graphdef: nnx.GraphDef, teacher_graphdef: nnx.GraphDef | None,
                    trainable_filter, tx: optax.GradientTransformation,
                    augment: Callable[[jax.Array, tuple, jax.Array], tuple]):
  """The pure step function (not yet jitted: `jit_train_step` adds the shardings).

  Args:
    method: the method object: `momentum_update(model, step)`, `loss(model, teacher, views,
      objective_state, step=, key=)`.
    graphdef: the student container's structure.
    teacher_graphdef: the teacher's structure, or None for methods without one.
    trainable_filter: the nnx filter `graphdef` was split with.
    tx: the optimiser.
    augment: `(key, uint8 views, example indices) -> normalised float views`.
  """

  def train_step(state: TrainState, teacher_state, batch: dict[str, Any]):
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    views = augment(key, batch["views"], batch["index"])
    model = nnx.merge(graphdef, state.trainable, state.rest)
    method.momentum_update(model, state.step)
    _, _, rest = nnx.split(model, trainable_filter, ...)
    # Random draws of the model (token dropping) use their own stream of the step's key.
    model_key = jax.random.fold_in(key, _MODEL_STREAM)

    def loss_fn(trainable):
      model = nnx.merge(graphdef, trainable, rest, copy=True)
      # Merged here, inside the differentiated function, so a teacher in batch-statistics
      # mode may write its (discarded) running statistics.
      teacher = (None if teacher_graphdef is None
                 else nnx.merge(teacher_graphdef, teacher_state, copy=True))
      loss, metrics, objective = method.loss(model, teacher, views, state.objective,
                                             step=state.step, key=model_key)
      _, _, new_rest = nnx.split(model, trainable_filter, ...)
      return loss, (metrics, objective, new_rest)

    grads, (metrics, objective, rest) = jax.grad(loss_fn, has_aux=True)(state.trainable)
    updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)
    metrics = dict(metrics, grad_norm=optax.tree.norm(grads))
    new_state = TrainState(step=state.step + 1, trainable=trainable, rest=rest,
                           opt_state=opt_state, objective=objective, rng=state.rng)
    return new_state, metrics

  return train_step


def jit_train_step(train_step, state_sharding, teacher_sharding, batch_sharding):
  """jax.jit with explicit in/out shardings and the state donated."""
  return jax.jit(train_step, in_shardings=(state_sharding, teacher_sharding, batch_sharding),
                 out_shardings=(state_sharding, None), donate_argnums=(0,))
