"""retro_jax.train.optim against torch.optim and NumPy transcriptions of the reference code.

References transcribed below: MoCo v2's `adjust_learning_rate` (main_moco.py), DINO's
`cosine_scheduler` and `clip_gradients` (utils.py), MoCo v3's `LARS` (moco/optimizer.py).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from retro_jax.models import heads
from retro_jax.train import optim

NUM_STEPS = 10


# --- The reference code -------------------------------------------------------------------


def moco_adjust_learning_rate(lr, epoch, epochs, cos, schedule=()):
  """MoCo v2 main_moco.py, returning the lr instead of setting it."""
  if cos:
    lr *= 0.5 * (1. + math.cos(math.pi * epoch / epochs))
  else:
    for milestone in schedule:
      lr *= 0.1 if epoch >= milestone else 1.
  return lr


def disco_lincls_learning_rate(lr, epoch, schedule):
  """DisCo main_lincls.py's stepwise schedule (x0.5 per passed milestone)."""
  for milestone in schedule:
    lr *= 0.5 if epoch >= milestone else 1.
  return lr


def dino_cosine_scheduler(base_value, final_value, epochs, niter_per_ep, warmup_epochs=0,
                          start_warmup_value=0):
  """DINO utils.py, verbatim."""
  warmup_schedule = np.array([])
  warmup_iters = warmup_epochs * niter_per_ep
  if warmup_epochs > 0:
    warmup_schedule = np.linspace(start_warmup_value, base_value, warmup_iters)
  iters = np.arange(epochs * niter_per_ep - warmup_iters)
  schedule = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / len(iters)))
  schedule = np.concatenate((warmup_schedule, schedule))
  assert len(schedule) == epochs * niter_per_ep
  return schedule


def dino_clip_gradients(parameters, clip):
  """DINO utils.py `clip_gradients`, over a list of tensors instead of a model."""
  norms = []
  for p in parameters:
    if p.grad is not None:
      param_norm = p.grad.data.norm(2)
      norms.append(param_norm.item())
      clip_coef = clip / (param_norm + 1e-6)
      if clip_coef < 1:
        p.grad.data.mul_(clip_coef)
  return norms


def moco_v3_lars_step(params, grads, mus, lr, weight_decay, momentum, trust_coefficient):
  """MoCo v3 moco/optimizer.py `LARS.step`, in NumPy (float32), for one parameter group."""
  for name, p in params.items():
    dp = grads[name]
    if p.ndim > 1:
      dp = dp + weight_decay * p
      param_norm = np.linalg.norm(p)
      update_norm = np.linalg.norm(dp)
      q = (trust_coefficient * param_norm / update_norm
           if param_norm > 0 and update_norm > 0 else np.float32(1.0))
      dp = dp * np.float32(q)
    mus[name] = momentum * mus[name] + dp
    params[name] = (p - np.float32(lr) * mus[name]).astype(np.float32)


def apex_larc_sgd_step(params, grads, mus, lr, weight_decay, decayed, momentum, trust):
  """apex.parallel.LARC.step (clip=False, eps 1e-8) then torch SGD's momentum step, in NumPy;
  `decayed` names the tensors of the parameter group with weight decay (VISSL's groups)."""
  for name, p in params.items():
    wd = weight_decay if name in decayed else 0.0
    d = grads[name]
    param_norm, grad_norm = np.linalg.norm(p), np.linalg.norm(d)
    if param_norm != 0 and grad_norm != 0:
      adaptive_lr = trust * param_norm / (grad_norm + param_norm * wd + 1e-8)
      d = (d + wd * p) * adaptive_lr
    mus[name] = momentum * mus[name] + d
    params[name] = (p - np.float32(lr) * mus[name]).astype(np.float32)


# --- Helpers ------------------------------------------------------------------------------

SHAPES = {"conv.kernel": (3, 3, 2, 4), "dense.kernel": (5, 4), "dense.bias": (4,),
          "norm.scale": (4,), "norm.bias": (4,)}


def _nest(flat):
  tree = {}
  for name, value in flat.items():
    module, leaf = name.split(".")
    tree.setdefault(module, {})[leaf] = value
  return tree


def _flatten(tree):
  return {f"{m}.{k}": np.asarray(v) for m, leaves in tree.items() for k, v in leaves.items()}


def _problem(seed=0, grad_scales=None):
  rng = np.random.default_rng(seed)
  params = {n: rng.normal(size=s).astype(np.float32) for n, s in SHAPES.items()}
  scales = grad_scales or {}
  grads = [{n: (scales.get(n, 1.0) * rng.normal(size=s)).astype(np.float32)
            for n, s in SHAPES.items()} for _ in range(NUM_STEPS)]
  return params, grads


def _run_optax(tx, params, grads):
  """Applies tx for every gradient in `grads` (jitted), returns the flat final params."""
  tree = jax.tree.map(jnp.asarray, _nest(params))
  state = tx.init(tree)

  @jax.jit
  def step(tree, state, g):
    updates, state = tx.update(g, state, tree)
    return jax.tree.map(lambda p, u: p + u, tree, updates), state

  for g in grads:
    tree, state = step(tree, state, jax.tree.map(jnp.asarray, _nest(g)))
  return _flatten(tree)


def _torch_params(params):
  return {n: torch.tensor(v.copy(), requires_grad=True) for n, v in params.items()}


def _assert_close(ours, theirs, atol=2e-6):
  for name in SHAPES:
    np.testing.assert_allclose(ours[name], theirs[name], rtol=2e-5, atol=atol, err_msg=name)


def _decayed(name):  # DINO's rule on the test tree
  return not (name.endswith("bias") or len(SHAPES[name]) == 1)


# --- Optimisers against torch -------------------------------------------------------------


@pytest.mark.parametrize("nesterov,exclude,clip", [
    (False, "none", None), (True, "bias_and_norm", None), (False, "none", 4.0)])
def test_sgd_matches_torch(nesterov, exclude, clip):
  spe, epochs, warmup = 2, 5, 1
  config = dict(name="sgd", lr=0.1, lr_scaling="linear", momentum=0.9, nesterov=nesterov,
                weight_decay=0.05, exclude_from_weight_decay=exclude, warmup_epochs=warmup,
                min_lr=0.001, clip_grad_norm=clip)
  tx, schedules = optim.build_optimizer(config, steps_per_epoch=spe, total_steps=spe * epochs,
                                        global_batch_size=512)
  lrs = dino_cosine_scheduler(0.2, 0.001, epochs, spe, warmup_epochs=warmup)
  params, grads = _problem(grad_scales={"conv.kernel": 3.0})
  ours = _run_optax(tx, params, grads)

  tp = _torch_params(params)
  decay = [n for n in SHAPES if exclude == "none" or _decayed(n)]
  groups = [{"params": [tp[n] for n in decay], "weight_decay": 0.05},
            {"params": [tp[n] for n in SHAPES if n not in decay], "weight_decay": 0.0}]
  opt = torch.optim.SGD([g for g in groups if g["params"]], lr=0.0, momentum=0.9,
                        nesterov=nesterov)
  for it, g in enumerate(grads):
    for n, t in tp.items():
      t.grad = torch.from_numpy(g[n].copy())
    if clip is not None:
      torch.nn.utils.clip_grad_norm_(list(tp.values()), clip)
    for group in opt.param_groups:
      group["lr"] = lrs[it]
    opt.step()
  _assert_close(ours, {n: t.detach().numpy() for n, t in tp.items()})
  np.testing.assert_allclose(jax.vmap(schedules["lr"])(jnp.arange(spe * epochs)), lrs,
                             rtol=1e-6)


@pytest.mark.parametrize("clip_mode", [None, "per_tensor", "global"])
def test_adamw_matches_torch_with_lr_and_wd_schedules(clip_mode):
  """DINO's loop: per iteration, every group's lr and the regularised group's wd are set."""
  spe, epochs, warmup = 2, 5, 2
  config = dict(name="adamw", lr=0.02, lr_scaling="none", warmup_epochs=warmup, min_lr=1e-4,
                weight_decay=0.04, weight_decay_end=0.4, exclude_from_weight_decay="bias_and_norm",
                clip_grad_norm=None if clip_mode is None else 1.5,
                clip_grad_mode=clip_mode or "global")
  tx, schedules = optim.build_optimizer(config, steps_per_epoch=spe, total_steps=spe * epochs)
  lrs = dino_cosine_scheduler(0.02, 1e-4, epochs, spe, warmup_epochs=warmup)
  wds = dino_cosine_scheduler(0.04, 0.4, epochs, spe)
  # Large gradients on two tensors, so per-tensor clipping clips some tensors and not others.
  params, grads = _problem(seed=1, grad_scales={"conv.kernel": 2.0, "dense.bias": 3.0,
                                                "norm.scale": 0.05})
  ours = _run_optax(tx, params, grads)

  tp = _torch_params(params)
  regularized = [tp[n] for n in SHAPES if _decayed(n)]
  not_regularized = [tp[n] for n in SHAPES if not _decayed(n)]
  opt = torch.optim.AdamW([{"params": regularized}, {"params": not_regularized,
                                                     "weight_decay": 0.0}])
  for it, g in enumerate(grads):
    for n, t in tp.items():
      t.grad = torch.from_numpy(g[n].copy())
    if clip_mode == "per_tensor":
      dino_clip_gradients(list(tp.values()), 1.5)
    elif clip_mode == "global":
      torch.nn.utils.clip_grad_norm_(list(tp.values()), 1.5)
    for i, group in enumerate(opt.param_groups):
      group["lr"] = lrs[it]
      if i == 0:
        group["weight_decay"] = wds[it]
    opt.step()
  _assert_close(ours, {n: t.detach().numpy() for n, t in tp.items()})
  steps = jnp.arange(spe * epochs)
  np.testing.assert_allclose(jax.vmap(schedules["lr"])(steps), lrs, rtol=1e-6)
  np.testing.assert_allclose(jax.vmap(schedules["weight_decay"])(steps), wds, rtol=1e-6)


def test_lars_matches_moco_v3():
  spe, epochs, warmup = 2, 5, 1
  config = dict(name="lars", lr=0.6, lr_scaling="none", momentum=0.9, weight_decay=1e-2,
                warmup_epochs=warmup, trust_coefficient=0.001)
  tx, _ = optim.build_optimizer(config, steps_per_epoch=spe, total_steps=spe * epochs)
  lrs = dino_cosine_scheduler(0.6, 0.0, epochs, spe, warmup_epochs=warmup)
  params, grads = _problem(seed=2)
  ours = _run_optax(tx, params, grads)

  ref = {n: v.copy() for n, v in params.items()}
  mus = {n: np.zeros_like(v) for n, v in params.items()}
  for it, g in enumerate(grads):
    moco_v3_lars_step(ref, g, mus, lrs[it], 1e-2, 0.9, 0.001)
  _assert_close(ours, ref)
  # The trust ratio moved the matrices by ~lr * 0.001 relative to their norm, the 1-D
  # tensors by plain momentum SGD: both must have changed.
  for name in SHAPES:
    assert not np.allclose(ours[name], params[name]), name


@pytest.mark.parametrize("exclude", ["none", "bias_and_norm"])
def test_larc_matches_apex_larc_around_torch_sgd(exclude):
  spe, epochs = 2, 5
  config = dict(name="larc", lr=0.6, lr_scaling="none", momentum=0.9, weight_decay=0.05,
                warmup_epochs=1, warmup_start_lr=0.1, min_lr=0.01, trust_coefficient=0.001,
                exclude_from_weight_decay=exclude)
  tx, _ = optim.build_optimizer(config, steps_per_epoch=spe, total_steps=spe * epochs)
  lrs = dino_cosine_scheduler(0.6, 0.01, epochs, spe, warmup_epochs=1, start_warmup_value=0.1)
  params, grads = _problem(seed=3)
  params["norm.bias"] = np.zeros_like(params["norm.bias"])  # ||p|| = 0: plain SGD, no decay
  ours = _run_optax(tx, params, grads)
  ref = {n: v.copy() for n, v in params.items()}
  mus = {n: np.zeros_like(v) for n, v in params.items()}
  decayed = set(SHAPES) if exclude == "none" else {"conv.kernel", "dense.kernel"}
  for it, g in enumerate(grads):
    apex_larc_sgd_step(ref, g, mus, lrs[it], 0.05, decayed, 0.9, 0.001)
  _assert_close(ours, ref)
  for name in SHAPES:
    assert not np.allclose(ours[name], params[name]), name


def test_lars_trust_ratio_is_one_for_zero_params():
  tx, _ = optim.build_optimizer(dict(name="lars", lr=1.0, lr_scaling="none", momentum=0.0,
                                     schedule="constant"), steps_per_epoch=1, total_steps=5)
  params = {"dense": {"kernel": jnp.zeros((2, 3))}}
  grads = {"dense": {"kernel": jnp.ones((2, 3))}}
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(updates["dense"]["kernel"], -np.ones((2, 3)))


# --- Schedules ----------------------------------------------------------------------------


def _values(schedule, total):
  return np.asarray(jax.jit(jax.vmap(schedule))(jnp.arange(total)))


def test_cosine_per_epoch_is_moco_v2():
  spe, epochs = 5, 20
  _, schedules = optim.build_optimizer(optim.recipe_config("retro"), steps_per_epoch=spe,
                                       total_steps=spe * epochs, global_batch_size=256)
  expected = [moco_adjust_learning_rate(0.03, s // spe, epochs, cos=True)
              for s in range(spe * epochs)]
  np.testing.assert_allclose(_values(schedules["lr"], spe * epochs), expected, rtol=1e-6)
  np.testing.assert_allclose(_values(schedules["weight_decay"], spe * epochs), 1e-4)


def test_step_schedule_is_moco_v2_and_disco_linear_eval():
  spe, epochs = 3, 20
  config = dict(name="sgd", lr=0.03, lr_scaling="none", schedule="step", schedule_unit="epoch",
                milestones=[12, 16])
  _, schedules = optim.build_optimizer(config, steps_per_epoch=spe, total_steps=spe * epochs)
  expected = [moco_adjust_learning_rate(0.03, s // spe, epochs, cos=False, schedule=[12, 16])
              for s in range(spe * epochs)]
  np.testing.assert_allclose(_values(schedules["lr"], spe * epochs), expected, rtol=1e-6)

  epochs = 100
  _, schedules = optim.build_optimizer(optim.recipe_config("linear_eval"), steps_per_epoch=spe,
                                       total_steps=spe * epochs, global_batch_size=256)
  milestones = optim.RECIPES["linear_eval"]["milestones"]
  expected = [disco_lincls_learning_rate(3.0, s // spe, milestones) for s in range(spe * epochs)]
  np.testing.assert_allclose(_values(schedules["lr"], spe * epochs), expected, rtol=1e-6)


@pytest.mark.parametrize("warmup,start,unit", [(3, 0.0, "step"), (1, 1e-5, "step"),
                                               (0, 0.0, "step"), (3, 1e-5, "epoch")])
def test_cosine_is_dino_cosine_scheduler(warmup, start, unit):
  spe, epochs = 7, 15
  config = dict(name="adamw", lr=5e-4, lr_scaling="linear", warmup_epochs=warmup,
                warmup_start_lr=start, min_lr=1e-6, weight_decay=0.04, weight_decay_end=0.4,
                schedule_unit=unit)
  total = spe * epochs
  _, schedules = optim.build_optimizer(config, steps_per_epoch=spe, total_steps=total,
                                       global_batch_size=512)
  lrs = dino_cosine_scheduler(1e-3, 1e-6, epochs, spe, warmup_epochs=warmup,
                              start_warmup_value=start)
  wds = dino_cosine_scheduler(0.04, 0.4, epochs, spe)
  if unit == "epoch":  # held at the value of each epoch's first step
    lrs, wds = lrs[(np.arange(total) // spe) * spe], wds[(np.arange(total) // spe) * spe]
  np.testing.assert_allclose(_values(schedules["lr"], total), lrs, rtol=1e-6, atol=1e-12)
  np.testing.assert_allclose(_values(schedules["weight_decay"], total), wds, rtol=1e-6)
  # Past the end the last value holds; the schedule is also callable with a Python int.
  np.testing.assert_allclose(schedules["lr"](total + 50), lrs[-1], rtol=1e-6)


def test_every_recipe_builds():
  for name in optim.RECIPES:
    tx, schedules = optim.build_optimizer(optim.recipe_config(name), steps_per_epoch=10,
                                          total_steps=10 * 400, global_batch_size=1024)
    params = {"dense": {"kernel": jnp.ones((2, 3)), "bias": jnp.zeros(3)}}
    updates, _ = tx.update(params, tx.init(params), params)
    assert all(np.isfinite(u).all() for u in jax.tree.leaves(updates)), name
    assert float(schedules["lr"](0)) >= 0.0
  np.testing.assert_allclose(float(optim.build_optimizer(
      optim.recipe_config("rob_dino"), steps_per_epoch=10, total_steps=3000,
      global_batch_size=1024)[1]["lr"](100)), 2e-3, rtol=1e-6)


# --- Clipping -----------------------------------------------------------------------------


# The last case has norms near torch's 1e-6 guard, where max_norm / (norm + 1e-6) and
# optax's max_norm / norm differ.
@pytest.mark.parametrize("max_norm,scale", [(0.5, 1.0), (3.0, 1.0), (100.0, 1.0), (1e-6, 1e-6)])
def test_global_clip_matches_torch_clip_grad_norm(max_norm, scale):
  _, grads = _problem(seed=3, grad_scales=dict.fromkeys(SHAPES, scale))
  tp = _torch_params(grads[0])
  for n, t in tp.items():
    t.grad = torch.from_numpy(grads[0][n].copy())
  torch.nn.utils.clip_grad_norm_(list(tp.values()), max_norm)
  clip = optim.clip_by_global_norm(max_norm)
  ours, _ = clip.update(_nest(grads[0]), clip.init(None))
  _assert_close(_flatten(ours), {n: t.grad.numpy() for n, t in tp.items()}, atol=0)


@pytest.mark.parametrize("max_norm,scale", [(0.5, 1.0), (3.0, 1.0), (100.0, 1.0), (1e-6, 1e-6)])
def test_per_tensor_clip_matches_dino_clip_gradients(max_norm, scale):
  _, grads = _problem(seed=4, grad_scales={n: scale * {"conv.kernel": 2.0, "norm.bias": 0.1}.get(
      n, 1.0) for n in SHAPES})
  tp = _torch_params(grads[0])
  for n, t in tp.items():
    t.grad = torch.from_numpy(grads[0][n].copy())
  dino_clip_gradients(list(tp.values()), max_norm)
  clip = optim.clip_by_tensor_norm(max_norm)
  ours, _ = clip.update(_nest(grads[0]), clip.init(None))
  _assert_close(_flatten(ours), {n: t.grad.numpy() for n, t in tp.items()}, atol=0)
  norms = {n: np.linalg.norm(v) for n, v in _flatten(ours).items()}
  assert all(v <= max_norm * (1 + 1e-5) for v in norms.values())
  if max_norm == 3.0:  # the large tensors are clipped, the small ones left alone
    clipped = {n for n in SHAPES if not np.array_equal(_flatten(ours)[n], grads[0][n])}
    assert clipped == {"conv.kernel", "dense.kernel"}


# --- Parameter selection ------------------------------------------------------------------


class _Student(nnx.Module):
  def __init__(self, rngs):
    self.stem = nnx.Conv(3, 4, (3, 3), rngs=rngs)
    self.bn = nnx.BatchNorm(4, rngs=rngs)
    self.blocks = nnx.List([nnx.LayerNorm(4, rngs=rngs)])
    self.pos_embed = nnx.Param(jnp.zeros((1, 5, 4)))
    self.head = heads.WeightNormLinear(4, 6, fixed_norm=False, rngs=rngs)
    self.teacher_head = heads.WeightNormLinear(4, 6, fixed_norm=True, rngs=rngs)


def test_weight_decay_mask_excludes_biases_and_norm_scales():
  model = _Student(nnx.Rngs(0))
  params = nnx.state(model, optim.trainable_filter())
  names = {optim.parameter_name(p): bool(m) for p, m in
           jax.tree_util.tree_leaves_with_path(optim.weight_decay_mask(params))}
  assert names == {"stem.kernel": True, "stem.bias": False, "bn.scale": False,
                   "bn.bias": False, "blocks.0.scale": False, "blocks.0.bias": False,
                   "pos_embed": True, "head.weight_v": True, "head.weight_g": True,
                   "teacher_head.weight_v": True}  # weight_g is (out, 1): 2-D, as in DINO
  # The same on the pure arrays that nnx.Optimizer hands to optax.
  pure = optim.weight_decay_mask(nnx.to_pure_dict(params))
  assert pure["bn"]["scale"] is False and pure["stem"]["kernel"] is True
  assert all(jax.tree.leaves(optim.weight_decay_mask(params, "none")))
  vissl = optim.weight_decay_mask(nnx.to_pure_dict(params), [r"\.bias$", "norm"])
  assert vissl["stem"]["bias"] is False and vissl["bn"]["scale"] is True


def test_frozen_params_are_not_trained_and_rejected():
  model = _Student(nnx.Rngs(0))
  trainable = jax.tree_util.tree_leaves_with_path(nnx.state(model, optim.trainable_filter()))
  assert "teacher_head.weight_g" not in {optim.parameter_name(p) for p, _ in trainable}
  assert "bn.mean" not in {optim.parameter_name(p) for p, _ in trainable}

  config = dict(name="adamw", lr=0.1, lr_scaling="none", weight_decay=0.5, schedule="constant")
  tx, _ = optim.build_optimizer(config, steps_per_epoch=1, total_steps=10)
  with pytest.raises(ValueError, match="teacher_head.weight_g.*trainable_filter"):
    nnx.Optimizer(model, tx, wrt=nnx.Param)

  # With zero gradients AdamW only decays: kernels shrink by 1 - lr * wd, the rest stays.
  optimizer = nnx.Optimizer(model, tx, wrt=optim.trainable_filter())
  before = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  grads = jax.tree.map(jnp.zeros_like, nnx.state(model, optim.trainable_filter()))

  @nnx.jit
  def step(model, optimizer, grads):
    optimizer.update(model, grads)

  step(model, optimizer, grads)
  after = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  np.testing.assert_allclose(after["stem"]["kernel"], before["stem"]["kernel"] * 0.95,
                             rtol=1e-6)
  np.testing.assert_array_equal(after["bn"]["scale"], before["bn"]["scale"])
  np.testing.assert_array_equal(after["stem"]["bias"], before["stem"]["bias"])
  np.testing.assert_array_equal(after["teacher_head"]["weight_g"],
                                before["teacher_head"]["weight_g"])


# --- Config errors ------------------------------------------------------------------------


@pytest.mark.parametrize("config,message", [
    (dict(name="rmsprop", lr=0.1),
     "optimizer.name must be one of 'sgd', 'lars', 'larc', 'adamw'"),
    (dict(name="sgd", lr=-0.1), "optimizer.lr must be > 0"),
    (dict(name="sgd", lr=0.1, learning_rate=0.1), "unknown optimizer config key.*'learning_rate'"),
    (dict(name="sgd"), "needs 'lr'"),
    (dict(name="adamw", lr=0.1, momentum=0.9), "momentum does not apply to 'adamw'"),
    (dict(name="sgd", lr=0.1, b2=0.99), "b2 does not apply to 'sgd'"),
    (dict(name="sgd", lr=0.1, schedule="linear"), "optimizer.schedule must be one of"),
    (dict(name="sgd", lr=0.1, schedule="step"), "needs milestones"),
    (dict(name="sgd", lr=0.1, milestones=[3]), "milestones only apply"),
    (dict(name="sgd", lr=0.1, schedule="constant", min_lr=0.1), "min_lr"),
    (dict(name="sgd", lr=0.1, weight_decay=-1e-4), "weight_decay must be >= 0"),
    (dict(name="sgd", lr=0.1, clip_grad_norm=0), "clip_grad_norm must be > 0"),
    (dict(name="sgd", lr=0.1, clip_grad_mode="local"), "clip_grad_mode"),
    (dict(name="sgd", lr=0.1, exclude_from_weight_decay="bias"), "exclude_from_weight_decay"),
    (dict(name="sgd", lr=0.1, exclude_from_weight_decay=["(bias"]), "bad regex"),
    (dict(name="sgd", lr=0.1, momentum=0.0, nesterov=True), "nesterov needs momentum"),
    (dict(name="sgd", lr=True), "lr must be a finite number"),
    (dict(name="sgd", lr=0.1, lr_scaling="none", warmup_epochs=10), "shorter than the run"),
    (dict(name="sgd", lr=0.1, lr_scaling="linear"), "global batch size"),
])
def test_config_errors(config, message):
  with pytest.raises(ValueError, match=message):
    optim.build_optimizer(config, steps_per_epoch=5, total_steps=50)


def test_config_dict_and_recipe_errors():
  import ml_collections  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict(dict(name="sgd", lr=0.1, lr_scaling="none",
                                          milestones=[2], schedule="step"))
  parsed = optim.parse_optimizer_config(config)
  assert parsed.momentum == 0.9 and parsed.milestones == (2,)
  assert parsed.exclude_from_weight_decay == "none"
  assert optim.parse_optimizer_config(dict(name="adamw", lr=1.0)).exclude_from_weight_decay \
      == "bias_and_norm"
  with pytest.raises(ValueError, match="unknown optimizer recipe 'byol'"):
    optim.recipe_config("byol")
  with pytest.raises(ValueError, match="steps_per_epoch"):
    optim.build_optimizer(dict(name="sgd", lr=0.1, lr_scaling="none"), steps_per_epoch=0,
                          total_steps=5)
