"""Distilling teacher scores into new checkpoints."""
