"""How far one train-mode gradient on 1 device is from the same on 8, batch after batch.

    python benchmarks/layout_gradient_gap.py            # batches 0..11, about 4 min on 2 cores
    python benchmarks/layout_gradient_gap.py 0 3        # batches 0..2

The step of `tests/train/test_engine.py::test_one_and_eight_devices_give_the_same_parameters`
(Retro, ResNet-18 student and teacher, low-res stem, 2 views of 16 x 16 px, global batch 16),
on 8 simulated CPU devices, with flax's one-pass BatchNorm variance (E[x^2] - E[x]^2, our
models' setting) and with the two-pass one (`use_fast_variance=False`). Per batch it prints
the relative norm of the gradient difference 1 vs 8 devices, overall and for the worst leaf.

What it showed (jax 0.10.2, flax 0.12.8, 12 batches): two levels. ~6e-6 (rounding) when no
ReLU gate flips; 2e-4 to 7e-3 (worst leaf up to 1.2e-2) when one pre-activation within ~1e-6
of zero lands on the other side of a ReLU on one layout. One-pass: 11 of 12 batches flipped;
two-pass: 7 of 12. The variance formula changes how often, not how much.
"""

from __future__ import annotations

import os
import sys

os.environ["XLA_FLAGS"] = " ".join(
    [f for f in os.environ.get("XLA_FLAGS", "").split()
     if not f.startswith("--xla_force_host_platform_device_count")]
    + ["--xla_force_host_platform_device_count=8"])
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from retro_jax.models.encoder import EncoderSpec  # noqa: E402
from retro_jax.models.encoder import build_encoder  # noqa: E402
from retro_jax.objectives import retro  # noqa: E402
from retro_jax.train import mesh as mesh_lib  # noqa: E402
from retro_jax.train.contrastive_methods import ContrastiveMethod  # noqa: E402


def gradient_functions():
  """(variance kind, device count) -> (jitted views -> gradients)."""
  teacher = build_encoder(EncoderSpec("resnet18", {"low_res_stem": True}, "mlp",
                                      {"dims": [512, 512, 128]}), rngs=nnx.Rngs(5))
  teacher.eval()
  method = ContrastiveMethod("retro", retro.Config(queue_size=32), "resnet18",
                             {"low_res_stem": True})
  teacher_graphdef, teacher_state = nnx.split(teacher)
  objective = method.init_state(jax.random.key(1))
  functions = {}
  for kind in ("one-pass", "two-pass"):
    model = method.build(teacher, rngs=nnx.Rngs(0))
    model.train()
    for _, module in nnx.iter_modules(model):
      if isinstance(module, nnx.BatchNorm):
        module.use_fast_variance = kind == "one-pass"
    graphdef, trainable, rest = nnx.split(model, method.trainable_filter(), ...)

    def grad(trainable, rest, teacher_state, objective, views, graphdef=graphdef):
      views = tuple(v.astype(jnp.float32) / 255.0 for v in views)

      def loss(trainable):
        model = nnx.merge(graphdef, trainable, rest, copy=True)
        teacher = nnx.merge(teacher_graphdef, teacher_state, copy=True)
        return method.loss(model, teacher, views, objective, step=0, key=jax.random.key(3))[0]

      return jax.grad(loss)(trainable)

    for count in (1, 8):
      mesh = mesh_lib.make_mesh(jax.devices()[:count])
      replicated, by_batch = mesh_lib.replicated(mesh), mesh_lib.batch_sharding(mesh)
      jitted = jax.jit(grad, in_shardings=(replicated,) * 4 + (by_batch,),
                       out_shardings=replicated)
      fixed = jax.device_put((trainable, rest, teacher_state, objective), replicated)
      functions[kind, count] = (
          lambda views, jitted=jitted, fixed=fixed, by_batch=by_batch:
          jax.device_get(jitted(*fixed, jax.device_put(views, by_batch))))
  return functions


def gap(a, b) -> tuple[float, float]:
  """Relative norm of a - b: over all leaves, and for the worst leaf."""
  pairs = [(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))]
  total = np.sqrt(sum(np.sum((x - y) ** 2) for x, y in pairs))
  norm = np.sqrt(sum(np.sum(y ** 2) for _, y in pairs))
  return total / norm, max(np.linalg.norm(x - y) / np.linalg.norm(y) for x, y in pairs)


def main(first: int = 0, stop: int = 12) -> None:
  functions = gradient_functions()
  for seed in range(first, stop):
    # Batch 0 is the engine test's batch.
    rng = np.random.default_rng(seed)
    views = tuple(rng.integers(0, 256, (16, 16, 16, 3), dtype=np.uint8) for _ in range(2))
    row = [f"batch {seed:2d}"]
    for kind in ("one-pass", "two-pass"):
      total, leaf = gap(functions[kind, 8](views), functions[kind, 1](views))
      row.append(f"{kind}: 1 vs 8 devices {total:.1e} (worst leaf {leaf:.1e})")
    print(" | ".join(row), flush=True)


if __name__ == "__main__":
  main(*map(int, sys.argv[1:3]))
