"""Input pipelines: dataset sources, host and device augmentation, device hand-over."""
