"""Scoring a batch: models, checkpoints, the scorer, micro-batching and policy."""
