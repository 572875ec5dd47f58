"""Training: state, step construction, sharding, optimisers and schedules, checkpoints, loop."""
