"""Weighted k-NN: DINO's `knn_classifier` (NumPy transcription), scikit-learn, chunks, sharding."""

from __future__ import annotations

import logging
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from sklearn.neighbors import KNeighborsClassifier

from retro_jax.evaluate import knn

NUM_CLASSES, DIM, NUM_TRAIN, NUM_TEST = 10, 32, 1024, 200
T = 0.07


def clustered(rng, count: int, centres: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Noisy points around class centres: overlapping classes, no exact ties."""
  labels = rng.integers(0, len(centres), count)
  features = centres[labels] + 1.2 * rng.normal(size=(count, centres.shape[1]))
  return features.astype(np.float32), labels.astype(np.int64)


@pytest.fixture(scope="module")
def data():
  rng = np.random.default_rng(0)
  centres = rng.normal(size=(NUM_CLASSES, DIM))
  train, train_labels = clustered(rng, NUM_TRAIN, centres)
  test, test_labels = clustered(rng, NUM_TEST, centres)
  return train, train_labels, test, test_labels


def unit(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float64)
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def dino_knn_classifier(train_features, train_labels, test_features, test_labels, k, T,
                        num_classes, num_chunks=7):
  """DINO `eval_knn.py: knn_classifier` in NumPy (float64), features normalised as its main does.

  Returns (top1, top5, probs); `probs` is DINO's per-chunk vote tensor, concatenated.
  """
  train_features, test_features = unit(train_features), unit(test_features)
  top1, top5, total = 0.0, 0.0, 0
  train_features = train_features.T
  num_test_images = test_labels.shape[0]
  imgs_per_chunk = max(1, num_test_images // num_chunks)
  all_probs = []
  for idx in range(0, num_test_images, imgs_per_chunk):
    features = test_features[idx:min(idx + imgs_per_chunk, num_test_images), :]
    targets = test_labels[idx:min(idx + imgs_per_chunk, num_test_images)]
    batch_size = targets.shape[0]
    similarity = features @ train_features
    indices = np.argsort(-similarity, axis=1, kind="stable")[:, :k]  # topk, sorted
    distances = np.take_along_axis(similarity, indices, axis=1)
    candidates = np.broadcast_to(train_labels.reshape(1, -1), (batch_size, len(train_labels)))
    retrieved_neighbors = np.take_along_axis(candidates, indices, axis=1)
    retrieval_one_hot = np.zeros((batch_size * k, num_classes))
    retrieval_one_hot[np.arange(batch_size * k), retrieved_neighbors.reshape(-1)] = 1
    distances_transform = np.exp(distances / T)
    probs = np.sum(retrieval_one_hot.reshape(batch_size, -1, num_classes)
                   * distances_transform.reshape(batch_size, -1, 1), axis=1)
    predictions = np.argsort(-probs, axis=1, kind="stable")
    correct = predictions == targets.reshape(-1, 1)
    top1 += correct[:, :1].sum()
    top5 += correct[:, :min(5, k)].sum()
    total += batch_size
    all_probs.append(probs)
  return top1 * 100.0 / total, top5 * 100.0 / total, np.concatenate(all_probs)


def assert_no_near_ties(train, test, k, scores=None, labels=None):
  """The comparisons below are exact only if no neighbour set or ranking hangs on rounding.

  fp32 similarities are off by ~1e-7 and scores, exp(sim / 0.07), by a few 1e-6 relative.
  """
  similarity = np.sort(unit(test) @ unit(train).T, axis=1)[:, ::-1]
  if k < similarity.shape[1]:
    assert np.min(similarity[:, k - 1] - similarity[:, k]) > 1e-6
  if scores is None:
    return
  order = np.argsort(-scores, axis=1, kind="stable")
  ranked = np.take_along_axis(scores, order, axis=1) / scores.max(axis=1, keepdims=True)
  assert np.min(ranked[:, 0] - ranked[:, 1]) > 1e-5  # the prediction
  if labels is not None:  # top-5: the label is not on the edge of the first min(5, k)
    last = min(5, k) - 1
    place = np.argmax(order == labels[:, None], axis=1)
    edge = (place == last) | (place == last + 1)
    assert np.all(ranked[edge, last] - ranked[edge, last + 1] > 1e-5)


@pytest.mark.parametrize("k", [3, 20, 200])
def test_scores_and_accuracy_match_dino(data, k):
  train, train_labels, test, test_labels = data
  top1, top5, probs = dino_knn_classifier(train, train_labels, test, test_labels, k, T,
                                          NUM_CLASSES)
  assert_no_near_ties(train, test, k, probs, test_labels)
  scores = knn.knn_predict(train, train_labels, test, num_classes=NUM_CLASSES, k=k,
                           temperature=T, chunk_size=64)
  assert scores.shape == (NUM_TEST, NUM_CLASSES) and scores.dtype == np.float32
  np.testing.assert_allclose(scores, probs, rtol=1e-5, atol=1e-30)
  accuracy = knn.knn_accuracy(train, train_labels, test, test_labels, num_classes=NUM_CLASSES,
                              ks=(k,), temperature=T, chunk_size=64)
  assert accuracy == {f"knn_top1_k{k}": pytest.approx(top1), f"knn_top5_k{k}": pytest.approx(top5)}
  assert 40 < top1 < 100  # The data is neither trivial nor random.


def test_default_ks_share_one_pass_and_match_dino(data):
  train, train_labels, test, test_labels = data
  accuracy = knn.knn_accuracy(train, train_labels, test, test_labels, num_classes=NUM_CLASSES)
  assert list(accuracy) == ["knn_top1_k20", "knn_top5_k20", "knn_top1_k200", "knn_top5_k200"]
  for k in knn.DEFAULT_KS:
    top1, top5, _ = dino_knn_classifier(train, train_labels, test, test_labels, k, T,
                                        NUM_CLASSES)
    assert accuracy[f"knn_top1_k{k}"] == pytest.approx(top1)
    assert accuracy[f"knn_top5_k{k}"] == pytest.approx(top5)


def test_uniform_votes_equal_sklearn_majority(data):
  train, train_labels, test, _ = data
  k = 11
  assert_no_near_ties(train, test, k)
  scores = knn.knn_predict(train, train_labels, test, num_classes=NUM_CLASSES, k=k,
                           temperature=math.inf)
  sklearn = KNeighborsClassifier(n_neighbors=k, metric="cosine", weights="uniform",
                                 algorithm="brute").fit(train.astype(np.float64), train_labels)
  # Votes are neighbour counts; equal counts go to the lower class in both.
  np.testing.assert_array_equal(scores, sklearn.predict_proba(test.astype(np.float64)) * k)
  np.testing.assert_array_equal(np.argmax(scores, axis=1),
                                sklearn.predict(test.astype(np.float64)))


@pytest.mark.parametrize("k", [20, 200])
def test_weighted_votes_agree_with_sklearn_callable_weights(data, k):
  train, train_labels, test, _ = data
  sklearn = KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute",
                                 weights=lambda d: np.exp((1 - d) / T))
  sklearn.fit(train.astype(np.float64), train_labels)
  scores = knn.knn_predict(train, train_labels, test, num_classes=NUM_CLASSES, k=k,
                           temperature=T)
  assert_no_near_ties(train, test, k, scores)
  np.testing.assert_allclose(scores / scores.sum(axis=1, keepdims=True),
                             sklearn.predict_proba(test.astype(np.float64)), rtol=1e-5,
                             atol=1e-12)
  np.testing.assert_array_equal(np.argmax(scores, axis=1),
                                sklearn.predict(test.astype(np.float64)))


def test_chunked_equals_unchunked(data):
  train, train_labels, test, test_labels = data
  whole = knn.knn_predict(train, train_labels, test, num_classes=NUM_CLASSES, k=20,
                          chunk_size=NUM_TEST)
  for chunk_size in (7, 64, 10_000):  # 7 and 64 leave an overlapping last chunk
    np.testing.assert_allclose(
        knn.knn_predict(train, train_labels, test, num_classes=NUM_CLASSES, k=20,
                        chunk_size=chunk_size), whole, rtol=1e-5)  # fp32 rounding / T
  assert (knn.knn_accuracy(train, train_labels, test, test_labels, num_classes=NUM_CLASSES,
                           chunk_size=7)
          == knn.knn_accuracy(train, train_labels, test, test_labels,
                              num_classes=NUM_CLASSES, chunk_size=NUM_TEST))


@pytest.fixture(scope="module")
def mesh():
  assert jax.device_count() == 8, "tests/conftest.py gives 8 simulated CPU devices"
  return jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


@pytest.mark.parametrize("num_train", [NUM_TRAIN, 64])  # 64: k = 20 > the 8 rows per device
def test_sharded_over_8_devices_equals_single_device(data, mesh, num_train):
  train, train_labels, test, test_labels = data
  train, train_labels = train[:num_train], train_labels[:num_train]
  one = jax.devices()[0]
  single = [jax.device_put(x, one) for x in (train, train_labels, test, test_labels)]
  rows = NamedSharding(mesh, P("data"))
  sharded = [jax.device_put(x, rows) for x in (train, train_labels, test, test_labels)]
  expected = knn.knn_predict(*single[:3], num_classes=NUM_CLASSES, k=20, chunk_size=48)
  got = knn.knn_predict(*sharded[:3], num_classes=NUM_CLASSES, k=20, chunk_size=48)
  np.testing.assert_allclose(got, expected, rtol=1e-5)  # fp32 rounding / T
  np.testing.assert_allclose(
      knn.knn_predict(sharded[0], sharded[1], test, num_classes=NUM_CLASSES, k=20), expected,
      rtol=1e-5)  # host test features next to a sharded bank
  assert (knn.knn_accuracy(*sharded, num_classes=NUM_CLASSES)
          == knn.knn_accuracy(*single, num_classes=NUM_CLASSES))


def test_sharded_bank_gathers_only_top_k_candidates(data, mesh):
  train, train_labels, test, _ = data
  bank = jax.device_put(train, NamedSharding(mesh, P("data")))
  problem = knn._Problem(bank, train_labels, test, NUM_CLASSES, T, 64)
  hlo = knn._score_chunk.lower(
      *problem.arrays(), 0, problem.temperature, k=20, num_classes=NUM_CLASSES, chunk=64,
      blocks=problem.blocks, out_sharding=problem.out_sharding).compile().as_text()
  gathered = re.findall(r"= \w+\[([\d,]+)\][^=]*? all-gather\(", hlo)
  assert gathered, "expected the top-k candidates to be gathered"
  # Never the [64, 1024] similarity block: at most the 8 x 20 candidates per test row.
  assert all(math.prod(map(int, shape.split(","))) <= 64 * 8 * 20 for shape in gathered)


def test_k_larger_than_bank_is_clipped_with_a_warning(data, caplog):
  train, train_labels, test, test_labels = data
  with caplog.at_level(logging.WARNING, logger=knn.__name__):
    scores = knn.knn_predict(train[:30], train_labels[:30], test, num_classes=NUM_CLASSES, k=200)
  assert "k=200 exceeds the 30 train examples" in caplog.text
  np.testing.assert_array_equal(
      scores, knn.knn_predict(train[:30], train_labels[:30], test, num_classes=NUM_CLASSES, k=30))
  accuracy = knn.knn_accuracy(train[:30], train_labels[:30], test, test_labels,
                              num_classes=NUM_CLASSES, ks=(20, 200))
  assert set(accuracy) == {"knn_top1_k20", "knn_top5_k20", "knn_top1_k200", "knn_top5_k200"}


def test_top5_only_with_five_classes_or_more(data):
  train, train_labels, test, test_labels = data
  keep, keep_test = train_labels < 3, test_labels < 3
  accuracy = knn.knn_accuracy(train[keep], train_labels[keep], test[keep_test],
                              test_labels[keep_test], num_classes=3, ks=(5,))
  assert list(accuracy) == ["knn_top1_k5"] and 0 <= accuracy["knn_top1_k5"] <= 100


@pytest.mark.parametrize("change, message", [
    (dict(train_labels=np.full(NUM_TRAIN, NUM_CLASSES)), r"train_labels must lie in \[0, "),
    (dict(test_labels=np.full(NUM_TEST, -1)), r"test_labels must lie in \[0, "),
    (dict(test_labels=None), "test_labels must be 1-D"),
    (dict(train_labels=np.zeros(NUM_TRAIN, np.float32)), "must be integer class ids"),
    (dict(train_labels=np.zeros(NUM_TRAIN - 1, np.int64)), "one label per feature row"),
    (dict(train=np.zeros((0, DIM), np.float32), train_labels=np.zeros(0, np.int64)), "empty"),
    (dict(test=np.zeros((0, DIM), np.float32), test_labels=np.zeros(0, np.int64)), "empty"),
    (dict(test=np.zeros((NUM_TEST, DIM + 1), np.float32)), "feature widths differ"),
    (dict(test=np.zeros((NUM_TEST,), np.float32)), "must be 2-D"),
    (dict(train=np.full((NUM_TRAIN, DIM), np.nan, np.float32)), "non-finite"),
    (dict(train=np.zeros((NUM_TRAIN, DIM), np.int32)), "floating point"),
    (dict(ks=()), "ks is empty"),
    (dict(ks=(20, 20)), "repeated"),
    (dict(ks=(0,)), "k must be a positive integer"),
    (dict(temperature=0.0), "temperature must be > 0"),
    (dict(temperature=float("nan")), "temperature must be > 0"),
    (dict(num_classes=0), "num_classes must be a positive integer"),
    (dict(chunk_size=0), "chunk_size must be a positive integer"),
])
def test_bad_inputs_raise_clear_errors(data, change, message):
  train, train_labels, test, test_labels = data
  args = dict(train=train, train_labels=train_labels, test=test, test_labels=test_labels,
              num_classes=NUM_CLASSES, ks=(20,), temperature=T, chunk_size=64)
  args.update(change)
  with pytest.raises(knn.KnnError, match=message):
    knn.knn_accuracy(args.pop("train"), args.pop("train_labels"), args.pop("test"),
                     args.pop("test_labels"), **args)


def forward(images):
  """A stand-in eval-mode forward: mean colour and brightness per image, [B, 4]."""
  x = images.astype(jnp.float32) / 255.0
  return jnp.concatenate([x.mean(axis=(1, 2)), x.mean(axis=(1, 2, 3))[:, None]], axis=1)


def test_extract_features_reads_views_images_and_masks(mesh):
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, size=(20, 6, 6, 3), dtype=np.uint8)
  labels = rng.integers(0, 5, 20)
  apply_fn = jax.jit(forward)
  pipeline_like = [{"views": (images[i:i + 8],), "index": np.arange(i, i + 8),
                    "label": labels[i:i + 8]} for i in (0, 8)]
  padded = {"image": np.concatenate([images[16:], np.zeros((4, 6, 6, 3), np.uint8)]),
            "label": np.concatenate([labels[16:], np.zeros(4, np.int64)]),
            "mask": np.arange(8) < 4}
  features, got_labels = knn.extract_features(apply_fn, iter([*pipeline_like, padded]))
  assert features.dtype == np.float32 and got_labels.dtype == np.int64
  np.testing.assert_allclose(features, forward(images), rtol=1e-6)
  np.testing.assert_array_equal(got_labels, labels)

  rows = NamedSharding(mesh, P("data"))  # device batches, as `DeviceBatches` gives them
  sharded = [{"views": (jax.device_put(images[:16], rows),),
              "label": jax.device_put(labels[:16].astype(np.int32), rows)}]
  features, got_labels = knn.extract_features(apply_fn, sharded)
  np.testing.assert_allclose(features, forward(images[:16]), rtol=1e-6)
  np.testing.assert_array_equal(got_labels, labels[:16])


@pytest.mark.parametrize("batches, message", [
    ([], "yielded no batch"),
    ([{"views": (np.zeros((2, 4, 4, 3), np.uint8),)}], "has no 'label'"),
    ([{"pixels": np.zeros((2, 4, 4, 3), np.uint8), "label": np.zeros(2)}],
     "neither 'image' nor 'views'"),
    ([{"image": np.zeros((2, 4, 4, 3), np.uint8), "label": np.zeros(3)}],
     "it must return features"),
])
def test_extract_features_errors(batches, message):
  with pytest.raises(knn.KnnError, match=message):
    knn.extract_features(jax.jit(forward), batches)


@pytest.mark.parametrize("sharded", [False, True])
def test_ties_go_to_the_earlier_train_row_and_the_lower_class(mesh, sharded):
  bank = np.tile(np.array([[1.0, 2.0, 3.0]], np.float32), (8, 1))  # 8 equal neighbours
  labels = np.array([5, 3, 1, 7, 0, 2, 4, 6])
  if sharded:  # one row per device: the tie is across devices
    bank, labels = (jax.device_put(x, NamedSharding(mesh, P("data"))) for x in (bank, labels))
  query = np.array([[2.0, 4.0, 6.0]], np.float32)
  scores = knn.knn_predict(bank, labels, query, num_classes=8, k=3, temperature=math.inf)
  np.testing.assert_array_equal(np.flatnonzero(scores[0]), [1, 3, 5])  # rows 0, 1, 2
  for label, top1 in ((1, 100.0), (3, 0.0)):  # three classes with one vote: class 1 wins
    accuracy = knn.knn_accuracy(bank, labels, query, np.array([label]), num_classes=8, ks=(3,))
    assert accuracy == {"knn_top1_k3": top1, "knn_top5_k3": 100.0}
