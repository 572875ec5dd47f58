"""Linear probe on frozen features: known answers, scikit-learn agreement, recipe constants."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from retro_jax.evaluate import linear
from retro_jax.train import optim

C = 10


def one_hot_features(rng, count: int, noise: float, extra: int = 20):
  labels = rng.integers(0, C, count)
  x = np.eye(C)[labels] + noise * rng.normal(size=(count, C))
  return np.concatenate([x, rng.normal(size=(count, extra))], 1).astype(np.float32), labels


def test_separable_features_are_learnt():
  rng = np.random.default_rng(0)
  train, test = one_hot_features(rng, 2000, 0.1), one_hot_features(rng, 500, 0.1)
  result = linear.train_linear_on_features(*train, *test, num_classes=C, epochs=5, seed=0)
  assert result["top1"] >= 99.0
  assert result["top5"] >= result["top1"]
  assert len(result["train_loss"]) == 5
  assert result["train_loss"][-1] < result["train_loss"][0]
  assert result["best_top1"] >= result["top1"]


def test_noise_features_give_chance():
  rng = np.random.default_rng(1)
  train_y, test_y = rng.integers(0, C, 2000), rng.integers(0, C, 2000)
  result = linear.train_linear_on_features(
      rng.normal(size=(2000, 16)), train_y, rng.normal(size=(2000, 16)), test_y,
      num_classes=C, epochs=5, lr=0.1)
  assert abs(result["top1"] - 100 / C) < 4.0
  assert abs(result["top5"] - 50.0) < 6.0


def test_agrees_with_scikit_learn():
  rng = np.random.default_rng(2)
  centres = rng.normal(size=(C, 32))
  def draw(count):
    y = rng.integers(0, C, count)
    return (centres[y] + 1.5 * rng.normal(size=(count, 32))).astype(np.float32), y
  (train_x, train_y), (test_x, test_y) = draw(3000), draw(1000)
  ours = linear.train_linear_on_features(train_x, train_y, test_x, test_y, num_classes=C,
                                         epochs=30, lr=0.1, milestones=(20,), seed=0)
  reference = LogisticRegression(max_iter=2000).fit(train_x, train_y)
  sklearn_top1 = 100.0 * reference.score(test_x, test_y)
  assert abs(ours["top1"] - sklearn_top1) < 3.0, (ours["top1"], sklearn_top1)


def test_deterministic_and_seeded():
  rng = np.random.default_rng(3)
  train, test = one_hot_features(rng, 300, 1.0), one_hot_features(rng, 100, 1.0)
  a = linear.train_linear_on_features(*train, *test, num_classes=C, epochs=3, lr=0.5, seed=4)
  b = linear.train_linear_on_features(*train, *test, num_classes=C, epochs=3, lr=0.5, seed=4)
  c = linear.train_linear_on_features(*train, *test, num_classes=C, epochs=3, lr=0.5, seed=5)
  assert a["train_loss"] == b["train_loss"]
  assert a["train_loss"] != c["train_loss"]


def test_recipe_constants_match_the_reference():
  assert (linear.EPOCHS, linear.BATCH_SIZE, linear.LR, linear.MOMENTUM) == (100, 256, 3.0, 0.9)
  assert linear.WEIGHT_DECAY == 0.0 and linear.GAMMA == 0.5
  assert linear.MILESTONES == (5, 10, 15, 20, 25, 30, 35, 40, 45, 60, 80)
  assert optim.recipe_config("linear_eval")["milestones"] == linear.MILESTONES


def test_bad_inputs_and_divergence():
  rng = np.random.default_rng(4)
  x, y = rng.normal(size=(50, 4)).astype(np.float32), rng.integers(0, 3, 50)
  with pytest.raises(linear.LinearError, match="labels must lie"):
    linear.train_linear_on_features(x, y + 5, x, y, num_classes=3, epochs=1)
  with pytest.raises(linear.LinearError, match="dims"):
    linear.train_linear_on_features(x, y, x[:, :2], y, num_classes=3, epochs=1)
  with pytest.raises(linear.LinearError, match="diverged"):
    linear.train_linear_on_features(x * 1e30, y, x, y, num_classes=3, epochs=2, lr=1e10)
