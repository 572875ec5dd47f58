"""retro_jax: self-supervised distillation of lightweight vision models in JAX/Flax.

Objectives: Retro (the student reuses the teacher's frozen projection head through a
dimension adapter) and RoB (one branch of DINO/MSN replaced by a frozen teacher), with the
DisCo, MoCo-v2 and DINO baselines. Command-line entry point: `python -m retro_jax --help`.
"""

from importlib import metadata as _metadata

try:
  __version__ = _metadata.version("retro_jax")
except _metadata.PackageNotFoundError:  # Running from a source tree that is not installed.
  __version__ = "0+unknown"


def __getattr__(name):
  # Loaded on first use: `import retro_jax` stays free of JAX (the CLI's start-up).
  if name == "load_student":
    from retro_jax.pretrained import load_student  # pylint: disable=import-outside-toplevel
    return load_student
  raise AttributeError(f"module 'retro_jax' has no attribute {name!r}")
