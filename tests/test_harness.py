"""The test harness itself: simulated devices, TensorFlow without accelerators, no network."""

from __future__ import annotations

import socket

import jax
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

import conftest


def test_jax_runs_on_simulated_cpu_devices():
  assert jax.default_backend() == "cpu"
  assert jax.device_count() == conftest.NUM_SIMULATED_DEVICES


def test_tensorflow_sees_no_accelerator():
  assert tf.config.get_visible_devices("GPU") == []
  assert [d.device_type for d in tf.config.get_visible_devices()] == ["CPU"]


def test_only_loopback_resolves():
  assert socket.getaddrinfo("127.0.0.1", 80)
  assert socket.getaddrinfo("localhost", 80)
  with pytest.raises(conftest.NetworkAccessInTest, match="tests run offline"):
    socket.getaddrinfo("example.org", 443)


def test_tfds_download_fails_at_the_first_attempt(tfds_data_dir, monkeypatch):
  attempts = []

  def counting_getaddrinfo(host, *args, **kwargs):
    attempts.append(host)
    return conftest._loopback_only_getaddrinfo(host, *args, **kwargs)  # pylint: disable=protected-access

  monkeypatch.setattr(socket, "getaddrinfo", counting_getaddrinfo)
  builder = tfds.builder("mnist", data_dir=tfds_data_dir)
  with pytest.raises(Exception, match="tests run offline"):
    builder.download_and_prepare()
  # MNIST fetches 4 files: one lookup each. With TFDS's default of 10 retries with back-off
  # every file is looked up again and again (~200 s when the network is really unreachable).
  assert 1 <= len(attempts) <= 4, attempts


def test_workdir_fixture_is_empty_and_private(workdir, tfds_data_dir):
  assert workdir.is_dir() and not any(workdir.iterdir())
  assert tfds_data_dir.is_dir() and tfds_data_dir != workdir
