"""MoCo-style methods with per-group batch norm and MoCo's shuffle-BN for the key encoder.

Tiny models: ResNet-18 of width 8 on 16 px images (feature width 64), heads 64 -> 32 -> 16.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from retro_jax.models.batch_norm import BatchNorm
from retro_jax.models.batch_norm import set_batch_groups
from retro_jax.models.encoder import EncoderSpec
from retro_jax.models.encoder import build_encoder
from retro_jax.objectives import disco
from retro_jax.objectives import mocov2
from retro_jax.objectives import retro
from retro_jax.train import loop
from retro_jax.train import mesh as mesh_lib
from retro_jax.train import recipes
from retro_jax.train.contrastive_methods import ContrastiveMethod
from retro_jax.train.contrastive_methods import shuffle_batch
from retro_jax.train.contrastive_methods import unshuffle_batch

STUDENT = {"width": 8, "low_res_stem": True}


def _mocov2(groups: int) -> ContrastiveMethod:
  return ContrastiveMethod("mocov2", mocov2.Config(queue_size=32, embed_dim=16), "resnet18",
                           STUDENT, head_hidden=32, bn_groups=groups)


def _images(batch: int, seed: int = 0) -> jax.Array:
  return jax.random.normal(jax.random.key(seed), (batch, 16, 16, 3))


def _groups_of_every_batch_norm(module) -> list[int]:
  return [m.batch_groups for _, m in nnx.iter_modules(module) if isinstance(m, BatchNorm)]


def test_unshuffle_restores_the_order_exactly():
  x = jnp.arange(16 * 3, dtype=jnp.float32).reshape(16, 3)
  key = jax.random.key(3)
  shuffled, order = shuffle_batch(key, x)
  assert sorted(np.asarray(order).tolist()) == list(range(16))
  assert not np.array_equal(shuffled, x)
  np.testing.assert_array_equal(shuffled, x[order])
  np.testing.assert_array_equal(unshuffle_batch(shuffled, order), x)
  np.testing.assert_array_equal(shuffle_batch(key, x)[1], order)  # reproducible from the key


def test_build_sets_the_groups_on_student_keys_and_teacher():
  teacher = build_encoder(EncoderSpec("resnet18", STUDENT, "mlp", {"dims": [64, 64, 16]}),
                          rngs=nnx.Rngs(1))
  method = ContrastiveMethod("disco", disco.Config(queue_size=32, embed_dim=16), "resnet18",
                             STUDENT, head_hidden=32, bn_groups=4)
  model = method.build(teacher, rngs=nnx.Rngs(0))
  assert len(_groups_of_every_batch_norm(model.backbone)) == 20
  assert set(_groups_of_every_batch_norm(model)) == {4}
  assert set(_groups_of_every_batch_norm(teacher)) == {4}
  assert set(_groups_of_every_batch_norm(_mocov2(1).build(None, rngs=nnx.Rngs(0)))) == {1}


def test_shuffled_keys_are_per_group_forwards_of_the_permuted_batch():
  """k = unshuffle(ema(shuffle(x))) with 4 BN groups, against 4 one-group copies."""
  method = _mocov2(4)
  model = method.build(None, rngs=nnx.Rngs(0))
  model.train()
  x, key = _images(8), jax.random.key(7)
  reference = nnx.clone(model)
  keys = nnx.jit(lambda model, x, key: method._keys(model, None, x, key))(model, x, key)

  order = jax.random.permutation(key, 8)
  shuffled = x[order]
  set_batch_groups(reference, 1)
  embed = nnx.jit(lambda model, x: model.ema_head(model.ema_backbone(x).pooled))
  copies = [nnx.clone(reference) for _ in range(4)]
  pieces = jnp.concatenate([embed(c, shuffled[2 * g:2 * g + 2]) for g, c in enumerate(copies)])
  expected = jnp.zeros_like(pieces).at[order].set(pieces)  # example order[i] got pieces[i]
  np.testing.assert_allclose(keys, expected, atol=1e-5, rtol=1e-5)
  # The key encoder's running statistics: the mean of the groups' (the student's untouched).
  stats = jax.tree.map(lambda *s: np.mean(s, 0),
                       *[nnx.state(c.ema_backbone, nnx.BatchStat) for c in copies])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5),
               nnx.state(model.ema_backbone, nnx.BatchStat), stats)
  jax.tree.map(np.testing.assert_array_equal, nnx.state(model.backbone, nnx.BatchStat),
               nnx.state(reference.backbone, nnx.BatchStat))


def test_one_group_skips_the_shuffle():
  method = _mocov2(1)
  model = method.build(None, rngs=nnx.Rngs(0))
  model.train()
  x = _images(8)
  plain = nnx.jit(lambda m, x: method._student_embedding(m, None, x, ema=True))(
      nnx.clone(model), x)
  keys = nnx.jit(lambda m, x: method._keys(m, None, x, None))(model, x)
  np.testing.assert_array_equal(keys, plain)


def test_stacked_views_equal_separate_forwards():
  """One forward of both views (stack_views) = two forwards: gradients and BN statistics.

  Retro (its adapter's BN is in the stack too) with 2 BN groups per view.
  """
  teacher = build_encoder(EncoderSpec("resnet18", STUDENT, "mlp", {"dims": [64, 64, 16]}),
                          rngs=nnx.Rngs(1))
  teacher.eval()
  objective = retro.Config(queue_size=32, embed_dim=16)
  methods = [ContrastiveMethod("retro", objective, "resnet18", STUDENT, head_hidden=32,
                               bn_groups=2, stack_views=stack) for stack in (True, False)]
  model = methods[0].build(teacher, rngs=nnx.Rngs(0))
  model.train()
  graphdef, params, rest = nnx.split(model, methods[0].trainable_filter(), ...)
  views = (_images(8, 1), _images(8, 2))
  queue = methods[0].init_state(jax.random.key(1))

  def run(method):
    def loss(params):
      model = nnx.merge(graphdef, params, rest, copy=True)
      value = method.loss(model, teacher, views, queue, key=jax.random.key(5))[0]
      return value, nnx.state(model, nnx.BatchStat)
    return jax.jit(jax.grad(loss, has_aux=True))(params)

  (grads, stats), (grads_separate, stats_separate) = run(methods[0]), run(methods[1])
  # Float32 rounding only (other reduction orders): each tensor within 1e-5 of its norm.
  for got, want in ((grads, grads_separate), (stats, stats_separate)):
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(b) + 1e-7
  # And the statistics compared did move: the equality above is not of two untouched trees.
  before = jax.tree.leaves(nnx.state(model.backbone, nnx.BatchStat))
  after = jax.tree.leaves(stats["backbone"])
  assert all(not np.allclose(a, b) for a, b in zip(before[:2], after[:2]))


@pytest.mark.slow
def test_grouped_loss_under_jit_with_the_batch_sharded_over_8_devices():
  """Per-device BN and shuffle-BN on 8 devices: the loss of the unsharded computation."""
  groups = len(jax.devices())
  method = _mocov2(groups)
  model = method.build(None, rngs=nnx.Rngs(0))
  model.train()
  graphdef, state = nnx.split(model)
  queue = method.init_state(jax.random.key(1))
  views = (_images(2 * groups, 1), _images(2 * groups, 2))

  @jax.jit
  def loss(state, views, key):
    model = nnx.merge(graphdef, state)
    return method.loss(model, None, views, queue, key=key)[0]

  key = jax.random.key(11)
  expected = loss(state, views, key)
  mesh = mesh_lib.make_mesh(jax.devices())
  sharded = loss(jax.device_put(state, mesh_lib.replicated(mesh)),
                 jax.device_put(views, mesh_lib.batch_sharding(mesh)), key)
  np.testing.assert_allclose(sharded, expected, rtol=1e-5)
  assert float(loss(state, views, jax.random.key(12))) != float(expected)  # the shuffle acts
  with pytest.raises(ValueError, match="random key"):
    method.loss(nnx.merge(graphdef, state), None, views, queue)


def test_bad_groups_are_refused():
  for bad in (0, -1, 2.5, True):
    with pytest.raises(ValueError, match="bn_groups must be a positive integer"):
      _mocov2(bad)
  config = recipes.smoke(recipes.contrastive_config("mocov2", "resnet18",
                                                    optimizer="moco_v2"))
  assert config.student.bn_groups == 1 and config.global_batch_size == 16
  objective = loop.objective_config(config)
  for bad, message in ((3, "student.bn_groups: 3 does not divide global_batch_size 16"),
                       (0, "student.bn_groups: 0 is not a positive integer")):
    config.student.bn_groups = bad
    with pytest.raises(loop.ConfigError, match=message):
      loop.build_method(config, objective, steps_per_epoch=1, total_steps=1)
  config.student.bn_groups = 8
  method = loop.build_method(config, objective, steps_per_epoch=1, total_steps=1)
  assert method.bn_groups == 8
