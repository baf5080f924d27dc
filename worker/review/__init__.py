"""The moderator review page: queue, item pages with Grad-CAM, overrides, JSON API (``create_app``)."""
