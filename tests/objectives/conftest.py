"""Fixtures for the objective tests: small random inputs and a data mesh of the 8 CPU devices."""

from __future__ import annotations

import jax
import numpy as np
import pytest


@pytest.fixture
def rng() -> np.random.Generator:
  return np.random.default_rng(0)


@pytest.fixture(params=["explicit", "auto"])
def data_mesh(request) -> jax.sharding.Mesh:
  """A 1-D ('data',) mesh over the 8 simulated devices, with explicit or auto axis types."""
  axis_type = {"explicit": jax.sharding.AxisType.Explicit,
               "auto": jax.sharding.AxisType.Auto}[request.param]
  return jax.make_mesh((jax.device_count(),), ("data",), axis_types=(axis_type,))
