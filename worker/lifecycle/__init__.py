"""Model lifecycle: the registry, hot reload and shadow scoring."""
