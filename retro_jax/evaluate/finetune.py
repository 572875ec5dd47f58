"""Fine-tuning a model directory on a labelled dataset, or the augmented linear protocol.

`run(config, workdir)` is what `python -m retro_jax.main --config configs/finetune.py` calls
(`config.task == "finetune"`). It loads `config.init_checkpoint` (a model directory: an
exported student, a converted teacher), puts a new Linear(D, C) classifier on its pooled
backbone feature (`features='backbone'`) or its head's embedding (`'embedding'`: the pooled
adapter output of a Retro student, as the authors' linear evaluation), and trains with
cross-entropy on augmented views:

  * `freeze_backbone=False`: every weight is trained, batch norm in train mode (fine-tuning);
  * `freeze_backbone=True`: only the classifier, the network in eval mode throughout (batch
    norm frozen): the reference linear evaluation with its random crops and flips
    (DisCo/MoCo `main_lincls.py`, retro.md section 4.1; `configs/finetune.py:linear`).

`config.data.label_fraction` (a class-balanced fraction of the training labels) or
`config.data.split_file` (a SimCLR 1 % / 10 % file) makes it semi-supervised
(`retro_jax.evaluate.subsets`). At the end the test split is classified, every example, through
the eval view: top-1 and top-5 are printed, logged and returned. Outputs in WORKDIR:

  checkpoints/   Orbax training checkpoints (resume: rerun the same command)
  metrics.jsonl, tensorboard/   progress (loss, lr, train accuracy)
  finetuned/     the fine-tuned network as a model directory (`load_model`, `embed`, `evaluate`)
                 plus classifier.npz (kernel [D, C], bias [C]) named in its model.json
  results.json   the test accuracy
"""

from __future__ import annotations

import json
import logging
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from retro_jax import checkpoint
from retro_jax import report
from retro_jax import storage
from retro_jax.data import pipeline as pipeline_lib
from retro_jax.data import sources
from retro_jax.data.presets import Augmentation
from retro_jax.evaluate import features as features_lib
from retro_jax.evaluate import knn
from retro_jax.evaluate import subsets
from retro_jax.models.encoder import Encoder
from retro_jax.models.encoder import EncoderSpec
from retro_jax.train import mesh as mesh_lib
from retro_jax.train import optim
from retro_jax.train import run_record
from retro_jax.train.prefetch import DevicePrefetch
from retro_jax.train.progress import Progress
from retro_jax.user_errors import UserError

log = logging.getLogger(__name__)

CLASSIFIER_FILE = "classifier.npz"


class FinetuneError(UserError, ValueError):
  """A fine-tuning config or input that cannot work; found before any compute is spent."""


class Classifier(nnx.Module):
  """The loaded encoder plus a Linear classifier on its pooled feature or embedding."""

  def __init__(self, encoder: Encoder, width: int, num_classes: int, *, features: str,
               init_std: float, rngs: nnx.Rngs):
    self.encoder = encoder
    self.features = features
    self.fc = nnx.Linear(width, num_classes, kernel_init=nnx.initializers.normal(init_std),
                         bias_init=nnx.initializers.zeros, rngs=rngs)

  def __call__(self, images: jax.Array) -> jax.Array:
    out = self.encoder(images)
    return self.fc(out.features if self.features == "backbone" else out.embedding)


def _num_classes(config: ml_collections.ConfigDict, source: sources.Source) -> int:
  if config.num_classes:
    return int(config.num_classes)
  if isinstance(source, sources.FolderSource):
    return len(source.classes)
  if source.label_key is None:
    raise FinetuneError(f"{source} has no labels to fine-tune on")
  count = getattr(source.features[source.label_key], "num_classes", None)
  if not count:
    raise FinetuneError(f"{source}: the label feature does not give the number of classes; "
                        "set config.num_classes")
  return int(count)


def _train_source(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> sources.Source:
  data = config.data
  source = sources.open_source(data.dataset, data.train_split or None, data.data_dir or None)
  fraction, split_file = data.get("label_fraction") or 0.0, data.get("split_file") or ""
  if fraction and split_file:
    raise FinetuneError("data: set label_fraction or split_file, not both")
  if fraction:
    ids = subsets.balanced_subset(subsets.source_labels(source), fraction, seed=config.seed)
  elif split_file:
    ids = subsets.indices_of_files(subsets.read_split_file(split_file),
                                   subsets.source_file_names(source))
  else:
    return source
  subset = subsets.subset_source(source, ids, workdir / "subset")
  print(f"semi-supervised: {subset.num_examples} of {source.num_examples} labelled examples "
        f"({'fraction ' + str(fraction) if fraction else split_file})", flush=True)
  return subset


def _embedding_width(encoder: Encoder, size: int) -> int:
  graphdef, state = nnx.split(encoder)
  shape = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x).embedding, state,
                         jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))
  return int(shape.shape[-1])


def _with_normalisation(augmentation_config, description) -> Augmentation:
  config = augmentation_config.copy_and_resolve_references()
  mean_std = description.get("input")
  for view in config.views:
    if mean_std and view.photometric.get("normalize") is not None:
      view.photometric.normalize = {"mean": tuple(mean_std["mean"]),
                                    "std": tuple(mean_std["std"])}
  return Augmentation.from_config(config)


def _check_init_checkpoint(config: ml_collections.ConfigDict) -> None:
  if not config.init_checkpoint:
    raise FinetuneError("init_checkpoint is not set: pass --config.init_checkpoint=MODEL_DIR "
                        "(a model directory from `python -m retro_jax convert` or a training "
                        "run's WORKDIR/student)")
  checkpoint.read_description(config.init_checkpoint)  # ModelDirectoryError if not one


def build_classifier(config: ml_collections.ConfigDict, num_classes: int, image_size: int
                     ) -> tuple[Classifier, dict[str, Any]]:
  """The loaded model with a fresh classifier; its head is dropped unless features need it."""
  _check_init_checkpoint(config)
  if config.features not in features_lib.FEATURES:
    raise FinetuneError(f"features must be one of {features_lib.FEATURES}, got "
                        f"{config.features!r}")
  encoder, description = checkpoint.load_model(config.init_checkpoint)
  if config.features == "embedding":
    if encoder.head is None:
      raise FinetuneError(f"{config.init_checkpoint} has no head, so no 'embedding': set "
                          "features='backbone'")
    width = _embedding_width(encoder, image_size)
  else:
    encoder = Encoder(encoder.backbone)
    width = encoder.feature_width
  model = Classifier(encoder, width, num_classes, features=config.features,
                     init_std=config.classifier_init_std, rngs=nnx.Rngs(config.seed))
  return model, description


def _accuracy(logits: np.ndarray, labels: np.ndarray, num_classes: int) -> dict[str, float]:
  ranked = np.argsort(-logits, axis=1, kind="stable")[:, :min(5, num_classes)]
  hits = ranked == labels[:, None]
  result = {"test_top1": 100.0 * float(np.mean(hits[:, 0]))}
  if num_classes >= 5:
    result["test_top5"] = 100.0 * float(np.mean(np.any(hits, axis=1)))
  return result


def run(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *,
        allow_config_change: bool = False) -> dict[str, float]:
  """Fine-tunes (or resumes); returns the final metrics with test top-1 / top-5 (percent).

  A resume with a changed training-relevant config is refused unless `allow_config_change`
  (retro_jax/train/run_record.py).
  """
  workdir = storage.path(workdir)  # local (absolute) or gs://...
  workdir.mkdir(parents=True, exist_ok=True)
  _check_init_checkpoint(config)
  mesh = mesh_lib.make_mesh()
  global_batch = config.global_batch_size
  try:
    mesh_lib.check_global_batch(global_batch, mesh)
    mesh_lib.check_global_batch(config.eval_batch_size, mesh)
  except mesh_lib.MeshError as error:
    raise FinetuneError(str(error)) from None

  # Model and data, every user-input check before compiling anything.
  augmentation_config = config.data.augmentation
  eval_config = config.data.eval_augmentation
  if len(augmentation_config.views) != 1 or len(eval_config.views) != 1:
    raise FinetuneError("data.augmentation and data.eval_augmentation must have one view each")
  source = _train_source(config, workdir)
  num_classes = _num_classes(config, source)
  image_size = Augmentation.from_config(augmentation_config).sizes[0]
  model, description = build_classifier(config, num_classes, image_size)
  augmentation = _with_normalisation(augmentation_config, description)
  eval_view = _with_normalisation(eval_config, description)
  test_source = sources.open_source(config.data.dataset, config.data.test_split or None,
                                    config.data.data_dir or None)
  if source.num_examples < global_batch:
    raise FinetuneError(f"data: {source} has {source.num_examples} examples, fewer than one "
                        f"batch of {global_batch}")
  steps_per_epoch = source.num_examples // global_batch
  total_steps = int(config.total_steps or round(config.epochs * steps_per_epoch))

  frozen = bool(config.freeze_backbone)
  if frozen:
    model.eval()  # main_lincls.py: model.eval() throughout, batch norm frozen
    trainable = nnx.All(nnx.Param, nnx.PathContains("fc"))
  else:
    model.train()
    trainable = optim.trainable_filter()
  tx, schedules = optim.build_optimizer(config.optimizer, steps_per_epoch=steps_per_epoch,
                                        total_steps=total_steps,
                                        global_batch_size=global_batch)
  graphdef, params, rest = nnx.split(model, trainable, ...)
  replicated = mesh_lib.replicated(mesh)
  state = jax.device_put({"step": jnp.zeros((), jnp.int32), "params": params, "rest": rest,
                          "opt_state": tx.init(params)}, replicated)
  count = sum(x.size for x in jax.tree.leaves(params))
  print(f"fine-tuning {config.init_checkpoint} ({'classifier only, network frozen' if frozen else 'all weights'}, "
        f"features {config.features}): {count:,} trainable parameters, {num_classes} classes, "
        f"{total_steps} steps of {global_batch}", flush=True)

  identity = {"init_checkpoint": str(storage.path(config.init_checkpoint)),
              "freeze_backbone": frozen, "features": config.features}
  checkpoints = checkpoint.TrainCheckpoints(workdir, every_steps=config.checkpoint_every_steps,
                                            keep=config.keep_checkpoints)
  resume_record = run_record.ResumeRecord(config, allow_change=allow_config_change)

  def check_resume(step: int, record: dict[str, Any]) -> None:
    if record.get("run") != identity:
      raise FinetuneError(f"checkpoint {checkpoints.directory / str(step)} belongs to another "
                          f"run ({record.get('run')}); this one is {identity}: use a new workdir")
    resume_record.check(step, record)

  start_step = 0
  resumed = checkpoints.restore_newest(state, check_resume)  # the fresh state's shapes
  if resumed is not None:
    state, record = resumed
    start_step = int(record["step"])
    print(f"resuming from step {start_step} ({checkpoints.directory})", flush=True)
  if jax.process_index() == 0:  # every check has passed: the run's record
    resume_record.write(workdir, start_step)
  config_record = run_record.checkpoint_fields(config)

  batch_sharding = mesh_lib.batch_sharding(mesh)
  seed = config.seed

  def train_step(state, batch):
    key = jax.random.fold_in(jax.random.key(seed), state["step"])
    images = augmentation.device_views(key, batch["views"], batch["index"])[0]
    labels = batch["label"]

    def loss_fn(params):
      model = nnx.merge(graphdef, params, state["rest"], copy=True)
      logits = model(images)
      loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))
      _, _, new_rest = nnx.split(model, trainable, ...)
      return loss, (new_rest, jnp.mean(jnp.argmax(logits, -1) == labels))

    (loss, (rest, accuracy)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    new_state = {"step": state["step"] + 1, "params": optax.apply_updates(state["params"],
                                                                          updates),
                 "rest": rest, "opt_state": opt_state}
    return new_state, {"loss": loss, "train_top1": 100.0 * accuracy}

  step_fn = jax.jit(train_step, in_shardings=(replicated, batch_sharding),
                    out_shardings=(replicated, None), donate_argnums=(0,))
  metrics: dict[str, Any] = {}
  if start_step < total_steps:
    # The next batch is read and placed while the current step runs (train/prefetch.py).
    batches = DevicePrefetch(pipeline_lib.make_pipeline(
        source, augmentation.host_views, global_batch_size=global_batch, seed=seed,
        sharding=batch_sharding, start_step=start_step,
        shuffle_buffer=config.data.get("shuffle_buffer", pipeline_lib.DEFAULT_SHUFFLE_BUFFER)),
        count=max(0, total_steps - start_step))
    progress = Progress(workdir, total_steps=total_steps, steps_per_epoch=steps_per_epoch,
                        global_batch=global_batch, every=config.log_every_steps,
                        schedules=schedules)
    try:
      for step in range(start_step, total_steps):
        batch = next(batches)
        started = time.perf_counter()
        state, metrics = step_fn(state, batch)
        if step == start_step:
          jax.block_until_ready(metrics)
          print(f"first step (compile + run): {time.perf_counter() - started:.1f} s",
                flush=True)
        progress.update(step + 1, metrics, skipped=batches.skipped_count)
        checkpoints.save(step + 1, state, {"step": step + 1, "run": identity, **config_record},
                         force=step + 1 == total_steps)
    finally:
      checkpoints.close()
      progress.close()
  else:
    checkpoints.close()

  # Test accuracy over every example of the test split, eval mode.
  model = nnx.merge(graphdef, state["params"], state["rest"])
  model.eval()
  eval_graphdef, eval_state = nnx.split(model)

  @jax.jit
  def logits_fn(eval_state, images):
    images = eval_view.device_views(jax.random.key(0), (images,))[0]
    return nnx.merge(eval_graphdef, eval_state)(images)

  batches = features_lib.eval_batches(test_source, eval_view,
                                      global_batch_size=config.eval_batch_size,
                                      sharding=batch_sharding)
  logits, labels = knn.extract_features(lambda x: logits_fn(eval_state, x), batches)
  result = {name: float(value) for name, value in jax.device_get(metrics).items()}
  result.update(_accuracy(logits, labels, num_classes))
  print("test: " + ", ".join(f"{k} {v:.2f}" for k, v in result.items() if k.startswith("test")),
        flush=True)
  # The Orbax save is collective: every process writes the fine-tuned model.
  _save(workdir, model, description, config, num_classes, int(state["step"]))
  if jax.process_index() == 0:  # the run's other files: process 0
    (workdir / "results.json").write_text(json.dumps(
        {**result, "test_examples": int(len(labels)), "num_classes": num_classes,
         "train_examples": source.num_examples, **identity}, indent=2) + "\n")
    try:
      print(f"report: {report.write_report(workdir, extra=result)}", flush=True)
    except report.ReportError as error:
      print(f"report: not written: {error}", flush=True)
  return result


def _save(workdir: pathlib.Path, model: Classifier, description: dict[str, Any],
          config: ml_collections.ConfigDict, num_classes: int, step: int) -> None:
  spec = EncoderSpec.from_json(description["encoder"])
  if model.encoder.head is None:
    spec = EncoderSpec(spec.architecture, spec.backbone_kwargs)
  out = workdir / "finetuned"
  info = {"input": description.get("input"),
          "source": {"format": "retro_jax.finetune", "init_checkpoint":
                     str(storage.path(config.init_checkpoint)), "step": step,
                     "freeze_backbone": bool(config.freeze_backbone)},
          "classifier": {"file": CLASSIFIER_FILE, "features": config.features,
                         "num_classes": num_classes}}
  checkpoint.save_model(out, model.encoder, spec, info, overwrite=True)  # on every process
  if jax.process_index() == 0:
    with (out / CLASSIFIER_FILE).open("wb") as file:
      np.savez(file, kernel=np.asarray(model.fc.kernel.get_value()),
               bias=np.asarray(model.fc.bias.get_value()))
    print(f"fine-tuned model: {out} (+ {CLASSIFIER_FILE})", flush=True)
