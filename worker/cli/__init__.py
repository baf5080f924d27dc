"""The ``moderation`` command: the root registers each command group."""
