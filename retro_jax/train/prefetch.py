"""Device prefetch: the next batch is on its devices while the current step runs.

JAX dispatches a step asynchronously, so the loop gets back control as soon as the step is
queued. `DevicePrefetch` uses that moment to read and place the following batch: with depth 2
(as in Flax's `prefetch_to_device` examples, without pmap) the batch for step s + 1 is decoded
and transferred while step s computes, so the device does not wait for the host. The batches
come from `pipeline.DeviceBatches`, whose `jax.make_array_from_process_local_data` puts each
process's rows on its devices with the batch sharding (the multi-process form of
`jax.device_put`); this wrapper only changes when that happens.

Exact resume is unaffected: a run resumes from the step in its checkpoint, and the pipeline is
addressed by step, so batches fetched ahead but never trained are simply fetched again. What the
wrapper reports (`step`, `skipped`) is as of the last batch it handed out, not of the batches
held ahead; it fetches no batch past the run's last step; and an error of a batch fetched ahead
(e.g. a step whose examples are all unreadable) is raised when that batch is asked for.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator
from typing import Any, Protocol


class StepBatches(Protocol):
  """What `DevicePrefetch` wraps: `pipeline.DeviceBatches` (or anything with these)."""
  step: int
  skipped: list[str]

  def __next__(self) -> dict[str, Any]: ...


class DevicePrefetch(Iterator[dict[str, Any]]):
  """Yields the next `count` batches of `batches`, keeping up to `depth` fetched ahead.

  Attributes (as of the last batch handed out):
    step: the step of the next batch.
    skipped: the unreadable examples of the batches handed out so far.
  """

  def __init__(self, batches: StepBatches, *, count: int, depth: int = 2):
    if count < 0 or depth < 1:
      raise ValueError(f"count must be >= 0 and depth >= 1, got {count} and {depth}")
    self._batches = batches
    self._unfetched = count
    self._depth = depth
    # (batch or the exception fetching it raised, len(skipped) after it)
    self._ahead: collections.deque[tuple[Any, int]] = collections.deque()
    self.step = batches.step
    self._skipped_seen = len(batches.skipped)

  @property
  def skipped(self) -> list[str]:
    return self._batches.skipped[:self._skipped_seen]

  @property
  def skipped_count(self) -> int:
    return self._skipped_seen

  def _fetch(self) -> None:
    self._unfetched -= 1
    try:
      batch = next(self._batches)
    except Exception as error:  # pylint: disable=broad-except  (raised in its turn)
      self._unfetched = 0  # the pipeline cannot go on after an error
      batch = error
    self._ahead.append((batch, len(self._batches.skipped)))

  def __next__(self) -> dict[str, Any]:
    while self._unfetched and len(self._ahead) < self._depth:
      self._fetch()
    if not self._ahead:
      raise StopIteration
    batch, self._skipped_seen = self._ahead.popleft()
    if isinstance(batch, Exception):
      raise batch
    self.step += 1
    return batch
