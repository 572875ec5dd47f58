"""NumPy helpers shared by the objective tests (float64) and a placement helper for meshes."""

from __future__ import annotations

import jax
import numpy as np
import pytest


def put(x, mesh: jax.sharding.Mesh, spec: jax.sharding.PartitionSpec):
  """Places x on the mesh with the given partition spec."""
  return jax.device_put(x, jax.sharding.NamedSharding(mesh, spec))


def unit(x: np.ndarray) -> np.ndarray:
  """Rows of x scaled to unit L2 norm (float64)."""
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def log_softmax(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float64)
  shifted = x - x.max(axis=-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def softmax(x: np.ndarray) -> np.ndarray:
  return np.exp(log_softmax(x))


def info_nce(q: np.ndarray, k: np.ndarray, queue: np.ndarray, temperature: float) -> float:
  """MoCo's loss on unit vectors: mean_i -log softmax([q_i.k_i, q_i.n_1..n_K] / T)_0."""
  losses = []
  for qi, ki in zip(np.asarray(q, np.float64), np.asarray(k, np.float64)):
    logits = np.concatenate([[qi @ ki], np.asarray(queue, np.float64) @ qi]) / temperature
    losses.append(-log_softmax(logits)[0])
  return float(np.mean(losses))


def enqueue(queue: np.ndarray, ptr: int, keys: np.ndarray) -> tuple[np.ndarray, int]:
  """MoCo's _dequeue_and_enqueue on a (K, D) queue: rows ptr..ptr+B <- keys, ptr += B mod K."""
  queue = np.array(queue, np.float64)
  batch = len(keys)
  queue[ptr:ptr + batch] = keys
  return queue, (ptr + batch) % len(queue)


def with_aux(loss_fn):
  """(loss, metrics, state) -> (loss, (metrics, state)), the form value_and_grad(has_aux) takes."""
  def wrapped(*args, **kwargs):
    loss, metrics, state = loss_fn(*args, **kwargs)
    return loss, (metrics, state)
  return wrapped


def vissl_criterion(student_scores, teacher_targets, *, student_temperature,
                    student_num_crops, teacher_num_crops, swapped_assignment):
  """VISSL's RoB DINO/MSN distillation criterion (teacher_targets are probabilities).

  Crops are concatenated along the batch as in VISSL; `swapped_assignment` chooses the pairs.
  """
  student_out = np.split(student_scores / student_temperature, student_num_crops)
  teacher_out = np.split(teacher_targets, teacher_num_crops)
  total_loss, n_loss_terms = 0.0, 0
  for iq, q in enumerate(teacher_out):
    for v in range(len(student_out)):
      if swapped_assignment:
        if v == iq:
          continue
      elif v < teacher_num_crops and v != iq:
        continue
      total_loss += np.sum(-q * log_softmax(student_out[v]), axis=-1).mean()
      n_loss_terms += 1
  return total_loss / n_loss_terms


# Fixtures; each test file imports them by name (a conftest.py here would shadow the root
# conftest module, which tests/test_harness.py imports).


@pytest.fixture
def rng() -> np.random.Generator:
  return np.random.default_rng(0)


@pytest.fixture(params=["explicit", "auto"])
def data_mesh(request) -> jax.sharding.Mesh:
  """A 1-D ('data',) mesh over the 8 simulated devices, with explicit or auto axis types."""
  axis_type = {"explicit": jax.sharding.AxisType.Explicit,
               "auto": jax.sharding.AxisType.Auto}[request.param]
  return jax.make_mesh((jax.device_count(),), ("data",), axis_types=(axis_type,))
