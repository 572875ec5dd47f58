"""Linear classifier on frozen features: the linear-evaluation protocol of the papers.

The reference recipe, DisCo/Retro `main_lincls.py` (retro.md section 4.1, peers.md section 2.4),
which MoCo's linear evaluation also is:

  * a new Linear(D, C) on the frozen features, weight ~ N(0, 0.01), bias 0 (`LINEAR_INIT_STD`);
  * model in eval mode throughout (batch norm frozen); for a Retro student the features are
    the pooled output of the frozen *adapter* (`which='embedding'` of a student exported with
    its adapter head), for the others the pooled backbone (`which='backbone'`);
  * SGD, momentum 0.9, weight decay 0, batch 256, 100 epochs (`EPOCHS`, `BATCH_SIZE`);
  * lr 3.0 (what DisCo's Reproduction.md passes for every architecture; the script's default
    is 30.0), halved (x0.5) at epochs 5, 10, 15, 20, 25, 30, 35, 40, 45, 60, 80;
  * train views RandomResizedCrop(224) + flip, test Resize(256) + CenterCrop(224);
  * the script reports the best test acc@1 over the epochs (`best_top1` here; `top1` is the
    last epoch's, the honest number).

The optimizer half of these constants lives once, in `retro_jax.train.optim.RECIPES
["linear_eval"]` (`optim.recipe_config("linear_eval")`); `EPOCHS`, `BATCH_SIZE` and
`LINEAR_INIT_STD` are here. Two ways to run it:

  * `train_linear_on_features` (this module): features extracted once, through the
    deterministic eval view (`retro_jax.evaluate.features`), and the classifier trained on
    them: a jitted SGD epoch on the device, seconds per epoch even for ImageNet-sized feature
    banks. No train-time augmentation: this is the cached protocol for small datasets
    (Fashion-MNIST, CIFAR) and quick comparisons; it usually reads a little higher on small
    data and lower on ImageNet than the augmented protocol.
  * the augmented protocol, exactly as the reference (random crops + flips each epoch through
    the frozen network): `configs/finetune.py:linear` (`retro_jax.evaluate.finetune` with
    `freeze_backbone=True`), the accelerator path.

Mini-batches: each epoch visits the training rows in a permutation drawn from (seed, epoch);
the last batch is smaller (torch's DataLoader, drop_last=False), and the loss is the mean
cross-entropy over the batch's real rows.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from retro_jax.train import optim
from retro_jax.user_errors import UserError

EPOCHS = 100  # main_lincls.py --epochs
BATCH_SIZE = 256  # main_lincls.py -b
LINEAR_INIT_STD = 0.01  # main_lincls.py: fc.weight.data.normal_(mean=0.0, std=0.01), bias 0
_RECIPE = optim.RECIPES["linear_eval"]
LR = float(_RECIPE["lr"])  # at batch 256 (DisCo's commands: --learning-rate 3.0)
MOMENTUM = float(_RECIPE["momentum"])
WEIGHT_DECAY = float(_RECIPE["weight_decay"])
MILESTONES = tuple(_RECIPE["milestones"])  # epochs where the lr is multiplied by GAMMA
GAMMA = float(_RECIPE["gamma"])


NORMALIZATIONS = ("none", "l2", "standardize")


def _normalized(train_x: np.ndarray, test_x: np.ndarray, how: str):
  if how == "l2":
    unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return unit(train_x), unit(test_x)
  if how == "standardize":
    mean, std = train_x.mean(0), train_x.std(0)
    std = np.where(std > 1e-6, std, 1.0)
    return (train_x - mean) / std, (test_x - mean) / std
  return train_x, test_x


class LinearError(UserError, ValueError):
  """Inputs the linear probe cannot use, or a run that diverged."""


def _check(x, y, name: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
  x, y = np.asarray(x), np.asarray(y)
  if x.ndim != 2 or not x.shape[0] or not x.shape[1]:
    raise LinearError(f"{name} features must be 2-D [examples, dim], got {x.shape}")
  if y.shape != (x.shape[0],):
    raise LinearError(f"{name} labels must be [examples] = [{x.shape[0]}], got {y.shape}")
  if not np.issubdtype(y.dtype, np.integer):
    raise LinearError(f"{name} labels must be integers, got {y.dtype}")
  if y.min() < 0 or y.max() >= num_classes:
    raise LinearError(f"{name} labels must lie in [0, {num_classes}), found "
                      f"[{y.min()}, {y.max()}]")
  if not np.all(np.isfinite(x)):
    raise LinearError(f"{name} features hold non-finite values")
  return x.astype(np.float32), y.astype(np.int32)


def _loss(params, x, y, mask):
  logits = x @ params["kernel"] + params["bias"]
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
  return jnp.sum(losses * mask) / jnp.maximum(jnp.sum(mask), 1.0)


@functools.partial(jax.jit, static_argnames=("tx", "batch_size", "steps"), donate_argnums=(0, 1))
def _epoch(params, opt_state, x, y, key, *, tx, batch_size: int, steps: int):
  """One pass over the training rows in a random order; returns the mean batch loss."""
  n = x.shape[0]
  order = jax.random.permutation(key, n)
  order = jnp.concatenate([order, jnp.zeros((steps * batch_size - n,), order.dtype)])
  valid = (jnp.arange(steps * batch_size) < n).astype(jnp.float32)

  def step(carry, i):
    params, opt_state = carry
    rows = jax.lax.dynamic_slice_in_dim(order, i * batch_size, batch_size)
    mask = jax.lax.dynamic_slice_in_dim(valid, i * batch_size, batch_size)
    loss, grads = jax.value_and_grad(_loss)(params, x[rows], y[rows], mask)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), jnp.arange(steps))
  return params, opt_state, jnp.mean(losses)


@functools.partial(jax.jit, static_argnames=("top",))
def _hits(params, x, y, *, top: int):
  logits = x @ params["kernel"] + params["bias"]
  _, best = jax.lax.top_k(logits, top)
  hits = best == y[:, None]
  return jnp.sum(hits[:, 0]), jnp.sum(jnp.any(hits, axis=1))


def accuracy(params: dict[str, Any], x: np.ndarray, y: np.ndarray, num_classes: int,
             chunk: int = 8192) -> tuple[float, float | None]:
  """(top-1, top-5) in percent of the linear classifier `params`; top-5 None below 5 classes."""
  top = min(5, num_classes)
  top1 = top5 = 0
  for start in range(0, len(y), chunk):  # Fixed chunk shape: one compilation (last padded).
    xs, ys = x[start:start + chunk], y[start:start + chunk]
    pad = min(chunk, len(y)) - len(ys)
    xs = np.pad(xs, ((0, pad), (0, 0)))
    ys = np.pad(ys, (0, pad), constant_values=-1)  # -1 never matches a class
    a, b = _hits(params, xs, ys, top=top)
    top1, top5 = top1 + int(a), top5 + int(b)
  return 100.0 * top1 / len(y), (100.0 * top5 / len(y) if num_classes >= 5 else None)


def train_linear_on_features(train_x, train_y, test_x, test_y, *, num_classes: int,
                             epochs: int = EPOCHS, batch_size: int = BATCH_SIZE,
                             lr: float = LR, momentum: float = MOMENTUM,
                             weight_decay: float = WEIGHT_DECAY,
                             milestones: Sequence[float] = MILESTONES, gamma: float = GAMMA,
                             normalize: str = "none", seed: int = 0) -> dict[str, Any]:
  """Trains Linear(D, num_classes) on frozen features with SGD; evaluates on the test rows.

  Defaults are the reference recipe (module docstring). `lr` is the learning rate itself (not
  per 256 images); `milestones` are epochs where it is multiplied by `gamma` (held per epoch,
  as `main_lincls.py`'s `adjust_learning_rate`); milestones at or past `epochs` never apply.
  `normalize`: 'none' (the reference: raw features), 'l2' (each row to unit norm) or
  'standardize' (each dimension to zero mean, unit variance with the training rows'
  statistics, as MAE's linear probe's affine-free BatchNorm). The reference lr of 3.0 assumes
  features of small norm (pooled post-ReLU CNN features); with larger ones (a wide or
  untrained network) it overshoots: standardise, or lower the lr.

  Returns:
    {"top1", "top5" (None below 5 classes): the last epoch's test accuracy in percent,
     "best_top1": the best test top-1 over the epochs (what main_lincls.py reports),
     "train_loss": the mean training loss of each epoch, "epochs", "lr", "batch_size"}.

  Raises:
    LinearError: malformed inputs, or a non-finite loss (lower the lr).
  """
  if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
    raise LinearError(f"num_classes must be an int >= 2, got {num_classes!r}")
  train_x, train_y = _check(train_x, train_y, "train", num_classes)
  test_x, test_y = _check(test_x, test_y, "test", num_classes)
  if train_x.shape[1] != test_x.shape[1]:
    raise LinearError(f"train features have {train_x.shape[1]} dims, test {test_x.shape[1]}")
  if normalize not in NORMALIZATIONS:
    raise LinearError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
  train_x, test_x = _normalized(train_x, test_x, normalize)
  if epochs < 1 or batch_size < 1:
    raise LinearError(f"epochs and batch_size must be positive, got {epochs}, {batch_size}")
  batch_size = min(batch_size, len(train_y))
  steps = math.ceil(len(train_y) / batch_size)
  kept = [m for m in milestones if m < epochs]
  config = dict(name="sgd", lr=float(lr), lr_scaling="none", momentum=float(momentum),
                weight_decay=float(weight_decay), schedule="step" if kept else "constant",
                schedule_unit="epoch", gamma=float(gamma), milestones=tuple(kept))
  try:
    tx, _ = optim.build_optimizer(config, steps_per_epoch=steps, total_steps=steps * epochs)
  except ValueError as error:
    raise LinearError(str(error)) from None
  init_key, key = jax.random.split(jax.random.key(seed))
  kernel = LINEAR_INIT_STD * jax.random.normal(init_key,
                                               (train_x.shape[1], num_classes), jnp.float32)
  params = {"kernel": kernel, "bias": jnp.zeros((num_classes,), jnp.float32)}
  opt_state = tx.init(params)
  x, y = jnp.asarray(train_x), jnp.asarray(train_y)
  losses, best = [], -1.0
  for epoch in range(epochs):
    params, opt_state, loss = _epoch(params, opt_state, x, y, jax.random.fold_in(key, epoch),
                                     tx=tx, batch_size=batch_size, steps=steps)
    loss = float(loss)
    if not math.isfinite(loss):
      raise LinearError(f"the linear probe diverged at epoch {epoch} (loss {loss}); lower the "
                        f"learning rate (lr={lr}) or normalise the features")
    losses.append(loss)
    top1, top5 = accuracy(params, test_x, test_y, num_classes)  # cheap: one matmul
    best = max(best, top1)
  return {"top1": top1, "top5": top5, "best_top1": best, "train_loss": losses,
          "epochs": epochs, "lr": float(lr), "batch_size": batch_size, "normalize": normalize}
