"""Optimisers and learning-rate / weight-decay schedules, built with optax from a config.

`build_optimizer(config, steps_per_epoch=..., total_steps=..., global_batch_size=...)`
returns `(tx, schedules)`: an optax GradientTransformation and `{"lr": f, "weight_decay": f}`,
functions of the step (the optax update count: 0 for the first update) for logging.

Config keys (`config` is a dict or an ml_collections ConfigDict; unknown keys are errors):

  name                 'sgd' | 'lars' | 'larc' | 'adamw'
  lr                   base learning rate per 256 images (> 0)
  lr_scaling           'linear' (peak = lr * global_batch_size / 256, the default) | 'none'
  momentum, nesterov   sgd, lars, larc (default 0.9, False)
  b1, b2, eps          adamw (default 0.9, 0.999, 1e-8: torch's)
  trust_coefficient    lars, larc (default 0.001)
  weight_decay         default 0
  weight_decay_end     cosine weight-decay schedule weight_decay -> weight_decay_end (DINO)
  exclude_from_weight_decay
                       'bias_and_norm' | 'none' | list of regexes; default 'none' for sgd
                       (MoCo), 'bias_and_norm' for adamw (DINO) and lars (MoCo v3)
  schedule             'cosine' (default) | 'constant' | 'step'
  schedule_unit        'step' (default: new value every step, DINO) | 'epoch' (held for
                       each epoch, MoCo v2 and VISSL's AdamW recipes)
  warmup_epochs        linear warm-up (may be fractional); default 0
  warmup_start_lr      first warm-up value (absolute, not scaled); default 0 (DINO)
  min_lr               cosine end value (absolute, not scaled; DINO's min_lr); default 0
  milestones, gamma    'step' schedule: lr * gamma ** #(milestones <= epoch) (MoCo, linear
                       evaluation); gamma default 0.1
  clip_grad_norm       None (off) or the maximum norm
  clip_grad_mode       'global' (torch.nn.utils.clip_grad_norm_; default) | 'per_tensor'
                       (DINO's utils.clip_gradients: every tensor clipped on its own)

Reference semantics reproduced exactly (tests/train/test_optim.py checks each against torch
or a NumPy transcription of the reference code):
  * sgd: torch.optim.SGD. Coupled weight decay is added to the gradient *before* momentum
    (optax.sgd applies none, and `optax.chain(trace, add_decayed_weights)` would decay after
    it), and the learning rate multiplies the momentum buffer, so a changing lr does not
    rescale past gradients.
  * adamw: torch.optim.AdamW, p <- p - lr * (adam(g) + wd * p): torch's decoupled decay is
    p *= 1 - lr * wd, so the decay is multiplied by the *scheduled* lr, as in DINO, which
    sets `param_group['weight_decay']` to `wd_schedule[it]` every iteration.
  * lars: MoCo v3's LARS class (the BYOL/SimCLR trust ratio with eta = 0.001). For decayed
    tensors (ndim > 1 under 'bias_and_norm') d = g + wd * p, d *= eta * ||p|| / ||d|| (1 if
    either norm is 0); other tensors get d = g, neither decayed nor adapted. Then
    mu = momentum * mu + d and p -= lr * mu. Reading: BYOL and SimCLR fold the lr into the
    momentum buffer instead (mu = m * mu + lr * d), identical at constant lr; we follow
    MoCo v3 to match torch SGD's momentum. VISSL's LARC (RoB-SwAV) differs again (trust
    ratio eta * ||p|| / (||g|| + wd * ||p||), applied to every tensor): that is 'larc'.
  * larc: VISSL's `sgd` with `use_larc` (apex's LARC, clip False, eps 1e-8) around
    torch.optim.SGD: for every tensor with ||p|| and ||g|| both non-zero,
    d = (g + wd * p) * eta * ||p|| / (||g|| + wd * ||p|| + 1e-8), else d = g (no decay that
    step); then torch SGD's momentum, p -= lr * mu. Tensors excluded from weight decay get
    wd 0 but are still adapted (VISSL's parameter groups with weight_decay 0).
  * schedule 'cosine' is DINO's `utils.cosine_scheduler(base, min_lr, epochs, niter_per_ep,
    warmup_epochs, start_warmup_value)` indexed by step: a linear warm-up
    `np.linspace(start, peak, W)` (it reaches the peak on its last step), then
    min + (peak - min) / 2 * (1 + cos(pi * i / (T - W))), i = step - W. With no warm-up,
    min_lr 0 and schedule_unit 'epoch' it is MoCo v2's `adjust_learning_rate` with `--cos`,
    lr * 0.5 * (1 + cos(pi * epoch / epochs)), changed once per epoch.
    Steps past total_steps keep the last value.
  * weight_decay_end: DINO's `cosine_scheduler(weight_decay, weight_decay_end, ...)`, no
    warm-up, same unit as the lr.
  * Gradient clipping runs first (torch clips `.grad` before `optimizer.step()`), with
    torch's factor max_norm / (norm + 1e-6), which optax's clip_by_global_norm omits.
  * `build_optimizer(..., freeze=EarlyFreeze(mask, steps))`: the selected tensors are
    skipped for the first `steps` updates as torch skips a tensor whose `grad` is None (DINO's
    last layer): no decay, no moment update, their own step count (retro_jax/train/freeze.py).

Which recipe uses what (`RECIPES`, `recipe_config(name)`):
  retro, disco, moco_v2   SGD 0.9, lr 0.03, wd 1e-4 on every trainable tensor, cosine held per
                          epoch, no warm-up (MoCo v2 `--cos`; DisCo and the Retro code).
  retro_mobilenetv3       the same plus clip_grad_norm 5 (global; Retro code, MobileNetV3).
  dino                    AdamW, lr 5e-4 linear scaling, warm-up 10 epochs, min_lr 1e-6, wd
                          cosine 0.04 -> 0.4 without bias/1-D tensors, clip 3.0 per tensor,
                          per step (DINO main_dino.py).
  rob_swav                VISSL SGD + LARC (eta 0.001), momentum 0.9, lr 0.3 per 256 after 10
                          warm-up epochs from 0.3, cosine to 0.0048, wd 1e-6 on every tensor,
                          per step (RoB-SwAV's config).
  rob_dino, rob_msn,      VISSL AdamW as in RoB's configs (values per epoch). VISSL evaluates
  rob_ibot                the cosine on whole-run progress after the warm-up; here it runs
                          over the post-warm-up steps as in DINO (a small deviation).
  linear_eval             SGD 0.9, lr 3.0 (DisCo's commands), no decay, x0.5 at epochs 5, 10,
                          ..., 45, 60, 80 (DisCo main_lincls.py).

Frozen parameters never reach the optimiser. The caller splits the model with
`trainable_filter()` (= `nnx.All(nnx.Param, nnx.Not(FrozenParam))`): it leaves out
`FrozenParam`s (DINO's fixed weight-norm gain, the teacher head that Retro's student reuses)
and batch statistics; the teacher's own variables are a separate pytree anyway. Without this,
decoupled weight decay would still shrink frozen weights. The optimiser's `init` raises if
it is handed a `FrozenParam`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
import dataclasses
import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from retro_jax.models.heads import FrozenParam
from retro_jax.train.freeze import EarlyFreeze
from retro_jax.train.freeze import freeze_early

Schedule = Callable[[Any], jax.Array]

OPTIMIZERS = ("sgd", "lars", "larc", "adamw")
SCHEDULES = ("cosine", "constant", "step")
# torch.nn.utils.clip_grad_norm_ and DINO's clip_gradients both divide by norm + 1e-6.
_CLIP_EPSILON = 1e-6
# Keys that only some optimisers take, with their default there.
_OPTIMIZER_KEYS = {
    "sgd": {"momentum": 0.9, "nesterov": False},
    "lars": {"momentum": 0.9, "nesterov": False, "trust_coefficient": 0.001},
    "larc": {"momentum": 0.9, "nesterov": False, "trust_coefficient": 0.001},
    "adamw": {"b1": 0.9, "b2": 0.999, "eps": 1e-8},
}
_DEFAULT_EXCLUDE = {"sgd": "none", "lars": "bias_and_norm", "larc": "none",
                    "adamw": "bias_and_norm"}
# apex LARC's eps (VISSL's larc_config.eps in RoB-SwAV's config).
_LARC_EPSILON = 1e-8


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """A validated optimizer config with every default filled in (see the module docstring)."""

  name: str
  lr: float
  lr_scaling: str = "linear"
  momentum: float | None = None
  nesterov: bool | None = None
  b1: float | None = None
  b2: float | None = None
  eps: float | None = None
  trust_coefficient: float | None = None
  weight_decay: float = 0.0
  weight_decay_end: float | None = None
  exclude_from_weight_decay: str | tuple[str, ...] | None = None
  schedule: str = "cosine"
  schedule_unit: str = "step"
  warmup_epochs: float = 0.0
  warmup_start_lr: float = 0.0
  min_lr: float = 0.0
  milestones: tuple[float, ...] = ()
  gamma: float | None = None
  clip_grad_norm: float | None = None
  clip_grad_mode: str = "global"


_KEYS = tuple(f.name for f in dataclasses.fields(OptimizerConfig))


def _number(key: str, value: Any, *, low: float | None = None, low_open: bool = False,
            high: float | None = None, high_open: bool = False) -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
    raise ValueError(f"optimizer.{key} must be a finite number, got {value!r}")
  if low is not None and (value < low or (low_open and value == low)):
    raise ValueError(f"optimizer.{key} must be {'>' if low_open else '>='} {low}, got {value}")
  if high is not None and (value > high or (high_open and value == high)):
    raise ValueError(f"optimizer.{key} must be {'<' if high_open else '<='} {high}, got {value}")
  return float(value)


def _choice(key: str, value: Any, choices: Sequence[str]) -> str:
  if value not in choices:
    raise ValueError(f"optimizer.{key} must be one of {', '.join(map(repr, choices))}, "
                     f"got {value!r}")
  return value


def parse_optimizer_config(config: Mapping[str, Any] | Any) -> OptimizerConfig:
  """Validates an optimizer config (dict or ConfigDict) and fills in the defaults.

  Raises:
    ValueError: on an unknown key or optimizer, a key that the optimizer does not take, or an
      out-of-range value, naming the key.
  """
  if hasattr(config, "to_dict"):
    config = config.to_dict()
  if not isinstance(config, Mapping):
    raise ValueError(f"the optimizer config must be a mapping, got {type(config).__name__}")
  unknown = sorted(set(config) - set(_KEYS))
  if unknown:
    raise ValueError(f"unknown optimizer config key(s) {', '.join(map(repr, unknown))}; "
                     f"known keys: {', '.join(_KEYS)}")
  for key in ("name", "lr"):
    if key not in config:
      raise ValueError(f"the optimizer config needs {key!r}")
  name = _choice("name", config["name"], OPTIMIZERS)
  values = dict(config)
  for other, keys in _OPTIMIZER_KEYS.items():
    for key in keys:
      if key in values and values[key] is not None and key not in _OPTIMIZER_KEYS[name]:
        raise ValueError(f"optimizer.{key} does not apply to {name!r} (it is a key of "
                         f"{other!r}); remove it")
  for key, default in _OPTIMIZER_KEYS[name].items():
    if values.get(key) is None:
      values[key] = default
  if values.get("exclude_from_weight_decay") is None:
    values["exclude_from_weight_decay"] = _DEFAULT_EXCLUDE[name]
  if values.get("gamma") is None:
    values["gamma"] = 0.1
  cfg = OptimizerConfig(**{**dataclasses.asdict(OptimizerConfig(name=name, lr=0.0)), **values})

  _number("lr", cfg.lr, low=0.0, low_open=True)
  _choice("lr_scaling", cfg.lr_scaling, ("linear", "none"))
  if name in ("sgd", "lars", "larc"):
    _number("momentum", cfg.momentum, low=0.0, high=1.0, high_open=True)
    if not isinstance(cfg.nesterov, bool):
      raise ValueError(f"optimizer.nesterov must be True or False, got {cfg.nesterov!r}")
    if cfg.nesterov and cfg.momentum == 0:
      raise ValueError("optimizer.nesterov needs momentum > 0 (as torch.optim.SGD)")
  if name in ("lars", "larc"):
    _number("trust_coefficient", cfg.trust_coefficient, low=0.0, low_open=True)
  if name == "adamw":
    _number("b1", cfg.b1, low=0.0, high=1.0, high_open=True)
    _number("b2", cfg.b2, low=0.0, high=1.0, high_open=True)
    _number("eps", cfg.eps, low=0.0, low_open=True)
  _number("weight_decay", cfg.weight_decay, low=0.0)
  if cfg.weight_decay_end is not None:
    _number("weight_decay_end", cfg.weight_decay_end, low=0.0)
  exclude = cfg.exclude_from_weight_decay
  if isinstance(exclude, str):
    _choice("exclude_from_weight_decay", exclude, ("bias_and_norm", "none"))
  elif isinstance(exclude, Sequence) and all(isinstance(p, str) for p in exclude):
    exclude = tuple(exclude)
    for pattern in exclude:
      try:
        re.compile(pattern)
      except re.error as e:
        raise ValueError(f"optimizer.exclude_from_weight_decay: bad regex {pattern!r}: {e}")
  else:
    raise ValueError("optimizer.exclude_from_weight_decay must be 'bias_and_norm', 'none' or "
                     f"a list of regexes, got {exclude!r}")
  _choice("schedule", cfg.schedule, SCHEDULES)
  _choice("schedule_unit", cfg.schedule_unit, ("step", "epoch"))
  _number("warmup_epochs", cfg.warmup_epochs, low=0.0)
  _number("warmup_start_lr", cfg.warmup_start_lr, low=0.0)
  _number("min_lr", cfg.min_lr, low=0.0)
  if cfg.min_lr and cfg.schedule != "cosine":
    raise ValueError(f"optimizer.min_lr is the end of the cosine schedule; schedule "
                     f"{cfg.schedule!r} does not use it")
  milestones = tuple(cfg.milestones or ())
  if cfg.schedule == "step":
    if not milestones:
      raise ValueError("optimizer.schedule 'step' needs milestones (epochs)")
    for m in milestones:
      _number("milestones", m, low=0.0)
    if list(milestones) != sorted(milestones):
      raise ValueError(f"optimizer.milestones must be increasing, got {list(milestones)}")
  elif milestones:
    raise ValueError(f"optimizer.milestones only apply to schedule 'step', not {cfg.schedule!r}")
  _number("gamma", cfg.gamma, low=0.0, low_open=True)
  if cfg.clip_grad_norm is not None:
    _number("clip_grad_norm", cfg.clip_grad_norm, low=0.0, low_open=True)
  _choice("clip_grad_mode", cfg.clip_grad_mode, ("global", "per_tensor"))
  return dataclasses.replace(cfg, exclude_from_weight_decay=exclude, milestones=milestones)


# ---------------------------------------------------------------------------------------------
# Schedules: functions of the step, closed-form jnp (no tables baked into the compiled step).


def _warmup(after: Schedule, peak: float, warmup_steps: int, start: float) -> Schedule:
  """np.linspace(start, peak, W)[step] for step < W (DINO's warm-up), then `after`."""
  if warmup_steps == 0:
    return after
  slope = (peak - start) / max(warmup_steps - 1, 1)  # linspace(s, p, 1) == [s]

  def schedule(step):
    step = jnp.asarray(step)
    return jnp.where(step < warmup_steps, start + slope * step.astype(jnp.float32), after(step))

  return schedule


def cosine_schedule(peak: float, final: float, total_steps: int, warmup_steps: int = 0,
                    warmup_start: float = 0.0) -> Schedule:
  """DINO's `cosine_scheduler` as a function of the step (see the module docstring)."""
  if not 0 <= warmup_steps < total_steps:
    raise ValueError(f"the warm-up ({warmup_steps} steps) must be shorter than the run "
                     f"({total_steps} steps)")
  decay_steps = total_steps - warmup_steps

  def after(step):
    i = jnp.clip(jnp.asarray(step), warmup_steps, total_steps - 1) - warmup_steps
    # (1 + cos(pi i / D)) / 2 == sin(pi (D - i) / 2D)^2: the same value without float32's
    # cancellation in 1 + cos(x) near the end of the run (D - i is an exact integer).
    half_cosine = jnp.square(jnp.sin((jnp.pi / (2 * decay_steps))
                                     * (decay_steps - i).astype(jnp.float32)))
    return final + (peak - final) * half_cosine

  return _warmup(after, peak, warmup_steps, warmup_start)


def step_schedule(peak: float, milestone_steps: Sequence[int], gamma: float,
                  warmup_steps: int = 0, warmup_start: float = 0.0) -> Schedule:
  """peak * gamma ** #(milestones <= step) (MoCo's stepwise schedule, DisCo's linear eval)."""
  milestones = jnp.asarray(list(milestone_steps), jnp.int32)

  def after(step):
    passed = jnp.sum(jnp.asarray(step) >= milestones)
    return peak * jnp.power(jnp.float32(gamma), passed.astype(jnp.float32))

  return _warmup(after, peak, warmup_steps, warmup_start)


def constant_schedule(peak: float, warmup_steps: int = 0, warmup_start: float = 0.0) -> Schedule:
  return _warmup(lambda step: jnp.full((), peak, jnp.float32), peak, warmup_steps, warmup_start)


def per_epoch(schedule: Schedule, steps_per_epoch: int, total_steps: int) -> Schedule:
  """Holds `schedule` at its value on the first step of each epoch (MoCo, VISSL).

  Steps past the run keep the value of the run's last epoch.
  """
  def held(step):
    step = jnp.minimum(jnp.asarray(step), total_steps - 1)
    return schedule((step // steps_per_epoch) * steps_per_epoch)

  return held


def _schedules(cfg: OptimizerConfig, steps_per_epoch: int, total_steps: int,
               global_batch_size: int | None) -> tuple[Schedule, Schedule]:
  if cfg.lr_scaling == "linear":
    if global_batch_size is None or global_batch_size < 1:
      raise ValueError("lr_scaling 'linear' needs the global batch size "
                       f"(global_batch_size={global_batch_size!r})")
    peak = cfg.lr * global_batch_size / 256
  else:
    peak = cfg.lr
  warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
  if warmup >= total_steps:
    raise ValueError(f"optimizer.warmup_epochs={cfg.warmup_epochs} ({warmup} steps) must be "
                     f"shorter than the run ({total_steps} steps)")
  if cfg.schedule == "cosine":
    lr = cosine_schedule(peak, cfg.min_lr, total_steps, warmup, cfg.warmup_start_lr)
  elif cfg.schedule == "step":
    lr = step_schedule(peak, [int(round(m * steps_per_epoch)) for m in cfg.milestones],
                       cfg.gamma, warmup, cfg.warmup_start_lr)
  else:
    lr = constant_schedule(peak, warmup, cfg.warmup_start_lr)
  if cfg.weight_decay_end is None:
    wd = constant_schedule(cfg.weight_decay)
  else:
    wd = cosine_schedule(cfg.weight_decay, cfg.weight_decay_end, total_steps)
  if cfg.schedule_unit == "epoch":
    lr = per_epoch(lr, steps_per_epoch, total_steps)
    wd = per_epoch(wd, steps_per_epoch, total_steps)
  return lr, wd


# ---------------------------------------------------------------------------------------------
# Parameter selection: trainable filter, weight-decay mask, frozen-parameter guard.


def trainable_filter() -> nnx.filterlib.Filter:
  """The parameters an optimiser may see: `nnx.All(nnx.Param, nnx.Not(FrozenParam))`.

  Split the model with it (`nnx.split(model, trainable_filter(), ...)`, or
  `nnx.Optimizer(model, tx, wrt=trainable_filter())`) and hand only that state to `tx`.
  """
  return nnx.All(nnx.Param, nnx.Not(FrozenParam))


def parameter_name(path: Sequence[Any]) -> str:
  """The dotted name of a pytree path ('backbone.blocks.0.norm1.scale'), torch style."""
  parts = []
  for i, key in enumerate(path):
    if isinstance(key, jax.tree_util.DictKey):
      parts.append(str(key.key))
    elif isinstance(key, jax.tree_util.SequenceKey):
      parts.append(str(key.idx))
    elif isinstance(key, jax.tree_util.GetAttrKey):
      if not (key.name == "value" and i == len(path) - 1):  # the array inside an nnx.Variable
        parts.append(key.name)
    elif isinstance(key, jax.tree_util.FlattenedIndexKey):
      parts.append(str(key.key))
    else:
      parts.append(str(key))
  return ".".join(parts)


def _decays(name: str, leaf: Any, exclude: str | tuple[str, ...]) -> bool:
  if exclude == "none":
    return True
  if exclude == "bias_and_norm":
    # DINO's get_params_groups: no decay for names ending in 'bias' or any 1-D tensor (norm
    # scales and offsets); a 0-d scalar is treated like a 1-D one.
    return not (name.split(".")[-1] == "bias" or len(jnp.shape(leaf)) <= 1)
  return not any(re.search(pattern, name) for pattern in exclude)


def weight_decay_mask(params: Any, exclude: str | Sequence[str] = "bias_and_norm") -> Any:
  """A pytree of bools like `params` (an nnx.State or any pytree): True = decayed.

  Args:
    params: the trainable parameters.
    exclude: 'bias_and_norm' (DINO: no decay on '*bias' and 1-D tensors: BN/LN scales and
      offsets; ViT's pos_embed and cls_token are 3-D and decayed), 'none', or regexes searched
      in the dotted parameter name (e.g. VISSL's [r'\\.bias$', 'norm']).
  """
  exclude = exclude if isinstance(exclude, str) else tuple(exclude)
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: _decays(parameter_name(path), leaf, exclude), params)


def _mask_fn(exclude: str | tuple[str, ...]) -> Callable[[Any], Any] | None:
  if exclude == "none":
    return None
  return lambda params: weight_decay_mask(params, exclude)


def scale_by_larc(weight_decay: Schedule, trust_coefficient: float,
                  mask: Callable[[Any], Any] | None) -> optax.GradientTransformation:
  """apex's LARC (clip False) as VISSL wraps torch SGD with it: weight decay and trust ratio.

  Args:
    weight_decay: the decay as a function of the update count.
    trust_coefficient: eta.
    mask: None (decay every tensor) or params -> tree of bools (the decayed tensors).
  """

  def init(params):
    del params
    return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

  def update(updates, state, params):
    if params is None:
      raise ValueError("LARC needs the parameters")
    wd = weight_decay(state.count)
    decayed = mask(params) if mask is not None else jax.tree.map(lambda _: True, params)

    def one(g, p, is_decayed):
      w = wd if is_decayed else 0.0
      p_norm, g_norm = jnp.linalg.norm(p), jnp.linalg.norm(g)
      rate = trust_coefficient * p_norm / (g_norm + w * p_norm + _LARC_EPSILON)
      return jnp.where((p_norm > 0) & (g_norm > 0), (g + w * p) * rate, g)

    new = jax.tree.map(one, updates, params, decayed)
    return new, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

  return optax.GradientTransformation(init, update)


def reject_frozen_params() -> optax.GradientTransformation:
  """A no-op whose `init` raises if the parameters hold a `FrozenParam` (nnx.State input)."""

  def init(params):
    flat, _ = jax.tree_util.tree_flatten_with_path(
        params, is_leaf=lambda x: isinstance(x, nnx.Variable))
    frozen = [parameter_name(path) for path, leaf in flat if isinstance(leaf, FrozenParam)]
    if frozen:
      raise ValueError(f"frozen parameters reached the optimizer: {', '.join(frozen)}; split "
                       "the model with retro_jax.train.optim.trainable_filter()")
    return optax.EmptyState()

  return optax.GradientTransformation(init, lambda updates, state, params=None: (updates, state))


# ---------------------------------------------------------------------------------------------
# Gradient clipping with torch's arithmetic.


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
  """torch.nn.utils.clip_grad_norm_: g *= min(1, max_norm / (||all grads|| + 1e-6))."""

  def update(updates, state, params=None):
    del params
    norm = jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32)))
                        for g in jax.tree.leaves(updates)))
    factor = jnp.minimum(1.0, max_norm / (norm + _CLIP_EPSILON))
    return jax.tree.map(lambda g: (g * factor).astype(g.dtype), updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def clip_by_tensor_norm(max_norm: float) -> optax.GradientTransformation:
  """DINO's utils.clip_gradients: each tensor g *= c / (||g|| + 1e-6) where that is < 1."""

  def clip(g):
    factor = max_norm / (jnp.sqrt(jnp.sum(jnp.square(g.astype(jnp.float32)))) + _CLIP_EPSILON)
    return jnp.where(factor < 1.0, (g * factor).astype(g.dtype), g)

  def update(updates, state, params=None):
    del params
    return jax.tree.map(clip, updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


# ---------------------------------------------------------------------------------------------
# The optimiser.


def build_optimizer(config: Mapping[str, Any] | Any, *, steps_per_epoch: int, total_steps: int,
                    global_batch_size: int | None = None, freeze: EarlyFreeze | None = None
                    ) -> tuple[optax.GradientTransformation, dict[str, Schedule]]:
  """Builds the optax transformation and its schedules from an optimizer config.

  Args:
    config: the `optimizer` config block (keys in the module docstring).
    steps_per_epoch: optimizer steps per epoch (for warm-up, milestones, per-epoch values).
    total_steps: the run's length in steps (the cosine's end).
    global_batch_size: images per step over all hosts; needed for lr_scaling 'linear'.
    freeze: tensors that get no update during the first steps, skipped as torch skips a
      tensor whose `grad` is None (DINO's last layer; retro_jax/train/freeze.py).

  Returns:
    (tx, {"lr": schedule, "weight_decay": schedule}); `tx` takes only trainable parameters
    (see `trainable_filter`).
  """
  cfg = parse_optimizer_config(config)
  if isinstance(steps_per_epoch, bool) or not isinstance(steps_per_epoch, int) \
      or steps_per_epoch < 1:
    raise ValueError(f"steps_per_epoch must be a positive int, got {steps_per_epoch!r}")
  if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
    raise ValueError(f"total_steps must be a positive int, got {total_steps!r}")
  lr, wd = _schedules(cfg, steps_per_epoch, total_steps, global_batch_size)
  mask = _mask_fn(cfg.exclude_from_weight_decay)

  def update_rule(offset: int) -> list[optax.GradientTransformation]:
    """Everything after clipping, its schedules read `offset` steps past its own count."""
    lr_at, wd_at = lr, wd
    if offset:
      lr_at, wd_at = (lambda count: lr(count + offset)), (lambda count: wd(count + offset))
    decay = []
    if cfg.weight_decay or cfg.weight_decay_end:
      decay = [optax.add_decayed_weights(wd_at, mask=mask)]
    if cfg.name == "adamw":
      parts = [optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, eps_root=0.0), *decay]
    elif cfg.name == "larc":
      parts = [scale_by_larc(wd_at, cfg.trust_coefficient, mask)]
      if cfg.momentum:
        parts.append(optax.trace(decay=cfg.momentum, nesterov=cfg.nesterov))
    else:
      parts = decay
      if cfg.name == "lars":
        trust = optax.scale_by_trust_ratio(trust_coefficient=cfg.trust_coefficient)
        parts.append(trust if mask is None else optax.masked(trust, mask))
      if cfg.momentum:
        parts.append(optax.trace(decay=cfg.momentum, nesterov=cfg.nesterov))
    return [*parts, optax.scale_by_learning_rate(lr_at)]

  parts = [reject_frozen_params()]
  if cfg.clip_grad_norm is not None:
    clip = clip_by_global_norm if cfg.clip_grad_mode == "global" else clip_by_tensor_norm
    parts.append(clip(cfg.clip_grad_norm))
  if freeze is None:
    parts += update_rule(0)  # one flat chain: the optimizer state of earlier runs restores
  else:
    parts.append(freeze_early(lambda offset: optax.chain(*update_rule(offset)), freeze))
  return optax.chain(*parts), {"lr": lr, "weight_decay": wd}


# ---------------------------------------------------------------------------------------------
# The recipes' optimizer blocks (base lr per 256 images; see the module docstring).

_MOCO_V2_SGD = dict(name="sgd", lr=0.03, lr_scaling="linear", momentum=0.9, weight_decay=1e-4,
                    exclude_from_weight_decay="none", schedule="cosine", schedule_unit="epoch")

RECIPES: dict[str, dict[str, Any]] = {
    "moco_v2": _MOCO_V2_SGD,
    "disco": _MOCO_V2_SGD,
    "retro": _MOCO_V2_SGD,
    "retro_mobilenetv3": {**_MOCO_V2_SGD, "clip_grad_norm": 5.0, "clip_grad_mode": "global"},
    "dino": dict(name="adamw", lr=5e-4, lr_scaling="linear", warmup_epochs=10, min_lr=1e-6,
                 weight_decay=0.04, weight_decay_end=0.4, exclude_from_weight_decay="bias_and_norm",
                 clip_grad_norm=3.0, clip_grad_mode="per_tensor"),
    # 5e-4 x 1024 / 256 = 2e-3 at RoB's batch of 1,024; 10 of 300 epochs of warm-up from 1e-5.
    "rob_dino": dict(name="adamw", lr=5e-4, lr_scaling="linear", warmup_epochs=10,
                     warmup_start_lr=1e-5, min_lr=1e-5, weight_decay=0.04, weight_decay_end=0.4,
                     exclude_from_weight_decay="bias_and_norm", schedule_unit="epoch"),
    # 5e-4 x 1024 / 256 = 2e-3 (VISSL's absolute 0.002); 10 of 100 epochs of warm-up from
    # 1e-5; weight decay to 0.48, as both iBOT distillation configs write it (iBOT's own 0.4).
    "rob_ibot": dict(name="adamw", lr=5e-4, lr_scaling="linear", warmup_epochs=10,
                     warmup_start_lr=1e-5, min_lr=1e-5, weight_decay=0.04, weight_decay_end=0.48,
                     exclude_from_weight_decay="bias_and_norm", schedule_unit="epoch"),
    # 2.5e-4 x 1024 / 256 = 1e-3; 15 of 150 epochs of warm-up from 2e-4; global clip 1.0.
    "rob_msn": dict(name="adamw", lr=2.5e-4, lr_scaling="linear", warmup_epochs=15,
                    warmup_start_lr=2e-4, min_lr=1e-5, weight_decay=0.04, weight_decay_end=0.4,
                    exclude_from_weight_decay="bias_and_norm", clip_grad_norm=1.0,
                    clip_grad_mode="global", schedule_unit="epoch"),
    # RoB-SwAV (VISSL SGD + LARC): 0.3 x 4096 / 256 = 4.8 after 10 of 100 epochs of linear
    # warm-up from 0.3, cosine to 0.0048 (VISSL scales it with the peak: 4.8 / 1000; absolute
    # here, the written value at 4,096), per step; wd 1e-6 on every tensor (BN and biases too).
    "rob_swav": dict(name="larc", lr=0.3, lr_scaling="linear", momentum=0.9,
                     trust_coefficient=0.001, weight_decay=1e-6, exclude_from_weight_decay="none",
                     warmup_epochs=10, warmup_start_lr=0.3, min_lr=0.0048),
    "linear_eval": dict(name="sgd", lr=3.0, lr_scaling="linear", momentum=0.9, weight_decay=0.0,
                        schedule="step", schedule_unit="epoch", gamma=0.5,
                        milestones=(5, 10, 15, 20, 25, 30, 35, 40, 45, 60, 80)),
}


def recipe_config(name: str) -> dict[str, Any]:
  """A copy of a recipe's optimizer block, to use as the config's `optimizer` entry."""
  if name not in RECIPES:
    raise ValueError(f"unknown optimizer recipe {name!r}; known: {', '.join(sorted(RECIPES))}")
  return dict(RECIPES[name])
