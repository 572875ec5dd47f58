"""PyTorch checkpoints <-> Flax NNX models, and the `python -m retro_jax.convert` CLI.

`state_dict` holds the generic, rule-based mapping between a torch state dict and an NNX
model whose attribute tree mirrors the torch module tree; `formats` only sorts a file's
entries into backbone and head; `cli` is the command.
"""

from retro_jax.convert.cli import main

__all__ = ["main"]
