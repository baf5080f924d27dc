"""Metrics, logs and error tracking."""
