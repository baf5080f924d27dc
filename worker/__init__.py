"""Scoring path and the pieces training shares with it."""
