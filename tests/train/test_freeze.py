"""retro_jax.train.freeze against torch: DINO's early last-layer freeze is a skipped tensor.

DINO's loop per iteration: backward, `clip_gradients` (per tensor), then
`cancel_gradients_last_layer` (`p.grad = None` for every "last_layer" tensor while
epoch < freeze_last_layer), then `optimizer.step()` with each group's lr (and the
regularised group's weight decay) set from the schedules. torch's optimisers skip a tensor
whose grad is None: no decay, no moments, no per-parameter step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from retro_jax.train import optim
from retro_jax.train.freeze import EarlyFreeze
from retro_jax.train.freeze import freeze_early

SPE, EPOCHS, FREEZE_EPOCHS = 3, 2, 1  # 6 steps, the last layer skipped in the first 3
# DINO's head in miniature: "weight_g" is (out, 1), 2-D, so DINO's groups regularise it.
SHAPES = {"backbone.conv.kernel": (3, 3, 2, 4), "backbone.norm.scale": (4,),
          "head.mlp.kernel": (4, 5), "head.mlp.bias": (5,),
          "head.last_layer.weight_v": (6, 5), "head.last_layer.weight_g": (6, 1)}
LAST_LAYER = [n for n in SHAPES if "last_layer" in n]


def dino_cosine_scheduler(base_value, final_value, epochs, niter_per_ep, warmup_epochs=0,
                          start_warmup_value=0):
  """DINO utils.py, verbatim (as in test_optim.py)."""
  warmup_schedule = np.array([])
  warmup_iters = warmup_epochs * niter_per_ep
  if warmup_epochs > 0:
    warmup_schedule = np.linspace(start_warmup_value, base_value, warmup_iters)
  iters = np.arange(epochs * niter_per_ep - warmup_iters)
  schedule = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / len(iters)))
  return np.concatenate((warmup_schedule, schedule))


def dino_clip_gradients(parameters, clip):
  """DINO utils.py `clip_gradients` over a list of tensors."""
  for p in parameters:
    if p.grad is not None:
      clip_coef = clip / (p.grad.data.norm(2) + 1e-6)
      if clip_coef < 1:
        p.grad.data.mul_(clip_coef)


def _last_layer_mask(params):
  """DINO's cancel_gradients_last_layer rule: '"last_layer" in name'."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: "last_layer" in optim.parameter_name(path), params)


def _nest(flat):
  tree = {}
  for name, value in flat.items():
    *modules, leaf = name.split(".")
    node = tree
    for m in modules:
      node = node.setdefault(m, {})
    node[leaf] = value
  return tree


def _flat(tree):
  return {optim.parameter_name(path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _problem(seed=0):
  rng = np.random.default_rng(seed)
  params = {n: rng.normal(size=s).astype(np.float32) for n, s in SHAPES.items()}
  # Large conv gradients so that clipping bites on some tensors and not on others.
  grads = [{n: ((3.0 if "conv" in n else 1.0) * rng.normal(size=s)).astype(np.float32)
            for n, s in SHAPES.items()} for _ in range(SPE * EPOCHS)]
  return params, grads


def _optax_trajectory(tx, params, grads):
  """The flat params after every update of `tx` (jitted), one dict per step."""
  tree = jax.tree.map(jnp.asarray, _nest(params))
  state = tx.init(tree)

  @jax.jit
  def step(tree, state, g):
    updates, state = tx.update(g, state, tree)
    return jax.tree.map(lambda p, u: p + u, tree, updates), state

  trajectory = []
  for g in grads:
    tree, state = step(tree, state, jax.tree.map(jnp.asarray, _nest(g)))
    trajectory.append(_flat(tree))
  return trajectory


def _torch_trajectory(name, clip_mode, params, grads, lrs, wds):
  """DINO's iteration in torch (regularised / not-regularised groups), params per step."""
  tp = {n: torch.tensor(v.copy(), requires_grad=True) for n, v in params.items()}
  decayed = [n for n in SHAPES if not (n.endswith("bias") or len(SHAPES[n]) == 1)]
  groups = [{"params": [tp[n] for n in decayed]},
            {"params": [tp[n] for n in SHAPES if n not in decayed], "weight_decay": 0.0}]
  opt = (torch.optim.AdamW(groups) if name == "adamw"
         else torch.optim.SGD(groups, lr=0.0, momentum=0.9))
  trajectory = []
  for it, g in enumerate(grads):
    for n, t in tp.items():
      t.grad = torch.from_numpy(g[n].copy())
    if clip_mode == "per_tensor":
      dino_clip_gradients(list(tp.values()), 1.5)
    elif clip_mode == "global":
      torch.nn.utils.clip_grad_norm_(list(tp.values()), 1.5)
    if it // SPE < FREEZE_EPOCHS:  # utils.cancel_gradients_last_layer
      for n in LAST_LAYER:
        tp[n].grad = None
    for i, group in enumerate(opt.param_groups):
      group["lr"] = lrs[it]
      if i == 0:
        group["weight_decay"] = wds[it]
    opt.step()
    trajectory.append({n: t.detach().numpy().copy() for n, t in tp.items()})
  return trajectory


def _config(name, clip_mode):
  config = dict(name=name, lr=0.02, lr_scaling="none", warmup_epochs=1, min_lr=1e-4,
                weight_decay=0.04, weight_decay_end=0.4,
                exclude_from_weight_decay="bias_and_norm",
                clip_grad_norm=None if clip_mode is None else 1.5,
                clip_grad_mode=clip_mode or "global")
  if name == "sgd":
    config["momentum"] = 0.9
  return config


def _torch_reference(name, clip_mode, params, grads):
  lrs = dino_cosine_scheduler(0.02, 1e-4, EPOCHS, SPE, warmup_epochs=1)
  wds = dino_cosine_scheduler(0.04, 0.4, EPOCHS, SPE)
  return _torch_trajectory(name, clip_mode, params, grads, lrs, wds)


@pytest.mark.parametrize("name,clip_mode", [("adamw", None), ("adamw", "per_tensor"),
                                            ("adamw", "global"), ("sgd", None)])
def test_early_freeze_matches_torch_skipping_grad_none(name, clip_mode):
  """Every parameter after every step, through the freeze and after it ends."""
  params, grads = _problem()
  tx, _ = optim.build_optimizer(_config(name, clip_mode), steps_per_epoch=SPE,
                                total_steps=SPE * EPOCHS,
                                freeze=EarlyFreeze(_last_layer_mask, FREEZE_EPOCHS * SPE))
  ours = _optax_trajectory(tx, params, grads)
  theirs = _torch_reference(name, clip_mode, params, grads)
  # float32 leaves a few ulps between torch's and optax's arithmetic (values are O(1)), the
  # same with or without a freeze; a wrong freeze is off by > 1e-3 (the next test).
  for it, (mine, ref) in enumerate(zip(ours, theirs)):
    for n in SHAPES:
      np.testing.assert_allclose(mine[n], ref[n], rtol=1e-6, atol=1e-6,
                                 err_msg=f"{n} after step {it}")
  # While frozen the last layer is bit-identical to its start: no decay, no update.
  for it in range(FREEZE_EPOCHS * SPE):
    for n in LAST_LAYER:
      np.testing.assert_array_equal(ours[it][n], params[n], err_msg=f"{n} at step {it}")
  for n in LAST_LAYER:  # and it trains afterwards
    assert not np.array_equal(ours[-1][n], params[n])


def test_zeroed_gradients_are_not_a_skipped_tensor():
  """The reference discriminates: zeroing the last layer's gradient (the former
  implementation) decays it while frozen and bias-corrects with the shared count after."""
  params, grads = _problem()
  zeroed = [{n: (0.0 * v if n in LAST_LAYER and it < FREEZE_EPOCHS * SPE else v)
             for n, v in g.items()} for it, g in enumerate(grads)]
  tx, _ = optim.build_optimizer(_config("adamw", None), steps_per_epoch=SPE,
                                total_steps=SPE * EPOCHS)
  ours = _optax_trajectory(tx, params, zeroed)
  theirs = _torch_reference("adamw", None, params, grads)
  after = FREEZE_EPOCHS * SPE
  assert not np.array_equal(ours[after - 1]["head.last_layer.weight_v"],
                            params["head.last_layer.weight_v"])  # decayed while frozen
  gap = np.abs(ours[after]["head.last_layer.weight_v"]
               - theirs[after]["head.last_layer.weight_v"]).max()
  assert gap > 1e-3  # far outside the tolerance of the test above


def test_waiting_copy_reads_the_global_schedule():
  """The waiting copy stands still, then its count 0 reads the global step's schedule."""
  # A "schedule" that is the step it is read at: each update is 1 * step.
  tx = freeze_early(lambda offset: optax.scale_by_schedule(lambda count: count + offset),
                    EarlyFreeze(lambda p: {"now": False, "later": True}, 2))
  params = {"now": jnp.zeros(()), "later": jnp.zeros(())}
  state = tx.init(params)
  seen = []
  for _ in range(5):
    updates, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
    seen.append((float(updates["now"]), float(updates["later"])))
  assert seen == [(0, 0), (1, 0), (2, 2), (3, 3), (4, 4)]


def test_freeze_errors():
  with pytest.raises(ValueError, match="positive int"):
    EarlyFreeze(_last_layer_mask, 0)
  tx, _ = optim.build_optimizer(_config("adamw", None), steps_per_epoch=SPE,
                                total_steps=SPE * EPOCHS,
                                freeze=EarlyFreeze(_last_layer_mask, 2))
  with pytest.raises(ValueError, match="selects no parameter"):
    tx.init({"backbone": {"kernel": jnp.zeros((2, 2))}})
