"""Evaluation of frozen features and fine-tuning.

  knn       weighted k-NN (DINO's), shared by the offline evaluation and the online monitor
  features  a split's features from a model directory, every example, optional cache
  linear    linear probe on cached features (the reference SGD recipe)
  subsets   class-balanced label fractions and SimCLR split files (semi-supervised)
  finetune  fine-tuning (or the augmented linear protocol) from a model directory
  cli       `python -m retro_jax.evaluate` and `evaluate_model`
"""

# The `python -m retro_jax evaluate` subcommand; importing it loads neither JAX nor TF.
from retro_jax.evaluate.cli import main

__all__ = ["main"]
