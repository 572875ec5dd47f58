"""Batch norm whose batch statistics can be computed over G groups of the batch.

Every model here builds its BatchNorm layers from this `BatchNorm` (an `nnx.BatchNorm` with
the same variables, names and defaults, so checkpoints and torch conversion are unchanged)
and one extra static attribute, `batch_groups` (default 1: the statistics of the whole
batch, i.e. synchronised BN when the batch is sharded over devices).

With `batch_groups = G > 1`, a train-mode forward splits the batch (axis 0) into G
consecutive slices of B / G examples and normalises each with its own mean and variance: the
per-GPU BN of torch DDP without SyncBatchNorm, where GPU g holds examples
[g B/G, (g+1) B/G) of the global batch. With the batch sharded over G devices of the 'data'
mesh axis the groups are the devices' shards and the statistics need no communication.

Running statistics: torch DDP (broadcast_buffers=True, the default) copies rank 0's buffers
to every rank before each forward, so the statistics it saves are those of GPU 0's slices
only. Here they move toward the *mean over the groups* of the group means and (biased, as
flax) variances: the same expectation with less noise and no dependence on which slice is
first. Eval mode (`use_running_average`) ignores the groups.

`set_batch_groups(model, G)` sets the attribute on every BatchNorm of a module tree, as
`retro_jax.train.teacher.set_batch_norm_mode` switches their mode.

Stacked batches (`stacked_batches(model, S)`, a context): the input is S batches stacked
along axis 0 (e.g. a method's two views), and each is normalised exactly as its own forward
call would normalise it: statistics over S * G slices, and the running statistics updated
once per batch in order, as S successive calls update them. One forward of the stack then
replaces S forwards (one copy of the network in the compiled step).
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes
from flax.nnx.nn import normalization as flax_normalization


class BatchNorm(nnx.BatchNorm):
  """`nnx.BatchNorm` with `batch_groups`: train-mode statistics per slice of the batch."""

  def __init__(self, num_features: int, *, batch_groups: int = 1, **kwargs):
    super().__init__(num_features, **kwargs)
    self.batch_groups = _check_groups(batch_groups)
    self.stacked = 1  # batches stacked on axis 0; set by `stacked_batches`

  def __call__(self, x: jax.Array, use_running_average: bool | None = None, *,
               mask: jax.Array | None = None) -> jax.Array:
    if use_running_average is None:
      use_running_average = self.use_running_average
    stacked = self.stacked
    groups = self.batch_groups * stacked
    if use_running_average:
      return super().__call__(x, use_running_average, mask=mask)
    if groups == 1:
      return self._whole_batch(x, mask)
    if mask is not None:
      raise NotImplementedError("BatchNorm: a mask with batch_groups > 1")
    batch = x.shape[0]
    if batch % groups:
      raise ValueError(f"BatchNorm: batch_groups={self.batch_groups} x {stacked} stacked "
                       f"batches does not divide the batch of {batch} (student.bn_groups must "
                       "divide the global batch size)")
    axes = _canonical_axes(x.ndim, self.axis)
    if 0 in axes:
      raise ValueError("BatchNorm: batch_groups > 1 needs the batch axis 0 to be reduced")
    scale = self.scale[...] if self.scale is not None else None
    bias = self.bias[...] if self.bias is not None else None
    x, scale, bias = self.promote_dtype((x, scale, bias), dtype=self.dtype)
    # [B, ...] -> [G, B/G, ...]: the feature axes move by one, the group axis is kept.
    grouped = x.reshape((groups, batch // groups) + x.shape[1:])
    features = tuple(a + 1 for a in axes)
    reduce = tuple(a for a in range(1, grouped.ndim) if a not in features)
    group_mean, group_var = _moments(grouped, reduce, self.dtype, self.use_fast_variance)
    # Flax's update rule, with the groups' mean of each statistic as the batch statistic,
    # applied once per stacked batch in order.
    for mean, var in zip(group_mean.reshape((stacked, -1) + group_mean.shape[1:]),
                         group_var.reshape((stacked, -1) + group_var.shape[1:])):
      # `set_value`, not `self.mean[...] = ` (see `_whole_batch`).
      self.mean.set_value(jax.lax.stop_gradient(
          self.momentum * self.mean[...] + (1 - self.momentum) * mean.mean(0)))
      self.var.set_value(jax.lax.stop_gradient(
          self.momentum * self.var[...] + (1 - self.momentum) * var.mean(0)))
    stats_shape = tuple(1 if a in reduce else n for a, n in enumerate(grouped.shape))
    feature_shape = tuple(n if a in features else 1 for a, n in enumerate(grouped.shape))
    mul = jax.lax.rsqrt(group_var.reshape(stats_shape) + self.epsilon)
    args = [x]
    if scale is not None:
      mul = mul * scale.reshape(feature_shape)
      args.append(scale)
    y = (grouped - group_mean.reshape(stats_shape)) * mul
    if bias is not None:
      y = y + bias.reshape(feature_shape)
      args.append(bias)
    return jnp.asarray(y.reshape(x.shape), dtypes.canonicalize_dtype(*args, dtype=self.dtype))

  def _whole_batch(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
    """`nnx.BatchNorm`'s train-mode forward (flax's own statistics and normalisation, so the
    same XLA program), with the running statistics written by `set_value`.

    flax's `self.mean[...] = ...` compares the shardings of the new and old values, and on a
    tracer that builds an error message by walking the whole jaxpr traced so far: 30 s of
    EfficientNet-B0's step trace (cProfile). The grouped path below is not used for one
    group: its reshapes made the Retro step 1.5x slower on XLA:CPU.
    """
    axes = _canonical_axes(x.ndim, self.axis)
    reduction_axes = tuple(i for i in range(x.ndim) if i not in axes)
    scale = self.scale[...] if self.scale is not None else None
    bias = self.bias[...] if self.bias is not None else None
    x, scale, bias = self.promote_dtype((x, scale, bias), dtype=self.dtype)
    mean, var = flax_normalization._compute_stats(  # pylint: disable=protected-access
        x, reduction_axes, dtype=self.dtype, axis_name=self.axis_name,
        axis_index_groups=self.axis_index_groups, use_fast_variance=self.use_fast_variance,
        mask=mask)
    self.mean.set_value(jax.lax.stop_gradient(
        self.momentum * self.mean[...] + (1 - self.momentum) * mean))
    self.var.set_value(jax.lax.stop_gradient(
        self.momentum * self.var[...] + (1 - self.momentum) * var))
    return flax_normalization._normalize(  # pylint: disable=protected-access
        x, mean, var, scale, bias, reduction_axes, axes, self.dtype, self.epsilon)


def _check_groups(groups) -> int:
  if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
    raise ValueError(f"batch_groups must be a positive integer, got {groups!r}")
  return groups


def _canonical_axes(ndim: int, axis) -> tuple[int, ...]:
  axes = (axis,) if isinstance(axis, int) else tuple(axis)
  return tuple(sorted(a % ndim for a in axes))


def _moments(x: jax.Array, axes: tuple[int, ...], dtype, fast: bool):
  """Mean and biased variance over `axes`, in at least float32 (flax's `_compute_stats`)."""
  dtype = jnp.promote_types(dtype or jnp.result_type(x), jnp.float32)
  x = jnp.asarray(x, dtype)
  mean = x.mean(axes)
  if fast:
    var = jnp.maximum(0.0, jnp.square(x).mean(axes) - jnp.square(mean))
  else:
    var = jnp.square(x - jnp.expand_dims(mean, axes)).mean(axes)
  return mean, var


def set_batch_groups(model: nnx.Module, groups: int) -> int:
  """Sets `batch_groups` on every BatchNorm of `model`; returns how many there are.

  Refuses a tree holding a plain `nnx.BatchNorm`, which would silently keep global
  statistics.
  """
  groups = _check_groups(groups)
  count = 0
  for path, module in nnx.iter_modules(model):
    if isinstance(module, BatchNorm):
      module.batch_groups = groups
      count += 1
    elif isinstance(module, nnx.BatchNorm):
      raise TypeError(f"{'.'.join(map(str, path))}: an nnx.BatchNorm without batch_groups; "
                      "build it with retro_jax.models.batch_norm.BatchNorm")
  return count


@contextlib.contextmanager
def stacked_batches(modules, count: int):
  """Within the block, every BatchNorm of `modules` takes its input as `count` stacked batches.

  Args:
    modules: a module or a sequence of modules (None entries are skipped).
    count: how many equal batches are stacked along axis 0.
  """
  if isinstance(modules, nnx.Module):
    modules = (modules,)
  layers = [m for module in modules if module is not None
            for _, m in nnx.iter_modules(module) if isinstance(m, BatchNorm)]
  previous = [m.stacked for m in layers]
  for m in layers:
    m.stacked = _check_groups(count)
  try:
    yield
  finally:
    for m, value in zip(layers, previous):
      m.stacked = value

