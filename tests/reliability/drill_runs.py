"""The fault drills' runs: tests/reliability/tiny_retro.py through the CLI, with a teacher
model directory saved from the config's own random teacher spec."""

from __future__ import annotations

import hashlib
import pathlib

import jax
import jax.numpy as jnp
from flax import nnx

from retro_jax import checkpoint
from retro_jax.data import presets
from retro_jax.models.encoder import EncoderSpec
from retro_jax.models.encoder import build_encoder

import tiny_retro

CONFIG = pathlib.Path(__file__).with_name("tiny_retro.py")
# The config's random teacher, as a model directory (with the statistics the views have).
TEACHER_SPEC = EncoderSpec.from_json(tiny_retro.TEACHER)


def save_teacher(directory: pathlib.Path, seed: int, *, nan: bool = False) -> pathlib.Path:
  model = build_encoder(TEACHER_SPEC, rngs=nnx.Rngs(seed))
  if nan:  # a teacher converted from a diverged checkpoint
    nnx.update(model, jax.tree.map(lambda x: jnp.full_like(x, jnp.nan),
                                   nnx.state(model, nnx.Param)))
  return checkpoint.save_model(
      directory, model, TEACHER_SPEC,
      {"input": {"mean": list(presets.IMAGENET_MEAN), "std": list(presets.IMAGENET_STD)}},
      overwrite=True)


def run_args(workdir, data_dir, teacher, *overrides) -> list[str]:
  return ["--config", str(CONFIG), "--workdir", str(workdir),
          f"--config.data.data_dir={data_dir}", f"--config.teacher.checkpoint={teacher}",
          "--config.total_steps=2", "--config.checkpoint_every_steps=1",
          "--config.monitor.every_steps=0", *overrides]


def checksums(directory: pathlib.Path) -> dict[str, str]:
  return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(directory.rglob("*")) if p.is_file()}


def student_weights(workdir: pathlib.Path):
  model, _ = checkpoint.load_model(workdir / "student")
  return jax.tree.leaves(nnx.state(model, (nnx.Param, nnx.BatchStat)))
