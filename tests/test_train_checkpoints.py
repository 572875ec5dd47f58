"""Training checkpoints: sharded round trip, retention, records, and the errors of a resume."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from retro_jax.checkpoint import TrainCheckpointError
from retro_jax.checkpoint import TrainCheckpoints


@pytest.fixture(scope="module")
def mesh():
  return jax.make_mesh((jax.device_count(),), ("data",),
                       axis_types=(jax.sharding.AxisType.Auto,))


def make_state(mesh, step: int):
  """A state like the engine's: replicated parameters, a sharded queue, raw key data."""
  rng = np.random.default_rng(step)
  replicated, by_row = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  return {
      "step": jax.device_put(np.int32(step), replicated),
      "params": {"w": jax.device_put(rng.standard_normal((3, 5), np.float32), replicated),
                 "b": jax.device_put(rng.standard_normal((5,), np.float32), replicated)},
      "queue": jax.device_put(rng.standard_normal((16, 4), np.float32), by_row),
      "rng": jax.device_put(jax.random.key_data(jax.random.key(step)), replicated),
  }


def test_round_trip_keeps_values_and_shardings(mesh, workdir):
  state = make_state(mesh, 3)
  with TrainCheckpoints(workdir, every_steps=1) as checkpoints:
    assert checkpoints.latest_step() is None
    assert checkpoints.save(3, state, {"data": {"epoch": 0, "step": 3}, "teacher": "t"})
  with TrainCheckpoints(workdir, every_steps=1) as checkpoints:
    assert checkpoints.latest_step() == 3
    assert checkpoints.read_record() == {"data": {"epoch": 0, "step": 3}, "teacher": "t"}
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                           sharding=x.sharding), state)
    restored, record = checkpoints.restore(abstract)
  assert record["data"]["step"] == 3
  for name, (got, want) in zip(["b", "w", "queue", "rng", "step"],
                               zip(jax.tree.leaves(restored), jax.tree.leaves(state))):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=name)
    assert got.sharding.is_equivalent_to(want.sharding, got.ndim), name


def test_saving_replicated_arrays_compiles_nothing(mesh, workdir, caplog):
  # Orbax's replica-parallel save compiled a slice per array shape and device: ~17 s at the
  # first save of a MobileNetV3 state on 8 CPU devices. On CPU, arrays are saved whole.
  rng = np.random.default_rng(0)
  replicated = NamedSharding(mesh, P())
  state = {f"w{i}": jax.device_put(rng.standard_normal((8 * (i + 5), 24), np.float32), replicated)
           for i in range(3)}  # shapes that no other test saves: nothing cached
  with caplog.at_level(logging.WARNING), jax.log_compiles(True):
    with TrainCheckpoints(workdir, every_steps=1) as checkpoints:
      assert checkpoints.save(1, state, {"step": 1})
  compiled = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Compiling")]
  assert not compiled, compiled[:3]


def test_interval_and_retention(mesh, workdir):
  with TrainCheckpoints(workdir, every_steps=2, keep=2) as checkpoints:
    started = [checkpoints.save(step, make_state(mesh, step), {"step": step})
               for step in range(1, 8)]
    assert started == [False, True, False, True, False, True, False]
    checkpoints.save(7, make_state(mesh, 7), {"step": 7}, force=True)  # The final step.
    checkpoints.wait()
    assert checkpoints.all_steps() == [6, 7]
    assert checkpoints.read_record(6) == {"step": 6}


def test_missing_step_and_changed_state_are_clear_errors(mesh, workdir):
  with TrainCheckpoints(workdir, every_steps=1) as checkpoints:
    with pytest.raises(TrainCheckpointError, match="no checkpoint"):
      checkpoints.read_record()
    checkpoints.save(1, make_state(mesh, 1), {})
    checkpoints.wait()
    with pytest.raises(TrainCheckpointError, match="no checkpoint 5 .*have \\[1\\]"):
      checkpoints.restore(make_state(mesh, 1), step=5)
    other = make_state(mesh, 1)
    other["params"]["extra"] = jnp.zeros(2)
    with pytest.raises(TrainCheckpointError, match="does not match this run's state"):
      checkpoints.restore(other)


def test_typed_keys_round_trip_as_key_data(mesh, workdir):
  state = make_state(mesh, 1)
  state["rng"] = jax.device_put(jax.random.key(7), NamedSharding(mesh, P()))
  with TrainCheckpoints(workdir, every_steps=1) as checkpoints:
    checkpoints.save(1, state, {})
    checkpoints.wait()
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                           sharding=x.sharding), state)
    restored, _ = checkpoints.restore(abstract)
  assert jax.dtypes.issubdtype(restored["rng"].dtype, jax.dtypes.prng_key)
  np.testing.assert_array_equal(jax.random.key_data(restored["rng"]),
                                jax.random.key_data(jax.random.key(7)))


def test_bad_arguments():
  with pytest.raises(ValueError, match="positive"):
    TrainCheckpoints("/tmp/unused", every_steps=0)
