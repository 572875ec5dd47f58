"""Weighted k-NN classification of frozen features: DINO's `eval_knn.py: knn_classifier`.

One implementation serves the offline evaluation (k = 20 and 200, T = 0.07, top-1 and top-5)
and the online monitor during training (k = 200 every N steps). For a test feature x and a
bank of train features f_j with labels y_j (DINO; the InstDisc / MoCo monitors are the same):

    s_j      = < x / |x| , f_j / |f_j| >                   cosine similarity
    N_k      = the k indices j of largest s_j              (`lax.top_k`, sorted)
    score_c  = sum over j in N_k with y_j = c of exp(s_j / T)

computed as DINO writes it: one-hot(y_j, j in N_k) [k, C] times the weights exp(s_j / T) [k, 1],
summed over the k neighbours. Normalisation is torch's F.normalize, x / max(|x|, 1e-12). The
prediction is the class of largest score; an example counts for top-5 when its label is among
the min(5, k) best classes (DINO's `correct.narrow(1, 0, min(5, k))`; with k < 5 only k classes
can have votes); top-5 is reported only when num_classes >= 5. `temperature=math.inf` gives
uniform votes, a plain majority vote (scikit-learn's `weights='uniform'`).

Ties: `lax.top_k` puts the lower index first, both for equal similarities (the train example
earlier in the bank is the neighbour) and for equal scores (the lower class is predicted, as in
scikit-learn's `KNeighborsClassifier.predict`). torch leaves tie order unspecified, so DINO can
differ from this only on exact ties.

Memory and compute. The test set is taken in chunks of `chunk_size` rows, one jitted call each
and one compilation (the last chunk is moved back to end at the last row; the rows it shares
with the previous chunk are dropped). Besides the bank itself (N x D x itemsize, never copied:
its inverse norms are computed once and the similarities rescaled), one chunk needs per device

    chunk_size x N_local x 4 B      the fp32 similarity block (N_local: bank rows on the device)
    + up to as much again           XLA's top-k (for large k a sort of each row)
    + chunk_size x k x C x 4 B      the one-hot votes

ImageNet on one device (N = 1.28M, D = 2048, C = 1000, k = 200, chunk 256): the bank takes
10.5 GB in fp32 (5.2 GB in bf16); XLA's memory analysis of the compiled chunk (CPU backend; not
yet measured on GPU or TPU) gives 1.3 GB of temporaries for `knn_predict` and 2.6 GB for
`knn_accuracy`. The 50k validation images make 196 chunks and 1.3e14 multiply-adds, in fp32 at
`Precision.HIGHEST` (the scores DINO computes in fp32). On smaller devices shard the bank or
lower `chunk_size`. The test features sit whole on each device (0.4 GB for ImageNet's 50k x
2048), and `knn_predict` keeps its N_test x C scores there until the end (0.2 GB).

Sharding. Inputs are NumPy arrays or `jax.Array`s, sharded or not. A bank sharded along N (the
training mesh's `P('data')`) stays where it is: each device computes its block of similarities
and its top-k (`shard_map`), and only the chunk x shards x k candidates are gathered for the
final top-k (`_top_k_blocks`). Test features and labels are put on the bank's devices once,
replicated. Results are replicated, so every process of a multi-host job gets them. They equal
the single-device ones up to fp32 rounding (rtol 1e-5 on the scores, identical accuracies;
tested on 8 simulated CPU devices).

Features for the bank and the test set come from `extract_features` (see its docstring for
the batch format); the online monitor calls it and `knn_accuracy` every N steps.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from retro_jax.user_errors import UserError

__all__ = ["DEFAULT_CHUNK_SIZE", "DEFAULT_KS", "KnnError", "TEMPERATURE", "extract_features",
           "knn_accuracy", "knn_predict"]

TEMPERATURE = 0.07  # DINO's --temperature
DEFAULT_KS = (20, 200)  # DINO reports 10, 20, 100, 200; 20 is its headline, 200 InstDisc's
DEFAULT_CHUNK_SIZE = 256
_NORMALIZE_EPSILON = 1e-12  # F.normalize's eps

log = logging.getLogger(__name__)


class KnnError(UserError, ValueError):
  """Inputs the k-NN classifier cannot use (shapes, labels, k, temperature)."""


# ----------------------------------------------------------------------------- the math


def _inverse_norms(bank: jax.Array) -> tuple[jax.Array, jax.Array]:
  norms = jnp.sqrt(jnp.sum(jnp.square(bank.astype(jnp.float32)), axis=-1))
  return 1.0 / jnp.maximum(norms, _NORMALIZE_EPSILON), jnp.all(jnp.isfinite(norms))


_inverse_norms_jit = jax.jit(_inverse_norms)


def _neighbours(bank, inv_norms, bank_labels, test, start, *, k: int, chunk: int,
                blocks: NamedSharding | None):
  """Similarities [chunk, k] (descending) and labels [chunk, k] of the k nearest bank rows."""
  x = lax.dynamic_slice_in_dim(test, start, chunk, axis=0).astype(jnp.float32)
  x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), _NORMALIZE_EPSILON)
  similarity = jnp.matmul(x.astype(bank.dtype), bank.T, precision=lax.Precision.HIGHEST,
                          preferred_element_type=jnp.float32) * inv_norms[None, :]
  if blocks is None:
    sims, indices = lax.top_k(similarity, k)
  else:  # Top-k of each device's block, then of their candidates (see `_top_k_blocks`).
    sims, indices = _top_k_blocks(similarity, k, blocks)
  return sims, jnp.take(bank_labels, indices, axis=0)


def _top_k_blocks(similarity, k: int, blocks: NamedSharding):
  """`lax.top_k(similarity, k)` for similarities whose axis N is split over devices.

  Plain `top_k` over the split axis makes XLA all-gather the whole [chunk, N] block onto every
  device first (XLA 0.10 on CPU; its own partitioned top-k did the same with a reshape). Here
  each device takes the top-k of its own block (`shard_map`; `blocks` is the sharding
  P(None, <the bank's N axes>)) and only the [chunk, shards x k] candidates travel. Equal
  values keep the lower global index first, as `lax.top_k` does: the candidates are in block
  order.
  """
  axes = blocks.spec[1]

  def local(block):
    sims, indices = lax.top_k(block, min(k, block.shape[1]))
    return sims, indices + lax.axis_index(axes) * block.shape[1]

  sims, indices = jax.shard_map(local, mesh=blocks.mesh, in_specs=blocks.spec,
                                out_specs=(blocks.spec, blocks.spec))(similarity)
  sims, picked = lax.top_k(sims, k)
  return sims, jnp.take_along_axis(indices, picked, axis=1)


def _votes(sims, labels, temperature, num_classes: int):
  """DINO: sum over neighbours of one_hot(label) * exp(sim / T) -> scores [chunk, C]."""
  weights = jnp.exp(sims / temperature)
  one_hot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  return jnp.sum(one_hot * weights[..., None], axis=1)


def _replicate(x, sharding):
  return x if sharding is None else lax.with_sharding_constraint(x, sharding)


@functools.partial(jax.jit,
                   static_argnames=("k", "num_classes", "chunk", "blocks", "out_sharding"))
def _score_chunk(bank, inv_norms, bank_labels, test, start, temperature, *, k, num_classes,
                 chunk, blocks, out_sharding):
  sims, labels = _neighbours(bank, inv_norms, bank_labels, test, start, k=k, chunk=chunk,
                             blocks=blocks)
  return _replicate(_votes(sims, labels, temperature, num_classes), out_sharding)


@functools.partial(jax.jit,
                   static_argnames=("ks", "num_classes", "chunk", "blocks", "out_sharding"))
def _count_chunk(bank, inv_norms, bank_labels, test, test_labels, start, skip, temperature, *,
                 ks, num_classes, chunk, blocks, out_sharding):
  """int32 [len(ks), 2]: top-1 and top-5 hits among the chunk's rows >= skip."""
  sims, labels = _neighbours(bank, inv_norms, bank_labels, test, start, k=max(ks), chunk=chunk,
                             blocks=blocks)
  targets = lax.dynamic_slice_in_dim(test_labels, start, chunk)
  new = jnp.arange(chunk) >= skip
  counts = []
  for k in ks:  # The top-max(ks) list is sorted: its first k entries are the top-k.
    scores = _votes(sims[:, :k], labels[:, :k], temperature, num_classes)
    _, predictions = lax.top_k(scores, min(5, k, num_classes))
    hits = (predictions == targets[:, None]) & new[:, None]
    counts.append(jnp.stack([jnp.sum(hits[:, 0]), jnp.sum(jnp.any(hits, axis=1))]))
  return _replicate(jnp.stack(counts).astype(jnp.int32), out_sharding)


# ------------------------------------------------------------------ checks and placement


def _features(x, name: str) -> Any:
  if not isinstance(x, jax.Array):
    x = np.asarray(x)
  if x.ndim != 2:
    raise KnnError(f"{name} must be 2-D [examples, dim], got shape {tuple(x.shape)}")
  if not x.shape[0]:
    raise KnnError(f"{name} is empty (shape {tuple(x.shape)})")
  if not x.shape[1]:
    raise KnnError(f"{name} has zero width (shape {tuple(x.shape)})")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise KnnError(f"{name} must be floating point, got {x.dtype}")
  return x


def _labels(y, name: str, count: int, num_classes: int) -> Any:
  if not isinstance(y, jax.Array):
    y = np.asarray(y)
  if y.ndim != 1 or y.shape[0] != count:
    raise KnnError(f"{name} must be 1-D with one label per feature row ({count}), "
                   f"got shape {tuple(y.shape)}")
  if not jnp.issubdtype(y.dtype, jnp.integer):
    raise KnnError(f"{name} must be integer class ids, got {y.dtype}")
  low, high = int(jnp.min(y)), int(jnp.max(y))
  if low < 0 or high >= num_classes:
    raise KnnError(f"{name} must lie in [0, num_classes={num_classes}), found values in "
                   f"[{low}, {high}]")
  return y


def _replicated(bank: jax.Array) -> jax.sharding.Sharding:
  """A sharding that holds a whole copy on each of the bank's devices."""
  sharding = bank.sharding
  if isinstance(sharding, NamedSharding):
    return NamedSharding(sharding.mesh, P())
  devices = sorted(sharding.device_set, key=lambda d: d.id)
  if len(devices) == 1:
    return jax.sharding.SingleDeviceSharding(devices[0])
  return NamedSharding(Mesh(np.asarray(devices), ("devices",)), P())


def _blocks(bank: jax.Array) -> NamedSharding | None:
  """P(None, <the bank's N axes>) on its mesh when the bank is split along N, else None.

  A bank split along N by another kind of sharding than `NamedSharding` gets the plain top-k
  (same result, the whole similarity block on each device).
  """
  sharding = bank.sharding
  if not isinstance(sharding, NamedSharding) or not sharding.spec or sharding.spec[0] is None:
    return None
  if _size(sharding.mesh, sharding.spec[0]) == 1:
    return None
  return NamedSharding(sharding.mesh, P(None, sharding.spec[0]))


def _size(mesh: Mesh, axes) -> int:
  """Devices along a PartitionSpec entry (an axis name or a tuple of them)."""
  axes = (axes,) if isinstance(axes, str) else tuple(axes)
  return math.prod(mesh.shape[axis] for axis in axes)


def _place(x, sharding: jax.sharding.Sharding) -> jax.Array:
  if isinstance(x, jax.Array) and x.sharding.device_set == sharding.device_set:
    return x
  return jax.device_put(x, sharding)


def _clip_k(k: int, bank_size: int) -> int:
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
    raise KnnError(f"k must be a positive integer, got {k!r}")
  if k > bank_size:
    log.warning("k=%d exceeds the %d train examples: using k=%d (DINO's topk would fail)",
                k, bank_size, bank_size)
    return bank_size
  return int(k)


class _Problem:
  """Validated inputs, placed on the bank's devices, and the chunking of the test set."""

  def __init__(self, train_features, train_labels, test_features, num_classes, temperature,
               chunk_size, test_labels=None, *, with_labels=False):
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or (
        num_classes < 1):
      raise KnnError(f"num_classes must be a positive integer, got {num_classes!r}")
    if not temperature > 0:  # Also refuses NaN.
      raise KnnError(f"temperature must be > 0 (math.inf for uniform votes), got {temperature}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or (
        chunk_size < 1):
      raise KnnError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    train = _features(train_features, "train_features")
    test = _features(test_features, "test_features")
    if train.shape[1] != test.shape[1]:
      raise KnnError(f"feature widths differ: train_features {tuple(train.shape)}, "
                     f"test_features {tuple(test.shape)}")
    labels = _labels(train_labels, "train_labels", train.shape[0], num_classes)
    if with_labels:
      test_labels = _labels(test_labels, "test_labels", test.shape[0], num_classes)

    self.bank = train if isinstance(train, jax.Array) else jnp.asarray(train)
    replicated = _replicated(self.bank)
    self.out_sharding = replicated if isinstance(replicated, NamedSharding) else None
    self.inv_norms, finite = _inverse_norms_jit(self.bank)
    if not bool(finite):
      raise KnnError("train_features holds non-finite values (NaN or inf)")
    self.bank_labels = _place(labels, replicated).astype(jnp.int32)
    self.test = _place(test, replicated)
    if not bool(_inverse_norms_jit(self.test)[1]):
      raise KnnError("test_features holds non-finite values (NaN or inf)")
    self.test_labels = (_place(test_labels, replicated).astype(jnp.int32) if with_labels
                        else None)
    self.num_classes = int(num_classes)
    self.temperature = jnp.float32(temperature)
    self.bank_size, self.num_test = self.bank.shape[0], self.test.shape[0]
    self.chunk = min(int(chunk_size), self.num_test)
    self.blocks = _blocks(self.bank)

  def chunks(self):
    """(start, skip) per chunk: rows [start, start + chunk), of which the first skip are done."""
    for first in range(0, self.num_test, self.chunk):
      start = min(first, self.num_test - self.chunk)
      yield start, first - start

  def arrays(self):
    return self.bank, self.inv_norms, self.bank_labels, self.test


# ----------------------------------------------------------------------------- the API


def knn_predict(train_features, train_labels, test_features, *, num_classes: int,
                k: int = 200, temperature: float = TEMPERATURE,
                chunk_size: int = DEFAULT_CHUNK_SIZE) -> np.ndarray:
  """Weighted k-NN class scores, float32 [N_test, num_classes] (see the module docstring).

  Args:
    train_features: [N, D] floating, the bank (normalised here; NumPy or a jax.Array, which may
      be sharded along N).
    train_labels: [N] integer class ids in [0, num_classes).
    test_features: [N_test, D] floating.
    num_classes: C, the width of the scores.
    k: neighbours per test example; clipped (with a logged warning) to N.
    temperature: T of the weights exp(sim / T); math.inf for uniform votes.
    chunk_size: test rows per jitted call; bounds the memory (module docstring).

  Raises:
    KnnError: empty or non-2-D features, different widths, labels out of range or not integer,
      non-finite features, k < 1, temperature <= 0.
  """
  problem = _Problem(train_features, train_labels, test_features, num_classes, temperature,
                     chunk_size)
  k = _clip_k(k, problem.bank_size)
  pending = [(_score_chunk(*problem.arrays(), start, problem.temperature, k=k,
                           num_classes=problem.num_classes, chunk=problem.chunk,
                           blocks=problem.blocks, out_sharding=problem.out_sharding), skip)
             for start, skip in problem.chunks()]
  return np.concatenate([np.asarray(scores)[skip:] for scores, skip in pending])


def knn_accuracy(train_features, train_labels, test_features, test_labels, *,
                 num_classes: int, ks: Sequence[int] = DEFAULT_KS,
                 temperature: float = TEMPERATURE,
                 chunk_size: int = DEFAULT_CHUNK_SIZE) -> dict[str, float]:
  """Top-1 (and top-5 if num_classes >= 5) accuracy in percent for each k in `ks`.

  Returns {"knn_top1_k20": ..., "knn_top5_k20": ..., "knn_top1_k200": ..., ...}, keyed by the
  requested k even when it was clipped to the bank size. All ks share one similarity pass and
  one top-max(ks) (its first k entries are the top-k). Arguments as `knn_predict`, plus
  `test_labels` [N_test] in [0, num_classes).
  """
  ks = tuple(ks)
  if not ks:
    raise KnnError("ks is empty: give at least one k")
  if len(set(ks)) != len(ks):
    raise KnnError(f"ks has repeated values: {ks}")
  problem = _Problem(train_features, train_labels, test_features, num_classes, temperature,
                     chunk_size, test_labels, with_labels=True)
  used = tuple(_clip_k(k, problem.bank_size) for k in ks)
  total = None
  for start, skip in problem.chunks():
    counts = _count_chunk(*problem.arrays(), problem.test_labels, start, skip,
                          problem.temperature, ks=used, num_classes=problem.num_classes,
                          chunk=problem.chunk, blocks=problem.blocks,
                          out_sharding=problem.out_sharding)
    total = counts if total is None else total + counts
  total = np.asarray(total, np.int64)
  result = {}
  for k, (top1, top5) in zip(ks, total):
    result[f"knn_top1_k{k}"] = 100.0 * int(top1) / problem.num_test
    if problem.num_classes >= 5:
      result[f"knn_top5_k{k}"] = 100.0 * int(top5) / problem.num_test
  return result


def _to_host(x) -> np.ndarray:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def _images(batch: Mapping[str, Any], number: int):
  if "image" in batch:
    return batch["image"]
  if "views" in batch:
    return batch["views"][0]
  raise KnnError(f"batch {number} has neither 'image' nor 'views' (keys: {sorted(batch)})")


def extract_features(apply_fn: Callable[[Any], Any],
                     batches: Iterable[Mapping[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
  """Runs `apply_fn` over `batches`; returns (features float32 [N, D], labels int64 [N]) on host.

  `apply_fn(images) -> features [B, D]` is called as given: make it a jitted, eval-mode forward
  whose parameters are arguments, not closed-over constants, e.g.
  `forward = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x).features)` and
  `apply_fn = lambda x: forward(state, x)`. It also does any input normalisation (pipeline
  views are uint8).

  A batch is a mapping with
    "image": [B, H, W, C], or "views": a tuple of them (the first view is used), and
    "label": [B] integer class ids, and optionally
    "mask":  [B] bool, True for real rows; rows where it is False (padding) are dropped.
  NumPy or jax.Array, sharded or not; arrays spread over several processes are gathered, so
  every process returns everything. The batches of `retro_jax.data.pipeline` ({"views",
  "index", "label"}) fit when built with a one-view eval preset (`eval`, `eval_lowres`). That
  pipeline drops the last `num_examples % global_batch_size` examples of each epoch: one epoch
  of it covers the whole split only when the global batch divides the split size.

  Batch i + 1 is dispatched before batch i is copied to the host, so the two overlap.
  """
  features, labels = [], []

  def collect(number, out, label, mask):
    out, label = _to_host(out), _to_host(label)
    if out.ndim != 2 or out.shape[0] != label.shape[0]:
      raise KnnError(f"batch {number}: apply_fn gave shape {out.shape} for {label.shape[0]} "
                     "labels; it must return features [B, D]")
    if mask is not None:
      mask = _to_host(mask).astype(bool)
      out, label = out[mask], label[mask]
    features.append(out.astype(np.float32))
    labels.append(label.astype(np.int64))

  pending = None
  for number, batch in enumerate(batches):
    if "label" not in batch:
      raise KnnError(f"batch {number} has no 'label' (keys: {sorted(batch)})")
    out = apply_fn(_images(batch, number))
    if pending is not None:
      collect(*pending)
    pending = (number, out, batch["label"], batch.get("mask"))
  if pending is None:
    raise KnnError("batches yielded no batch")
  collect(*pending)
  return np.concatenate(features), np.concatenate(labels)
