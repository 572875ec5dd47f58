"""The host pipeline and the device hand-over: order, determinism, sharding, resumption, bad data.

References: the sources' own ids and labels (`examples()`), the host op applied by hand to an
example with the documented seed, and the pipeline itself under other process counts and start
steps. Several processes are simulated in one: each process's pipeline is built with its
`process_index` and the local batches are put side by side, which is what
`jax.make_array_from_process_local_data` does with them on a real multi-host mesh.
"""

from __future__ import annotations

import logging
import pathlib

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from jax.sharding import PartitionSpec as P

import sample_data
from retro_jax.data import host_ops
from retro_jax.data import pipeline
from retro_jax.data import sources
from retro_jax.data.host_ops import CropSpec
from retro_jax.data.sources import DataSourceError

tf = host_ops.tf

GLOBAL_BATCH = 16
SIZE = 32


def host_fn(image, seed):
  return host_ops.multi_crop(image, seed, [CropSpec(SIZE, (0.2, 1.0))] * 2)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> sources.FolderSource:
  """45 images in 3 classes: 2 steps of 16 per epoch, 13 left out each epoch."""
  root = sample_data.make_image_folder(tmp_path_factory.mktemp("images"),
                                       {"cat": 20, "dog": 15, "emu": 10})
  return sources.open_folder(root)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> sources.TfdsSource:
  """48 TFDS examples in 3 files: 3 steps of 16 per epoch."""
  data_dir = sample_data.build_tiny_tfds(tmp_path_factory.mktemp("tfds"))
  return sources.open_tfds("tiny_images", "train", data_dir)


def run(source, steps: int, *, process_count: int = 1, process_index: int = 0, seed: int = 0,
        **options) -> list[dict]:
  batches = pipeline.host_batches(source, host_fn, global_batch_size=GLOBAL_BATCH, seed=seed,
                                  process_index=process_index, process_count=process_count,
                                  **options)
  return [next(batches) for _ in range(steps)]


def run_processes(source, steps: int, process_count: int, **options) -> list[dict]:
  """The global batches of `process_count` simulated processes: local batches side by side."""
  per_process = [run(source, steps, process_count=process_count, process_index=p, **options)
                 for p in range(process_count)]
  return [jax.tree.map(lambda *rows: np.concatenate(rows), *step) for step in zip(*per_process)]


def assert_same_batches(actual: list[dict], expected: list[dict]) -> None:
  assert len(actual) == len(expected)
  for step, (a, e) in enumerate(zip(actual, expected)):
    np.testing.assert_array_equal(a["index"], e["index"], err_msg=f"step {step}")
    np.testing.assert_array_equal(a["label"], e["label"], err_msg=f"step {step}")
    for view_a, view_e in zip(a["views"], e["views"], strict=True):
      np.testing.assert_array_equal(view_a, view_e, err_msg=f"step {step}")


def ids(batches: list[dict]) -> np.ndarray:
  return np.concatenate([b["index"] for b in batches])


SOURCES = ["folder", "tfds per process", "tfds process-invariant"]


def source_and_options(request, name: str):
  if name == "folder":
    return request.getfixturevalue("folder"), {}
  return request.getfixturevalue("tiny"), {"process_invariant": "invariant" in name}


# ------------------------------------------------------------------------------------------
# Order and content.


def test_folder_epochs_are_seeded_permutations_with_the_sources_labels(folder):
  batches = run(folder, 4)
  for batch in batches:
    assert [v.shape for v in batch["views"]] == [(GLOBAL_BATCH, SIZE, SIZE, 3)] * 2
    assert all(v.dtype == np.uint8 for v in batch["views"])
    assert batch["index"].dtype == batch["label"].dtype == np.int64
    np.testing.assert_array_equal(batch["label"], folder.labels[batch["index"]])
  epoch_0, epoch_1 = ids(batches[:2]), ids(batches[2:])
  assert len(set(epoch_0)) == len(set(epoch_1)) == 2 * GLOBAL_BATCH
  assert set(epoch_0) | set(epoch_1) <= set(range(folder.num_examples))
  assert list(epoch_0) != list(epoch_1)
  other_seed = run(folder, 1, seed=1)
  assert list(other_seed[0]["index"]) != list(batches[0]["index"])


def test_tfds_examples_carry_their_ids_and_labels(tiny):
  by_id = {int(e["index"]): e for e in tiny.examples().as_numpy_iterator()}
  batches = run(tiny, 3, process_invariant=True)
  assert sorted(ids(batches)) == list(range(48))  # 48 = 3 full steps: one whole epoch.
  for batch in batches:
    assert [by_id[int(i)]["label"] for i in batch["index"]] == list(batch["label"])


def test_views_are_a_function_of_seed_epoch_and_index_only(folder):
  batch = run(folder, 3, seed=7)[2]  # Step 2 is the first of epoch 1.
  for slot in (0, 9):
    index = batch["index"][slot]
    image = tf.io.read_file(folder.paths[index])
    views = tf.data.Dataset.from_tensors(image).map(
        lambda x, i=index: host_fn(x, pipeline.example_seed(7, 1, i))).get_single_element()
    for view, expected in zip(views, batch["views"], strict=True):
      np.testing.assert_array_equal(view.numpy(), expected[slot])


def test_tfds_per_process_reading_gives_each_process_its_part_of_the_split(tiny):
  # 48 examples, 2 processes: process p reads ids [24 p, 24 p + 24), 3 local batches of 8.
  for p in range(2):
    batches = run(tiny, 6, process_count=2, process_index=p)
    epoch_0, epoch_1 = ids(batches[:3]), ids(batches[3:])
    assert sorted(epoch_0) == sorted(epoch_1) == list(range(24 * p, 24 * p + 24))
    assert list(epoch_0) != list(epoch_1)


# ------------------------------------------------------------------------------------------
# Determinism, process count, resumption.


@pytest.mark.parametrize("name", SOURCES)
def test_same_seed_gives_the_same_batches(request, name):
  source, options = source_and_options(request, name)
  assert_same_batches(run(source, 4, **options), run(source, 4, **options))


@pytest.mark.parametrize("name", ["folder", "tfds process-invariant"])
def test_global_batches_do_not_depend_on_the_process_count(request, name):
  source, options = source_and_options(request, name)
  expected = run(source, 4, **options)  # Crosses an epoch boundary for both sources.
  assert_same_batches(run_processes(source, 4, 2, **options), expected)
  if name == "folder":
    assert_same_batches(run_processes(source, 4, 4, **options), expected)


@pytest.mark.parametrize("name", SOURCES)
def test_resuming_at_a_step_continues_the_uninterrupted_run(request, name):
  source, options = source_and_options(request, name)
  uninterrupted = run(source, 6, **options)
  for start in (1, 4):  # Within the first epoch, and in the second.
    assert_same_batches(run(source, 2, start_step=start, **options),
                        uninterrupted[start:start + 2])


def test_resuming_a_process_of_several(tiny):
  uninterrupted = run(tiny, 5, process_count=2, process_index=1)
  resumed = run(tiny, 1, process_count=2, process_index=1, start_step=4)
  assert_same_batches(resumed, uninterrupted[4:])


# ------------------------------------------------------------------------------------------
# Hand-over to the devices.


def test_device_batches_are_global_arrays_sharded_over_the_data_axis(folder):
  mesh = jax.make_mesh((jax.device_count(),), ("data",))
  assert jax.device_count() == 8
  batches = pipeline.make_pipeline(folder, host_fn, global_batch_size=GLOBAL_BATCH, seed=3,
                                   sharding=pipeline.batch_sharding(mesh), start_step=1)
  expected = run(folder, 2, seed=3, start_step=1)
  assert batches.step == 1 and batches.steps_per_epoch == 2
  for host in expected:
    batch = next(batches)
    arrays = [*batch["views"], batch["index"], batch["label"]]
    assert [a.shape[0] for a in arrays] == [GLOBAL_BATCH] * 4
    for array in arrays:
      assert array.sharding.spec == P("data")
      shards = array.addressable_shards
      assert len({shard.device for shard in shards}) == 8
      assert all(shard.data.shape[0] == GLOBAL_BATCH // 8 for shard in shards)
    assert batch["index"].dtype == batch["label"].dtype == np.int32
    np.testing.assert_array_equal(np.asarray(batch["index"]), host["index"])
    np.testing.assert_array_equal(np.asarray(batch["label"]), host["label"])
    for view, host_view in zip(batch["views"], host["views"], strict=True):
      np.testing.assert_array_equal(np.asarray(view), host_view)
  assert batches.step == 3 and batches.skipped_count == 0


def test_hand_over_refuses_batches_it_cannot_place(folder):
  sharding = pipeline.batch_sharding(jax.make_mesh((8,), ("data",)))
  with pytest.raises(ValueError, match="global batch 12 cannot be split by NamedSharding"):
    pipeline.make_pipeline(folder, host_fn, global_batch_size=12, seed=0, sharding=sharding)
  simulated = pipeline.host_batches(folder, host_fn, global_batch_size=GLOBAL_BATCH, seed=0,
                                    process_index=1, process_count=2)
  with pytest.raises(ValueError, match="these host batches are for process 1 of 2, but this "
                     "is process 0 of 1"):
    pipeline.DeviceBatches(simulated, sharding)


def test_batch_and_process_arguments_are_checked(folder):
  with pytest.raises(DataSourceError, match=f"image folder {folder.root} has 45 examples, "
                     "fewer than one global batch of 64"):
    run_options = dict(global_batch_size=64, seed=0, process_index=0, process_count=1)
    pipeline.host_batches(folder, host_fn, **run_options)
  with pytest.raises(ValueError, match="global_batch_size 16 must be a positive multiple of "
                     "the process count 3"):
    pipeline.host_batches(folder, host_fn, global_batch_size=16, seed=0, process_index=0,
                          process_count=3)


# ------------------------------------------------------------------------------------------
# Bad data.


def test_gaps_in_the_stream_are_filled_within_their_step():
  # Positions 2, 8, 11 and all of step 3 (12-15) were dropped; chunks of 3 straddle steps.
  positions = np.array([0, 1, 3, 4, 5, 6, 7, 9, 10, 16, 17, 18, 19])
  dataset = tf.data.Dataset.from_tensor_slices({
      "views": (positions,), "index": positions + 100, "label": positions % 2,
      "position": positions}).batch(3)
  plan = pipeline.Plan(num_examples=20, global_batch_size=4, process_index=0, process_count=1)
  batches = pipeline.HostBatches(dataset, plan, 0, describe=lambda position: f"#{position}")
  steps = [next(batches)["index"].tolist() for _ in range(5)]
  assert steps == [[100, 101, 100, 103], [104, 105, 106, 107], [109, 109, 110, 110],
                   [109, 109, 110, 110], [116, 117, 118, 119]]
  assert batches.skipped == ["#2", "#8", "#11", "#12", "#13", "#14", "#15"]
  resumed = pipeline.HostBatches(dataset.unbatch().skip(9).batch(3), plan, 3, str)
  with pytest.raises(DataSourceError, match="all 4 examples of step 3 on process 0 are "
                     "unreadable, e.g. 15"):
    next(resumed)


def test_unreadable_files_are_skipped_reported_and_replaced(tmp_path, caplog):
  root = sample_data.make_image_folder(tmp_path, {"a": 16, "b": 16})  # 2 full steps per epoch.
  rng = np.random.default_rng(5)
  corrupt, truncated = root / "a" / "003.bmp", root / "b" / "010.jpg"
  corrupt.write_bytes(b"<html>not found</html>")
  truncated.write_bytes(sample_data.truncated_jpeg(rng))
  source = sources.open_folder(root)
  bad = {source.paths.index(str(corrupt)), source.paths.index(str(truncated))}

  with caplog.at_level(logging.WARNING, logger=pipeline.__name__):
    batches = pipeline.host_batches(source, host_fn, global_batch_size=GLOBAL_BATCH, seed=0,
                                    process_index=0, process_count=1)
    epochs = [[next(batches) for _ in range(2)] for _ in range(2)]
  assert batches.skipped_count == 4  # Both files, in both epochs.
  assert sorted(batches.skipped) == sorted([str(corrupt), str(truncated)] * 2)
  for epoch in epochs:
    seen = ids(epoch)
    assert all(v.shape == (GLOBAL_BATCH, SIZE, SIZE, 3) for b in epoch for v in b["views"])
    assert set(seen) == set(range(32)) - bad  # Every readable example arrives...
    assert len(seen) - len(set(seen)) == 2  # ... and two of them twice, in the bad ones' slots.
  warnings = [r.getMessage() for r in caplog.records if "skipped an unreadable" in r.getMessage()]
  assert len(warnings) == 4
  assert any(str(corrupt) in w for w in warnings) and any(str(truncated) in w for w in warnings)


def test_unreadable_tfds_record_is_skipped_and_located(tmp_path):
  data_dir = sample_data.build_tiny_tfds(tmp_path, name="tiny_broken", bad=(5,))
  source = sources.open_tfds("tiny_broken", "train", data_dir)
  # Ids are positions in file order; the builder's `number` 5 is the broken image.
  undecoded = {"image": tfds.decode.SkipDecoding()}
  numbers = [int(source.features.deserialize_example(record, decoders=undecoded)["number"])
             for record in tf.data.TFRecordDataset([span.path for span in source.spans])]
  bad_id = numbers.index(5)
  batches = pipeline.host_batches(source, host_fn, global_batch_size=GLOBAL_BATCH, seed=0,
                                  process_index=0, process_count=1, process_invariant=True)
  seen = ids([next(batches) for _ in range(3)])
  assert bad_id not in seen and set(seen) == set(range(48)) - {bad_id}
  assert batches.skipped_count == 1
  assert batches.skipped[0].startswith(f"{source}: the example in slot ")
  assert "on process 0 (epoch 0)" in batches.skipped[0]


def test_truncated_tfrecord_file_loses_its_records_but_not_the_run(tmp_path):
  data_dir = sample_data.build_tiny_tfds(tmp_path, name="tiny_truncated")
  source = sources.open_tfds("tiny_truncated", "train", data_dir)
  lost = source.spans[1]  # Ids 16-31; cut inside its first record.
  pathlib.Path(lost.path).write_bytes(pathlib.Path(lost.path).read_bytes()[:20])
  batches = pipeline.host_batches(source, host_fn, global_batch_size=GLOBAL_BATCH, seed=0,
                                  process_index=0, process_count=1, process_invariant=True)
  epoch = [next(batches) for _ in range(3)]
  # The epoch's stream is 16 records short; the slots left empty hold copies of others.
  assert set(ids(epoch)) == set(range(48)) - set(range(16, 32))
  assert all(v.shape == (GLOBAL_BATCH, SIZE, SIZE, 3) for b in epoch for v in b["views"])
  assert batches.skipped_count == 16
  assert all("on process 0 (epoch 0)" in what for what in batches.skipped)
  assert set(ids([next(batches) for _ in range(3)])) == set(ids(epoch))


def test_a_source_that_cannot_be_read_at_all_is_refused_at_once(tmp_path):
  root = tmp_path / "downloads"
  (root / "pages").mkdir(parents=True)
  for i in range(20):
    (root / "pages" / f"{i:02d}.jpg").write_bytes(b"<html>403 Forbidden</html>")
  source = sources.open_folder(root)
  with pytest.raises(DataSourceError) as error:
    pipeline.host_batches(source, host_fn, global_batch_size=GLOBAL_BATCH, seed=0,
                          process_index=0, process_count=1)
  assert (f"the first 8 examples of image folder {root} all fail to read, decode or augment; "
          "the first one with: ") in str(error.value)
  assert "Unknown image file format" in str(error.value)
