"""Wiring one worker process: the Celery app, the runtime and the supervisor."""
