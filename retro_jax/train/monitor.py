"""The online k-NN monitor: is the student's representation improving while it trains?

Every `monitor.every_steps` steps the student backbone (eval mode: running BN statistics)
embeds a labelled bank split and a held-out split through the deterministic eval view, and a
cosine k-NN with temperature-weighted votes (`retro_jax.evaluate.knn`, the code the offline
evaluation uses) classifies the held-out examples. The splits pass through the training
pipeline with its remainder dropped, so up to one batch of each split is left out; eval views
have no randomness, so every evaluation sees the same images.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from retro_jax.data import pipeline as pipeline_lib
from retro_jax.data import sources
from retro_jax.data.presets import Augmentation
from retro_jax.evaluate import knn


class KnnMonitor:
  """Builds the two eval pipelines once; `evaluate(state)` returns the k-NN accuracies."""

  def __init__(self, config: ml_collections.ConfigDict, data: ml_collections.ConfigDict,
               method, graphdef: nnx.GraphDef, sharding: jax.sharding.Sharding):
    self.every_steps = config.every_steps
    self.k = config.k
    self.batch_size = config.batch_size
    self.augmentation = Augmentation.from_config(config.augmentation)
    if self.augmentation.num_views != 1:
      raise ValueError("monitor.augmentation: expected one (eval) view, got "
                       f"{self.augmentation.num_views}")
    data_dir = data.get("data_dir") or None
    self.bank = sources.open_source(data.dataset, config.bank_split or None, data_dir)
    self.test = sources.open_source(data.dataset, config.test_split or None, data_dir)
    self.sharding = sharding
    view = self.augmentation

    @jax.jit
    def features(trainable, rest, images):
      model = nnx.merge(graphdef, trainable, rest, copy=True)
      model.eval()
      # An eval view draws nothing: this only converts and normalises.
      images = view.device_views(jax.random.key(0), (images,))[0]
      return method.export_backbone(model)(images).pooled.astype(jnp.float32)  # bf16 students

    self._features = features

  def due(self, step: int, total_steps: int) -> bool:
    return self.every_steps > 0 and (step % self.every_steps == 0 or step == total_steps)

  def _extract(self, source, state) -> tuple[Any, Any]:
    batches = pipeline_lib.make_pipeline(
        source, self.augmentation.host_views, global_batch_size=self.batch_size, seed=0,
        sharding=self.sharding, shuffle_buffer=1)
    steps = batches.steps_per_epoch

    def apply(images):
      return self._features(state.trainable, state.rest, images)

    return knn.extract_features(apply, (batch for batch, _ in zip(batches, range(steps))))

  def evaluate(self, state) -> dict[str, float]:
    bank_features, bank_labels = self._extract(self.bank, state)
    test_features, test_labels = self._extract(self.test, state)
    num_classes = int(max(bank_labels.max(), test_labels.max())) + 1
    return knn.knn_accuracy(bank_features, bank_labels, test_features, test_labels,
                            num_classes=num_classes, ks=(self.k,))
