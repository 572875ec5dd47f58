"""Input pipelines: dataset sources, host and device augmentation, device hand-over."""

# The `python -m retro_jax data` subcommand; importing it loads neither TF nor TFDS.
from retro_jax.data.cli import main

__all__ = ["main"]
