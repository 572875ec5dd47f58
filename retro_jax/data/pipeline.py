"""The per-process host pipeline: which examples make up each step, and their hand-over to JAX.

The contract the trainer relies on:
  * Step s of the run is the global batch s. Epoch e = s // steps_per_epoch uses a permutation
    of the example ids drawn from (seed, e); each epoch drops its last `num_examples %
    global_batch_size` examples, so every step has a full batch and `steps_per_epoch =
    num_examples // global_batch_size`.
  * The host views of an example are drawn from `example_seed(seed, epoch, index)`, so they do
    not depend on which process, batch position or run reads the example.
  * Process p of P holds rows [p * L, (p + 1) * L) of every global batch (L = G / P), which is
    where `jax.make_array_from_process_local_data` puts them on a mesh whose 'data' axis lists
    each process's devices together (as `jax.make_mesh` does; checked).
  * Starting at step s gives the batches an uninterrupted run gives from step s on.

Image folders are read by random access, so every process computes the epoch's global
permutation and reads only its own files: the global batches are the same for any number of
processes, and resuming costs nothing. A TFDS split is a set of TFRecord streams. By default
each process reads its own contiguous part of the split (an even split, as
`tfds.split_for_jax_process` makes), with the file order and a shuffle buffer drawn per epoch:
cheap, but the batches depend on the process count.
With `process_invariant=True` every process reads the whole split in the same seeded order and
keeps its slice of each global batch before decoding: P times the reading, batches independent
of P. Either way, resuming reads (but does not decode) the records of the current epoch up to
the start step.

A record that cannot be read or decoded is dropped by `ignore_errors`; each element carries its
position in the process's stream, so the Python side sees the gap, logs and counts the
example, and fills its slot with a copy of another example of the same local batch (keeping
batch shapes, the step arithmetic and resumption exact). The trainer logs `skipped`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np

from retro_jax.data import sources
from retro_jax.data.tf_runtime import import_tensorflow

tf = import_tensorflow()

# host_fn(image, seed) -> views: `image` is encoded bytes or uint8 [H, W, C], `seed` int64 [2];
# the views are uint8 [size, size, 3] (e.g. `Augmentation.host_views`, `host_ops.multi_crop`).
HostFn = Callable[[tf.Tensor, tf.Tensor], tuple[tf.Tensor, ...]]

# Stream salts for `_salted`: negative, so they never equal an example id.
_ORDER, _FILES, _SHUFFLE = -1, -2, -3
DEFAULT_SHUFFLE_BUFFER = 10_000
# Files a TFDS stream reads at once.
_CYCLE_LENGTH = 16
# Examples tried before the pipeline starts (see `_check_readable`).
_PROBE_EXAMPLES = 8

log = logging.getLogger(__name__)


def example_seed(seed: tf.Tensor, epoch: tf.Tensor, index: tf.Tensor) -> tf.Tensor:
  """int64 [2]: the host augmentation seed of example `index` in `epoch`."""
  key = tf.stack([tf.cast(seed, tf.int64), tf.cast(epoch, tf.int64)])
  return tf.random.experimental.stateless_fold_in(key, tf.cast(index, tf.int64))


def _salted(seed, epoch, salt: int) -> tf.Tensor:
  return example_seed(seed, epoch, tf.constant(salt, tf.int64))


@dataclasses.dataclass(frozen=True)
class Plan:
  """The batch arithmetic: which slice of which global batch this process produces."""

  num_examples: int
  global_batch_size: int
  process_index: int
  process_count: int

  @property
  def local_batch_size(self) -> int:
    return self.global_batch_size // self.process_count

  @property
  def steps_per_epoch(self) -> int:
    return self.num_examples // self.global_batch_size

  @property
  def epoch_examples(self) -> int:
    """Examples this process reads per epoch."""
    return self.steps_per_epoch * self.local_batch_size


def folder_epoch_ids(source: sources.FolderSource, plan: Plan, seed, epoch) -> tf.Tensor:
  """int64 [epoch_examples]: this process's ids of `epoch`, in stream order."""
  n, spe = plan.num_examples, plan.steps_per_epoch
  perm = tf.random.experimental.stateless_shuffle(tf.range(n, dtype=tf.int64),
                                                  _salted(seed, epoch, _ORDER))
  batches = tf.reshape(perm[:spe * plan.global_batch_size],
                       [spe, plan.process_count, plan.local_batch_size])
  return tf.reshape(batches[:, plan.process_index], [-1])


def _folder_stream(source: sources.FolderSource, plan: Plan, seed: tf.Tensor,
                   start_step: int):
  start_epoch, first_step = divmod(start_step, plan.steps_per_epoch)
  per_epoch, L = plan.epoch_examples, plan.local_batch_size

  def epoch_elements(epoch):
    ids = folder_epoch_ids(source, plan, seed, epoch)
    begin = tf.where(epoch == start_epoch, tf.constant(first_step * L, tf.int64), 0)
    return tf.data.Dataset.from_tensor_slices({
        "index": ids[begin:], "position": epoch * per_epoch + tf.range(begin, per_epoch),
        "epoch": tf.fill([per_epoch - begin], epoch)})

  def load(element):
    return {**source.read(element["index"]), "position": element["position"],
            "epoch": element["epoch"]}

  def describe(position: int) -> str:
    epoch, k = divmod(position, per_epoch)
    index = int(folder_epoch_ids(source, plan, seed, epoch)[k])
    return source.paths[index]

  return tf.data.Dataset.counter(start_epoch).flat_map(epoch_elements), load, describe


def _tfds_stream(source: sources.TfdsSource, plan: Plan, seed: tf.Tensor, start_step: int,
                 process_invariant: bool, shuffle_buffer: int):
  n, P, p, L = (plan.num_examples, plan.process_count, plan.process_index,
                plan.local_batch_size)
  start_epoch, first_step = divmod(start_step, plan.steps_per_epoch)
  per_epoch = plan.epoch_examples
  if process_invariant:
    spans, stream_epoch, first = source.spans, per_epoch * P, first_step * L * P
  else:  # An even split: process p reads ids [p n / P, (p + 1) n / P).
    spans = source.spans_between(p * n // P, (p + 1) * n // P)
    stream_epoch, first = per_epoch, first_step * L

  def epoch_elements(epoch):
    order = tf.random.experimental.stateless_shuffle(tf.range(len(spans), dtype=tf.int64),
                                                     _salted(seed, epoch, _FILES))
    records = source.read_spans(spans, order, _CYCLE_LENGTH).shuffle(
        shuffle_buffer, seed=_salted(seed, epoch, _SHUFFLE)[0], reshuffle_each_iteration=False)
    records = records.take(stream_epoch).enumerate()
    records = records.skip(tf.where(epoch == start_epoch, tf.constant(first, tf.int64), 0))
    if process_invariant:  # Record k belongs to global batch k // G, process (k // L) % P.
      records = records.filter(lambda k, _: (k // L) % P == p)
      position = lambda k: epoch * per_epoch + k // (L * P) * L + k % L
    else:
      position = lambda k: epoch * per_epoch + k
    return records.map(lambda k, r: {"index": r[0], "record": r[1], "position": position(k),
                                     "epoch": epoch})

  def load(element):
    return {**source.parse(element["index"], element["record"]),
            "position": element["position"], "epoch": element["epoch"]}

  def describe(position: int) -> str:
    epoch, k = divmod(position, per_epoch)
    return (f"{source}: the example in slot {k % L} of step {position // L} on process {p} "
            f"(epoch {epoch})")

  return tf.data.Dataset.counter(start_epoch).flat_map(epoch_elements), load, describe


def _check_readable(source: sources.Source, host_fn: HostFn, seed: tf.Tensor) -> None:
  """Refuses a source whose first examples all fail in `host_fn`.

  Unreadable examples are dropped inside tf.data, so if none could be read (a folder of
  HTML error pages saved as .jpg, a host_fn that fails on every image) the first batch would
  never fill and the run would wait forever, printing only TF's warnings.
  """
  count = min(_PROBE_EXAMPLES, source.num_examples)

  def views(example):
    return host_fn(example["image"], example_seed(seed, 0, example["index"]))

  if next(iter(source.examples(0, count).map(views).ignore_errors()), None) is not None:
    return
  try:
    source.examples(0, 1).map(views).get_single_element()
    reason = "(the first one did not fail when tried again)"
  except tf.errors.OpError as error:
    reason = f"the first one with: {error.message.strip().splitlines()[0]}"
  raise sources.DataSourceError(
      f"the first {count} examples of {source} all fail to read, decode or augment; {reason}")


class HostBatches(Iterator[dict[str, Any]]):
  """This process's slices of the global batches, as NumPy, one per step.

  Yields {"views": tuple of uint8 [L, s, s, 3], "index": int64 [L], "label": int64 [L]}. The
  slot of an unreadable example holds a copy (views, index, label) of another example.

  Attributes:
    plan: the batch arithmetic.
    step: the step of the next batch.
    skipped: what was skipped so far, one entry per unreadable example and epoch: the file
      path for folders, the step and slot for TFDS.
  """

  def __init__(self, dataset: tf.data.Dataset, plan: Plan, start_step: int,
               describe: Callable[[int], str]):
    self.plan = plan
    self.step = start_step
    self.skipped: list[str] = []
    self._describe = describe
    self._chunks = dataset.as_numpy_iterator()
    self._pending: dict[str, Any] | None = None
    self._previous: dict[str, Any] | None = None  # The last batch, for `_fill_gaps`.

  @property
  def steps_per_epoch(self) -> int:
    return self.plan.steps_per_epoch

  @property
  def skipped_count(self) -> int:
    return len(self.skipped)

  def __next__(self) -> dict[str, Any]:
    L = self.plan.local_batch_size
    start, end = self.step * L, (self.step + 1) * L
    parts = []
    while True:  # Collect the elements of positions [start, end); gaps are skipped examples.
      chunk = self._pending if self._pending is not None else next(self._chunks)
      self._pending = None
      inside = int(np.searchsorted(chunk["position"], end))
      if inside < len(chunk["position"]):
        parts.append(_rows(chunk, slice(0, inside)))
        self._pending = _rows(chunk, slice(inside, None))
        break
      parts.append(chunk)
      if chunk["position"][-1] == end - 1:
        break
    batch = parts[0] if len(parts) == 1 else jax.tree.map(lambda *a: np.concatenate(a), *parts)
    if len(batch["position"]) != L:
      batch = self._fill_gaps(batch, start)
    self.step += 1
    self._previous = batch
    return {"views": batch["views"], "index": batch["index"], "label": batch["label"]}

  def _fill_gaps(self, batch: dict[str, Any], start: int) -> dict[str, Any]:
    """The local batch with each missing slot holding a copy of a received example.

    Copies come from this step's examples, or from the previous step's when none of this
    step's arrived (e.g. a truncated TFRecord file loses the rest of its records, which
    shortens the epoch's stream: its last steps come up empty).
    """
    L = self.plan.local_batch_size
    slots = batch["position"] - start
    assert slots.min(initial=0) >= 0 and np.all(np.diff(slots) > 0), slots
    missing = np.setdiff1d(np.arange(L), slots)
    for slot in missing:
      what = self._describe(start + int(slot))
      log.warning("skipped an unreadable example at step %d: %s", self.step, what)
      self.skipped.append(what)
    donors = batch if len(slots) else self._previous
    if donors is None:
      raise sources.DataSourceError(
          f"all {L} examples of step {self.step} on process {self.plan.process_index} are "
          f"unreadable, e.g. {self.skipped[-1]}")
    fill = np.arange(len(missing)) % len(donors["index"])

    def filled(rows, donor_rows):
      out = np.empty((L,) + donor_rows.shape[1:], donor_rows.dtype)
      out[slots], out[missing] = rows, donor_rows[fill]
      return out

    return jax.tree.map(filled, batch, donors)


def _rows(tree, rows: slice):
  return jax.tree.map(lambda a: a[rows], tree)


def host_batches(source: sources.Source, host_fn: HostFn, *, global_batch_size: int,
                 seed: int, start_step: int = 0, process_index: int | None = None,
                 process_count: int | None = None, process_invariant: bool = False,
                 shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
                 num_parallel_calls: int | None = tf.data.AUTOTUNE,
                 prefetch: int = tf.data.AUTOTUNE) -> HostBatches:
  """This process's host pipeline, from `start_step` on.

  Args:
    source: an image folder or TFDS split (`sources.open_source`).
    host_fn: the host augmentation, `host_fn(image, seed) -> tuple of uint8 views`.
    global_batch_size: examples per step over all processes (G).
    seed: the run seed.
    start_step: the step of the first batch (resumption).
    process_index: this process (default `jax.process_index()`).
    process_count: the number of processes (default `jax.process_count()`).
    process_invariant: TFDS only: every process reads the whole split, so that the global
      batches do not depend on the process count (image folders always are).
    shuffle_buffer: TFDS only: the per-epoch shuffle buffer, in examples.
    num_parallel_calls: parallelism of the decode-and-augment map.
    prefetch: batches prepared ahead.

  Raises:
    DataSourceError: the source has fewer examples than one global batch, or its first
      examples all fail in `host_fn` (see `_check_readable`).
    ValueError: inconsistent batch size or process arguments.
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(f"global_batch_size {global_batch_size} must be a positive multiple of "
                     f"the process count {process_count}")
  if start_step < 0:
    raise ValueError(f"start_step must be >= 0, got {start_step}")
  if shuffle_buffer <= 0:
    raise ValueError(f"shuffle_buffer must be positive, got {shuffle_buffer}")
  if source.num_examples < global_batch_size:
    raise sources.DataSourceError(
        f"{source} has {source.num_examples} examples, fewer than one global batch of "
        f"{global_batch_size}")
  plan = Plan(source.num_examples, global_batch_size, process_index, process_count)
  seed_t = tf.constant(seed, tf.int64)
  _check_readable(source, host_fn, seed_t)
  if isinstance(source, sources.FolderSource):
    stream, load, describe = _folder_stream(source, plan, seed_t, start_step)
    reading = "its files of a global permutation per epoch"
  else:
    stream, load, describe = _tfds_stream(source, plan, seed_t, start_step, process_invariant,
                                          shuffle_buffer)
    reading = ("the whole split, keeping its slice of every batch" if process_invariant
               else "its even part of the split")
  log.info("%s: %d examples, %d steps of %d per epoch; process %d of %d reads %s, from step "
           "%d", source, plan.num_examples, plan.steps_per_epoch, global_batch_size,
           process_index, process_count, reading, start_step)

  def augment(element):
    example = load(element)
    views = host_fn(example["image"], example_seed(seed_t, element["epoch"], example["index"]))
    return {"views": tuple(views), "index": example["index"], "label": example["label"],
            "position": example["position"]}

  dataset = stream.map(augment, num_parallel_calls=num_parallel_calls, deterministic=True)
  dataset = dataset.ignore_errors(log_warning=True).batch(plan.local_batch_size)
  options = tf.data.Options()
  options.deterministic = True
  options.threading.max_intra_op_parallelism = 1
  dataset = dataset.prefetch(prefetch).with_options(options)
  return HostBatches(dataset, plan, start_step, describe)


def _check_placement(sharding: jax.sharding.Sharding, global_batch_size: int) -> None:
  """Checks that this process's rows of the global batch are the ones its pipeline makes."""
  G, P, p = global_batch_size, jax.process_count(), jax.process_index()
  L = G // P
  try:
    indices = sharding.addressable_devices_indices_map((G,))
  except ValueError as error:
    raise ValueError(f"global batch {G} cannot be split by {sharding}: {error}") from None
  rows = set()
  for index in indices.values():
    rows.update(range(*index[0].indices(G)))
  if rows != set(range(p * L, (p + 1) * L)):
    raise ValueError(
        f"{sharding} gives process {p} other rows than [{p * L}, {(p + 1) * L}) of the "
        "global batch; build the mesh with jax.make_mesh, which puts each process's devices "
        "together on the 'data' axis")


class DeviceBatches(Iterator[dict[str, Any]]):
  """Global batches as `jax.Array`s sharded along the batch, one per step.

  Yields {"views": tuple of uint8 [G, s, s, 3], "index": int32 [G], "label": int32 [G]}.
  `index` is the global example id, from which the device derives per-example random keys.
  """

  def __init__(self, host: HostBatches, sharding: jax.sharding.Sharding):
    plan = host.plan
    if (plan.process_index, plan.process_count) != (jax.process_index(), jax.process_count()):
      raise ValueError(
          f"these host batches are for process {plan.process_index} of {plan.process_count}, "
          f"but this is process {jax.process_index()} of {jax.process_count()}")
    if plan.num_examples >= 2**31:
      raise ValueError(f"{plan.num_examples} examples: ids do not fit the int32 `index`")
    _check_placement(sharding, plan.global_batch_size)
    self.host = host
    self.sharding = sharding

  @property
  def step(self) -> int:
    return self.host.step

  @property
  def steps_per_epoch(self) -> int:
    return self.host.steps_per_epoch

  @property
  def skipped(self) -> list[str]:
    return self.host.skipped

  @property
  def skipped_count(self) -> int:
    return self.host.skipped_count

  def _global(self, local: np.ndarray) -> jax.Array:
    shape = (self.host.plan.global_batch_size,) + local.shape[1:]
    return jax.make_array_from_process_local_data(self.sharding, local, shape)

  def __next__(self) -> dict[str, Any]:
    local = next(self.host)
    return {"views": tuple(self._global(v) for v in local["views"]),
            "index": self._global(local["index"].astype(np.int32)),
            "label": self._global(local["label"].astype(np.int32))}


def batch_sharding(mesh: jax.sharding.Mesh, axis: str = "data") -> jax.sharding.NamedSharding:
  """Batches split along their first dimension over the mesh's `axis`."""
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(axis))


def make_pipeline(source: sources.Source, host_fn: HostFn, *, global_batch_size: int,
                  seed: int, sharding: jax.sharding.Sharding, start_step: int = 0,
                  process_invariant: bool = False,
                  shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
                  num_parallel_calls: int | None = tf.data.AUTOTUNE,
                  prefetch: int = tf.data.AUTOTUNE) -> DeviceBatches:
  """This process's device batches from `start_step` on; the arguments are `host_batches`'s.

  `sharding` places the global batch, e.g. `batch_sharding(mesh)`; this process's rows of it
  must be the ones its host pipeline produces (checked).
  """
  _check_placement(sharding, global_batch_size)  # Before any reading.
  host = host_batches(source, host_fn, global_batch_size=global_batch_size, seed=seed,
                      start_step=start_step, process_invariant=process_invariant,
                      shuffle_buffer=shuffle_buffer, num_parallel_calls=num_parallel_calls,
                      prefetch=prefetch)
  return DeviceBatches(host, sharding)
