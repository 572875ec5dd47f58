"""Evaluation of frozen features: weighted k-NN (`knn`); linear probe and fine-tuning to come."""
