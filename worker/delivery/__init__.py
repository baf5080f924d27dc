"""Decisions out: the decision store, dead letters and callbacks."""
