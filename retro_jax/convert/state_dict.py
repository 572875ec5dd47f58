"""Strict, rule-based loading of PyTorch state dicts into NNX models, and back.

A model's NNX attribute tree mirrors its reference PyTorch module tree (the naming contract in
`retro_jax.models.registry`), so a torch key differs from an NNX path only in its leaf name and
in the axis order of kernels:

  NNX leaf            torch leaf       array
  Conv `kernel`       `weight`         (kh, kw, in/groups, out) <- (out, in/groups, kh, kw)
  Linear `kernel`     `weight`         (in, out)                <- (out, in)
  Norm `scale`        `weight`         as is
  BatchNorm `mean`    `running_mean`   as is
  BatchNorm `var`     `running_var`    as is
  anything else       same name        as is (biases, cls_token, weight_g, ...)

Loading is all or nothing: every NNX variable must receive a value of its exact shape and
every torch entry must be consumed, otherwise `StateDictMismatchError` lists the problems and
the model is left untouched.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from retro_jax.user_errors import UserError

# Torch bookkeeping that carries no model state.
_IGNORED_TORCH_LEAVES = ("num_batches_tracked",)
_LEAF_RENAMES = {"scale": "weight", "mean": "running_mean", "var": "running_var"}
_LISTED_PER_KIND = 20


class StateDictMismatchError(UserError, ValueError):
  """A state dict does not fit a model exactly."""

  def __init__(self, missing: list[str], unexpected: list[str], wrong_shape: list[str],
               context: str = ""):
    self.missing, self.unexpected, self.wrong_shape = missing, unexpected, wrong_shape
    parts = [f"{context}state dict does not match the model; nothing was loaded."]
    for title, keys in (("missing from the state dict", missing),
                        ("unexpected in the state dict", unexpected),
                        ("shape mismatch", wrong_shape)):
      if keys:
        shown = "\n    ".join(keys[:_LISTED_PER_KIND])
        more = f"\n    ... and {len(keys) - _LISTED_PER_KIND} more" if len(
            keys) > _LISTED_PER_KIND else ""
        parts.append(f"  {len(keys)} {title}:\n    {shown}{more}")
    super().__init__("\n".join(parts))


def _path_to_key(path: tuple[Any, ...]) -> str:
  return ".".join(str(part) for part in path)


def torch_key(path: tuple[Any, ...]) -> str:
  """The torch state-dict key of the NNX variable at `path`."""
  *parents, leaf = path
  if leaf == "kernel":
    leaf = "weight"
  else:
    leaf = _LEAF_RENAMES.get(leaf, leaf)
  return _path_to_key((*parents, leaf))


def _kernel_from_torch(weight: np.ndarray) -> np.ndarray:
  if weight.ndim == 4:  # Conv2d (out, in/groups, kh, kw) -> (kh, kw, in/groups, out)
    return weight.transpose(2, 3, 1, 0)
  if weight.ndim == 2:  # Linear (out, in) -> (in, out)
    return weight.T
  raise ValueError(f"unsupported kernel rank {weight.ndim}")


def _kernel_to_torch(kernel: np.ndarray) -> np.ndarray:
  if kernel.ndim == 4:
    return kernel.transpose(3, 2, 0, 1)
  if kernel.ndim == 2:
    return kernel.T
  raise ValueError(f"unsupported kernel rank {kernel.ndim}")


def _as_numpy(value: Any) -> np.ndarray:
  # torch tensors are converted without importing torch: runtime code must not need it.
  if hasattr(value, "detach"):
    value = value.detach().cpu().numpy()
  return np.asarray(value)


@dataclasses.dataclass(frozen=True)
class _Slot:
  path: tuple[Any, ...]
  variable: nnx.Variable
  is_kernel: bool


def _slots(model: nnx.Module) -> dict[str, _Slot]:
  slots = {}
  for path, variable in nnx.iter_graph(model):
    # Only parameters and batch statistics have torch counterparts; RNG state does not.
    if isinstance(variable, (nnx.Param, nnx.BatchStat)):
      key = torch_key(path)
      if key in slots:
        raise ValueError(f"two NNX variables map to the torch key {key!r}")
      slots[key] = _Slot(path, variable, path[-1] == "kernel")
  return slots


def load_state_dict(model: nnx.Module, state_dict: Mapping[str, Any], *,
                    context: str = "") -> None:
  """Copies a torch state dict into `model` in place, all or nothing.

  Args:
    model: an NNX module following the naming contract.
    state_dict: torch key -> tensor or array (torch tensors are accepted as they are).
    context: a prefix for error messages (e.g. the file and format being converted).

  Raises:
    StateDictMismatchError: a key is missing, unexpected, or has the wrong shape.
  """
  slots = _slots(model)
  entries = {k: v for k, v in state_dict.items()
             if k.rsplit(".", 1)[-1] not in _IGNORED_TORCH_LEAVES}
  missing = sorted(k for k in slots if k not in entries)
  unexpected = sorted(k for k in entries if k not in slots)
  arrays, wrong_shape = {}, []
  for key in sorted(set(slots) & set(entries)):
    slot = slots[key]
    array = _as_numpy(entries[key])
    if slot.is_kernel and array.ndim in (2, 4):
      array = _kernel_from_torch(array)
    expected = tuple(slot.variable.get_value().shape)
    if array.shape != expected:
      wrong_shape.append(f"{key}: file {tuple(_as_numpy(entries[key]).shape)}, "
                         f"model expects {_expected_torch_shape(slot, expected)}")
    arrays[key] = array
  if missing or unexpected or wrong_shape:
    raise StateDictMismatchError(missing, unexpected, wrong_shape, context)
  for key, array in arrays.items():
    variable = slots[key].variable
    dtype = variable.get_value().dtype
    # A copy: on CPU jnp.asarray may share memory with the torch tensor, which torch code
    # can still change in place (a train-mode BatchNorm, an optimiser step).
    variable.set_value(jnp.array(array, dtype=dtype, copy=True))


def _expected_torch_shape(slot: _Slot, shape: tuple[int, ...]) -> tuple[int, ...]:
  if slot.is_kernel and len(shape) in (2, 4):
    return tuple(_kernel_to_torch(np.empty(shape, dtype=np.uint8)).shape)
  return shape


def torch_shapes(model: nnx.Module) -> dict[str, tuple[int, ...]]:
  """torch key -> the torch-layout shape the model expects (works on `nnx.eval_shape` models)."""
  return {key: _expected_torch_shape(slot, tuple(slot.variable.get_value().shape))
          for key, slot in _slots(model).items()}


def model_state_dict(model: nnx.Module, *, skip: Iterable[str] = ()) -> dict[str, np.ndarray]:
  """The torch-layout state dict of `model` (NumPy float arrays), the inverse of loading."""
  skipped = set(skip)
  result = {}
  for key, slot in _slots(model).items():
    if key in skipped:
      continue
    array = np.array(slot.variable.get_value())  # A writable copy, as torch.from_numpy wants.
    result[key] = _kernel_to_torch(array) if slot.is_kernel and array.ndim in (2, 4) else array
  return result
