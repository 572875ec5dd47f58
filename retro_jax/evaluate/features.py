"""Frozen features of a whole split, from a model directory: what k-NN and the linear probe read.

`FeatureExtractor(model_dir, which=...)` loads the model once (eval mode: running batch-norm
statistics) and compiles one forward; `extract(dataset, split)` runs every example of the
split, in id order, through a deterministic eval view and returns (features, labels) on the
host:

  * every example counts: the split is read in the source's id order (`source.examples()`) and
    cut into global batches; the last, partial one is padded and its padding masked out, so
    the row count is the split's size, not a multiple of the batch (the training pipeline,
    `retro_jax.data.pipeline`, and the online monitor drop that remainder instead);
  * the batch is sharded over every device (the `data` mesh axis) and the model replicated;
    with several processes, global row k is read and decoded by process (k // L) % P (L rows
    per process and batch, as the training pipeline places them), and the features are
    gathered, so every process returns the whole split in id order;
  * `which` = 'backbone' is the pooled backbone feature (`EncoderOutput.features`),
    'embedding' the model's head output before any L2 normalisation (`EncoderOutput.embedding`:
    for a Retro student exported with its adapter head, the pooled adapter output that the
    authors' linear evaluation reads, retro.md section 4.1). Both can come from one forward.
  * the view: `eval_augmentation(description, image_size)`: ImageNet's Resize(256) +
    CenterCrop(224) by default, the whole image resized for image_size <= 64 (28-32 px data);
    normalised with the model's own mean/std from its model.json.

An unreadable image is skipped with a logged warning (its row is absent from the result and
`last_skipped` counts it). With `cache_dir`, each result is kept as an `.npz` keyed by the
model (model.json and the weights' modification times), dataset, data_dir, split, view and
`which`; a cached split costs a file read (for small datasets evaluated several times, e.g.
the quickstart or a sweep of linear-probe settings).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import pathlib
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from retro_jax import checkpoint
from retro_jax import storage
from retro_jax.data import pipeline as pipeline_lib
from retro_jax.data import presets
from retro_jax.data import sources
from retro_jax.evaluate import knn
from retro_jax.train import mesh as mesh_lib
from retro_jax.user_errors import UserError

FEATURES = ("backbone", "embedding")
DEFAULT_BATCH_SIZE = 256
# Sides up to this are "small images": the whole image is resized (eval_lowres), not cropped.
LOWRES_MAX_SIZE = 64
_CACHE_VERSION = 1

log = logging.getLogger(__name__)


class FeatureError(UserError, ValueError):
  """Features that cannot be extracted as asked (no head, bad `which`, batch size)."""


def check_which(which: str | Sequence[str]) -> tuple[str, ...]:
  names = (which,) if isinstance(which, str) else tuple(which)
  unknown = [name for name in names if name not in FEATURES]
  if not names or unknown or len(set(names)) != len(names):
    raise FeatureError(f"features must be some of {FEATURES} (each once), got {which!r}")
  return names


def eval_augmentation(description: dict[str, Any] | None = None, image_size: int | None = None,
                      config: Any = None) -> presets.Augmentation:
  """The deterministic view features are read through, normalised as the model expects.

  Args:
    description: a model.json (`checkpoint.load_model`'s second value); its input mean/std
      replace the preset's (ImageNet's) when given.
    image_size: None: `preset("eval")`, Resize(256) + CenterCrop(224). At most 64 px:
      `preset("eval_lowres", size=image_size)`, the whole image resized (28-32 px datasets).
      Otherwise `preset("eval", size=image_size)` (resize to size / 0.875, centre crop).
    config: an augmentation config (one eval view) to use instead of a preset.
  """
  if config is None:
    if image_size is None:
      config = presets.preset("eval")
    elif image_size <= LOWRES_MAX_SIZE:
      config = presets.preset("eval_lowres", size=int(image_size))
    else:
      config = presets.preset("eval", size=int(image_size))
  else:
    config = copy.deepcopy(config)
  views = config["views"]
  if len(views) != 1:
    raise FeatureError(f"the feature view must be one view, got {len(views)}")
  normalize = (description or {}).get("input")
  if normalize and views[0]["photometric"].get("normalize") is not None:
    views[0]["photometric"]["normalize"] = {"mean": tuple(normalize["mean"]),
                                            "std": tuple(normalize["std"])}
  return presets.Augmentation.from_config(config)


def eval_batches(source: sources.Source, augmentation: presets.Augmentation, *,
                 global_batch_size: int, sharding: jax.sharding.Sharding, seed: int = 0,
                 epoch: int = 0) -> Iterator[dict[str, Any]]:
  """The whole split in id order as global batches {"image", "label", "index", "mask"}.

  ceil(N / G) batches of G rows sharded by `sharding`; rows past the split's end (and rows of
  skipped, unreadable examples) are zeros with mask False. A view with random crops draws
  them from `pipeline.example_seed(seed, epoch, index)`, as training does.
  """
  tf = sources.tf
  count, index = jax.process_count(), jax.process_index()
  if global_batch_size % count:
    raise FeatureError(f"batch size {global_batch_size} is not divisible by the {count} "
                       "processes")
  local = global_batch_size // count
  n = source.num_examples
  if not n:
    raise sources.DataSourceError(f"{source} has no examples")
  num_batches = math.ceil(n / global_batch_size)
  seed_t = tf.constant(seed, tf.int64)

  def view(example):
    views = augmentation.host_views(
        example["image"], pipeline_lib.example_seed(seed_t, epoch, example["index"]))
    return {"image": views[0], "label": example["label"], "index": example["index"]}

  dataset = source.examples()
  if count > 1:  # Global row k goes to process (k // L) % P, as in the training pipeline.
    dataset = dataset.enumerate().filter(lambda k, _: (k // local) % count == index).map(
        lambda _, example: example)
  dataset = dataset.map(view, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  dataset = dataset.ignore_errors(log_warning=True).batch(local).prefetch(tf.data.AUTOTUNE)
  options = tf.data.Options()
  options.deterministic = True
  dataset = dataset.with_options(options)
  size = augmentation.sizes[0]
  empty = {"image": np.zeros((0, size, size, 3), np.uint8), "label": np.zeros((0,), np.int64),
           "index": np.zeros((0,), np.int64)}

  def put(array):
    shape = (global_batch_size,) + array.shape[1:]
    return jax.make_array_from_process_local_data(sharding, array, shape)

  chunks = dataset.as_numpy_iterator()
  for _ in range(num_batches):
    batch = next(chunks, empty)
    valid = len(batch["label"])
    pad = local - valid
    mask = np.arange(local) < valid
    yield {"image": put(np.pad(batch["image"], ((0, pad), (0, 0), (0, 0), (0, 0)))),
           "label": put(np.pad(batch["label"].astype(np.int32), (0, pad))),
           "index": put(np.pad(batch["index"].astype(np.int32), (0, pad))),
           "mask": put(mask)}


def _model_fingerprint(model_dir: storage.Path) -> dict[str, Any]:
  json_text = (model_dir / checkpoint.MODEL_JSON).read_text()
  state = model_dir / checkpoint.STATE_DIR
  if storage.is_local(model_dir):  # Nanosecond times: a model rewritten within a second.
    local = pathlib.Path(model_dir)
    stamps = sorted((str(p.relative_to(local)), p.stat().st_mtime_ns, p.stat().st_size)
                    for p in (local / checkpoint.STATE_DIR).rglob("*") if p.is_file())
  else:  # Cloud objects have times in seconds.
    stamps = sorted((f"{checkpoint.STATE_DIR}/{name}", (state / name).stat().mtime,
                     (state / name).stat().length) for name in storage.files(state))
  return {"model_json": hashlib.sha256(json_text.encode()).hexdigest(),
          "weights": hashlib.sha256(json.dumps(stamps).encode()).hexdigest()}


class FeatureExtractor:
  """One model directory, loaded and compiled once; `extract` gives a split's features."""

  def __init__(self, model_dir: str | os.PathLike, *,
               which: str | Sequence[str] = "backbone", image_size: int | None = None,
               augmentation: Any = None, batch_size: int = DEFAULT_BATCH_SIZE,
               mesh: jax.sharding.Mesh | None = None):
    """Loads the model (eval mode).

    Args:
      model_dir: a retro_jax model directory (converted teacher, trained or exported student).
      which: 'backbone', 'embedding' or both (a tuple): what `extract` returns.
      image_size: the eval view's side (see `eval_augmentation`).
      augmentation: an augmentation config of one view instead of the preset.
      batch_size: the global batch (a multiple of the device count).
      mesh: the device mesh (default: every device, one `data` axis).

    Raises:
      FeatureError: 'embedding' asked of a model without a head; a bad batch size.
      ModelDirectoryError: not a model directory.
    """
    self.which = check_which(which)
    self.model_dir = storage.path(model_dir)
    model, self.description = checkpoint.load_model(self.model_dir)
    if "embedding" in self.which and model.head is None:
      raise FeatureError(
          f"{self.model_dir} has no head, so it has no 'embedding': use features 'backbone' "
          f"(its {self.description['encoder']['architecture']} backbone, head_kind None)")
    self.augmentation = eval_augmentation(self.description, image_size, augmentation)
    self.mesh = mesh_lib.make_mesh() if mesh is None else mesh
    try:
      mesh_lib.check_global_batch(batch_size, self.mesh)
    except mesh_lib.MeshError as error:
      raise FeatureError(str(error)) from None
    self.batch_size = batch_size
    self.last_skipped = 0
    graphdef, state = nnx.split(model)
    self._state = jax.device_put(state, mesh_lib.replicated(self.mesh))
    view, which = self.augmentation, self.which

    @jax.jit
    def forward(state, images):
      out = nnx.merge(graphdef, state)(view.device_views(jax.random.key(0), (images,))[0])
      parts = {"backbone": out.features, "embedding": out.embedding}
      return jnp.concatenate([parts[name].astype(jnp.float32) for name in which], axis=1)

    self._forward = forward
    self.widths: tuple[int, ...] | None = None

  def _cache_path(self, cache_dir, dataset: str, split: str, data_dir) -> pathlib.Path:
    key = {"version": _CACHE_VERSION, "model_dir": str(self.model_dir),
           **_model_fingerprint(self.model_dir), "dataset": dataset, "split": split,
           "data_dir": None if data_dir is None else str(storage.path(data_dir)),
           "view": repr(self.augmentation), "which": list(self.which)}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    safe_split = "".join(c if c.isalnum() else "_" for c in split)
    return storage.path(cache_dir) / f"features_{safe_split}_{'+'.join(self.which)}_{digest}.npz"

  def extract(self, dataset: str, split: str | None, *, data_dir: str | os.PathLike | None = None,
              cache_dir: str | os.PathLike | None = None
              ) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """({name: float32 [N, D_name] for name in which}, int64 labels [N]) of a whole split.

    Args:
      dataset: 'tfds:NAME[:VERSION]' or 'folder:PATH' (`sources.open_source`).
      split: e.g. 'train', 'test', 'train[:10000]'.
      data_dir: the TFDS data directory.
      cache_dir: read from / write to an .npz cache there (None: no cache).
    """
    path = None
    if cache_dir is not None:
      path = self._cache_path(cache_dir, dataset, split or "", data_dir)
      if path.is_file():
        with path.open("rb") as file, np.load(file) as cached:
          log.info("features of %s %s from the cache %s", dataset, split, path)
          self.last_skipped = int(cached["skipped"])
          return {name: cached[name] for name in self.which}, cached["labels"]
    source = sources.open_source(dataset, split, data_dir)
    batches = eval_batches(source, self.augmentation, global_batch_size=self.batch_size,
                           sharding=mesh_lib.batch_sharding(self.mesh))
    joined, labels = knn.extract_features(lambda x: self._forward(self._state, x), batches)
    self.last_skipped = source.num_examples - len(labels)
    if self.last_skipped:
      log.warning("%s: %d unreadable examples skipped", source, self.last_skipped)
    widths = [self._width(name, joined.shape[1]) for name in self.which]
    parts = dict(zip(self.which, np.split(joined, np.cumsum(widths)[:-1], axis=1)))
    if path is not None and jax.process_index() == 0:
      path.parent.mkdir(parents=True, exist_ok=True)
      temporary = path.with_suffix(".tmp.npz")
      with temporary.open("wb") as file:
        np.savez(file, labels=labels, skipped=self.last_skipped, **parts)
      temporary.replace(path)  # Atomic: a killed run leaves no half-written cache entry.
    return parts, labels

  def _width(self, name: str, total: int) -> int:
    if len(self.which) == 1:
      return total
    if name == "backbone":
      return int(self.description["feature_width"])
    return total - int(self.description["feature_width"])


def split_features(model_dir: str | os.PathLike, *, dataset: str, split: str | None,
                   data_dir: str | os.PathLike | None = None, which: str = "backbone",
                   image_size: int | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
                   cache_dir: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(features float32 [N, D], labels int64 [N]) of every example of a split (one `which`).

  For several splits or both kinds of features, build one `FeatureExtractor` (one model
  load and one compilation).
  """
  extractor = FeatureExtractor(model_dir, which=which, image_size=image_size,
                               batch_size=batch_size)
  parts, labels = extractor.extract(dataset, split, data_dir=data_dir, cache_dir=cache_dir)
  return parts[which], labels
