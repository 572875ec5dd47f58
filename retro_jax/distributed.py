"""Joining a multi-process run: explicit flags, or the cluster JAX detects (Cloud TPU, SLURM).

`initialize(argv)` runs before anything touches a JAX backend. With --coordinator_address /
--num_processes / --process_id it calls `jax.distributed.initialize` with them; without them it
asks JAX's own cluster detection (`jax._src.clusters`: each `ClusterEnv` that is not opt-in and
whose `is_env_present()` is true, in JAX's order, as `jax.distributed.initialize()` does
itself) and, when a cluster of several processes is found, calls `jax.distributed.initialize()`
with no arguments so that JAX fills them in. One process (a single-task SLURM job, one TPU VM)
is left alone: there is nobody to join, and JAX would otherwise bind a coordinator port.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

FLAGS = ("coordinator_address", "num_processes", "process_id")


class DistributedError(RuntimeError):
  """The multi-process run cannot be joined (bad flags, unreachable coordinator)."""


def add_flags(parser: argparse.ArgumentParser) -> None:
  """The three multi-host flags, for an argparse CLI (`initialize` reads them from argv)."""
  parser.add_argument("--coordinator_address", default=None,
                      help="host:port of process 0 (multi-host runs; detected on Cloud TPU "
                      "and SLURM)")
  parser.add_argument("--num_processes", type=int, default=None,
                      help="number of processes (multi-host runs)")
  parser.add_argument("--process_id", type=int, default=None,
                      help="this process's index (multi-host runs)")


def explicit_flags(argv: list[str]) -> dict[str, Any]:
  """The multi-host flags given in argv (only those given), without parsing anything else."""
  parser = argparse.ArgumentParser(add_help=False)
  add_flags(parser)
  known, _ = parser.parse_known_args(argv)
  return {name: getattr(known, name) for name in FLAGS if getattr(known, name) is not None}


def detected_cluster() -> type | None:
  """The first cluster environment JAX's auto-detection would use here, or None.

  The same choice as `ClusterEnv.auto_detect_unset_distributed_params` (jax/_src/clusters/
  cluster.py) without a `cluster_detection_method`: opt-in environments (mpi4py) are skipped.
  """
  from jax._src import clusters  # pylint: disable=g-import-not-at-top
  return next((env for env in clusters.ClusterEnv._cluster_types  # pylint: disable=protected-access
               if not env.opt_in_only_method and env.is_env_present()), None)


def _use_gloo_on_cpu(jax) -> None:
  # CPU processes exchange data through gloo; accelerators use their own collectives.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")


def initialize(argv: list[str]) -> str | None:
  """Joins the multi-process run argv's flags or the detected cluster describe.

  Returns what was joined ('flags', the cluster's class name) or None (one process).

  Raises:
    DistributedError: jax.distributed.initialize failed (its message).
  """
  given = explicit_flags(argv)
  import jax  # pylint: disable=g-import-not-at-top
  if jax.distributed.is_initialized():  # the caller joined already (e.g. in a notebook)
    return None
  if given:
    _use_gloo_on_cpu(jax)
    try:
      jax.distributed.initialize(**{name: given.get(name) for name in FLAGS})
    except (ValueError, RuntimeError) as error:
      raise DistributedError(str(error)) from None
    return "flags"
  env = detected_cluster()
  if env is None or env.get_process_count() <= 1:
    return None
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  if xla_bridge.backends_are_initialized():
    # Called from Python after JAX computations (a notebook, a test): too late to join.
    print(f"note: a {env.__name__} cluster of {env.get_process_count()} processes is present, "
          "but JAX is already running in this process, so this run uses this process only; "
          "to join the cluster, call jax.distributed.initialize() before any JAX computation",
          file=sys.stderr, flush=True)
    return None
  _use_gloo_on_cpu(jax)
  try:
    jax.distributed.initialize()
  except (ValueError, RuntimeError) as error:
    raise DistributedError(f"{env.__name__} detected: {error}") from None
  return env.__name__


def values_of_all_processes(value: int) -> list[int]:
  """`value` of every process, in process order (one small collective; [value] in one process).

  What lets the processes agree before a collective step (an Orbax save or restore) instead of
  one of them raising while the others wait for it.
  """
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_count() == 1:
    return [int(value)]
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  gathered = multihost_utils.process_allgather(np.asarray(value, np.int32))
  return [int(v) for v in np.asarray(gathered).reshape(-1)]
