"""The device mesh and the two shardings training uses: batch-sharded and replicated.

Data parallelism over one `data` axis covering every device of every process: the batch is
split along it, everything else (student, optimiser state, queue, teacher) is replicated.
That is enough for students under ~100M parameters and ResNet-50/ViT-B teachers.

The axis type is passed explicitly (the default of `jax.make_mesh` changed to Explicit in
JAX 0.9). We use Auto: the models and augmentations are written without sharding annotations
and XLA propagates the batch sharding through them; with Explicit axes every batch reduction
(batch-norm statistics, the DINO centre) would need a sharding-typed rewrite.
"""

from __future__ import annotations

import jax
from jax.sharding import AxisType
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from retro_jax.user_errors import UserError

DATA_AXIS = "data"


class MeshError(UserError, ValueError):
  """A batch or buffer size that cannot be laid out on the devices."""


def make_mesh(devices: list | None = None) -> Mesh:
  """A 1-D `data` mesh over `devices` (default: all devices of all processes)."""
  devices = jax.devices() if devices is None else devices
  return jax.make_mesh((len(devices),), (DATA_AXIS,), axis_types=(AxisType.Auto,),
                       devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over `data`; the other axes whole."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_global_batch(global_batch: int, mesh: Mesh, process_count: int | None = None) -> int:
  """Returns the per-process batch; refuses a batch the devices or processes cannot split."""
  process_count = jax.process_count() if process_count is None else process_count
  devices = mesh.devices.size
  if global_batch <= 0:
    raise MeshError(f"the global batch size must be positive, got {global_batch}")
  if global_batch % devices:
    raise MeshError(f"global batch {global_batch} is not divisible by the {devices} devices; "
                    f"use a multiple of {devices}, e.g. {devices * max(1, global_batch // devices)}")
  if global_batch % process_count:
    raise MeshError(f"global batch {global_batch} is not divisible by the {process_count} "
                    "processes")
  return global_batch // process_count
