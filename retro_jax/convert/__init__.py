"""PyTorch checkpoints <-> Flax NNX models.

`state_dict` holds the generic, rule-based mapping between a torch state dict and an NNX
model whose attribute tree mirrors the torch module tree; the format modules only rename keys.
"""
