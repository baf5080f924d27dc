"""Events in: the producer API and the stream contract."""
