"""The HTTP API for producers and readers (``moderation api``): submit events, read decisions, score one
synchronously.

``create_app`` builds the FastAPI app; routes in :mod:`worker.api.routes`, bearer tokens in
:mod:`worker.api.tokens`, request and response models in :mod:`worker.api.schemas`.
"""
